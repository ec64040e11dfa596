"""The serving path's own capacity, measured with the null engine (issue 32): streamed text requests, closed loop.

    .venv/bin/python benchmarks/serving_capacity.py --build BUILD [--concurrency 1,4,16,32,64] [--max-tokens 256]
        [--step-ms 10] [--seconds 20] [--entry-instances N] [--baseline-tree DIR] [--json F]

With --baseline-tree DIR (a checkout of an earlier revision), the same sweep runs first with DIR's code and then with
this tree's, one after the other on the same machine, and the ratios new / baseline are printed side by side.

BUILD is an `nvlm-build engine` output whose max batch size covers the highest concurrency (the entry model admits
max batch size in flight and as many waiting). Its contract repository is written with the null engine
(`nvlm-build triton-repo --target contract --null-engine`: an LLM step with the `tensorrtllm` backend's I/O that runs
no model, models/llm_step.NullLLMModel) and served by the bundled tritonserver, without the keeper's probe.

The load generator is this process: nvlm-bench's closed loop with kept streams (one gRPC stream per concurrency
slot, perf_analyzer's pattern; clients/loadgen.py), so that its own CPU is measured like every other process's —
perf_analyzer would be one more process to account for and is not on this machine's package index. Per level:
delivered tokens/s, time to first token (request in → first token out; with the null engine, all of it is the
serving path's), tokens per streamed response, and the CPU each process spent per streamed token
(utime + stime from /proc/PID/stat over the level): the entry stub (`nvlm`), tritonserver, the LLM step's stub
(the null engine), preprocessing's stub, and the client (this process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)


def processes(root_pid: int) -> dict[str, list[int]]:
    """name → PIDs of tritonserver and each Python stub under the keeper `root_pid` (found by walking /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                pass

    def under(pid):
        while pid in parent and pid > 1:
            pid = parent[pid]
            if pid == root_pid:
                return True
        return False

    out: dict[str, list[int]] = {}
    for pid in parent:
        if not under(pid):
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "bin/tritonserver" in cmd:
            out.setdefault("tritonserver", []).append(pid)
        elif "triton_python_backend_stub" in cmd:
            for model in ("nvlm", "preprocessing", "postprocessing", "tensorrt_llm", "vision_encoder"):
                if f"/{model}/1/model.py" in cmd:
                    out.setdefault(model, []).append(pid)  # every instance of a model: its processes together
    return out


def level(url: str, concurrency: int, seconds: float, max_tokens: int, procs: dict[str, list[int]]) -> dict:
    """One closed-loop level: every slot sends its next request as soon as its last one ended, for `seconds`."""
    import threading

    from clients.loadgen import one_request
    from clients.triton_client import NVLMClient
    from clients.workloads import load_workload

    items = load_workload("text", 0)
    stop, lock, samples = threading.Event(), threading.Lock(), []

    def worker(slot):
        client = NVLMClient(url, keep_stream=True)
        k = 0
        try:
            while not stop.is_set():
                s = one_request(client, items[(slot + k) % len(items)], max_tokens, seed=slot * 1000 + k, index=k)
                k += 1
                with lock:
                    samples.append(s)
        finally:
            client.close()

    before = {name: sum(map(cpu_seconds, pids)) for name, pids in procs.items()}
    before["client"] = time.process_time()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    [t.start() for t in threads]
    time.sleep(seconds)
    stop.set()
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    after = {name: sum(map(cpu_seconds, pids)) for name, pids in procs.items()}
    after["client"] = time.process_time()
    ok = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in ok)
    responses = sum(len(s.itls) + 1 for s in ok)
    return {
        "concurrency": concurrency, "requests": len(samples), "failed": len(samples) - len(ok),
        "errors": sorted({s.error for s in samples if not s.ok})[:3], "seconds": wall,
        "tokens_per_s": tokens / wall, "tokens_per_response": tokens / responses if responses else None,
        "ttft_ms_p50": statistics.median(s.ttft for s in ok) * 1e3 if ok else None,
        "cpu_us_per_token": {name: (after[name] - before[name]) / tokens * 1e6 if tokens else None for name in after},
        "cpu_share": {name: (after[name] - before[name]) / wall for name in after},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", required=True, help="an nvlm-build engine output (max batch size ≥ the concurrency)")
    ap.add_argument("--concurrency", default="1,4,16,32,64")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=20.0, help="per level")
    ap.add_argument("--step-ms", type=float, default=10.0,
                    help="the null engine's decode step: every active request gets one token per step, as from a real "
                         "engine (NVLM-D-72B fp8 TP2 on H100s: ≥ 11–23 ms at batch 8–256, nvlm-bench roofline --batch); "
                         "0: as fast as it can, when the tokens pile up into long runs")
    ap.add_argument("--port", type=int, default=24100)
    ap.add_argument("--entry-instances", type=int, default=1, help="processes of the entry model")
    ap.add_argument("--baseline-tree", metavar="DIR",
                    help="a checkout of the baseline (e.g. `git worktree add DIR REV`): the same sweep is run first "
                         "with DIR's code, then with this tree's, and the ratios are printed side by side")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.baseline_tree:
        return compare(a, argv if argv is not None else sys.argv[1:])

    from triton_repo.generate import generate_repo
    from triton_repo.server import TritonServer

    os.environ["NVLM_NULL_STEP_MS"] = str(a.step_ms)  # the server this process starts inherits it
    work = Path(tempfile.mkdtemp(prefix="nvlm-capacity-"))
    repo = work / "repo"
    generate_repo(a.build, repo, "contract", null_engine=True,
                  **({"entry_instances": a.entry_instances} if a.entry_instances != 1 else {}))
    server = TritonServer(repo, grpc_port=a.port, http_port=a.port + 1, metrics_port=a.port + 2, hang_timeout=0,
                          log_file=work / "tritonserver.log").start()
    url = f"127.0.0.1:{a.port}"
    rows = []
    try:
        procs = processes(server.proc.pid)
        print(f"# processes: {procs}", flush=True)
        level(url, 1, 3.0, a.max_tokens, procs)  # warm-up: stubs, imports, tokenizer caches
        for c in (int(x) for x in a.concurrency.split(",")):
            r = level(url, c, a.seconds, a.max_tokens, procs)
            rows.append(r)
            cpu = r["cpu_us_per_token"]
            print(f"c={c:<3} {r['tokens_per_s']:9.0f} tok/s  ttft p50 {r['ttft_ms_p50'] or 0:7.2f} ms  "
                  f"tok/resp {r['tokens_per_response'] or 0:5.2f}  µs/token: "
                  + "  ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v is not None)
                  + (f"  FAILED {r['failed']}: {r['errors']}" if r["failed"] else ""), flush=True)
    finally:
        server.stop()
    if a.json:
        Path(a.json).write_text(json.dumps({"build": str(a.build), "max_tokens": a.max_tokens, "step_ms": a.step_ms,
                                            "rows": rows}, indent=1))
    return 0


def _without(args: list[str], flag: str) -> list[str]:
    """`args` without `flag` and its value (either `--flag V` or `--flag=V`)."""
    out, skip = [], False
    for x in args:
        if skip:
            skip = False
        elif x == flag:
            skip = True
        elif not x.startswith(flag + "="):
            out.append(x)
    return out


def compare(a, argv: list[str]) -> int:
    """The sweep with the baseline tree's code, then with this tree's (each in its own process, one after the
    other on the same machine), and the ratios: new / baseline."""
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="nvlm-capacity-compare-"))
    base = Path(a.baseline_tree).resolve()
    args = _without(_without(_without(argv, "--baseline-tree"), "--json"), "--entry-instances")
    results = {}
    for name, tree, extra in (("baseline", base, []), ("new", ROOT, [f"--entry-instances={a.entry_instances}"])):
        print(f"# {name}: {tree}", flush=True)
        out = work / f"{name}.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}  # the server and its stubs inherit it: the tree's models
        subprocess.run([sys.executable, str(tree / "benchmarks" / "serving_capacity.py"), *args, *extra,
                        "--json", str(out)], check=True, env=env, cwd=tree)
        results[name] = {r["concurrency"]: r for r in json.loads(out.read_text())["rows"]}
    print("\nnew / baseline:")
    print(f"{'c':>4} {'tokens/s':>9} {'TTFT p50':>9} {'entry µs/tok':>13} {'tritonserver µs/tok':>20}")
    for c, new in results["new"].items():
        old = results["baseline"].get(c)
        if old is None:
            continue

        def ratio(f):
            x, y = f(new), f(old)
            return f"{x / y:.2f}" if x and y else "-"

        print(f"{c:>4} {ratio(lambda r: r['tokens_per_s']):>9} {ratio(lambda r: r['ttft_ms_p50']):>9} "
              f"{ratio(lambda r: r['cpu_us_per_token']['nvlm']):>13} "
              f"{ratio(lambda r: r['cpu_us_per_token']['tritonserver']):>20}")
    if a.json:
        Path(a.json).write_text(json.dumps({"build": str(a.build), "baseline_tree": str(base), "max_tokens": a.max_tokens,
                                            "step_ms": a.step_ms, "baseline": list(results["baseline"].values()),
                                            "new": list(results["new"].values())}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
