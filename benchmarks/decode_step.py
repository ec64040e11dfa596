"""In-flight batching in isolation: one `ReferenceExecutor.decode_step` for B sequences against the baseline
of B separate one-sequence steps (requests run one at a time), side by side in one run.

    .venv/bin/python benchmarks/decode_step.py [--batch 1,2,4,8,16] [--context 39,300] [--threads 1]
                                               [--repeats 30] [--format bf16] [--json F]

The embedded default's LLM built in `--format` (bf16 by default; fp8 takes the FP8 KV cache too), each
sequence with its own random prompt of `--context` tokens (lengths staggered by a few tokens, as an
in-flight batch has them). Per B: the median of `--repeats` steps (each step extends every cache by one
token, as serving does), for the batched step and for the baseline (B calls of `decode_step` with one
sequence each). Prints ms per step, ms per token, and baseline ÷ batched.
"""

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=_ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--context", type=_ints, default=[39, 1300], help="prompt tokens per sequence (1,300: a 4-tile image prompt)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--format", default="bf16")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()

    import torch

    from builder.llm_build import build_llm
    from runtime.core.demo_checkpoint import write_demo_checkpoint
    from runtime.core.llm_formats import LLMBuildOptions, get_format
    from runtime.executor import KVCache, ReferenceExecutor

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_demo_checkpoint(Path(tmp) / "ckpt")
        build_llm(ckpt, Path(tmp) / "llm", LLMBuildOptions(get_format(args.format), kv_cache_fp8=args.format == "fp8"),
                  calib_size=4, fidelity=False)
        ex = ReferenceExecutor.load(Path(tmp) / "llm")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for ctx in args.context:
                for b_len in args.batch:
                    caches = []
                    for b in range(b_len):
                        c = KVCache()
                        ex.forward(torch.randint(0, ex.vocab_size, (ctx + 3 * b,), generator=g).tolist(), None, c)
                        caches.append(c)
                    tokens = torch.randint(0, ex.vocab_size, (b_len,), generator=g).tolist()
                    row = {"context": ctx, "batch": b_len}
                    for name in ("baseline", "batched"):
                        work = copy.deepcopy(caches)
                        times = []
                        for _ in range(args.repeats):
                            t0 = time.perf_counter()
                            if name == "batched":
                                ex.decode_step(tokens, work)
                            else:
                                for t, c in zip(tokens, work):
                                    ex.decode_step([t], [c])
                            times.append(time.perf_counter() - t0)
                        row[name + "_ms"] = statistics.median(times) * 1e3
                    row["ratio"] = row["baseline_ms"] / row["batched_ms"]
                    rows.append(row)
                    print(f"context {ctx:4d}  B {b_len:2d}: one at a time {row['baseline_ms']:7.2f} ms, batched "
                          f"{row['batched_ms']:7.2f} ms ({row['batched_ms'] / b_len:5.2f} ms/token), "
                          f"{row['ratio']:.2f}×", flush=True)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.format}, median of {args.repeats} steps")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
