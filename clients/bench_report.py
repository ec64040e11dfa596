"""Reporting for `nvlm-bench`: the CSV rows, the console table and the plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .workloads import BenchError

# every row carries the run's context, so a CSV row pasted elsewhere still says what was measured
CSV_CONTEXT = ["date", "machine", "endpoint", "build_manifest_sha256", "workload", "seed", "max_tokens", "complete"]


CSV_FIELDS = CSV_CONTEXT + ["mode", "level", "requests", "succeeded", "failed", "ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms",
              "ttft_p99_ms", "itl_mean_ms", "itl_p99_ms", "tpot_mean_ms", "e2e_mean_ms", "e2e_p99_ms",
              "output_tokens_per_s", "requests_per_s"]


def csv_context(result: dict) -> dict:
    m = result["machine"]
    return {"date": result["date"], "machine": f"{m['platform']} ({m['cpus']} CPUs)",
            "endpoint": f"{result['endpoint']['url']}/{result['endpoint']['model']}",
            "build_manifest_sha256": result["build_manifest_sha256"] or "", "workload": result["workload"]["spec"],
            "seed": result["seed"], "max_tokens": result["max_tokens"], "complete": result["complete"]}


def csv_row(run: dict) -> dict:
    s = run["summary"]
    g = lambda k, q: None if s[k] is None else round(s[k][q], 3)  # noqa: E731
    return {"mode": run["mode"], "level": run["level"], "requests": s["requests"], "succeeded": s["succeeded"],
            "failed": s["failed"], "ttft_mean_ms": g("ttft_ms", "mean"), "ttft_p50_ms": g("ttft_ms", "p50"),
            "ttft_p90_ms": g("ttft_ms", "p90"), "ttft_p99_ms": g("ttft_ms", "p99"), "itl_mean_ms": g("itl_ms", "mean"),
            "itl_p99_ms": g("itl_ms", "p99"), "tpot_mean_ms": g("tpot_ms", "mean"), "e2e_mean_ms": g("e2e_ms", "mean"),
            "e2e_p99_ms": g("e2e_ms", "p99"), "output_tokens_per_s": s["output_tokens_per_s"],
            "requests_per_s": s["requests_per_s"]}


def print_table(result: dict) -> None:
    print(f"{'mode':<13}{'level':>6}{'ok/req':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL mean':>10}"
          f"{'TPOT':>8}{'E2E p50':>9}{'tok/s':>8}{'req/s':>7}")
    for run in result["runs"]:
        s = run["summary"]
        f = lambda k, q: "-" if s[k] is None else f"{s[k][q]:.1f}"  # noqa: E731
        print(f"{run['mode']:<13}{run['level']:>6}{s['succeeded']:>5}/{s['requests']:<3}{f('ttft_ms', 'p50'):>10}"
              f"{f('ttft_ms', 'p99'):>10}{f('itl_ms', 'mean'):>10}{f('tpot_ms', 'mean'):>8}{f('e2e_ms', 'p50'):>9}"
              f"{(s['output_tokens_per_s'] or 0):>8.1f}{(s['requests_per_s'] or 0):>7.2f}")
        for model, st in sorted((run["server"] or {}).items()):
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
        stage = [(r["server"] or {}).get(m) for r in result["runs"]]
        vals = np.array([s["queue_ms"] + s["compute_infer_ms"] if isinstance(s, dict) else 0 for s in stage])
        ax.bar(labels, vals, bottom=bottom, label=m)
        bottom += vals
    ax.set(ylabel="ms per request (queue + compute)", title="Where the time goes (server side)")
    save(fig, ax, "stage_breakdown.png")
    return written
