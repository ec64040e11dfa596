"""The serving logic that needs no Triton stub: unit-testable without a server (tests/test_serving_core.py).

- `watch`, `AtMostEvery`: noticing a client that went away without a round trip per token;
- `PendingRun`, `Outbox`: the LLM step's coalescing of a streamed request's tokens and its one sending thread;
- `Admission`, `LeavingSender`: how many requests the entry model carries;
- `entry_decoding`, `AnswerStream`: what the entry model sends the LLM step for a request's decoding parameters,
  and how it turns the LLM step's responses into the client's answer — stop words held back and removed, text
  decoded incrementally, log-probs kept in line with the tokens passed on.

The Python models (triton_repo/models/) put these together with `triton_python_backend_utils`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from runtime.core import request_schema as schema
from runtime.decoding import StopFilter, to_trtllm, word_list
from runtime.tokenizer import StreamDecoder

from .keeper import PROBE_PARAMETER, SHARED_PREFIX_ENV, STREAM_INTERVAL_ENV, STREAM_INTERVAL_MS


def watch(future, is_cancelled, flag: threading.Event, period: float = 0.01):
    """Wait for a request's result on the request's own thread, asking Triton every `period` whether its
    client went away (`is_cancelled`: a round trip from the stub to tritonserver) and setting its stop flag
    if so. The batcher's loop only reads the flag: asked from there, the round trips of every active request
    held up each decode step of the whole batch."""
    from concurrent.futures import TimeoutError as Pending

    while True:
        try:
            return future.result(timeout=period)
        except Pending:
            if not flag.is_set() and is_cancelled():
                flag.set()


class AtMostEvery:
    """A costly yes/no check asked at most once per `period` seconds, the first time one period after it was made;
    in between, the last answer stands (no, at first), and a yes stays yes. For `request.is_cancelled()`: each call
    is a round trip from the stub to tritonserver, and asked for every token of every request it cost a round trip
    per token — asked at once, one on the way to each request's first token; a client that goes away is still
    noticed within `period`."""

    def __init__(self, check, period: float = 0.01):
        self.check, self.period = check, period
        self.answer, self.next = False, time.monotonic() + period

    def __call__(self) -> bool:
        if not self.answer:
            now = time.monotonic()
            if now >= self.next:
                self.answer, self.next = bool(self.check()), now + self.period
        return self.answer


def stream_interval() -> float:
    """Seconds between two streamed responses of one request after its first (NVLM_STREAM_INTERVAL_MS, which
    nvlm-serve --stream-interval-ms sets; STREAM_INTERVAL_MS by default): tokens made in between leave together."""
    import os

    return float(os.environ.get(STREAM_INTERVAL_ENV) or STREAM_INTERVAL_MS) / 1e3


class PendingRun:
    """A streamed request's tokens not yet sent: each new token joins the run, and the whole run leaves as one
    response — the `tensorrtllm` backend's streamed `output_ids` are [batch, beam, new tokens] and may hold
    several. Runs are the normal mode, not an overload mode: a response costs the same fixed work all the way
    down (a stub-to-server round trip, tritonserver, the entry model's receive and its own response, a gRPC
    message to the client) whatever it carries, so after a request's first token (sent at once) a run leaves
    `interval` seconds after the last one at the earliest, and sooner only when the sending thread falls behind
    anyway. Order is kept: the request's final response flushes its run first (`flush`)."""

    def __init__(self, enqueue, send, interval: float = 0.0, enqueue_at=None):
        self.enqueue, self.send = enqueue, send  # send(tokens, log_probs, cum_log_prob up to the last token)
        self.interval, self.enqueue_at = interval, enqueue_at  # enqueue_at(due monotonic time, fn)
        self.lock = threading.Lock()
        self.tokens: list[int] = []
        self.lps: list = []
        self.cum = 0.0
        self.last = float("-inf")  # when the last run left

    def push(self, tok: int, lp) -> None:
        with self.lock:
            self.tokens.append(tok)
            self.lps.append(lp)
            self.cum += lp or 0.0
            first = len(self.tokens) == 1
            due = self.last + self.interval
        if first:
            if self.interval and self.enqueue_at is not None and due > time.monotonic():
                self.enqueue_at(due, self.flush)
            else:
                self.enqueue(self.flush)

    def flush(self) -> None:
        with self.lock:
            tokens, lps, cum = self.tokens, self.lps, self.cum
            self.tokens, self.lps = [], []
            if tokens:
                self.last = time.monotonic()
        if tokens:
            self.send(tokens, lps, cum)


class Outbox:
    """The LLM step's one sending thread: every streamed token's response and every final response goes
    through it, in order of enqueueing (`put`), or once due (`put_at`: a run waiting for its stream interval).
    The batcher's decode loop only enqueues — a send is a round trip from the stub to tritonserver, and made
    inside the loop it held up the whole batch — while all responses still leave from one thread: sending from
    each request's own thread instead hung the bundled server's Python backend (r24.10) in the soak test, every
    stub idle and sends never acknowledged."""

    def __init__(self):
        import collections
        import itertools

        self.cv = threading.Condition()
        self.ready: collections.deque = collections.deque()
        self.later: list = []  # heap of (due, order, send)
        self.order = itertools.count()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="llm-step-sender", daemon=True)
        self.thread.start()

    def put(self, send) -> None:
        with self.cv:
            self.ready.append(send)
            self.cv.notify()

    def put_at(self, due: float, send) -> None:
        import heapq

        with self.cv:
            heapq.heappush(self.later, (due, next(self.order), send))
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def _next(self):
        import heapq

        with self.cv:
            while True:
                now = time.monotonic()
                while self.later and (self.later[0][0] <= now or self.closed):
                    self.ready.append(heapq.heappop(self.later)[2])
                if self.ready:
                    return self.ready.popleft()
                if self.closed:
                    return None
                self.cv.wait(timeout=self.later[0][0] - now if self.later else None)

    def _loop(self) -> None:
        while (send := self._next()) is not None:
            try:
                send()
            except Exception:  # noqa: BLE001 — the request is gone (cancelled): nothing to tell
                pass


def is_probe(request) -> bool:
    """A request the keeper sent to see that the server answers (its parameters hold PROBE_PARAMETER)."""
    import json

    try:
        params = request.parameters() or "{}"
        # most requests carry no parameters at all: no JSON parse for them (it was 3% of the entry's CPU at c=32)
        return PROBE_PARAMETER in params and bool(json.loads(params).get(PROBE_PARAMETER))
    except (AttributeError, ValueError):
        return False


class ServerBusy(ValueError):
    pass


class SharedCount:
    """A count shared by the processes of one server — the entry model's instances — kept in a small file
    (`path`, under /dev/shm) and changed under an exclusive lock (flock): a few microseconds per request."""

    def __init__(self, path: str):
        import os

        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def add(self, delta: int, limit: int | None = None) -> bool:
        """Add `delta` unless the count would pass `limit`; whether it was added."""
        import fcntl
        import os

        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self.fd, 8, 0)
            n = int.from_bytes(raw, "little", signed=True) if len(raw) == 8 else 0
            if limit is not None and n + delta > limit:
                return False
            os.pwrite(self.fd, (n + delta).to_bytes(8, "little", signed=True), 0)
            return True
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


def shared_count_path(name: str) -> str:
    """The file of a count shared by the Python stubs of the tritonserver that started this one (their parent,
    so a restarted server starts from zero), under the keeper's shared-memory prefix, which it cleans up."""
    import os
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"{os.environ.get(SHARED_PREFIX_ENV, 'nvlm_')}{name}_{os.getppid()}")


class Admission:
    """How many requests the entry model carries at once: up to `max_in_flight` run (each on its own worker
    thread, so `execute` returns at once and the model's instance never caps concurrency), up to
    `max_waiting` more wait for a worker in arrival order, and one beyond that is refused at once with a
    "server busy" error. With several instances (processes) the count is one `SharedCount` for all of them, so the
    bound holds for the model, however Triton spreads the requests."""

    def __init__(self, max_in_flight: int, max_waiting: int, shared: SharedCount | None = None):
        self.max_in_flight, self.max_waiting = max_in_flight, max_waiting
        self.shared = shared
        self.count = 0  # running + waiting (this process's; the model's is `shared`'s when there is one)
        self.lock = threading.Lock()

    def enter(self) -> None:
        bound = self.max_in_flight + self.max_waiting
        with self.lock:
            ok = self.shared.add(1, bound) if self.shared is not None else self.count < bound
            if not ok:
                raise ServerBusy(f"server busy: {self.max_in_flight} requests in flight (the build's max batch size) "
                                 f"and {self.max_waiting} waiting (nvlm-serve --max-queue); retry later")
            self.count += 1

    def leave(self) -> None:
        with self.lock:
            self.count -= 1
            if self.shared is not None:
                self.shared.add(-1)


class LeavingSender:
    """A response sender that gives the request's admission place back just before its final response:
    a client that sends its next request as soon as the last one ended must find the place free."""

    def __init__(self, sender, leave, final_flag):
        self.sender, self._leave, self.final = sender, leave, final_flag
        self.left = False

    def leave(self) -> None:
        if not self.left:
            self.left = True
            self._leave()

    def send(self, response=None, flags=0):
        if flags & self.final:
            self.leave()
        return self.sender.send(response, flags=flags) if response is not None else self.sender.send(flags=flags)


@dataclass(frozen=True)
class EntryDecoding:
    values: dict  # the request's decoding parameters (request-schema names), checked, end_id filled in
    sends: list  # (name, array) for the LLM step, without the batch dimension
    outputs: list[str]  # what the entry asks the LLM step for
    stop_words: tuple  # token sequences the client must not see
    log_probs: bool
    exclude_input: bool  # False: the answer starts with the prompt's text (and output_ids with its ids)


def entry_decoding(get: Callable[[str], object], max_tokens: int, encode: Callable[[str], list[int]],
                   end_id: int, exclude_input: bool = True) -> EntryDecoding:
    """The entry model's inputs (`get(name)` → array or None) → the request's checked decoding parameters and
    the tensors the LLM step takes for them (NVIDIA's names and dtypes; runtime/core/request_schema.py)."""
    values = schema.from_entry(get)
    schema.validate(values, max_tokens)
    values.setdefault("end_id", end_id)
    # each stop / bad word tokenized alone, as NVIDIA's preprocessing does, and after a space
    tokens = {name: word_list(encode, values.get(name, ())) for name, p in schema.BY_NAME.items() if p.kind == "words"}
    sends = schema.to_llm_step(values, {name: to_trtllm(w) for name, w in tokens.items() if w})
    log_probs = bool(values.get("return_log_probs"))
    # only what the entry reads: every tensor asked for is serialized into each streamed response; the
    # cumulative log-prob is the entry's own (of what it returns)
    outputs = ["output_ids"] + (["output_log_probs"] if log_probs else [])
    return EntryDecoding(values, sends, outputs, tokens["stop_words"], log_probs, exclude_input)


@dataclass
class Piece:
    """What one response to the client carries."""
    text: str
    ids: list[int]
    log_probs: list[float] = field(default_factory=list)  # of `ids`, when asked for
    cum: float | None = None  # the cumulative log-prob of everything returned, on the final response

    def then(self, later: "Piece") -> "Piece":
        """This piece and `later` as one response (`later`'s cumulative log-prob)."""
        return Piece(self.text + later.text, self.ids + later.ids, self.log_probs + later.log_probs, later.cum)


class AnswerStream:
    """One request's answer, from the LLM step's responses to what the client sees. Every token the engine
    returned is kept (a stop word's included); `released` of them were passed on — always a prefix — and the
    tokens that could still begin a stop word wait in the StopFilter until they cannot."""

    def __init__(self, tokenizer, decoding: EntryDecoding):
        self.decoding = decoding
        self.tokens: list[int] = []
        self.log_probs: list[float] = []
        self.released = 0
        self.stops = StopFilter(decoding.stop_words)
        self.text = StreamDecoder(tokenizer)

    def prompt(self, prompt_ids: Sequence[int]) -> str:
        """The prompt's text, streamed first when the answer includes the input."""
        return self.text.push(list(prompt_ids))

    def push(self, group: Sequence[tuple[list[int], list[float] | None]], render: bool) -> Piece | None:
        """The LLM-step responses that arrived together ((tokens, their log-probs or None) each) → the piece
        to send, or None when they held no token. `render`: decode the piece's text (streaming)."""
        new = []
        for got, lps in group:
            new += got
            if lps is not None and got:
                self.log_probs += lps[-len(got):]
        if not new:
            return None
        self.tokens += new
        safe = self.stops.push(new)
        lps = self.log_probs[self.released:self.released + len(safe)]
        self.released += len(safe)
        return Piece(self.text.push(safe) if render else "", safe, lps)

    def finish_stream(self) -> Piece:
        """The last streamed piece: the tokens held back as a possible stop word's start that was not one,
        and the text's incomplete last character, as the full decode has it."""
        tail = self.stops.finish()
        text = self.text.push(tail) + self.text.finish()
        end = self.released + len(tail)
        return Piece(text, tail, self.log_probs[self.released:end], sum(self.log_probs[:end]))

    def finish(self) -> Piece:
        """The whole answer (not streamed): every token passed on, the held tail included; no text (the
        postprocessing model decodes it)."""
        kept = self.tokens[:self.released] + self.stops.finish()
        lps = self.log_probs[:len(kept)]
        return Piece("", kept, lps, sum(lps))
