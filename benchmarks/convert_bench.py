"""Streaming bf16 conversion vs a plain file copy of the same bytes, on a generated multi-GB checkpoint.

    .venv/bin/python benchmarks/convert_bench.py [--layers 24] [--workdir /tmp/nvlm-convert-bench] [--json F]

Generates an NVLM-D checkpoint in the released layout with a larger LLM (hidden 2048, intermediate
5632, vocab 32000; ~2.9 GB of bf16 in 6 shards), then, each in a fresh subprocess so peak RSS is its
own: (1) copies the shards byte for byte (the physical limit here), (2) runs `nvlm-build llm --quant
bf16 --no-fidelity`. Prints throughput, the ratio, and peak RSS against the largest shard and layer.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_checkpoint(out: Path, layers: int, hidden: int, inter: int, shards: int) -> None:
    import torch
    from safetensors.torch import save_file

    from runtime.core.demo_checkpoint import DemoDims, build_tokenizer, demo_config
    from runtime.core.families import family_for, from_hf

    dims = DemoDims(llm_hidden=hidden, llm_layers=layers, llm_heads=hidden // 128, llm_kv_heads=4,
                    llm_intermediate=inter)
    tok = build_tokenizer(dims.tokenizer_vocab)
    raw = demo_config(dims, 32000, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    cfg = from_hf(raw)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(raw))
    tok.save(str(out / "tokenizer.json"))
    rows = [r for c in family_for(cfg).components for r in c.expand(cfg)]
    per = -(-len(rows) // shards)
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for k in range(shards):
        part = rows[k * per:(k + 1) * per]
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({src: (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16) for src, _, shape in part},
                  str(out / name))
        weight_map.update({src: name for src, _, _ in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and the child's peak RSS in bytes (fresh process, so the peak is its own)."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nvlm-convert-bench"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    src = args.workdir / "ckpt"
    make_checkpoint(src, args.layers, args.hidden, args.intermediate, args.shards)
    shard_files = sorted(src.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in shard_files)
    copy_dir = args.workdir / "copy"
    copy_dir.mkdir()
    copy_cmd = [sys.executable, "-c", "import shutil, sys; [shutil.copyfile(f, sys.argv[1] + '/' + f.split('/')[-1]) "
                "for f in sys.argv[2:]]", str(copy_dir), *map(str, shard_files)]
    os.sync()
    t_copy, rss_copy = run_measured(copy_cmd)
    os.sync()
    t_conv, rss_conv = run_measured([str(ROOT / ".venv/bin/nvlm-build"), "llm", str(src), "-o",
                                     str(args.workdir / "trtllm"), "--quant", "bf16", "--no-fidelity"])
    out_bytes = sum(f.stat().st_size for f in (args.workdir / "trtllm").glob("rank*.safetensors"))
    largest_shard = max(f.stat().st_size for f in shard_files)
    h, i = args.hidden, args.intermediate
    layer_bytes = 2 * (4 * h * h // 1 + 3 * h * i)  # upper bound of one decoder layer in bf16
    result = {
        "benchmark": "streaming_conversion_bf16", "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "checkpoint_bytes": total, "output_bytes": out_bytes, "shards": len(shard_files),
        "largest_shard_bytes": largest_shard, "layer_bytes_upper_bound": layer_bytes,
        "copy_seconds": round(t_copy, 2), "copy_GBps": round(total / t_copy / 1e9, 3),
        "convert_seconds": round(t_conv, 2), "convert_GBps": round(total / t_conv / 1e9, 3),
        "convert_vs_copy_throughput": round(t_copy / t_conv, 3),
        "peak_rss_copy_bytes": rss_copy, "peak_rss_convert_bytes": rss_conv,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
