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

Streams shared by the whole process, not one per worker thread (issue 32). Every LLM-step response is one gRPC
message, and the entry process's CPU per streamed token is mostly what it does per message. With a
tritonclient stream per thread, each message crossed three Python threads: the channel's spin thread,
tritonclient's response thread, and the worker. There were also 64 channels' threads for the GIL to rotate
through. Now STREAMS `grpc.aio` calls carry every request, one event-loop thread reads them, and each response
goes straight to the queue of the worker that waits for its request id. That is one thread hop per message,
and the response stays a protobuf message until the worker reads its outputs. A request abandoned half-way
is stopped with NVIDIA's `stop` request (`LLMLink.stop`), and its late responses are dropped by id.

A request whose inputs are all scalars or 1-D lists (text without stop or bad words) goes over HTTP instead, when the
server's HTTP address is known: a message costs under half there (llm_http.py). The server's gRPC address comes from
NVLM_TRITON_GRPC_URL, which `nvlm-serve` (triton_repo/server.py) and
the GPU host's launch script (builder/deploy.py) set to the port they start tritonserver on; without it,
Triton's default 127.0.0.1:8001.
"""

from __future__ import annotations

import asyncio
import collections
import os
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np

from .llm_http import HTTP_URL_ENV, HttpReader, as_json, http_url

URL_ENV = "NVLM_TRITON_GRPC_URL"
DEFAULT_URL = "127.0.0.1:8001"
FINAL = "triton_final_response"


# tritonclient's own choice: a prompt table of NVLM-D-72B (13 tiles x 256 rows x 8192 in BF16) is 54 MB
MAX_MESSAGE = 2**31 - 1
# streams per process, requests dealt round-robin: one HTTP/2 stream carries one request's messages at a time on
# the server's side, and its flow-control window is shared by everything on it
STREAMS = 8
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


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


class Reply:
    """One LLM-step response as it came off the stream (a `ModelInferResponse` message): its outputs are decoded
    only when the worker asks for them, in the worker's thread."""

    __slots__ = ("msg",)

    def __init__(self, msg):
        self.msg = msg

    @property
    def id(self) -> str:
        return self.msg.id

    @property
    def final(self) -> bool:
        params = self.msg.parameters
        return FINAL in params and params[FINAL].bool_param

    def tokens(self) -> tuple[list[int], list[float] | None] | None:
        """The new tokens and their log-probs; None for the final, empty response of a stream."""
        out = self.as_numpy("output_ids")
        if out is None:
            return None
        lp = self.as_numpy("output_log_probs")
        return out.reshape(-1).tolist(), None if lp is None else lp.reshape(-1).tolist()

    def as_numpy(self, name: str) -> np.ndarray | None:
        from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

        for i, out in enumerate(self.msg.outputs):
            if out.name != name:
                continue
            raw = self.msg.raw_output_contents[i] if i < len(self.msg.raw_output_contents) else b""
            if out.datatype == "BYTES":
                arr = deserialize_bytes_tensor(raw)
            elif out.datatype == "BF16":  # as float32, exactly (the LLM step's outputs are not BF16 today)
                arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype=triton_to_np_dtype(out.datatype))
            return arr.reshape(list(out.shape))
        return None


def _request(model: str, inputs: list, outputs: list[str], request_id: str):
    """The `ModelInferRequest` tritonclient's async_stream_infer would send (empty final response asked for)."""
    from tritonclient.grpc import service_pb2

    msg = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, value in inputs:
        t = infer_input(name, value)
        msg.inputs.append(t._get_tensor())
        msg.raw_input_contents.append(t._get_content())
    for name in outputs:
        msg.outputs.add().name = name
    msg.parameters["triton_enable_empty_final_response"].bool_param = True
    return msg


class _Stream:
    """A tritonclient client and its open stream, for a request sent apart from the shared stream (`stop`, which
    reuses the id of the request it stops); responses land in `inbox` as (result, error)."""

    def __init__(self, url: str):
        from tritonclient import grpc

        self.client = grpc.InferenceServerClient(url)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.client.start_stream(callback=lambda result, error: self.inbox.put((result, error)))

    def close(self) -> None:
        for step in (lambda: self.client.stop_stream(cancel_requests=True), self.client.close):
            try:
                step()
            except Exception:  # noqa: BLE001 — a stream or channel the server already closed
                pass


class _Inbox:
    """One request's responses as the reader delivers them: (Reply, None) or (None, error). The worker is woken
    only when it has something to do: while it waits for a response (`eager`), and for the last one (final or
    error). Between two runs it sleeps until its interval ends and the responses just queue: one wake-up per
    run of tokens, not one per token."""

    __slots__ = ("items", "wake", "eager", "ended", "on_end")

    def __init__(self):
        self.items: collections.deque = collections.deque()
        self.wake = threading.Lock()
        self.wake.acquire()
        self.eager, self.ended = True, False
        self.on_end = None  # called (on the reader's thread) once the last response is in: Call.paced

    def put(self, item) -> None:  # the reader's side
        self.items.append(item)
        reply, error = item
        if error is not None or reply.final:
            self.ended = True
            if self.on_end is not None:
                self.on_end()
        elif not self.eager:
            return
        try:
            self.wake.release()
        except RuntimeError:  # already released: the worker has a wake-up waiting
            pass

    def wait(self, timeout: float | None = None) -> None:
        self.wake.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))


class _Shared:
    """One `grpc.aio` stream to the server, read by the link's event loop. `waiting`: request id → the queue of
    the worker thread waiting for its responses ((Reply, None) or (None, error)). Dead once the stream ends;
    every request still waiting then gets the error."""

    def __init__(self):
        self.waiting: dict[str, _Inbox] = {}
        self.outgoing: asyncio.Queue = asyncio.Queue()
        self.dead: BaseException | None = None
        self.channel = None


class Call:
    """One request to the LLM step in flight, for a caller that does not wait on it (the entry's pacer): its
    responses as they have arrived (`take`), a call for when the last one has (`paced`), and `abandon`.

    `http`: (reader, its response) for a request on the HTTP road (llm_http.HttpReader), read by the caller when
    it takes its responses once `paced`; None for the gRPC road, whose responses the link's event loop delivers."""

    __slots__ = ("link", "request_id", "inbox", "_forget", "_http")

    def __init__(self, link: "LLMLink", request_id: str, inbox: _Inbox, forget, http=None):
        self.link, self.request_id, self.inbox, self._forget, self._http = link, request_id, inbox, forget, http

    def first(self) -> Reply:
        """Wait for the first response (raises ValueError for an error, naming the address when unreachable)."""
        return self.link._take(self.inbox, True)

    def take(self) -> list:
        """After `first`: every response that has arrived since, in order, up to and including the final one
        (possibly none). An error response raises ValueError with the LLM step's message."""
        self.inbox.eager = False  # nobody waits on the inbox: the reader need not wake anyone
        if self._http is not None:
            reader, resp = self._http
            reader.pull(resp)
        out = []
        while self.inbox.items and not (out and out[-1].final):
            out.append(self.link._checked(self.inbox.items.popleft(), False))
        return out

    def paced(self, wake) -> None:
        """After `first`: the caller takes the responses at its own pace (`take`), and `wake()` is called once the
        request has ended (the final response or an error is in, or, on the HTTP road, the server closed the
        connection after it), so that the next `take` finds the end: at once if it has, else on the thread that
        notices (so `wake` must be quick and must not block). It may be called twice; it is never missed."""
        self.inbox.on_end = wake
        if self._http is not None:
            reader, resp = self._http
            reader.watch(resp, wake)  # from now on read by `take`, not by the reader thread
        if self.inbox.ended:  # arrived before `wake` was set (the reader may also have called it: harmless)
            wake()

    def abandon(self) -> None:
        """Stop reading; if the LLM step still works on the request, stop it there (in the background)."""
        if self._forget():
            self.link.stop_in_background(self.request_id)


class LLMLink:
    """Requests to `model` (the LLM step) over STREAMS gRPC streams shared by every thread of the process. A thread
    sends a request and reads its responses from its own queue; a request abandoned half-way (the caller stopped
    reading, or an error) is stopped in the LLM step, and whatever it still sends is dropped."""

    def __init__(self, model: str = "tensorrt_llm", url: str | None = None, http: str | None = None):
        """`http`: the server's HTTP address (None: NVLM_TRITON_HTTP_URL; "" or unset: every request takes gRPC)."""
        self.model, self.url = model, url or server_url()
        self.http_url = (http_url() if http is None else http) or None
        self._http = None  # the HttpReader, started with the first request that takes HTTP
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: list[_Shared | None] = [None] * STREAMS
        self._next = 0

    # ------------------------------------------------------------------ the event loop's side

    def _start_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:  # one loop: the first requests of a process arrive together
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="nvlm-llm-link", daemon=True).start()
                self._loop = loop
            return self._loop

    async def _open(self, shared: _Shared) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        shared.channel = grpc.aio.insecure_channel(self.url, options=CHANNEL_OPTIONS)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(shared.channel)

        async def requests():
            while True:
                msg = await shared.outgoing.get()
                if msg is None:
                    return
                yield msg

        call = stub.ModelStreamInfer(requests())
        asyncio.get_running_loop().create_task(self._read(shared, call))

    async def _read(self, shared: _Shared, call) -> None:
        error: BaseException = ConnectionError("the LLM step's stream ended")
        try:
            async for msg in call:
                self._deliver(shared, msg)
        except Exception as e:  # noqa: BLE001 — the stream failed: every waiting request gets its error
            error = e
        with self._lock:
            shared.dead = error
            waiting, shared.waiting = shared.waiting, {}
            self._streams = [None if x is shared else x for x in self._streams]
        for inbox in waiting.values():
            inbox.put((None, error))
        await shared.channel.close()

    def _deliver(self, shared: _Shared, msg) -> None:
        reply = Reply(msg.infer_response)
        rid = reply.id
        with self._lock:
            inbox = shared.waiting.get(rid)
            if inbox is not None and (msg.error_message or reply.final):
                del shared.waiting[rid]  # its last message: nothing more goes to that queue
        if inbox is None:
            return  # an abandoned request's late response, or a `stop` request's
        inbox.put((None, ValueError(msg.error_message)) if msg.error_message else (reply, None))

    # ------------------------------------------------------------------ the worker threads' side

    def _send(self, request_id: str, msg) -> tuple[_Shared, _Inbox]:
        """Register `request_id`'s inbox on a live stream (opening one if there is none) and send `msg`."""
        loop = self._start_loop()
        inbox = _Inbox()
        with self._lock:
            k = self._next = (self._next + 1) % STREAMS
            shared = self._streams[k]
            if shared is None or shared.dead is not None:
                shared = self._streams[k] = _Shared()
                opening = True
            else:
                opening = False
            shared.waiting[request_id] = inbox
        if opening:  # the first request of a stream waits until the call exists; the others do not
            asyncio.run_coroutine_threadsafe(self._open(shared), loop).result()
        loop.call_soon_threadsafe(shared.outgoing.put_nowait, msg)
        return shared, inbox

    def _forget(self, shared: _Shared, request_id: str) -> bool:
        """Stop routing `request_id`'s responses; True if it was still waiting for some."""
        with self._lock:
            return shared.waiting.pop(request_id, None) is not None

    def open(self, inputs: list, outputs: list[str], request_id: str) -> "Call":
        """Send one request ((name, array or tensor) pairs, with their batch dimension) and return it in flight: its
        responses are read as they arrive (`Call`). `request_id` must be unique among the requests in flight."""
        body = None
        if self.http_url:
            body = as_json(inputs)  # scalars and 1-D lists: the cheaper road (llm_http.py says why)
        if body is not None:
            inbox = _Inbox()
            reader = self._http_reader()
            try:
                resp = reader.open(self.model, request_id, body, inbox)
            except OSError as e:
                raise self._unreachable(e, "HTTP", self.http_url, HTTP_URL_ENV) from None
            return Call(self, request_id, inbox, lambda: reader.close(resp), http=(reader, resp))
        shared, inbox = self._send(request_id, _request(self.model, inputs, outputs, request_id))
        return Call(self, request_id, inbox, lambda: self._forget(shared, request_id))

    def generate(self, inputs: list, outputs: list[str], request_id: str, grouped: bool = False,
                 interval: float = 0.0) -> Iterator:
        """Send one request (as `open`) and yield its responses (`Reply`; `llm_http.JsonReply` for a request that went
        over HTTP) up to and including the final one. An error response raises ValueError with the LLM step's
        message.

        `grouped`: yield lists instead — every response that had arrived when the caller asked for the next
        (at least one; the final one ends its list), and, with `interval` > 0, every response that arrives
        until `interval` seconds after the last list (the first response is yielded at once). A caller that
        answers each list with one response of its own sends one per `interval` while responses keep coming,
        instead of one per LLM-step response: the fixed cost of a response is paid per run of tokens."""
        call = self.open(inputs, outputs, request_id)
        clean = False
        try:
            yield from self._exchange(call.inbox, grouped, interval)
            clean = True
        finally:
            if not clean:
                call.abandon()

    def _http_reader(self) -> HttpReader:
        with self._lock:
            if self._http is None:
                self._http = HttpReader(self.http_url)
            return self._http

    def _exchange(self, inbox: _Inbox, grouped: bool, interval: float) -> Iterator:
        first, due = True, 0.0
        while True:
            if grouped and not first and interval > 0:
                inbox.wake.acquire(False)  # a wake-up left from before: not a reason to send early
                inbox.eager = False
                if not inbox.ended and (left := due - time.monotonic()) > 0:
                    inbox.wait(left)  # woken early only by the request's last response
                inbox.eager = True
            group = [self._take(inbox, first)]
            while grouped and not group[-1].final and inbox.items:
                group.append(self._checked(inbox.items.popleft(), False))
            first = False
            due = time.monotonic() + interval
            yield group if grouped else group[0]
            if group[-1].final:
                return

    def _take(self, inbox: _Inbox, first: bool) -> Reply:
        while not inbox.items:
            inbox.wait()
        return self._checked(inbox.items.popleft(), first)

    def _checked(self, item, first: bool) -> Reply:
        reply, error = item
        if error is not None:
            if first and _unavailable(error):
                raise self._unreachable(error)
            raise ValueError(_message(error))
        return reply

    def run(self, inputs: list, outputs: list[str], request_id: str) -> list:
        """Send a request on a stream of its own and wait for all its responses (tritonclient InferResults): a
        `stop` request, which carries the id of the request it stops."""
        s = _Stream(self.url)
        try:
            from tritonclient import grpc

            s.client.async_stream_infer(self.model, [infer_input(n, v) for n, v in inputs], request_id=request_id,
                                        outputs=[grpc.InferRequestedOutput(n) for n in outputs],
                                        enable_empty_final_response=True)
            out = []
            while True:
                result, error = s.inbox.get(timeout=60)
                if error is not None:
                    raise ValueError(_message(error))
                out.append(result)
                params = result.get_response().parameters
                if FINAL in params and params[FINAL].bool_param:
                    return out
        finally:
            s.close()

    def stop(self, request_id: str) -> None:
        """NVIDIA's way to stop a request in the `tensorrtllm` backend: a request with the same id and `stop`
        set (with the inputs Triton requires). Its own response is empty."""
        stop = [("input_ids", np.zeros((1, 1), np.int32)), ("input_lengths", np.ones((1, 1), np.int32)),
                ("request_output_len", np.ones((1, 1), np.int32)), ("stop", np.ones((1, 1), bool))]
        self.run(stop, ["output_ids"], request_id)

    def stop_in_background(self, request_id: str) -> None:
        """`stop` from a thread of its own: the caller (a worker, the pacer) does not wait for the round trip."""
        threading.Thread(target=self._stop_quietly, args=(request_id,), daemon=True).start()

    def _stop_quietly(self, request_id: str) -> None:
        try:
            self.stop(request_id)
        except Exception:  # noqa: BLE001 — the request may have ended meanwhile, or the server gone
            pass

    def _unreachable(self, error, road: str = "gRPC", url: str | None = None, env: str = URL_ENV) -> ValueError:
        return ValueError(f"the entry model cannot reach the LLM step at {url or self.url}, its server's {road} "
                          f"address (set {env} to it when tritonserver listens elsewhere): {_message(error)}")

    def close(self) -> None:
        with self._lock:
            streams, self._streams = self._streams, [None] * STREAMS
            reader, self._http = self._http, None
        if reader is not None:
            reader.shutdown()
        loop = self._loop
        if loop is None:
            return

        async def end() -> None:
            # ends the request streams, then closes their channels: a loop stopped at once left them open, and while
            # this process lived the server counted the LLM step as busy and waited its 30 s exit timeout to stop
            for shared in streams:
                if shared is not None:
                    shared.outgoing.put_nowait(None)
            for shared in streams:
                if shared is not None and shared.channel is not None:
                    await shared.channel.close(grace=1.0)

        try:
            asyncio.run_coroutine_threadsafe(end(), loop).result(timeout=5)
        except Exception:  # noqa: BLE001 — a loop or channel already gone: nothing left to close
            pass
        loop.call_soon_threadsafe(loop.stop)
        self._loop = None


def _message(error) -> str:
    if hasattr(error, "details") and callable(error.details):  # grpc.aio.AioRpcError
        return error.details() or str(error)
    return error.message() if hasattr(error, "message") else str(error)


def _unavailable(error) -> bool:
    import grpc

    code = error.code() if hasattr(error, "code") and callable(error.code) else None
    return code == grpc.StatusCode.UNAVAILABLE or "UNAVAILABLE" in str(getattr(error, "status", lambda: "")())
