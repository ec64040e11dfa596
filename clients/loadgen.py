"""Load generation for `nvlm-bench`: closed-loop concurrency and Poisson open loop over gRPC streaming,
per-request timings (TTFT, ITL, TPOT, end to end), their statistics, and Triton's per-model server statistics."""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from clients.openai_client import OpenAIChatClient
from clients.triton_client import ClientError, NVLMClient

from .workloads import Item


@dataclass
class Sample:
    label: str
    ok: bool
    error: str | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    tokens: int = 0
    index: int = -1  # the request's number in its run; its workload item is items[index % len(items)]
    token_ids: list[int] = field(default_factory=list)


def client_for(url: str, model: str, keep_stream: bool = False):
    """The endpoint's client: the OpenAI API for an http(s) URL (…/v1), Triton gRPC otherwise."""
    if url.startswith(("http://", "https://")):
        return OpenAIChatClient(url, model, keep_stream=keep_stream)
    return NVLMClient(url, model, keep_stream=keep_stream)


def one_request(client, item: Item, max_tokens: int, seed: int, min_tokens: int = 0, index: int = -1) -> Sample:
    """One streamed request. `min_tokens` (--min-tokens) is sent as min_tokens, so that every
    request produces the same length, as genai-perf and aiperf do for fixed output lengths."""

    extra = {"min_tokens": ("INT32", np.array([min_tokens], np.int32))} if min_tokens else None
    try:
        ans = client.generate(item.prompt, item.images, max_tokens=max_tokens, stream=True, seed=seed, extra=extra)
    except ClientError as e:
        return Sample(item.label, False, str(e), index=index)
    stamps = ans.chunk_times  # arrival times after the send, stamped in the stream's thread
    if not stamps:
        return Sample(item.label, False, "no tokens returned", index=index)
    itls = [b - a for a, b in zip(stamps, stamps[1:])]
    return Sample(item.label, True, None, stamps[0], itls, ans.seconds, len(ans.tokens), index, list(ans.tokens))


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
        # streamed responses that carried tokens (one per token while the server keeps up, fewer under load)
        "tokens_per_response": (sum(s.tokens for s in ok) / sum(len(s.itls) + 1 for s in ok)) if ok else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None, "seconds": wall,
    }


def server_stats(url: str) -> dict:
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(as_json=True)
    out = {}
    for m in stats.get("model_stats", []):
        s = m.get("inference_stats", {})
        out[m["name"]] = {k: (int(s.get(k, {}).get("count", 0)), int(s.get(k, {}).get("ns", 0)))
                          for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")}
    return out


def stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for model, cur in after.items():
        prev = before.get(model, {k: (0, 0) for k in cur})
        n = cur["success"][0] - prev["success"][0]
        if n <= 0:
            continue
        out[model] = {"requests": n, **{f"{k}_ms": (cur[k][1] - prev[k][1]) / n / 1e6
                                        for k in ("queue", "compute_input", "compute_infer", "compute_output")}}
    return out


def _measure(client, item: Item, max_tokens: int, seed: int, min_tokens: int, dead: threading.Event,
             index: int = -1) -> Sample:
    """One request; a failure with the server gone sets `dead`, which stops the run (no more sends)."""

    s = one_request(client, item, max_tokens, seed, min_tokens, index)
    if not s.ok:
        try:
            client.check()
        except ClientError:
            dead.set()
    return s


def run_closed_loop(url, model, items, concurrency, requests, max_tokens, seed, *, min_tokens: int = 0,
                    dead: threading.Event | None = None, keep_streams: bool = False) -> tuple[list[Sample], float]:
    """`concurrency` workers, each sending its next request as soon as its last one ended. `keep_streams`:
    each worker keeps one gRPC stream open for all its requests (perf_analyzer's pattern) instead of a
    stream per request."""
    dead = dead or threading.Event()
    lock, next_index, samples = threading.Lock(), [0], []

    def worker():
        client = client_for(url, model, keep_streams)
        try:
            while not dead.is_set():
                with lock:
                    k = next_index[0]
                    next_index[0] += 1
                if k >= requests:
                    return
                s = _measure(client, items[k % len(items)], max_tokens, seed + k, min_tokens, dead, k)
                with lock:
                    samples.append(s)
        finally:
            client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return samples, time.perf_counter() - t0


def run_open_loop(url, model, items, rate, requests, max_tokens, seed, *, min_tokens: int = 0,
                  dead: threading.Event | None = None) -> tuple[list[Sample], float]:
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
        c = client_for(url, model)
        c.check()
        idle.put(c)

    def fire(k):
        try:
            client = idle.get_nowait()
        except queue.Empty:
            client = client_for(url, model)
        s = _measure(client, items[k % len(items)], max_tokens, seed + k, min_tokens, dead, k)
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
