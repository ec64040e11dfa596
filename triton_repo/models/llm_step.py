"""`tensorrt_llm` on CPU: the `tensorrtllm` backend's I/O computed by the reference executor (reference target),
and the stand-in for NVIDIA's backend that refuses what it refuses (contract target)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from runtime.core import request_schema as schema
from runtime.core.build_dir import engine_dtype, read_limits
from runtime.decoding import from_trtllm
from runtime.executor import ReferenceExecutor, Request, Result
from runtime.inflight import InflightBatcher
from runtime.prompt import mask_to_ranges

from ..check import cross_fraction_problem
from ..contract import load_contract
from ..pb import (
    Inputs,
    as_torch,
    build_dir,
    error,
    get_input,
    model_parameters,
    response,
    scalar,
    stub,
    torch_dtype_name,
)
from ..serving_core import Outbox, PendingRun, stream_interval, watch


class ReferenceLLMModel:
    """The `tensorrtllm` backend's I/O, computed by the reference executor (decoupled, streaming).

    As in the backend, `execute` only admits requests: each one goes to the in-flight batcher
    (runtime/inflight.py; up to the build's max batch size decode together) and its thread waits for it,
    so that a later `execute` can deliver a `stop` request — the backend's way to stop a
    request by its id, which the entry model uses when its client cancels — and the executor asks before
    every decode step whether its request was stopped or cancelled by Triton (a client that closed its
    stream; asked by the request's own thread every 10 ms, see serving_core.watch). A cancelled request frees the
    executor within a step or 10 ms."""

    waiters = None  # see _waiters

    def initialize(self, args):
        self._setup(build_dir(args))

    def _setup(self, build: Path):
        import os

        import torch

        # intra-op threads of the executor in this stub: it shares the machine with tritonserver, the other
        # stubs and the clients, where idle-spinning OpenMP workers of a second thread cost more than they
        # give on the reference model's small matrices (docs/PERFORMANCE.md)
        torch.set_num_threads(int(os.environ.get("NVLM_EXECUTOR_THREADS", "1")))
        self.build = build
        self.executor = ReferenceExecutor.load(build / "llm")
        self.limits = read_limits(build)
        # in-flight batching, as the backend does: up to the engine's max batch size decode together
        self.batcher = InflightBatcher(self.executor, self.limits.max_batch_size)
        self.outbox = Outbox()
        self.interval = stream_interval()  # a streamed request's tokens leave in runs at most this often
        self.stops: dict[str, threading.Event] = {}  # request id → its stop flag, while it runs
        self.stops_lock = threading.Lock()

    def execute(self, requests):
        pb = stub()
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = Inputs(request)
                if scalar(inputs, "stop", False, bool):
                    self._stop(request, sender, pb)
                    continue
                job = self._admit(request, inputs, pb)
                # to the batcher from here: the first token does not wait for a waiting thread to start
                started = self._start(job, sender, pb)
            except Exception as e:  # noqa: BLE001 — every failure becomes this request's error
                sender.send(error(f"tensorrt_llm: {e}"), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self._waiters().submit(self._run, job, started, sender, pb)
        return None

    def _waiters(self):
        """The threads that wait for a request each (`_run`), kept between requests: a thread started per request
        was a tenth of a millisecond on the way to each first token (issue 32). As many as requests in flight."""
        if self.waiters is None:  # made on first use: the targets' set-ups differ (_setup), execute is one thread
            from concurrent.futures import ThreadPoolExecutor

            self.waiters = ThreadPoolExecutor(max_workers=1 << 16, thread_name_prefix="llm-request")
        return self.waiters

    def finalize(self):
        self.batcher.close()
        self.outbox.close()
        if self.waiters is not None:
            self.waiters.shutdown(wait=False)

    def _stop(self, request, sender, pb):
        """NVIDIA's `stop` input: stop the running request with this request's id; it ends with the
        tokens it has. The stop request itself gets an empty final response."""
        rid = request.request_id()
        if not rid:
            raise ValueError("a stop request needs the request id of the request to stop")
        with self.stops_lock:
            flag = self.stops.get(rid)
        if flag is not None:
            flag.set()
        sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _rows(self, inputs, pb, name: str):
        """A [..., rows, hidden] input (the prompt-embedding table, the encoder features) as float32 [rows,
        hidden], or None when absent or empty. The reference target takes any declared dtype."""
        t = inputs.tensor(name)
        if t is None:
            return None
        x = as_torch(t)
        self._check_dtype(name, x)
        return None if x.numel() == 0 else x.reshape(-1, x.shape[-1]).float()

    def _check_dtype(self, name: str, x) -> None:
        pass

    def _table(self, inputs, pb):
        return self._rows(inputs, pb, "prompt_embedding_table")

    def _features(self, inputs, pb):
        return self._rows(inputs, pb, "encoder_input_features")

    def _encoder(self, inputs, pb, input_len: int):
        """NVLM-X/H: the backend's encoder-decoder inputs as the executor's encoder features and key ranges.
        `cross_attention_mask` is [input tokens, keys] as the backend takes it (generated tokens reuse its last
        row); each row must be one contiguous range, NVLM's rule."""
        features = self._features(inputs, pb)
        mask = get_input(inputs, "cross_attention_mask")
        if features is None:
            if mask is not None and mask.size and mask.any():
                raise ValueError("cross_attention_mask reads image keys, but no encoder_input_features were given")
            return None, None
        keys = features.shape[0]
        self.limits.check_request(keys=keys)
        length = scalar(inputs, "encoder_output_lengths", keys, int)
        if length != keys:
            raise ValueError(f"encoder_output_lengths {length} differs from the {keys} rows of encoder_input_features")
        if mask is None:
            raise ValueError("encoder_input_features need a cross_attention_mask [input tokens, keys]: NVLM's tokens "
                             "read different image keys")
        mask = mask.reshape(mask.shape[-2:]) if mask.ndim >= 2 else mask
        if tuple(mask.shape) != (input_len, keys):
            raise ValueError(f"cross_attention_mask is {list(mask.shape)}, expected [{input_len}, {keys}] "
                             f"(input tokens, encoder features: {load_contract().cite('cross_attention_masks')})")
        return features, mask_to_ranges(mask)

    def _admit(self, request, inputs, pb):
        """Validate a request against the build's limits and make its executor request (no compute)."""
        ids = get_input(inputs, "input_ids")
        if ids is None or ids.size == 0:
            raise ValueError("input_ids is required and must not be empty")
        n = scalar(inputs, "request_output_len", None, int)
        if n is None:
            raise ValueError("request_output_len is required")
        self.limits.check_request(output_len=n, output_name="request_output_len")
        # the decoding parameters under NVIDIA's names, checked by the request schema's rules
        controls = schema.controls(schema.from_llm_step(lambda name: get_input(inputs, name), from_trtllm), n)
        ids = ids.reshape(-1).astype(np.int64).tolist()
        self.limits.check_request(input_len=len(ids))
        table = self._table(inputs, pb)
        if table is not None:
            self.limits.check_request(image_tokens=table.shape[0])
        features, ranges = self._encoder(inputs, pb, len(ids))
        stream = scalar(inputs, "streaming", False, bool)
        rid, flag = request.request_id(), threading.Event()
        if rid:
            with self.stops_lock:
                self.stops[rid] = flag
        # length_penalty is checked and otherwise unused: beam search only, no effect at beam width 1
        req = Request(ids, n, table, encoder_features=features, key_ranges=ranges, controls=controls,
                      cancelled=flag.is_set)  # set by a `stop` request or by _run's watch (the client left)
        return req, stream, rid, set(request.requested_output_names()), flag, request.is_cancelled

    def _start(self, job, sender, pb):
        """Submit the request to the batcher: its future, its PendingRun and how a response is made (`emit`)."""
        req, stream, rid, wanted, flag, is_cancelled = job

        def emit(tokens, lps, cum):
            out = [pb.Tensor("output_ids", np.asarray([[tokens]], np.int32))]  # [batch=1, beam=1, tokens]
            if not wanted or "sequence_length" in wanted:  # a tensor per token costs: only what was asked for
                out.append(pb.Tensor("sequence_length", np.asarray([[len(tokens)]], np.int32)))
            if req.controls.return_log_probs:  # as the backend returns them: [batch, beam, tokens] and [batch, beam]
                out += [pb.Tensor("output_log_probs", np.asarray([[lps]], np.float32)),
                        pb.Tensor("cum_log_probs", np.asarray([[cum]], np.float32))]
            return response(pb, wanted, out)

        run = PendingRun(self.outbox.put, lambda tokens, lps, cum: sender.send(emit(tokens, lps, cum)), self.interval,
                         self.outbox.put_at)
        try:  # run.push is called by the batcher's loop: it only appends (and enqueues the run's send)
            return self.batcher.submit(req, run.push if stream else None), run, emit
        except BaseException:
            if rid:
                with self.stops_lock:
                    self.stops.pop(rid, None)
            raise

    def _run(self, job, started, sender, pb):
        """Wait for the request's end on a thread of its own (watching for its client to leave), then send its final
        response."""
        req, stream, rid, wanted, flag, is_cancelled = job
        future, run, emit = started
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        send = self.outbox.put

        try:
            result = watch(future, is_cancelled, flag)
            if stream:
                send(lambda: (run.flush(), sender.send(flags=final)))  # a run waiting for its interval goes first
            else:
                send(lambda: sender.send(emit(result.tokens, result.log_probs, result.cum_log_prob), flags=final))
            if result.finish_reason == "cancelled":  # the fault tests read this line in the server log
                print(f"tensorrt_llm: request {rid or '-'} cancelled after {len(result.tokens)} of "
                      f"{req.max_new_tokens} tokens", flush=True)
        except Exception as e:  # noqa: BLE001 — a failure ends this request with an error
            message = f"tensorrt_llm: {e}"
            send(lambda: sender.send(error(message), flags=final))
        finally:
            if rid:
                with self.stops_lock:
                    self.stops.pop(rid, None)


class StandInLLMModel(ReferenceLLMModel):
    """Contract target: stands in for NVIDIA's `tensorrtllm` backend. Its config carries NVIDIA's inputs,
    outputs and parameters (triton_repo/contract.py); it refuses what the backend refuses, with the
    backend's messages — a missing required parameter or an unknown `gpt_model_type` at load, a
    prompt table whose dtype differs from the engine's or whose rows differ from `prompt_vocab_size`
    per request — and computes with the reference executor on the build that `gpt_model_path`
    (BUILD/engines/llm) belongs to. Triton itself refuses unknown input names and mismatched dtypes."""

    engine_path = ""

    def initialize(self, args):
        self.contract = c = load_contract()
        params = model_parameters(args)
        for key in c.required_parameters:
            if key not in params:
                raise RuntimeError(c.message("missing_parameter", name=key))
        if params["gpt_model_type"] not in c.model_type_values:
            raise RuntimeError(c.message("bad_model_type"))
        self.build = Path(params.get("gpt_model_path", "")).parents[1]
        if not (self.build / "llm" / "config.json").is_file():
            raise RuntimeError(f"gpt_model_path {params.get('gpt_model_path')!r} is not BUILD/engines/llm of an "
                               "nvlm-build output (the stand-in computes with BUILD/llm)")
        llm_config = json.loads((self.build / "llm" / "config.json").read_text())
        refused = cross_fraction_problem(params, cross=bool(llm_config.get("cross_attention_layers")))
        if refused:  # TrtGptModelInflightBatching refuses it when it creates the KV caches, at load
            raise RuntimeError(refused)
        self.engine_dtype = engine_dtype(llm_config)
        self._setup(self.build)

    def _check_dtype(self, name: str, x) -> None:
        if torch_dtype_name(x.dtype) == self.engine_dtype:
            return
        if name == "prompt_embedding_table":  # PromptTuningBuffers::validate
            raise ValueError(self.contract.message("table_dtype"))
        # the config declares the engine dtype (${encoder_input_features_data_type}): Triton refuses another
        # before the backend sees it; this keeps a direct caller's mistake as clear
        raise ValueError(f"{name} must be {self.engine_dtype}, the engine's dtype")

    def _table(self, inputs, pb):
        table = super()._table(inputs, pb)
        rows = scalar(inputs, "prompt_vocab_size", None, int)
        if table is not None and rows is not None and rows != table.shape[0]:
            raise ValueError(self.contract.message("table_rows"))
        return table


class NullLLMModel(StandInLLMModel):
    """Benchmark only (`nvlm-build triton-repo --target contract --null-engine`; never a default): the stand-in's
    contract checks and I/O, with tokens from no model at all, so that the serving path's own capacity can be
    measured on any CPU (benchmarks/serving_capacity.py). Each request gets a fixed token sequence of its
    requested length, drawn from its seed; one loop gives every active request `NVLM_NULL_RUN` tokens per step
    (default 1, the engine's one token per decode step), a step every `NVLM_NULL_STEP_MS` ms (default 0: as fast
    as the loop runs), and the responses leave through the stand-in's sending thread, one per step (no stream
    interval: the C++ backend has none)."""

    def _setup(self, build: Path):
        import os

        self.build = build
        self.limits = read_limits(build)
        vocab = json.loads((build / "llm" / "config.json").read_text())["vocab_size"]
        self.batcher = NullBatcher(vocab, int(os.environ.get("NVLM_NULL_RUN", "1")),
                                   float(os.environ.get("NVLM_NULL_STEP_MS", "0")) / 1e3)
        self.outbox = Outbox()
        # a response per step, as the `tensorrtllm` backend sends one per decode iteration (the Python stand-in's
        # runs per stream interval would spare the entry model most of its messages: not what a GPU host does).
        # Tokens still leave together when the sending thread falls behind (PendingRun).
        self.interval = 0.0
        self.stops: dict[str, threading.Event] = {}
        self.stops_lock = threading.Lock()


class NullBatcher:
    """The null engine's decode loop: `submit` as the in-flight batcher's (a future of the executor's Result,
    `on_token(token, log_prob)` per token), no model."""

    def __init__(self, vocab: int, run: int, step_s: float):
        import queue

        self.high = min(vocab, 32000)  # ordinary text tokens of a Qwen2 vocabulary
        self.run, self.step_s = max(1, run), step_s
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="null-engine", daemon=True)
        self.thread.start()

    def submit(self, req: Request, on_token=None):
        from concurrent.futures import Future

        c = req.controls
        tokens = np.random.default_rng(c.seed).integers(0, self.high, req.max_new_tokens).tolist()
        if c.end_id is not None:  # never the end id: every request runs to its requested length
            tokens = [t if t != c.end_id else (t + 1) % self.high for t in tokens]
        future: Future = Future()
        self.queue.put((req, on_token, future, tokens))
        return future

    def close(self) -> None:
        self.closed = True
        self.queue.put(None)

    def _loop(self) -> None:
        import queue
        import time

        active = []  # [req, on_token, future, tokens, produced]
        while not self.closed:
            try:
                while True:
                    item = self.queue.get(block=not active)
                    if item is None:
                        return
                    active.append([*item, 0])
            except queue.Empty:
                pass
            for a in active:
                req, on_token, future, tokens, done = a
                lp = -1.0 if req.controls.return_log_probs else None
                if req.cancelled is not None and req.cancelled():
                    future.set_result(Result(tokens[:done], "cancelled", [-1.0] * done if lp else None))
                    a[4] = -1
                    continue
                for t in tokens[done:done + self.run]:
                    if on_token is not None:
                        on_token(t, lp)
                a[4] = done = min(len(tokens), done + self.run)
                if done == len(tokens):
                    future.set_result(Result(tokens, "length", [-1.0] * done if lp else None))
                    a[4] = -1
            active = [a for a in active if a[4] >= 0]
            # the next step only while requests are in flight: an idle engine starts a new request at once, as a
            # real one does, so that the time to first token at concurrency 1 is the serving path's own
            if self.step_s and active:
                time.sleep(self.step_s)
