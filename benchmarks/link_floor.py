"""The floor under the entry model's CPU per streamed token (issue 32): what one LLM-step message costs a Python
process that receives it, over gRPC and over HTTP, measured with nothing else in that process.

    .venv/bin/python benchmarks/link_floor.py --build BUILD [--concurrency 32] [--seconds 15] [--max-tokens 128]
        [--step-ms 10] [--interval-ms 40]

NVIDIA's `tensorrtllm` backend sends one response per decode step per streamed request, each with that step's
one new token (TensorRT-LLM's `LlmRequest::createResult` sends the tokens since the last response, and the
executor creates a response every iteration; the backend's `WaitForResponse` sends each executor response as its
own Triton response; no setting coalesces them in the C++ engine path — docs/PERFORMANCE.md cites the sources).
So the entry model receives one message per streamed token, whatever it does with them afterwards, and the CPU
that one message costs the receiving process is a floor under its CPU per token.

The three runs stream the same requests from the null engine (BUILD's contract repository with `--null-engine`,
served by the bundled tritonserver) into this process, at the same concurrency:

- `floor`: grpc.aio streams read by one event loop that only counts the messages: the cost of receiving them.
- `grpc`: triton_repo.llm_link.LLMLink as the entry model uses it, on its gRPC road — one thread per request
  reading its responses in runs per stream interval, each response's `output_ids` decoded.
- `http`: the same LLMLink on its HTTP road (triton_repo/llm_http.py: Triton's `generate_stream`, every
  connection read by one selector thread), which the entry takes for text without stop or bad words.

Printed per run: tokens/s, this process's CPU µs per message (= per token), split into gRPC's own C++ threads
(`event_engine`) and the Python threads, tritonserver's CPU per message over the same window, and the ratios
to the floor.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.serving_capacity import cpu_seconds, processes  # noqa: E402 — after the path is set

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """Thread id → (name, CPU seconds) of every thread of this process, from /proc."""
    out = {}
    for d in Path("/proc/self/task").iterdir():
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        out[d.name] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def cpu_split(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds between two `thread_cpu` readings: gRPC's C++ threads apart from the Python threads."""
    split: collections.Counter = collections.Counter()
    for tid, (name, cpu) in after.items():
        spent = cpu - before.get(tid, (name, 0.0))[1]
        split["event_engine" if name.startswith(("event_engine", "grpc")) else "python"] += spent
    return dict(split)


def llm_inputs(seed: int, max_tokens: int) -> list:
    ids = np.arange(1, 20, dtype=np.int32)
    return [("input_ids", ids[None]), ("input_lengths", np.asarray([[ids.size]], np.int32)),
            ("request_output_len", np.asarray([[max_tokens]], np.int32)), ("streaming", np.asarray([[True]])),
            ("seed", np.asarray([[seed]], np.uint64))]


class Window:
    """Messages counted and this process's CPU read at the same two instants, while every thread is alive (a
    thread that ended takes its /proc entry with it)."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid  # tritonserver's CPU per message is read over the same window
        self.count = 0  # messages received: every thread adds to it (under the GIL: exact enough for a rate)

    def measure(self, seconds: float, settle: float = 1.0) -> dict:
        time.sleep(settle)  # every slot busy before the window opens
        n0, t0, cpu0, wall0 = self.count, thread_cpu(), time.process_time(), time.perf_counter()
        s0 = cpu_seconds(self.server_pid)
        time.sleep(seconds)
        n1, t1, cpu1, wall1 = self.count, thread_cpu(), time.process_time(), time.perf_counter()
        s1 = cpu_seconds(self.server_pid)
        n = max(n1 - n0, 1)
        split = cpu_split(t0, t1)
        grpc_us = split.get("event_engine", 0.0) / n * 1e6
        total_us = (cpu1 - cpu0) / n * 1e6
        return {"tokens_per_s": n / (wall1 - wall0), "us": total_us, "grpc_us": grpc_us,
                "python_us": total_us - grpc_us, "tritonserver_us": (s1 - s0) / n * 1e6}


def run_link(url: str, http: str, concurrency: int, seconds: float, max_tokens: int, interval: float,
             server_pid: int) -> dict:
    """LLMLink as the entry uses it, over the road `http` selects: its HTTP address, or "" for gRPC."""
    from triton_repo.llm_link import LLMLink

    link, stop, window = LLMLink("tensorrt_llm", url, http=http), threading.Event(), Window(server_pid)

    def worker(slot: int) -> None:
        k = 0
        while not stop.is_set():
            for group in link.generate(llm_inputs(slot * 1000 + k, max_tokens), ["output_ids"], uuid.uuid4().hex,
                                       grouped=True, interval=interval):
                for reply in group:
                    out = reply.as_numpy("output_ids")
                    window.count += 0 if out is None else out.size
            k += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    [t.start() for t in threads]
    result = window.measure(seconds)
    stop.set()
    [t.join() for t in threads]
    link.close()
    return result


def run_floor(url: str, concurrency: int, seconds: float, max_tokens: int, server_pid: int) -> dict:
    """`concurrency` requests in flight at all times over the link's number of streams; each message is counted."""
    import asyncio

    import grpc
    from tritonclient.grpc import service_pb2_grpc

    from triton_repo.llm_link import CHANNEL_OPTIONS, FINAL, STREAMS, _request

    window, result = Window(server_pid), {}

    async def main() -> None:
        k, in_flight, done, stopping = [0], [0], asyncio.Event(), [False]

        def next_request():
            k[0] += 1
            in_flight[0] += 1
            return _request("tensorrt_llm", llm_inputs(k[0], max_tokens), ["output_ids"], uuid.uuid4().hex)

        channels, queues = [], []
        for s in range(STREAMS):
            ch = grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS)
            q: asyncio.Queue = asyncio.Queue()
            channels.append(ch)
            queues.append(q)

        async def requests(q):
            while (msg := await q.get()) is not None:
                yield msg

        async def read(s: int, call):
            async for msg in call:
                params = msg.infer_response.parameters
                if FINAL in params and params[FINAL].bool_param:
                    in_flight[0] -= 1
                    if not stopping[0]:
                        queues[s].put_nowait(next_request())  # closed loop: the slot's next request
                    elif in_flight[0] == 0:
                        done.set()
                else:
                    window.count += 1

        calls = [service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(requests(q))
                 for ch, q in zip(channels, queues)]
        readers = [asyncio.create_task(read(s, call)) for s, call in enumerate(calls)]
        for i in range(concurrency):
            queues[i % STREAMS].put_nowait(next_request())
        # the window is measured in a thread: this loop keeps reading meanwhile
        result.update(await asyncio.get_running_loop().run_in_executor(None, window.measure, seconds))
        stopping[0] = True
        await done.wait()
        for q in queues:
            q.put_nowait(None)
        await asyncio.gather(*readers, return_exceptions=True)
        for ch in channels:
            await ch.close()

    asyncio.run(main())
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", required=True, help="an nvlm-build engine output (max batch size ≥ the concurrency)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=10.0, help="the null engine's decode step")
    ap.add_argument("--interval-ms", type=float, default=40.0, help="the link's runs: the entry's stream interval")
    ap.add_argument("--port", type=int, default=24700)
    a = ap.parse_args(argv)

    from triton_repo.generate import generate_repo
    from triton_repo.server import TritonServer

    os.environ["NVLM_NULL_STEP_MS"] = str(a.step_ms)
    work = Path(tempfile.mkdtemp(prefix="nvlm-link-floor-"))
    generate_repo(a.build, work / "repo", "contract", null_engine=True)
    server = TritonServer(work / "repo", grpc_port=a.port, http_port=a.port + 1, metrics_port=a.port + 2,
                          hang_timeout=0, log_file=work / "tritonserver.log").start()
    url, http, rows = f"127.0.0.1:{a.port}", f"127.0.0.1:{a.port + 1}", {}
    try:
        pid = processes(server.proc.pid)["tritonserver"][0]  # server.proc is its keeper
        interval = a.interval_ms / 1e3
        run_link(url, "", 1, 2.0, a.max_tokens, interval, pid)  # warm-up: imports, channels
        runs = {"floor": lambda: run_floor(url, a.concurrency, a.seconds, a.max_tokens, pid),
                "grpc": lambda: run_link(url, "", a.concurrency, a.seconds, a.max_tokens, interval, pid),
                "http": lambda: run_link(url, http, a.concurrency, a.seconds, a.max_tokens, interval, pid)}
        for name, run in runs.items():
            r = rows[name] = run()
            print(f"{name:<6} c={a.concurrency}: {r['tokens_per_s']:7.0f} tokens/s  CPU µs per message: {r['us']:6.1f}"
                  f"  (gRPC's C++ threads {r['grpc_us']:5.1f}, the Python threads {r['python_us']:5.1f}); tritonserver"
                  f" {r['tritonserver_us']:5.1f}", flush=True)
    finally:
        server.stop()
    print(f"link over gRPC / floor: {rows['grpc']['us'] / rows['floor']['us']:.2f}   "
          f"link over HTTP / floor: {rows['http']['us'] / rows['floor']['us']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
