"""The cost argument for NVLM-X and NVLM-H against NVLM-D, in one run.

    .venv/bin/python benchmarks/family_cost.py [--repeats 5] [--threads 2] [--json F]

For 72B (tests/fixtures/nvlm_{d,x,h}_72b_config.json), from the cost model (`runtime.core.inspect.request_shape`,
`clients.roofline`): decoder sequence length, cross-attention keys, prefill TFLOPs of the decoder (vision
excluded: it is the same for all three) and the request's KV cache (self-attention + cross-attention,
bf16), for one image of 1, 4 and 7 tiles and 64 text tokens. Then the embedded defaults (same dimensions for
D, X and H) measured side by side on this CPU: the reference's prefill over a one-image prompt (fastest of
`--repeats`, vision encoding timed separately and subtracted), with random pre-normalized tiles.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TILES = (1, 4, 7)
TEXT_TOKENS = 64


def model_rows():
    from clients.roofline import prefill_flops
    from runtime.core.families import from_hf
    from runtime.core.inspect import cross_kv_bytes_per_key, kv_bytes_per_token, request_shape

    rows = []
    for v in "dxh":
        cfg = from_hf(json.loads((ROOT / f"tests/fixtures/nvlm_{v}_72b_config.json").read_text()))
        for t in TILES:
            s = request_shape(cfg, [t], TEXT_TOKENS)
            kv = s.decoder_tokens * kv_bytes_per_token(cfg, 2) + s.key_tokens * cross_kv_bytes_per_key(cfg, 2)
            rows.append({"family": cfg.family, "tiles": t, "decoder_tokens": s.decoder_tokens, "keys": s.key_tokens,
                         "prefill_tflop": prefill_flops(cfg, s.decoder_tokens, s.key_tokens) / 1e12,
                         "kv_cache_mb": kv / 1e6})
    return rows


def measured_rows(repeats: int):
    import torch

    from runtime.core.demo_checkpoint import write_demo_checkpoint
    from runtime.core.families import family_for
    from runtime.prompt import build_prompt
    from runtime.reference import reference_model
    from runtime.tokenizer import NVLMTokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in "dxh":
            path = write_demo_checkpoint(Path(tmp) / v, variant=v)
            model, tok = reference_model(path), NVLMTokenizer.from_dir(path)
            layout = family_for(model.cfg).prompt_layout
            for t in TILES:
                pv = torch.randn(t, 3, 448, 448, generator=torch.Generator().manual_seed(t))
                pr = build_prompt(tok, "<image>\nWhat shapes are in this picture, and what colour is each?", [t],
                                  tokens_per_tile=model.cfg.preprocess.tokens_per_tile, layout=layout)
                ids = torch.tensor([pr.input_ids])
                kw = {"cross": pr.cross} if pr.cross else {}

                def total():
                    model.logits(ids, pv, image_token_id=tok.image_pad_id, **kw)

                def vision():
                    model.encode_images(pv)

                total()  # warm-up
                times = {"total": [], "vision": []}
                for _ in range(repeats):
                    for name, fn in (("total", total), ("vision", vision)):
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
                tot, vis = min(times["total"]), min(times["vision"])  # the least disturbed run on a shared CPU
                rows.append({"family": model.cfg.family, "tiles": t, "decoder_tokens": len(pr.input_ids),
                             "keys": pr.cross.num_keys if pr.cross else 0, "prefill_ms": 1e3 * (tot - vis),
                             "vision_ms": 1e3 * vis})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    model, measured = model_rows(), measured_rows(a.repeats)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, torch threads {a.threads}")
    print("\n72B, one image, 64 text tokens (cost model; KV bf16):\n")
    print("| family | tiles | decoder tokens | keys | decoder prefill TFLOP | KV cache MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in model:
        print(f"| {r['family']} | {r['tiles']} | {r['decoder_tokens']:,} | {r['keys']:,} | {r['prefill_tflop']:.1f} "
              f"| {r['kv_cache_mb']:.0f} |")
    base = {r["tiles"]: r["prefill_ms"] for r in measured if r["family"] == "nvlm-d"}
    print("\nEmbedded defaults on this CPU (reference, one image; prefill = logits − vision encoding):\n")
    print("| family | tiles | decoder tokens | keys | prefill ms | vs D | vision ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in measured:
        print(f"| {r['family']} | {r['tiles']} | {r['decoder_tokens']:,} | {r['keys']:,} | {r['prefill_ms']:.1f} "
              f"| {r['prefill_ms'] / base[r['tiles']]:.2f}× | {r['vision_ms']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"model_72b": model, "embedded": measured}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
