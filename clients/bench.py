"""`nvlm-bench`: latency benchmarks against an NVLM Triton endpoint (gRPC streaming), and rooflines.

    nvlm-bench run --url 127.0.0.1:8001 [--concurrency 1,4,16 | --request-rate 2,4] [--requests N]
                   [--warmup N] [--max-tokens N] [--workload text | tiles:1,3,7 | images:WxH,… | jsonl:PATH]
                   [--seed S] [--build BUILD [--gpu auto|h100-sxm|h100-pcie|h200|none]] [--out DIR] [--json]
    nvlm-bench roofline BUILD|CKPT [--quant Q] [--tp N] [--tiles N] [--gpu h100-sxm|h100-pcie|h200] [--json]

Per request (streaming): time to first token (first text chunk), inter-token latencies (gaps between
chunks), time per output token ((end − first) / (tokens − 1)), end-to-end latency; per run: mean,
p50, p90, p99 of each, output tokens/s and requests/s over the measured window, failures counted
with their messages (never dropped). Warm-up requests are sent first and excluded. Server-side
per-model timings (queue and compute, from Triton's statistics API) are the difference between
snapshots taken around each run. Output: JSON (schema nvlm-trt/bench/v1, docs/bench.md) and CSV.

This module is the command and the run's orchestration; the workloads are clients/workloads.py, the
load generators and statistics clients/loadgen.py, the CSV, table and plots clients/bench_report.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

from runtime.core.build_dir import read_chat_format, read_family, read_manifest, read_preprocess, sha256_file
from runtime.core.errors import NVLMError
from runtime.core.llm_formats import FORMATS
from runtime.preprocess import preprocess_images
from runtime.prompt import build_prompt, with_image_placeholders
from runtime.tokenizer import NVLMTokenizer

from .bench_report import CSV_FIELDS, csv_context, csv_row, print_table, write_plots
from .loadgen import client_for, one_request, run_closed_loop, run_open_loop, server_stats, stats_delta, summarize
from .roofline import GPU, GPUS, build_facts, decode_bound, facts_roofline, served_target
from .workloads import BenchError, Item, load_workload

SCHEMA = "nvlm-trt/bench/v1"




# --------------------------------------------------------------------------- workloads












# --------------------------------------------------------------------------- measurement




















# --------------------------------------------------------------------------- outputs







def _manifest_hash(build: str | None) -> str | None:
    if not build:
        return None

    m = Path(build) / "manifest.json"
    return sha256_file(m) if m.is_file() else None


def _item_shapes(build: Path, items: list[Item]) -> list[tuple[int, int]]:
    """(text tokens, tiles) of each workload item as the server will see it: the build's own
    preprocessing and prompt layout."""

    tok = NVLMTokenizer.from_dir(build / "tokenizer", chat_format=read_chat_format(build))
    pcfg, _ = read_preprocess(build)
    layout = read_family(build).prompt_layout
    shapes = []
    for it in items:
        tiles = [d.num_tiles for d in preprocess_images(it.images, pcfg, max_images=len(it.images))] if it.images else []
        p = build_prompt(tok, with_image_placeholders(it.prompt, len(tiles)), tiles, tokens_per_tile=pcfg.tokens_per_tile,
                         layout=layout)
        shapes.append((len(p.input_ids) - p.num_image_tokens, sum(tiles)))
    return shapes


def roofline_plan(args, items: list[Item]) -> dict | None:
    """Per workload item, the roofline bounds of the build on the chosen GPU; None without a GPU.
    The default GPU is H100 SXM when the build serves TensorRT engines and none for the CPU
    reference target (a ratio against an H100 bound says nothing about the CPU stand-in)."""

    if args.gpu not in ("auto", "none") and not args.build:
        raise BenchError(f"--gpu {args.gpu} needs --build BUILD: the bounds come from the build's model and options")
    if not args.build or args.gpu == "none":
        return None

    manifest = read_manifest(args.build)
    if manifest is None:
        raise BenchError(f"{args.build}: no manifest.json — pass the directory `nvlm-build engine` wrote")
    if args.gpu == "auto" and served_target(manifest) != "trt":
        return None
    facts = build_facts(args.build, checkpoint=args.checkpoint, manifest=manifest)
    gpu = GPUS["h100-sxm" if args.gpu == "auto" else args.gpu]
    per_label: dict[str, list] = {}
    for it, (text_tokens, tiles) in zip(items, _item_shapes(Path(args.build), items)):
        r = facts_roofline(facts, gpu, tiles=tiles, text_tokens=text_tokens, output_tokens=args.max_tokens)
        per_label.setdefault(it.label, []).append(r)
    mean = lambda rs, k: sum(getattr(r, k) for r in rs) / len(rs)  # noqa: E731 — items that share a label
    return {"gpu": gpu.name, "peaks": {"bf16_tflops": gpu.bf16_tflops, "fp8_tflops": gpu.fp8_tflops,
                                       "hbm_tbps": gpu.hbm_tbps},
            "fmt": facts.fmt, "tp": facts.tp, "kv_fp8": facts.kv_fp8, "vision_fp8": facts.vision_fp8,
            "served_target": facts.served_target,
            "items": {label: {"tiles": rs[0].tiles, "prompt_tokens": mean(rs, "prompt_tokens"),
                              "ttft_bound_ms": mean(rs, "ttft_ms"), "tpot_bound_ms": mean(rs, "tpot_ms")}
                      for label, rs in per_label.items()}}


def _vs_roofline(plan: dict | None, ttft_by: dict, tpot_by: dict) -> dict | None:
    """measured / bound per workload item: TTFT p50 and TPOT mean (≥ 1 by construction on the GPU)."""
    if plan is None:
        return None
    ratio = lambda stats, q, bound: None if not stats else stats[q] / bound  # noqa: E731
    return {label: {"ttft_p50_over_bound": ratio(ttft_by.get(label), "p50", b["ttft_bound_ms"]),
                    "tpot_mean_over_bound": ratio(tpot_by.get(label), "mean", b["tpot_bound_ms"])}
            for label, b in plan["items"].items()}


def _stop(result: dict, reason: str) -> None:
    result["complete"], result["incomplete_reason"] = False, reason


def benchmark(args) -> dict:
    if args.requests < 1:
        raise BenchError("--requests must be ≥ 1")
    levels_c = [int(x) for x in args.concurrency.split(",")] if args.concurrency else []
    levels_r = [float(x) for x in args.request_rate.split(",")] if args.request_rate else []
    if any(c < 1 for c in levels_c) or any(r <= 0 for r in levels_r):
        raise BenchError("concurrency must be ≥ 1 and request rates > 0")
    if args.max_tokens < 1 or not 0 <= args.min_tokens <= args.max_tokens:
        raise BenchError("--max-tokens must be ≥ 1 and --min-tokens between 0 and --max-tokens")
    if not levels_c and not levels_r:
        levels_c = [1]
    items = load_workload(args.workload, args.seed)
    plan = roofline_plan(args, items)  # before the run: a bad build or checkpoint path fails early
    client_for(args.url, args.model).check()  # unreachable server / wrong model: fail before the run
    warm = client_for(args.url, args.model)
    # Triton's per-model statistics come over gRPC: the endpoint itself, or --triton-url beside an OpenAI URL
    stats_url = args.triton_url or (None if args.url.startswith(("http://", "https://")) else args.url)
    for k in range(args.warmup):
        one_request(warm, items[k % len(items)], args.max_tokens, args.seed, args.min_tokens)
    result = {"schema": SCHEMA, "complete": True, "incomplete_reason": None, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "endpoint": {"url": args.url, "model": args.model,
                           "streams": "kept-open" if args.keep_streams else "per-request"}, "build_manifest_sha256": _manifest_hash(args.build),
              "workload": {"spec": args.workload, "items": [i.label for i in items]}, "seed": args.seed,
              "max_tokens": args.max_tokens, "warmup": args.warmup, "roofline": plan, "runs": []}
    plans = [("concurrency", c) for c in levels_c] + [("request_rate", r) for r in levels_r]
    for mode, level in plans:
        try:
            before = server_stats(stats_url) if stats_url else {}
        except Exception as e:  # noqa: BLE001 — the server died between runs
            _stop(result, f"server not answering before {mode} {level}: {e}")
            break
        dead = threading.Event()
        loop = run_closed_loop if mode == "concurrency" else run_open_loop
        kw = {"keep_streams": args.keep_streams} if mode == "concurrency" else {}
        samples, wall = loop(args.url, args.model, items, level, args.requests, args.max_tokens, args.seed,
                             min_tokens=args.min_tokens, dead=dead, **kw)
        summary = summarize(samples, wall)
        if dead.is_set():
            _stop(result, f"the server stopped answering during {mode} {level} "
                          f"({summary['failed']} requests failed, {args.requests - len(samples)} not sent)")
        try:
            server = stats_delta(before, server_stats(stats_url)) if stats_url else None
        except Exception as e:  # noqa: BLE001 — the server died during the run
            server = {"error": str(e)}
            if result["complete"]:
                _stop(result, f"server statistics unavailable after {mode} {level}: {e}")
        by_label = {label: summarize([s for s in samples if s.label == label], wall)
                    for label in sorted({s.label for s in samples})}
        ttft_by = {label: v["ttft_ms"] for label, v in by_label.items()}
        tpot_by = {label: v["tpot_ms"] for label, v in by_label.items()}
        result["runs"].append({"mode": mode, "level": level, "summary": summary, "ttft_by_workload_item": ttft_by,
                               "tpot_by_workload_item": tpot_by, "vs_roofline": _vs_roofline(plan, ttft_by, tpot_by),
                               "server": server,
                               "ttft_samples_ms": [round(s.ttft * 1e3, 3) for s in samples if s.ok]})
        if result["complete"] and summary["failed"] == summary["requests"]:
            _stop(result, f"every request of {mode} {level} failed: {summary['errors'][0]}")
        if not result["complete"]:
            break
    return result






# --------------------------------------------------------------------------- roofline command


def _roofline(args) -> int:
    facts = build_facts(args.build, quant=args.quant, tp=args.tp)
    gpu = GPUS[args.gpu]
    if args.peak_bf16 or args.peak_fp8 or args.hbm:
        gpu = GPU(gpu.name + " (custom)", args.peak_bf16 or gpu.bf16_tflops, args.peak_fp8 or gpu.fp8_tflops,
                  args.hbm or gpu.hbm_tbps)
    r = facts_roofline(facts, gpu, tiles=args.tiles, text_tokens=args.text_tokens, output_tokens=args.output_tokens)
    batch = decode_bound(r, facts.cfg, args.batch, gpu) if args.batch else None
    if args.json:
        print(json.dumps({**r.as_dict(), **({"decode_at_batch": batch} if batch else {})}))
    else:
        print(f"{r.gpu}, {r.fmt}, TP{r.tp}, {r.tiles} tiles, {r.prompt_tokens}-token prompt:")
        print(f"  TTFT ≥ {r.ttft_ms:.3g} ms  (vision {r.vision_tflop:.3g} TFLOP + prefill {r.prefill_tflop:.3g} TFLOP)")
        print(f"  TPOT ≥ {r.tpot_ms:.3g} ms  ({r.weight_gb_per_gpu:.3g} GB weights + {r.kv_gb_per_gpu:.3g} GB KV per GPU)")
        if batch:
            print(f"  decode at batch {batch['batch']}: ≤ {batch['tokens_per_s']:,.0f} tokens/s  (a step ≥ "
                  f"{batch['step_ms']:.3g} ms, {batch['bound']} bound)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nvlm-bench", description="NVLM latency benchmarks and rooflines.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="benchmark a Triton endpoint")
    r.add_argument("--url", default="127.0.0.1:8001",
                   help="Triton gRPC host:port, or the OpenAI API's http://host:port/v1 (nvlm-serve --openai-port)")
    r.add_argument("--triton-url", help="with an OpenAI --url: Triton's gRPC host:port, for server statistics")
    r.add_argument("--model", default="nvlm")
    r.add_argument("--concurrency", help="closed-loop levels, e.g. 1,4,16")
    r.add_argument("--request-rate", help="open-loop Poisson rates in requests/s, e.g. 0.5,1")
    r.add_argument("--requests", type=int, default=16, help="measured requests per level")
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--max-tokens", type=int, default=32)
    r.add_argument("--min-tokens", type=int, default=0, help="minimum output length (min_tokens), e.g. = --max-tokens")
    r.add_argument("--workload", default="text", help="text, tiles:1,3,7, images:WxH,…, mixed:1,3 or jsonl:PATH")
    r.add_argument("--keep-streams", action="store_true",
                   help="closed loop: keep one gRPC stream open per concurrency slot (perf_analyzer's pattern)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--build", help="build directory: records its manifest hash; with a GPU, measured/bound ratios")
    r.add_argument("--gpu", choices=["auto", *GPUS, "none"], default="auto",
                   help="roofline GPU for measured/bound (auto: h100-sxm for a TensorRT build, none for the "
                        "CPU reference target)")
    r.add_argument("--checkpoint", help="source checkpoint, if the build's manifest path no longer holds it")
    r.add_argument("--out", type=Path, help="write bench.json and bench.csv here")
    r.add_argument("--plot", action="store_true", help="also write PNG plots to --out")
    r.add_argument("--json", action="store_true")
    f = sub.add_parser("roofline", help="lower bounds for TTFT and TPOT on H100s")
    f.add_argument("build", help="build directory (manifest.json) or checkpoint / config.json")
    f.add_argument("--quant", choices=list(FORMATS))
    f.add_argument("--tp", type=int)
    f.add_argument("--tiles", type=int, default=7)
    f.add_argument("--text-tokens", type=int, default=64)
    f.add_argument("--output-tokens", type=int, default=128)
    f.add_argument("--gpu", choices=list(GPUS), default="h100-sxm")
    f.add_argument("--peak-bf16", type=float, help="TFLOP/s")
    f.add_argument("--peak-fp8", type=float, help="TFLOP/s")
    f.add_argument("--hbm", type=float, help="TB/s")
    f.add_argument("--batch", type=int, default=0, metavar="N",
                   help="also the decode throughput bound with N requests in flight (e.g. the build's max batch size)")
    f.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "roofline":
            return _roofline(args)
        if args.plot and not args.out:
            raise BenchError("--plot needs --out DIR")
        result = benchmark(args)
    except NVLMError as e:
        print(f"nvlm-bench: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
        with open(args.out / "bench.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            w.writeheader()
            for run in result["runs"]:
                w.writerow(csv_context(result) | csv_row(run))
        if args.plot:
            write_plots(result, args.out)
    print(json.dumps(result)) if args.json else print_table(result)
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
