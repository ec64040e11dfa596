"""The floor under the entry model's CPU per streamed token (issue 32): what one LLM-step message costs a Python
process that receives it over gRPC, measured with nothing else in that process.

    .venv/bin/python benchmarks/link_floor.py --build BUILD [--concurrency 32] [--seconds 15] [--max-tokens 128]
        [--step-ms 10] [--interval-ms 40]

NVIDIA's `tensorrtllm` backend sends one response per decode step per streamed request, each with that step's
one new token (TensorRT-LLM's `LlmRequest::createResult` sends the tokens since the last response, and the
executor creates a response every iteration; the backend's `WaitForResponse` sends each executor response as its
own Triton response; no setting coalesces them in the C++ engine path — docs/PERFORMANCE.md cites the sources).
So the entry model receives one gRPC message per streamed token, whatever it does with them afterwards, and the
CPU that one message costs the receiving process is a floor under its CPU per token.

Both runs stream the same requests from the null engine (BUILD's contract repository with
`--null-engine`, served by the bundled tritonserver) into this process, at the same concurrency:

- `floor`: grpc.aio streams read by one event loop that only counts the messages: the cost of receiving them.
- `link`: triton_repo.llm_link.LLMLink as the entry model uses it — one thread per request reading its responses
  in runs per stream interval, each response's `output_ids` decoded.
- `http`: the same requests over Triton's HTTP `generate_stream` (server-sent events), every connection read by
  one selector loop: what a message costs without grpc's Python layer. The entry's link takes this road for text
  without stop or bad words (triton_repo/llm_http.py); `link` here is its gRPC road, which the rest still take.

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


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


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

    server_pid = 0  # tritonserver's, set once it runs: its CPU per message is read over the same window

    def __init__(self):
        self.count = 0  # messages received: every thread adds to it (under the GIL: exact enough for a rate)

    def measure(self, seconds: float, settle: float = 1.0) -> dict:
        time.sleep(settle)  # every slot busy before the window opens
        n0, t0, cpu0, wall0 = self.count, thread_cpu(), time.process_time(), time.perf_counter()
        s0 = process_cpu(Window.server_pid)
        time.sleep(seconds)
        n1, t1, cpu1, wall1 = self.count, thread_cpu(), time.process_time(), time.perf_counter()
        s1 = process_cpu(Window.server_pid)
        n = max(n1 - n0, 1)
        split = cpu_split(t0, t1)
        grpc_us = split.get("event_engine", 0.0) / n * 1e6
        total_us = (cpu1 - cpu0) / n * 1e6
        return {"tokens_per_s": n / (wall1 - wall0), "us": total_us, "grpc_us": grpc_us,
                "python_us": total_us - grpc_us, "tritonserver_us": (s1 - s0) / n * 1e6}


def run_link(url: str, concurrency: int, seconds: float, max_tokens: int, interval: float) -> dict:
    from triton_repo.llm_link import LLMLink

    link, stop, window = LLMLink("tensorrt_llm", url, http=""), threading.Event(), Window()  # its gRPC road

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


def run_floor(url: str, concurrency: int, seconds: float, max_tokens: int) -> dict:
    """`concurrency` requests in flight at all times over the link's number of streams; each message is counted."""
    import asyncio

    import grpc
    from tritonclient.grpc import service_pb2_grpc

    from triton_repo.llm_link import CHANNEL_OPTIONS, FINAL, STREAMS, _request

    window, result = Window(), {}

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


def run_http(url: str, concurrency: int, seconds: float, max_tokens: int) -> dict:
    """The same requests over Triton's HTTP generate_stream (server-sent events), every connection read by one
    selector loop in this thread: what receiving a message costs without grpc. Closed loop: a slot whose stream
    ended sends its next request on a new connection."""
    import json
    import selectors
    import socket

    host, port = url.rsplit(":", 1)
    window, result, sel, k = Window(), {}, selectors.DefaultSelector(), [0]

    def send() -> None:
        k[0] += 1
        body = json.dumps({"input_ids": list(range(1, 20)), "input_lengths": 19, "request_output_len": max_tokens,
                           "streaming": True, "seed": k[0]}).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v2/models/tensorrt_llm/generate_stream HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, [b""])

    def measure() -> None:
        result.update(window.measure(seconds))

    for _ in range(concurrency):
        send()
    timer = threading.Thread(target=measure)
    timer.start()
    while timer.is_alive():
        for key, _ in sel.select(0.5):
            sock, buf = key.fileobj, key.data
            buf[0] += sock.recv(1 << 16)
            # chunked transfer: one event per chunk in practice; the chunk-size lines sit between events
            *events, buf[0] = buf[0].split(b"\n\n")
            for ev in events:
                i = ev.find(b"data: ")
                if i >= 0:
                    out = json.loads(ev[i + 6:]).get("output_ids")
                    window.count += len(out) if isinstance(out, list) else int(out is not None)
            if buf[0].lstrip(b"\r\n").startswith(b"0\r\n"):  # the last chunk: this request ended
                sel.unregister(sock)
                sock.close()
                send()
    for key in list(sel.get_map().values()):
        key.fileobj.close()
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
    url, rows = f"127.0.0.1:{a.port}", {}
    try:
        from benchmarks.serving_capacity import processes

        Window.server_pid = processes(server.proc.pid)["tritonserver"][0]  # server.proc is its keeper
        run_link(url, 1, 2.0, a.max_tokens, a.interval_ms / 1e3)  # warm-up: imports, channels
        http_url = f"127.0.0.1:{a.port + 1}"
        for name in ("floor", "link", "http"):
            if name == "floor":
                r = rows[name] = run_floor(url, a.concurrency, a.seconds, a.max_tokens)
            elif name == "http":
                r = rows[name] = run_http(http_url, a.concurrency, a.seconds, a.max_tokens)
            else:
                r = rows[name] = run_link(url, a.concurrency, a.seconds, a.max_tokens, a.interval_ms / 1e3)
            print(f"{name:<6} c={a.concurrency}: {r['tokens_per_s']:7.0f} tokens/s  CPU µs per message: {r['us']:6.1f}"
                  f"  (gRPC's C++ threads {r['grpc_us']:5.1f}, the Python threads {r['python_us']:5.1f}); tritonserver"
                  f" {r['tritonserver_us']:5.1f}", flush=True)
    finally:
        server.stop()
    print(f"link / floor: {rows['link']['us'] / rows['floor']['us']:.2f}   "
          f"http / floor: {rows['http']['us'] / rows['floor']['us']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
