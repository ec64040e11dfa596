"""Hunt for a serving hang: rounds of closed-loop load on kept-open gRPC streams, each on a fresh server.

Each round serves the build with the keeper's probe off (a hang must stay a hang), sends REQUESTS requests of
the soak's workload (`mixed:1`: text and one-tile images) on CONCURRENCY kept-open streams, and calls the round
hung when it has not finished within --hang-s. On a hang, --stacks DIR keeps gdb's native stacks and py-spy's
Python stacks of every process under the server, then the round's server is stopped and the next round starts.

    .venv/bin/python benchmarks/hang_stress.py BUILD --concurrency 8 --requests 2000 --max-tokens 8 --rounds 10

docs/serving.md ("An intermittent hang") records its results before and after the entry model's gRPC link.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.loadgen import run_closed_loop, summarize  # noqa: E402
from clients.workloads import load_workload  # noqa: E402
from triton_repo.keeper import descendants  # noqa: E402
from triton_repo.server import TritonServer  # noqa: E402


def free_ports(n: int) -> list[int]:
    """n ports free right now (the OS picks them)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def dump_stacks(root_pid: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for pid in [root_pid, *descendants(root_pid)]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = (argv[1] if len(argv) > 1 and argv[1] else argv[0]).decode(errors="replace")
        if shutil.which("gdb"):
            bt = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                                capture_output=True, text=True, timeout=120).stdout
            (out / f"native-{pid}.txt").write_text(f"{name}\n{bt}")
        py = subprocess.run([sys.executable, "-m", "py_spy", "dump", "--pid", str(pid)],
                            capture_output=True, text=True, timeout=60)
        (out / f"python-{pid}.txt").write_text(f"{name}\n{py.stdout}{py.stderr}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000, help="per round")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--hang-s", type=float, default=150.0, help="a round not finished by then is a hang")
    ap.add_argument("--stacks", type=Path, help="keep native and Python stacks of a hung server here")
    args = ap.parse_args(argv)

    items = load_workload("mixed:1", seed=0)
    hung = 0
    for rnd in range(args.rounds):
        grpc, http, metrics = free_ports(3)
        with TritonServer(args.build / "triton_repo", grpc_port=grpc, http_port=http, metrics_port=metrics,
                          hang_timeout=0) as srv:
            result: dict = {}

            def load(url=srv.grpc_url, seed=rnd):
                result["run"] = run_closed_loop(url, "nvlm", items, args.concurrency, args.requests,
                                                args.max_tokens, seed=seed, keep_streams=True)

            t = threading.Thread(target=load, daemon=True)
            t0 = time.perf_counter()
            t.start()
            t.join(timeout=args.hang_s)
            if t.is_alive():
                hung += 1
                print(f"round {rnd}: HUNG (no end after {time.perf_counter() - t0:.0f} s)", flush=True)
                if args.stacks:
                    dump_stacks(srv.proc.pid, args.stacks / f"round{rnd}")
                continue
            samples, wall = result["run"]
            r = summarize(samples, wall)
            print(f"round {rnd}: {r['requests']} requests, {r['failed']} failed, {wall:.0f} s", flush=True)
            for err in r["errors"][:3]:
                print(f"  error: {err}", flush=True)
            if r["failed"]:  # what the server said (a dead stub: the keeper's restart line)
                log = srv.log_file.read_text(errors="replace").splitlines() if srv.log_file.is_file() else []
                for line in [ln for ln in log if "keeper" in ln or "Stub" in ln or "rror" in ln][:8]:
                    print(f"  server: {line[:300]}", flush=True)
                if args.stacks:
                    args.stacks.mkdir(parents=True, exist_ok=True)
                    shutil.copy(srv.log_file, args.stacks / f"round{rnd}-tritonserver.log")
    print(f"{hung} of {args.rounds} rounds hung")
    return 1 if hung else 0


if __name__ == "__main__":
    sys.exit(main())
