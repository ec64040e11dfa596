"""Quantization error with text-only versus multimodal calibration, on the embedded default.

    .venv/bin/python benchmarks/calibration_compare.py [--ckpt DIR] [--samples 16] [--json F]

Same prompts, same count, same formats; the only difference is whether the calibration prompts
carry their images (embeddings from the reference vision tower at the <|vision_pad|> positions) or
are the same prompts with the images removed. Error is measured on the held-out fidelity prompts
(multimodal + one text-only) against the unquantized reference: max and mean |Δlogit| relative to
max |logit|, and top-1 agreement at text positions; also the error at image positions, where the
activations differ most between the two calibrations.
"""

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    from builder.calibration import builtin_samples, embed_samples
    from builder.fidelity import decoder_logits, logit_errors, prepare_prompts
    from builder.llm_build import quantize
    from runtime.core.demo_checkpoint import write_demo_checkpoint
    from runtime.core.llm_formats import LLMBuildOptions, get_format
    from runtime.reference import reference_model
    from runtime.tokenizer import NVLMTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    ckpt = args.ckpt or write_demo_checkpoint(Path(tempfile.mkdtemp()) / "demo")
    ref = reference_model(ckpt)
    tok = NVLMTokenizer.from_dir(ckpt)
    runs = prepare_prompts(ref, tok)
    base = [decoder_logits(ref.llm, r) for r in runs]
    samples = builtin_samples(args.samples, seed=7)
    rows = []
    for fmt in ("fp8", "int4_awq", "w4a8_awq"):
        for mode in ("text-only", "multimodal"):
            embeds = list(embed_samples(samples, ref, tok, text_only=mode == "text-only"))
            model = quantize(ref, LLMBuildOptions(get_format(fmt), kv_cache_fp8=fmt == "fp8"), embeds)
            a, b = torch.cat([decoder_logits(model, r) for r in runs]), torch.cat(base)
            text = torch.cat([r.text for r in runs])
            rows.append({"format": fmt + (" + fp8 kv" if fmt == "fp8" else ""), "calibration": mode,
                         **logit_errors(a, b, text),
                         "image_positions_mean_rel": float((a - b)[~text].abs().mean() / b.abs().max())})
    print(f"{'format':<16}{'calibration':<12}{'max rel':>9}{'mean rel':>10}{'img mean':>10}{'top-1':>7}")
    for r in rows:
        print(f"{r['format']:<16}{r['calibration']:<12}{r['max_rel']:>9.4f}{r['mean_rel']:>10.5f}"
              f"{r['image_positions_mean_rel']:>10.5f}{r['top1_text']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "calibration_compare", "date": time.strftime("%Y-%m-%d"),
                                         "samples": args.samples, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
