"""In-flight batching for the reference executor: the scheduling the `tensorrtllm` backend does, on CPU.

One scheduler thread owns the executor. Between steps it admits waiting requests (each one's prefill runs
on its own, the engine's context phase without chunking) up to `max_batch` active requests; then it runs
one batched decode step (runtime/executor/: `decode_step`) for every active request — each with
its own length, KV cache, decoding controls (runtime/decoding.py) and stop condition — and hands each
token to its own request's callback. A request leaves the batch when it ends (end id, stop word, its
length) or is cancelled, asked before each of its steps, so the next one can take its place.

Greedy tokens do not depend on the company a request keeps: the prefill is the request's alone and a
batched decode step computes each row as the single-request step does (tested against `generate` with
staggered arrivals of text and image requests).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from runtime.core.errors import InputError
from runtime.decoding import Decoder
from runtime.executor import KVCache, ReferenceExecutor, Request, Result

OnToken = Callable[[int, float | None], None]  # (token, log-prob or None)


@dataclass
class _Active:
    req: Request
    on_token: OnToken | None
    future: Future
    decoder: Decoder
    cache: KVCache = field(default_factory=KVCache)
    last: int = -1  # the token the next decode step feeds


class InflightBatcher:
    """`submit(request, on_token)` → a Future of its Result; tokens stream through `on_token` as they are
    chosen. `close()` ends the loop (requests still in flight end as cancelled)."""

    def __init__(self, executor: ReferenceExecutor, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        self.executor, self.max_batch = executor, max_batch
        self._waiting: list[tuple[Request, OnToken | None, Future]] = []
        self._active: list[_Active] = []
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run (for tests and benchmarks: how much batching happened)
        self.batched_rows = 0  # sum over decode steps of the batch size
        self._thread = threading.Thread(target=self._loop, name="inflight-batcher", daemon=True)
        self._thread.start()

    def submit(self, req: Request, on_token: OnToken | None = None) -> Future:
        if not req.input_ids:
            raise InputError("input_ids is empty")
        if req.max_new_tokens < 1:
            raise InputError(f"request_output_len must be ≥ 1, got {req.max_new_tokens}")
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the in-flight batcher is closed")
            self._waiting.append((req, on_token, fut))
            self._cv.notify()
        return fut

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)


    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._active:
                    self._cv.wait()
                if self._closed:
                    break
                room = self.max_batch - len(self._active)
                admitted, self._waiting = self._waiting[:room], self._waiting[room:]
            with torch.no_grad():
                for req, on_token, fut in admitted:
                    self._guard(fut, lambda: self._prefill(req, on_token, fut))
                self._guard_all(self._decode)
        for a in self._active:
            a.future.set_result(Result(a.decoder.generated, "cancelled", self._lps(a)))
        for _, _, fut in self._waiting:
            fut.set_result(Result([], "cancelled"))

    @staticmethod
    def _guard(fut: Future, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 — a failing request ends with its error, the loop goes on
            if not fut.done():
                fut.set_exception(e)

    def _guard_all(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 — a failed batched step fails the requests in it
            for a in self._active:
                if not a.future.done():
                    a.future.set_exception(e)
            self._active = []

    @staticmethod
    def _lps(a: _Active):
        return a.decoder.log_probs if a.req.controls.return_log_probs else None

    def _emit(self, a: _Active, logits: torch.Tensor) -> bool:
        """Choose a's next token from its logits [vocab]; True when a is finished (its future is set)."""
        tok, finished = a.decoder.step(logits)
        if a.on_token:
            a.on_token(tok, a.decoder.log_probs[-1] if a.req.controls.return_log_probs else None)
        a.last = tok
        if finished is None and len(a.decoder.generated) >= a.req.max_new_tokens:
            finished = "length"
        if finished:
            a.future.set_result(Result(a.decoder.generated, finished, self._lps(a)))
        return bool(finished)

    def _prefill(self, req: Request, on_token, fut: Future) -> None:
        a = _Active(req, on_token, fut, Decoder(req.input_ids, self.executor.vocab_size, req.controls))
        if req.cancelled is not None and req.cancelled():
            fut.set_result(Result([], "cancelled"))
            return
        logits = self.executor.prefill(req, a.cache)[-1]
        if not self._emit(a, logits):
            self._active.append(a)

    def _decode(self) -> None:
        live = []
        for a in self._active:
            if a.req.cancelled is not None and a.req.cancelled():
                a.future.set_result(Result(a.decoder.generated, "cancelled", self._lps(a)))
            else:
                live.append(a)
        self._active = live
        if not live:
            return
        logits = self.executor.decode_step([a.last for a in live], [a.cache for a in live])
        self.steps += 1
        self.batched_rows += len(live)
        self._active = [a for a, row in zip(live, logits) if not self._emit(a, row)]
