"""The entry model's link to the LLM step: a gRPC stream to the server the entry model runs in.

Why not a decoupled BLS call (`pb_utils.InferenceRequest(...).exec(decoupled=True)`): in the Python backend
— the r24.10 build bundled here, and unchanged in python_backend main as of f9088ff (2026) — one stub's
threads can deadlock once two of them use decoupled BLS at the same time, which the entry model does by
design (each request on its own worker thread, issue 16). The cycle, read in the backend's sources:

- a worker iterating its response stream (`ResponseIterator::Next`, pb_response_iterator.cc) wakes with
  the iterator's mutex held and only then takes the GIL back (its `gil_scoped_release` sits inside the
  locked wait loop);
- the stub's delivery thread (`Stub::ProcessBLSResponseDecoupled`, pb_stub.cc) holds the stub-wide
  iterator map's mutex while it enqueues that stream's next response, i.e. while it waits for the
  iterator's mutex;
- a worker whose `exec(decoupled=True)` returns takes the map's mutex in `Stub::GetResponseIterator`
  while holding the GIL.

Nothing moves again: the stub stops answering, the parent waits on it, and the server hangs (seen in the
soak test about once in ten runs, docs/serving.md). A gRPC stream per worker thread touches none of those
locks: the gRPC library hands each response to a queue the worker waits on. The same client-side stream is
what perf_analyzer and `nvlm-client` use, so the LLM step sees the requests a client would send.

The server's gRPC address comes from NVLM_TRITON_GRPC_URL, which `nvlm-serve` (triton_repo/server.py) and
the GPU host's launch script (builder/deploy.py) set to the port they start tritonserver on; without it,
Triton's default 127.0.0.1:8001.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np

URL_ENV = "NVLM_TRITON_GRPC_URL"
DEFAULT_URL = "127.0.0.1:8001"
FINAL = "triton_final_response"


def _is_final(result) -> bool:
    params = result.get_response().parameters
    return FINAL in params and params[FINAL].bool_param


def server_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def _bf16_array(x) -> tuple[np.ndarray, str]:
    """A torch bfloat16 tensor as the array tritonclient takes for BF16: ml_dtypes.bfloat16 from
    tritonclient r26.06 on, float32 (truncated to BF16 on the wire, exact for BF16 values) before it."""
    import torch
    from tritonclient.utils import np_to_triton_dtype

    try:
        import ml_dtypes
    except ImportError:
        ml_dtypes = None
    if ml_dtypes is not None and np_to_triton_dtype(np.dtype(ml_dtypes.bfloat16)) == "BF16":
        return x.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16), "BF16"
    return x.float().numpy(), "BF16"


def infer_input(name: str, value):
    """A tritonclient gRPC input from a NumPy array or a torch tensor (BF16 included)."""
    from tritonclient import grpc
    from tritonclient.utils import np_to_triton_dtype

    if hasattr(value, "dtype") and str(value.dtype) == "torch.bfloat16":
        arr, dtype = _bf16_array(value)
    else:
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        dtype = np_to_triton_dtype(arr.dtype)
    t = grpc.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(np.ascontiguousarray(arr))
    return t


class _Stream:
    """One client and its open stream; responses land in `inbox` as (result, error)."""

    def __init__(self, url: str):
        from tritonclient import grpc

        self.client = grpc.InferenceServerClient(url)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        self.client.start_stream(callback=lambda result, error: self.inbox.put((result, error)))

    def close(self) -> None:
        self.closed = True
        for step in (lambda: self.client.stop_stream(cancel_requests=True), self.client.close):
            try:
                step()
            except Exception:  # noqa: BLE001 — a stream or channel the server already closed
                pass


class LLMLink:
    """Requests to `model` (the LLM step) on one gRPC stream per calling thread, kept open between its
    requests. A thread runs one request at a time; a request abandoned half-way (the caller stopped
    reading, or an error) closes its thread's stream, so no stale response reaches the next one."""

    def __init__(self, model: str = "tensorrt_llm", url: str | None = None):
        self.model, self.url = model, url or server_url()
        self._local = threading.local()
        self._all: set[_Stream] = set()
        self._lock = threading.Lock()

    def _stream(self) -> _Stream:
        s = getattr(self._local, "stream", None)
        if s is None or s.closed:
            s = _Stream(self.url)
            self._local.stream = s
            with self._lock:
                self._all.add(s)
        return s

    def _drop(self, s: _Stream) -> None:
        # a generator may be finalized on another thread (garbage collection): clear only our own slot;
        # the owner sees `closed` and opens a new stream
        if getattr(self._local, "stream", None) is s:
            self._local.stream = None
        with self._lock:
            self._all.discard(s)
        s.close()

    def generate(self, inputs: list, outputs: list[str], request_id: str, grouped: bool = False,
                 interval: float = 0.0) -> Iterator:
        """Send one request ((name, array or tensor) pairs, with their batch dimension) on this thread's stream
        and yield its responses (tritonclient InferResult) up to and including the final one. An error
        response raises ValueError with the LLM step's message.

        `grouped`: yield lists instead — every response that had arrived when the caller asked for the next
        (at least one; the final one ends its list), and, with `interval` > 0, every response that arrives
        until `interval` seconds after the last list (the first response is yielded at once). A caller that
        answers each list with one response of its own sends one per `interval` while responses keep coming,
        instead of one per LLM-step response: the fixed cost of a response is paid per run of tokens."""
        s = self._stream()
        clean = False
        try:
            yield from self._exchange(s, inputs, outputs, request_id, grouped, interval)
            clean = True
        finally:
            if not clean:
                self._drop(s)

    def run(self, inputs: list, outputs: list[str], request_id: str) -> list:
        """Send a request and wait for all its responses, on a stream of its own (e.g. a `stop` request
        sent while this thread's stream still carries the request it stops)."""
        s = _Stream(self.url)
        try:
            return list(self._exchange(s, inputs, outputs, request_id))
        finally:
            s.close()

    def _exchange(self, s: _Stream, inputs: list, outputs: list[str], request_id: str,
                  grouped: bool = False, interval: float = 0.0) -> Iterator:
        from tritonclient import grpc

        try:
            s.client.async_stream_infer(self.model, [infer_input(n, v) for n, v in inputs],
                                        outputs=[grpc.InferRequestedOutput(n) for n in outputs],
                                        request_id=request_id, enable_empty_final_response=True)
        except Exception as e:  # noqa: BLE001 — a stream that failed: the detail went to the callback
            try:
                e = s.inbox.get(timeout=1.0)[1] or e
            except queue.Empty:
                pass
            raise self._unreachable(e) from None
        first, due = True, 0.0
        while True:
            group = [self._receive(s, request_id, first)]
            # the one reader of this inbox: not empty means the next get does not wait
            while grouped and not _is_final(group[-1]):
                wait = 0.0 if first else due - time.monotonic()
                if wait <= 0 and s.inbox.empty():
                    break
                try:
                    group.append(self._receive(s, request_id, False, timeout=max(wait, 0.0) or None))
                except queue.Empty:
                    break
            first = False
            due = time.monotonic() + interval
            yield group if grouped else group[0]
            if _is_final(group[-1]):
                return

    def _receive(self, s: _Stream, request_id: str, first: bool, timeout: float | None = None):
        result, error = s.inbox.get(timeout=timeout) if timeout else s.inbox.get()
        if error is not None:
            if first and "UNAVAILABLE" in str(getattr(error, "status", lambda: "")()):
                raise self._unreachable(error)
            raise ValueError(error.message() if hasattr(error, "message") else str(error))
        answered = result.get_response().id
        if answered != request_id:  # cannot happen on a stream used by one request at a time
            raise ValueError(f"LLM step answered request {answered!r} on the stream of {request_id!r}")
        return result

    def _unreachable(self, error) -> ValueError:
        detail = error.message() if hasattr(error, "message") else str(error)
        return ValueError(f"the entry model cannot reach the LLM step at {self.url}, its server's gRPC address "
                          f"(set {URL_ENV} to it when tritonserver listens elsewhere): {detail}")

    def close(self) -> None:
        with self._lock:
            streams, self._all = list(self._all), set()
        for s in streams:
            s.close()
