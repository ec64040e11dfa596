"""`nvlm-bench`: latency benchmarks against an NVLM Triton endpoint (gRPC streaming), and rooflines.

    nvlm-bench run --url 127.0.0.1:8001 [--concurrency 1,4,16 | --request-rate 2,4] [--requests N]
                   [--warmup N] [--max-tokens N] [--workload text | tiles:1,3,7 | images:WxH,… | jsonl:PATH]
                   [--seed S] [--build BUILD [--gpu auto|h100-sxm|h200|none]] [--out DIR] [--json]
    nvlm-bench roofline BUILD|CKPT [--quant Q] [--tp N] [--tiles N] [--gpu h100-sxm] [--json]

Per request (streaming): time to first token (first text chunk), inter-token latencies (gaps between
chunks), time per output token ((end − first) / (tokens − 1)), end-to-end latency; per run: mean,
p50, p90, p99 of each, output tokens/s and requests/s over the measured window, failures counted
with their messages (never dropped). Warm-up requests are sent first and excluded. Server-side
per-model timings (queue and compute, from Triton's statistics API) are the difference between
snapshots taken around each run. Output: JSON (schema nvlm-trt/bench/v1, docs/bench.md) and CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from builder.errors import NVLMError

SCHEMA = "nvlm-trt/bench/v1"
# image sizes whose NVLM tiling (448 px, ≤ 6 tiles + thumbnail) gives exactly this many tiles
TILE_SIZES = {1: (448, 448), 3: (896, 448), 4: (1344, 448), 5: (1000, 1000), 6: (2240, 448), 7: (1344, 896)}
PROMPTS = ["Describe this image in detail.", "What objects are in the picture?", "Summarize what you see.",
           "Explain the layout of this scene."]
TEXT_PROMPTS = ["Explain how a transformer generates text.", "Write a haiku about GPUs.",
                "What is the capital of France and why?", "List three uses of image tiling."]


class BenchError(NVLMError):
    """The benchmark cannot run as asked."""


# --------------------------------------------------------------------------- workloads


@dataclass
class Item:
    prompt: str
    images: list  # encoded bytes
    label: str


def _png(width: int, height: int, seed: int) -> bytes:
    from builder.calibration import synthetic_scene

    buf = io.BytesIO()
    synthetic_scene(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def load_workload(spec: str, seed: int) -> list[Item]:
    kind, _, arg = spec.partition(":")
    if kind == "text":
        return [Item(p, [], "text") for p in TEXT_PROMPTS]
    if kind == "tiles":
        counts = [int(x) for x in arg.split(",") if x]
        bad = [c for c in counts if c not in TILE_SIZES]
        if bad or not counts:
            raise BenchError(f"--workload tiles:… takes tile counts from {sorted(TILE_SIZES)}, got {arg!r}")
        return [Item(PROMPTS[k % len(PROMPTS)], [_png(*TILE_SIZES[c], seed + k)], f"{c} tiles")
                for k, c in enumerate(counts)]
    if kind == "images":
        items = []
        for k, size in enumerate(x for x in arg.split(",") if x):
            try:
                w, h = (int(v) for v in size.lower().split("x"))
            except ValueError:
                raise BenchError(f"--workload images: expects WxH sizes, got {size!r}") from None
            items.append(Item(PROMPTS[k % len(PROMPTS)], [_png(w, h, seed + k)], f"{w}x{h}"))
        return items
    if kind == "jsonl":
        return _jsonl(Path(arg))
    raise BenchError(f"--workload {spec!r}: use text, tiles:1,3,7, images:WxH,… or jsonl:PATH")


def _jsonl(path: Path) -> list[Item]:
    from builder.jsonl import parse_jsonl

    if not path.is_file():
        raise BenchError(f"workload file {path} not found")
    rows, problems = parse_jsonl(path, _bench_row, 'JSON objects with a "text_input" string')
    if problems:
        raise BenchError(f"{path}: " + "; ".join(problems))
    if not rows:
        raise BenchError(f"{path} holds no requests")
    return [Item(text, [p.read_bytes() for p in images], f"line {n}") for n, (text, images) in rows]


def _bench_row(row: dict, image_path) -> tuple[str, list[Path]]:
    """genai-perf's input format: {"text_input": …, "image": path or [paths]}."""
    text = row["text_input"]
    if not isinstance(text, str):
        raise TypeError
    images = row.get("image") or []
    return text, [image_path(i) for i in ([images] if isinstance(images, str) else images)]


# --------------------------------------------------------------------------- measurement


@dataclass
class Sample:
    label: str
    ok: bool
    error: str | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    tokens: int = 0


def _one(client, item: Item, max_tokens: int, seed: int, min_tokens: int = 0) -> Sample:
    """One streamed request. `min_tokens` (--min-tokens) is sent as min_tokens, so that every
    request produces the same length, as genai-perf and aiperf do for fixed output lengths."""
    from runtime.client import ClientError

    extra = {"min_tokens": ("INT32", np.array([min_tokens], np.int32))} if min_tokens else None
    try:
        ans = client.generate(item.prompt, item.images, max_tokens=max_tokens, stream=True, seed=seed, extra=extra)
    except ClientError as e:
        return Sample(item.label, False, str(e))
    stamps = ans.chunk_times  # arrival times after the send, stamped in the stream's thread
    if not stamps:
        return Sample(item.label, False, "no tokens returned")
    itls = [b - a for a, b in zip(stamps, stamps[1:])]
    return Sample(item.label, True, None, stamps[0], itls, ans.seconds, len(ans.tokens))


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    a = np.asarray(values) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "n": int(a.size)}


def summarize(samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.ok]
    tpots = [(s.e2e - s.ttft) / (s.tokens - 1) for s in ok if s.tokens > 1]
    return {
        "requests": len(samples), "succeeded": len(ok), "failed": len(samples) - len(ok),
        "errors": sorted({s.error for s in samples if not s.ok})[:10],
        "ttft_ms": _stats([s.ttft for s in ok]), "itl_ms": _stats([x for s in ok for x in s.itls]),
        "tpot_ms": _stats(tpots), "e2e_ms": _stats([s.e2e for s in ok]),
        "output_tokens_per_s": sum(s.tokens for s in ok) / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None, "seconds": wall,
    }


def _server_stats(url: str) -> dict:
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(as_json=True)
    out = {}
    for m in stats.get("model_stats", []):
        s = m.get("inference_stats", {})
        out[m["name"]] = {k: (int(s.get(k, {}).get("count", 0)), int(s.get(k, {}).get("ns", 0)))
                          for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")}
    return out


def _stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for model, cur in after.items():
        prev = before.get(model, {k: (0, 0) for k in cur})
        n = cur["success"][0] - prev["success"][0]
        if n <= 0:
            continue
        out[model] = {"requests": n, **{f"{k}_ms": (cur[k][1] - prev[k][1]) / n / 1e6
                                        for k in ("queue", "compute_input", "compute_infer", "compute_output")}}
    return out


def _measure(client, item: Item, max_tokens: int, seed: int, min_tokens: int, dead: threading.Event) -> Sample:
    """One request; a failure with the server gone sets `dead`, which stops the run (no more sends)."""
    from runtime.client import ClientError

    s = _one(client, item, max_tokens, seed, min_tokens)
    if not s.ok:
        try:
            client.check()
        except ClientError:
            dead.set()
    return s


def run_closed_loop(url, model, items, concurrency, requests, max_tokens, seed, *, min_tokens: int = 0,
                    dead: threading.Event | None = None) -> tuple[list[Sample], float]:
    from runtime.client import NVLMClient

    dead = dead or threading.Event()
    lock, next_index, samples = threading.Lock(), [0], []

    def worker():
        client = NVLMClient(url, model)
        while not dead.is_set():
            with lock:
                k = next_index[0]
                next_index[0] += 1
            if k >= requests:
                return
            s = _measure(client, items[k % len(items)], max_tokens, seed + k, min_tokens, dead)
            with lock:
                samples.append(s)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return samples, time.perf_counter() - t0


def run_open_loop(url, model, items, rate, requests, max_tokens, seed, *, min_tokens: int = 0,
                  dead: threading.Event | None = None) -> tuple[list[Sample], float]:
    from runtime.client import NVLMClient

    dead = dead or threading.Event()
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(requests):
        t += rng.expovariate(rate)  # Poisson process: exponential gaps
        arrivals.append(t)
    samples, lock = [], threading.Lock()
    # Idle, connected clients: a request that opened its own channel would time a TCP and HTTP/2
    # handshake as part of its TTFT (aiperf and perf_analyzer reuse connections too). A client runs
    # one stream at a time, so overlapping requests take more clients from the pool.
    idle: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(4):
        c = NVLMClient(url, model)
        c.check()
        idle.put(c)

    def fire(k):
        try:
            client = idle.get_nowait()
        except queue.Empty:
            client = NVLMClient(url, model)
        s = _measure(client, items[k % len(items)], max_tokens, seed + k, min_tokens, dead)
        idle.put(client)
        with lock:
            samples.append(s)

    t0 = time.perf_counter()
    threads = []
    for k, at in enumerate(arrivals):
        if dead.is_set():
            break
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=fire, args=(k,))
        th.start()
        threads.append(th)
    [th.join() for th in threads]
    return samples, time.perf_counter() - t0


# --------------------------------------------------------------------------- outputs

# every row carries the run's context, so a CSV row pasted elsewhere still says what was measured
CSV_CONTEXT = ["date", "machine", "endpoint", "build_manifest_sha256", "workload", "seed", "max_tokens", "complete"]
CSV_FIELDS = CSV_CONTEXT + ["mode", "level", "requests", "succeeded", "failed", "ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms",
              "ttft_p99_ms", "itl_mean_ms", "itl_p99_ms", "tpot_mean_ms", "e2e_mean_ms", "e2e_p99_ms",
              "output_tokens_per_s", "requests_per_s"]


def _csv_context(result: dict) -> dict:
    m = result["machine"]
    return {"date": result["date"], "machine": f"{m['platform']} ({m['cpus']} CPUs)",
            "endpoint": f"{result['endpoint']['url']}/{result['endpoint']['model']}",
            "build_manifest_sha256": result["build_manifest_sha256"] or "", "workload": result["workload"]["spec"],
            "seed": result["seed"], "max_tokens": result["max_tokens"], "complete": result["complete"]}


def _csv_row(run: dict) -> dict:
    s = run["summary"]
    g = lambda k, q: None if s[k] is None else round(s[k][q], 3)  # noqa: E731
    return {"mode": run["mode"], "level": run["level"], "requests": s["requests"], "succeeded": s["succeeded"],
            "failed": s["failed"], "ttft_mean_ms": g("ttft_ms", "mean"), "ttft_p50_ms": g("ttft_ms", "p50"),
            "ttft_p90_ms": g("ttft_ms", "p90"), "ttft_p99_ms": g("ttft_ms", "p99"), "itl_mean_ms": g("itl_ms", "mean"),
            "itl_p99_ms": g("itl_ms", "p99"), "tpot_mean_ms": g("tpot_ms", "mean"), "e2e_mean_ms": g("e2e_ms", "mean"),
            "e2e_p99_ms": g("e2e_ms", "p99"), "output_tokens_per_s": s["output_tokens_per_s"],
            "requests_per_s": s["requests_per_s"]}


def _manifest_hash(build: str | None) -> str | None:
    if not build:
        return None
    from builder.engine_build import sha256_file

    m = Path(build) / "manifest.json"
    return sha256_file(m) if m.is_file() else None


def _item_shapes(build: Path, items: list[Item]) -> list[tuple[int, int]]:
    """(text tokens, tiles) of each workload item as the server will see it: the build's own
    preprocessing and prompt layout."""
    from builder.engine_build import read_preprocess
    from runtime.preprocess import preprocess_images
    from runtime.prompt import build_prompt, with_image_placeholders
    from runtime.tokenizer import NVLMTokenizer

    tok = NVLMTokenizer.from_dir(build / "tokenizer")
    pcfg, _ = read_preprocess(build)
    shapes = []
    for it in items:
        tiles = [d.num_tiles for d in preprocess_images(it.images, pcfg, max_images=len(it.images))] if it.images else []
        p = build_prompt(tok, with_image_placeholders(it.prompt, len(tiles)), tiles, tokens_per_tile=pcfg.tokens_per_tile)
        shapes.append((len(p.input_ids) - p.num_image_tokens, sum(tiles)))
    return shapes


def roofline_plan(args, items: list[Item]) -> dict | None:
    """Per workload item, the roofline bounds of the build on the chosen GPU; None without a GPU.
    The default GPU is H100 SXM when the build serves TensorRT engines and none for the CPU
    reference target (a ratio against an H100 bound says nothing about the CPU stand-in)."""
    from .roofline import GPUS, build_facts, facts_roofline, served_target

    if args.gpu not in ("auto", "none") and not args.build:
        raise BenchError(f"--gpu {args.gpu} needs --build BUILD: the bounds come from the build's model and options")
    if not args.build or args.gpu == "none":
        return None
    from builder.engine_build import read_manifest

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
    from runtime.client import NVLMClient

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
    NVLMClient(args.url, args.model).check()  # unreachable server / wrong model: fail before the run
    warm = NVLMClient(args.url, args.model)
    for k in range(args.warmup):
        _one(warm, items[k % len(items)], args.max_tokens, args.seed, args.min_tokens)
    result = {"schema": SCHEMA, "complete": True, "incomplete_reason": None, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "endpoint": {"url": args.url, "model": args.model}, "build_manifest_sha256": _manifest_hash(args.build),
              "workload": {"spec": args.workload, "items": [i.label for i in items]}, "seed": args.seed,
              "max_tokens": args.max_tokens, "warmup": args.warmup, "roofline": plan, "runs": []}
    plans = [("concurrency", c) for c in levels_c] + [("request_rate", r) for r in levels_r]
    for mode, level in plans:
        try:
            before = _server_stats(args.url)
        except Exception as e:  # noqa: BLE001 — the server died between runs
            _stop(result, f"server not answering before {mode} {level}: {e}")
            break
        dead = threading.Event()
        loop = run_closed_loop if mode == "concurrency" else run_open_loop
        samples, wall = loop(args.url, args.model, items, level, args.requests, args.max_tokens, args.seed,
                             min_tokens=args.min_tokens, dead=dead)
        summary = summarize(samples, wall)
        if dead.is_set():
            _stop(result, f"the server stopped answering during {mode} {level} "
                          f"({summary['failed']} requests failed, {args.requests - len(samples)} not sent)")
        try:
            server = _stats_delta(before, _server_stats(args.url))
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


def print_table(result: dict) -> None:
    print(f"{'mode':<13}{'level':>6}{'ok/req':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL mean':>10}"
          f"{'TPOT':>8}{'E2E p50':>9}{'tok/s':>8}{'req/s':>7}")
    for run in result["runs"]:
        s = run["summary"]
        f = lambda k, q: "-" if s[k] is None else f"{s[k][q]:.1f}"  # noqa: E731
        print(f"{run['mode']:<13}{run['level']:>6}{s['succeeded']:>5}/{s['requests']:<3}{f('ttft_ms', 'p50'):>10}"
              f"{f('ttft_ms', 'p99'):>10}{f('itl_ms', 'mean'):>10}{f('tpot_ms', 'mean'):>8}{f('e2e_ms', 'p50'):>9}"
              f"{(s['output_tokens_per_s'] or 0):>8.1f}{(s['requests_per_s'] or 0):>7.2f}")
        for model, st in sorted(run["server"].items()):
            if isinstance(st, dict) and "queue_ms" in st:
                print(f"    {model:<16} queue {st['queue_ms']:8.2f} ms  compute {st['compute_infer_ms']:8.2f} ms")
        for label, r in sorted((run["vs_roofline"] or {}).items()):
            f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"    {label:<16} measured/bound  TTFT p50 {f(r['ttft_p50_over_bound']):>9}  "
                  f"TPOT {f(r['tpot_mean_over_bound']):>9}")
    if result["roofline"]:
        rl = result["roofline"]
        print(f"bounds: {rl['gpu']}, {rl['fmt']} TP{rl['tp']}: " + "; ".join(
            f"{label} TTFT ≥ {b['ttft_bound_ms']:.3g} ms, TPOT ≥ {b['tpot_bound_ms']:.3g} ms"
            for label, b in sorted(rl["items"].items())))
    if not result["complete"]:
        print(f"INCOMPLETE ({result['incomplete_reason']}); partial results saved")


def write_plots(result: dict, out: Path) -> list[str]:
    """latency_vs_concurrency.png, ttft_distribution.png, stage_breakdown.png (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib (pip install nvlm-trt[bench])") from None
    written = []

    def save(fig, ax, name):
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    runs = [r for r in result["runs"] if r["mode"] == "concurrency"]
    if runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        levels = [r["level"] for r in runs]
        for key, label in (("ttft_ms", "TTFT"), ("e2e_ms", "end to end")):
            for q, style in (("p50", "-o"), ("p99", "--")):
                ax.plot(levels, [r["summary"][key][q] if r["summary"][key] else None for r in runs], style,
                        label=f"{label} {q}")
        ax.set(xlabel="concurrency", ylabel="ms", title="Latency vs concurrency", xscale="log")
        save(fig, ax, "latency_vs_concurrency.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["runs"]:
        if r["ttft_samples_ms"]:
            ax.hist(r["ttft_samples_ms"], bins=20, alpha=0.5, label=f"{r['mode']} {r['level']}")
    ax.set(xlabel="time to first token (ms)", ylabel="requests", title="TTFT distribution")
    save(fig, ax, "ttft_distribution.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    models = ["preprocessing", "vision_encoder", "tensorrt_llm", "postprocessing"]
    labels = [f"{r['mode'][0]}{r['level']}" for r in result["runs"]]
    bottom = np.zeros(len(labels))
    for m in models:
        stage = [r["server"].get(m) for r in result["runs"]]
        vals = np.array([s["queue_ms"] + s["compute_infer_ms"] if isinstance(s, dict) else 0 for s in stage])
        ax.bar(labels, vals, bottom=bottom, label=m)
        bottom += vals
    ax.set(ylabel="ms per request (queue + compute)", title="Where the time goes (server side)")
    save(fig, ax, "stage_breakdown.png")
    return written


# --------------------------------------------------------------------------- roofline command


def _roofline(args) -> int:
    from .roofline import GPU, GPUS, build_facts, facts_roofline

    facts = build_facts(args.build, quant=args.quant, tp=args.tp)
    gpu = GPUS[args.gpu]
    if args.peak_bf16 or args.peak_fp8 or args.hbm:
        gpu = GPU(gpu.name + " (custom)", args.peak_bf16 or gpu.bf16_tflops, args.peak_fp8 or gpu.fp8_tflops,
                  args.hbm or gpu.hbm_tbps)
    r = facts_roofline(facts, gpu, tiles=args.tiles, text_tokens=args.text_tokens, output_tokens=args.output_tokens)
    if args.json:
        print(json.dumps(r.as_dict()))
    else:
        print(f"{r.gpu}, {r.fmt}, TP{r.tp}, {r.tiles} tiles, {r.prompt_tokens}-token prompt:")
        print(f"  TTFT ≥ {r.ttft_ms:.3g} ms  (vision {r.vision_tflop:.3g} TFLOP + prefill {r.prefill_tflop:.3g} TFLOP)")
        print(f"  TPOT ≥ {r.tpot_ms:.3g} ms  ({r.weight_gb_per_gpu:.3g} GB weights + {r.kv_gb_per_gpu:.3g} GB KV per GPU)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nvlm-bench", description="NVLM latency benchmarks and rooflines.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="benchmark a Triton endpoint")
    r.add_argument("--url", default="127.0.0.1:8001")
    r.add_argument("--model", default="nvlm")
    r.add_argument("--concurrency", help="closed-loop levels, e.g. 1,4,16")
    r.add_argument("--request-rate", help="open-loop Poisson rates in requests/s, e.g. 0.5,1")
    r.add_argument("--requests", type=int, default=16, help="measured requests per level")
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--max-tokens", type=int, default=32)
    r.add_argument("--min-tokens", type=int, default=0, help="minimum output length (min_tokens), e.g. = --max-tokens")
    r.add_argument("--workload", default="text")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--build", help="build directory: records its manifest hash; with a GPU, measured/bound ratios")
    r.add_argument("--gpu", choices=["auto", "h100-sxm", "h200", "none"], default="auto",
                   help="roofline GPU for measured/bound (auto: h100-sxm for a TensorRT build, none for the "
                        "CPU reference target)")
    r.add_argument("--checkpoint", help="source checkpoint, if the build's manifest path no longer holds it")
    r.add_argument("--out", type=Path, help="write bench.json and bench.csv here")
    r.add_argument("--plot", action="store_true", help="also write PNG plots to --out")
    r.add_argument("--json", action="store_true")
    f = sub.add_parser("roofline", help="lower bounds for TTFT and TPOT on H100s")
    f.add_argument("build", help="build directory (manifest.json) or checkpoint / config.json")
    f.add_argument("--quant", choices=["bf16", "fp16", "fp8", "int4_awq", "w4a8_awq"])
    f.add_argument("--tp", type=int)
    f.add_argument("--tiles", type=int, default=7)
    f.add_argument("--text-tokens", type=int, default=64)
    f.add_argument("--output-tokens", type=int, default=128)
    f.add_argument("--gpu", choices=["h100-sxm", "h200"], default="h100-sxm")
    f.add_argument("--peak-bf16", type=float, help="TFLOP/s")
    f.add_argument("--peak-fp8", type=float, help="TFLOP/s")
    f.add_argument("--hbm", type=float, help="TB/s")
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
                w.writerow(_csv_context(result) | _csv_row(run))
        if args.plot:
            write_plots(result, args.out)
    print(json.dumps(result)) if args.json else print_table(result)
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
