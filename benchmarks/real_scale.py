"""Build stages on checkpoints with NVLM-72B's real tensor shapes and few layers: time and peak memory.

    .venv/bin/python benchmarks/real_scale.py --work DIR [--family d|x|h] [--depths 1:2,3:6]
        [--stages inspect,llm-bf16-stream,vision-fp16,llm-bf16,llm-fp8,llm-int4] [--rss-limit-gb 20] [--json F]

A slice is a checkpoint in the released layout (tests/fixtures/nvlm_{d,x,h}_72b_config.json: LLM hidden 8192,
MLP 29568, 64/8 heads, vocabulary 152064; InternViT hidden 3200, MLP 12800, 25 heads + 7 padding heads; mlp1
12800 → 29568 → 8192) with `decoder:vision` layers, the release's stored dtypes (F32 q/k/v, bf16 beside them),
random weights and NVLM-D-72B's own tokenizer (tests/fixtures/release). Embeddings and lm_head are the real
2.49 GB tensors. Each stage runs as its own `nvlm-build` process; its resident set is sampled every 0.1 s
(/proc/PID/status) and the process is killed past --rss-limit-gb, so that an out-of-memory stage is reported
instead of taking the machine down. Per stage: wall time, peak RSS, exit status; with two depths, the slope
per layer and the extrapolation to 80 decoder and 45 vision layers (NVLM-D-72B). Results: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the project's entry point; on a host without the project's .venv (the GPU check) the same CLI through python
NB = ([str(ROOT / ".venv" / "bin" / "nvlm-build")] if (ROOT / ".venv" / "bin" / "nvlm-build").exists()
      else [sys.executable, "-c", "import sys; from builder.cli import main; sys.exit(main())"])
REAL = {"decoder": 80, "vision": 45}
SHARD_BYTES = 4 << 30
# what the release stores in F32 (docs/released_layout.md); everything else bf16
F32 = re.compile(r".*(self_attn\.[qkv]_proj\.(weight|bias)|attn\.qkv\.weight|attn\.proj\.weight|attn\.[qk]_norm\.weight)$")
# The decoder's residual branches end in o_proj / down_proj. At the 0.02 of every other weight, each branch adds
# ~100x the embedding's per-element size (o_proj: 0.02 * sqrt(8192) * ~1 ~ 1.8; down_proj: 0.02 * sqrt(29568) * ~2
# ~ 7), so after a few layers the hidden state is noise and the logits are near-uniform over 152,064 ids: the
# fidelity report then finds nothing decidable and refuses (a 3:6 fp8 slice: 90% near-ties, logit error 0.08 of
# a small max). These stds make each branch add ~0.01 per element, half the embedding's 0.02, so the residual
# stream keeps its token's direction as a trained model's early layers do, and the tied lm_head below gives a
# clear top-1 at every depth measured here.
BRANCH_OUT_STD = {"o_proj.weight": 1e-4, "down_proj.weight": 3e-5}

STAGES = {  # name → nvlm-build arguments after the checkpoint ({out} is the stage's output directory)
    "inspect": ["inspect", "{ckpt}", "--json"],
    "llm-bf16-stream": ["llm", "{ckpt}", "-o", "{out}", "--quant", "bf16", "--no-fidelity"],
    "vision-fp16": ["vision", "{ckpt}", "-o", "{out}", "--dtype", "fp16"],
    "llm-bf16": ["llm", "{ckpt}", "-o", "{out}", "--quant", "bf16"],
    "llm-fp8": ["llm", "{ckpt}", "-o", "{out}", "--quant", "fp8", "--kv-cache-dtype", "fp8", "--calib-size", "2"],
    "llm-int4": ["llm", "{ckpt}", "-o", "{out}", "--quant", "int4_awq", "--calib-size", "2"],
    # every stage of a deployment build (vision export with its checks, LLM with its fidelity report; engines
    # are GPU-host stages, skipped here)
    "engine-bf16": ["engine", "{ckpt}", "-o", "{out}", "--quant", "bf16", "--target", "reference", "--force"],
    "engine-fp8": ["engine", "{ckpt}", "-o", "{out}", "--quant", "fp8", "--kv-cache-dtype", "fp8", "--calib-size", "2",
                   "--target", "reference", "--force"],
    "engine-int4": ["engine", "{ckpt}", "-o", "{out}", "--quant", "int4_awq", "--calib-size", "2",
                    "--target", "reference", "--force"],
}
SCALES_WITH = {"vision-fp16": "vision"}  # every other stage scales with the decoder's depth


def slice_config(family: str, decoder: int, vision: int) -> dict:
    raw = json.loads((ROOT / f"tests/fixtures/nvlm_{family}_72b_config.json").read_text())
    raw["llm_config"]["num_hidden_layers"] = decoder
    raw["vision_config"]["num_hidden_layers"] = vision
    raw["select_layer"] = -1
    if "cross_attention_layers" in raw:
        raw["cross_attention_layers"] = list(range(0, decoder, 2))
    return raw


def write_slice(out: Path, family: str, decoder: int, vision: int, seed: int = 0) -> Path:
    """The slice, shard by shard (at most one shard of tensors in memory)."""
    import torch
    from safetensors.torch import save_file

    from runtime.core.families import family_for, from_hf

    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    raw = slice_config(family, decoder, vision)
    cfg = from_hf(raw)
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
    fx = ROOT / "tests/fixtures/release"
    (tmp / "tokenizer.json").write_bytes(lzma.decompress((fx / "tokenizer.json.xz").read_bytes()))
    shutil.copy(fx / "tokenizer_config.json", tmp / "tokenizer_config.json")
    rows = [(src, shape) for comp in family_for(cfg).components for src, _, shape in comp.expand(cfg)]
    g = torch.Generator().manual_seed(seed)
    weight_map, group, size, k = {}, {}, 0, 0

    def flush():
        nonlocal group, size, k
        if group:
            k += 1
            name = f"model-{k:05d}.safetensors"
            save_file(group, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({n: name for n in group})
            group, size = {}, 0

    embedding = None
    for src, shape in rows:
        dtype = torch.float32 if F32.match(src) else torch.bfloat16
        if len(shape) == 1 and ("norm" in src or src.endswith(("ls1", "ls2"))):
            t = torch.ones(shape, dtype=dtype)
        elif src.endswith("_gate"):
            t = torch.full(shape, 0.5, dtype=dtype)
        elif src.endswith("lm_head.weight") and embedding is not None:
            # lm_head = the embedding: the random model's logits then peak at the input token, as a trained
            # model's have a clear top-1; a random lm_head gives near-uniform logits over 152,064 ids, in which
            # the fidelity report rightly finds nothing decidable and refuses (a 3-layer fp8 slice: 92% near-ties)
            t = embedding.clone()
        else:
            std = next((v for k, v in BRANCH_OUT_STD.items() if src.startswith("language_model.") and src.endswith(k)),
                       0.02)
            t = (torch.randn(shape, generator=g, dtype=torch.float32 if dtype == torch.float32 else torch.bfloat16)
                 * std).to(dtype)
        if src.endswith("embed_tokens.weight"):
            embedding = t
        nbytes = t.numel() * t.element_size()
        if size + nbytes > SHARD_BYTES:
            flush()
        group[src] = t
        size += nbytes
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tmp.rename(out)
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_stage(args: list[str], limit: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([*NB, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, killed = 0, False
    while proc.poll() is None:
        peak = max(peak, rss_bytes(proc.pid))
        if peak > limit:
            proc.kill()
            killed = True
            break
        time.sleep(0.1)
    err = proc.communicate()[1] or ""
    last = next((line for line in reversed(err.splitlines()) if line.strip()), "")
    status = f"over {limit / 2**30:.0f} GiB (killed)" if killed else ("ok" if proc.returncode == 0 else
                                                                     f"exit {proc.returncode}: {last[:160]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak / 1e9, 2), "status": status}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the slices and stage outputs (tens of GB)")
    ap.add_argument("--family", choices=["d", "x", "h"], default="d")
    ap.add_argument("--depths", default="1:2,3:6", help="decoder:vision layers per slice, comma-separated")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--rss-limit-gb", type=float, default=20.0)
    ap.add_argument("--keep", action="store_true", help="keep the stage outputs")
    ap.add_argument("--json")
    ap.add_argument("--device", help="passed to the llm and engine stages (--device cuda: the layers on the GPU)")
    a = ap.parse_args()
    work = Path(a.work)
    depths = [tuple(int(x) for x in d.split(":")) for d in a.depths.split(",")]
    stages = a.stages.split(",")
    limit = int(a.rss_limit_gb * 2**30)
    results = []
    for dec, vis in depths:
        t0 = time.perf_counter()
        ckpt = write_slice(work / f"nvlm-{a.family}-{dec}x{vis}", a.family, dec, vis)
        print(f"# slice {ckpt.name}: {sum(p.stat().st_size for p in ckpt.glob('*.safetensors')) / 1e9:.1f} GB "
              f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)
        for s in stages:
            out = work / f"out-{s}"
            shutil.rmtree(out, ignore_errors=True)
            args = [x.format(ckpt=ckpt, out=out) for x in STAGES[s]]
            if a.device and args[0] in ("llm", "engine"):
                args += ["--device", a.device]
            r = run_stage(args, limit)
            r.update(stage=s, decoder_layers=dec, vision_layers=vis)
            results.append(r)
            print(f"{s:<16} {dec:>3}:{vis:<3} {r['seconds']:>8.1f} s {r['peak_rss_gb']:>7.2f} GB  {r['status']}",
                  flush=True)
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
    extrapolated = []
    if len(depths) >= 2:
        (d1, v1), (d2, v2) = depths[0], depths[-1]
        for s in stages:
            a1 = next(r for r in results if r["stage"] == s and r["decoder_layers"] == d1)
            a2 = next(r for r in results if r["stage"] == s and r["decoder_layers"] == d2)
            if a1["status"] != "ok" or a2["status"] != "ok":
                continue
            axis = SCALES_WITH.get(s, "decoder")
            n1, n2 = (v1, v2) if axis == "vision" else (d1, d2)
            slope_rss = (a2["peak_rss_gb"] - a1["peak_rss_gb"]) / (n2 - n1)
            slope_s = (a2["seconds"] - a1["seconds"]) / (n2 - n1)
            extrapolated.append({"stage": s, "axis": axis, "rss_gb_per_layer": round(slope_rss, 3),
                                 "seconds_per_layer": round(slope_s, 1),
                                 "peak_rss_gb_at_real_depth": round(a1["peak_rss_gb"] + slope_rss * (REAL[axis] - n1), 1),
                                 # a negative slope is noise (a cold first read of the slice): no estimate
                                 "seconds_at_real_depth": (round(a1["seconds"] + slope_s * (REAL[axis] - n1))
                                                           if slope_s >= 0 else None)})
        for e in extrapolated:
            print(f"{e['stage']:<16} per {e['axis']} layer: {e['rss_gb_per_layer']:+.3f} GB, "
                  f"{e['seconds_per_layer']:+.1f} s → at {REAL[e['axis']]} layers: {e['peak_rss_gb_at_real_depth']} GB, "
                  f"{e['seconds_at_real_depth']} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                                            "family": a.family, "results": results, "extrapolated": extrapolated},
                                           indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
