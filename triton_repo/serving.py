"""The Python models of the Triton repository (reference target; the entry point serves both targets).

Each `REPO/<model>/1/model.py` is one line that imports a class from here, so the serving logic is
in the package (one implementation, importable by tests) and the repository stays regenerable.

    nvlm (BLS, decoupled) ─▶ preprocessing ─▶ vision_encoder (only with images) ─▶ tensorrt_llm
                           ◀── text deltas (stream) or one answer ◀── postprocessing (decode)

Bad requests are answered with an error response (INVALID_ARGUMENT-class message) and the model
instance keeps serving; nothing raised by a request escapes `execute`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.chat_format import stop_id
from runtime.core.build_dir import engine_dtype, read_chat_format, read_family, read_limits, read_preprocess
from runtime.core.families import ENCODER_INPUTS, PROMPT_TABLE_INPUTS
from runtime.core.trtllm_checkpoint import EmbeddingRows
from runtime.cross_reference import key_sequence
from runtime.decoding import StopFilter, from_trtllm, to_trtllm, word_list
from runtime.inflight import InflightBatcher
from runtime.preprocess import Preprocessed, check_image_count, load_image, preprocess_images
from runtime.prompt import (
    KeyTile,
    build_prompt,
    chat_messages,
    mask_to_ranges,
    ranges_to_mask,
    tile_tags,
    with_image_placeholders,
)
from runtime.sampling import Sampling
from runtime.tokenizer import NVLMTokenizer, StreamDecoder
from runtime.trtllm_executor import Request, TRTLLMExecutor

from .check import cross_fraction_problem
from .contract import load_contract
from .llm_link import LLMLink

# the penalty inputs the entry model declares (tensorrtllm_backend names): checked finite when sent
PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty")
# the same under the LLM step's names
LLM_STEP_PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty", "len_penalty")


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def _build_dir(args) -> Path:
    """The build this repository serves: its `build_dir` parameter, relative to the repository root
    (`args["model_repository"]` is the model's own directory) unless absolute."""
    cfg = json.loads(args["model_config"])
    return (Path(args["model_repository"]).parent / cfg["parameters"]["build_dir"]["string_value"]).resolve()


def _input(request, name, default=None):
    t = _pb().get_input_tensor_by_name(request, name)
    return default if t is None else t.as_numpy()


def _scalar(request, name, default, cast):
    v = _input(request, name)
    if v is None or v.size == 0:
        return default
    return cast(v.reshape(-1)[0])


# Triton dtype names → torch dtypes. numpy has no bfloat16: tensors whose dtype a config declares as
# BF16 cross the Python backend as DLPack (torch) tensors, never through as_numpy().
def _torch_dtype(name: str):
    import torch

    return {"FP16": torch.float16, "BF16": torch.bfloat16, "FP32": torch.float32}[name]


def _torch_dtype_name(dtype) -> str:
    import torch

    return {torch.float16: "FP16", torch.bfloat16: "BF16", torch.float32: "FP32"}.get(dtype, str(dtype))


def _as_torch(tensor):
    """A pb_utils.Tensor of any dtype (BF16 included) as a torch tensor."""
    import torch

    return torch.from_dlpack(tensor.to_dlpack())


def _from_torch(name: str, x):
    import torch.utils.dlpack

    return _pb().Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(x.contiguous()))


def _params(args) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _error(message: str):
    pb = _pb()
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message))


# --------------------------------------------------------------------------- preprocessing


def _response(pb, wanted: set, tensors: list):
    """A streamed response with only the outputs its request asked for (`wanted`; empty: all). The bundled
    Python backend (r24.10) drops unrequested outputs inside `response_sender.send`, which runs without the GIL
    (ResponseSender::Send → PruneOutputTensors → ~PbTensor), so their NumPy arrays were freed off the GIL,
    corrupting the interpreter's heap (python_backend 2082a3c, fixed in r24.12): they are dropped here instead."""
    if wanted:
        tensors = [t for t in tensors if t.name() in wanted]
    return pb.InferenceResponse(output_tensors=tensors)


class PreprocessingModel:
    """text_input (+ image_bytes) → TensorRT-LLM input_ids (fake ids at image positions), pixel_values."""

    def initialize(self, args):
        build = _build_dir(args)
        self.cfg, _ = read_preprocess(build)
        self.layout = read_family(build).prompt_layout
        self.max_images = read_limits(build).max_images_per_request  # the tiling's own check enforces it
        self.tok = NVLMTokenizer.from_dir(build / "tokenizer", chat_format=read_chat_format(build))
        self.vocab = json.loads((build / "llm" / "config.json").read_text())["vocab_size"]
        self.gpu = _cuda()  # GPU hosts: Pillow-exact Triton kernels (plugins/tiling.py) do the tiling

    def _tile(self, images):
        if not self.gpu:
            return preprocess_images(images, self.cfg, max_images=self.max_images)
        import torch

        from plugins.tiling import tile_image

        check_image_count(len(images), self.max_images)
        out = []
        for blob in images:
            rgb = np.asarray(load_image(blob, copy_rgb=False), dtype=np.uint8)
            tiles, grid = tile_image(torch.from_numpy(rgb).cuda(), self.cfg, "fp32")
            out.append(Preprocessed(tiles.cpu().numpy(), grid, tile_tags(tiles.shape[0])))
        return out

    def execute(self, requests):
        pb = _pb()
        out = []
        for request in requests:
            try:
                out.append(self._one(request, pb))
            except Exception as e:  # noqa: BLE001 — every failure becomes this request's error
                out.append(_error(f"preprocessing: {e}"))
        return out

    def _one(self, request, pb):
        text = _input(request, "text_input")
        if text is None or text.size == 0:
            raise ValueError("text_input is required")
        prompt = text.reshape(-1)[0]
        prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
        blobs = _input(request, "image_bytes")
        images = [] if blobs is None else [bytes(b) for b in blobs.reshape(-1)]
        chat = _input(request, "messages")  # a whole conversation (JSON) instead of one user turn
        if chat is not None and chat.size:
            raw = chat.reshape(-1)[0]
            messages = chat_messages(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw), len(images))
        else:
            messages = with_image_placeholders(prompt, len(images))
        done = self._tile(images) if images else []  # refuses more images than the build's limit
        p = build_prompt(self.tok, messages, [d.num_tiles for d in done],
                         tokens_per_tile=self.cfg.tokens_per_tile, layout=self.layout)
        s = self.cfg.image_size
        pixels = np.concatenate([d.pixel_values for d in done]) if done else np.zeros((0, 3, s, s), np.float32)
        ids = p.trtllm_input_ids(self.vocab)
        salt = _scalar(request, "prompt_table_extra_id", 0, int)
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("input_ids", np.asarray(ids, np.int32)),
            pb.Tensor("pixel_values", pixels.astype(np.float32)),
            pb.Tensor("image_token_count", np.asarray([p.num_image_tokens], np.int32)),
            pb.Tensor("prompt_table_extra_ids", np.asarray(p.prompt_table_extra_ids(images, salt), np.uint64)),
        ] + ([] if p.cross is None else [pb.Tensor(k, v) for k, v in cross_tensors(p.cross).items()]))


def cross_tensors(cross) -> dict[str, np.ndarray]:
    """NVLM-X/H: what the entry model needs, beside the tiles, to build the LLM step's encoder inputs —
    each token's key range, which tiles are key tiles (with their tag ids, NVLM-H: padded with -1) and which
    sit in the sequence (their rows go to the prompt table)."""
    width = max([len(kt.tag_ids) for kt in cross.key_tiles], default=0)
    tags = np.full((len(cross.key_tiles), width), -1, np.int32)
    for i, kt in enumerate(cross.key_tiles):
        tags[i, :len(kt.tag_ids)] = kt.tag_ids
    return {"key_ranges": np.asarray(cross.key_ranges, np.int32).reshape(-1, 2),
            "key_tiles": np.asarray([kt.tile for kt in cross.key_tiles], np.int32),
            "key_tag_ids": tags, "inline_tiles": np.asarray(cross.inline_tiles, np.int32)}


CROSS_OUTPUTS = ("key_ranges", "key_tiles", "key_tag_ids", "inline_tiles")
# the LLM step's tensors that the entry model builds with their batch dimension already (torch, any dtype)
_BATCHED_BY_SENDER = ("prompt_embedding_table", "encoder_input_features")


# --------------------------------------------------------------------------- vision encoder


class VisionEncoderModel:
    """pixel_values → image_embeds with onnxruntime on the exported ONNX (the engine's CPU stand-in).
    Reference target: FP32 in and out, whatever dtype the ONNX computes in."""

    io_dtype = "FP32"

    def initialize(self, args):
        self._load(_build_dir(args))

    def _load(self, build: Path):
        import onnxruntime as ort

        self.limits = read_limits(build)
        info = json.loads((build / "vision" / "config.json").read_text())
        self.onnx_dtype = {"fp32": np.float32, "fp16": np.float16}.get(info["dtype"], np.float32)
        self.sess = ort.InferenceSession(str(build / "vision" / info["onnx"]), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        import torch

        pb = _pb()
        out = []
        for request in requests:
            try:
                t = pb.get_input_tensor_by_name(request, "pixel_values")
                self.limits.check_request(tiles=t.shape()[0])  # from the shape: the data is not touched
                x = _as_torch(t).float().numpy()
                y = self.sess.run(None, {"pixel_values": x.astype(self.onnx_dtype)})[0]
                y = torch.from_numpy(y.astype(np.float32)).to(_torch_dtype(self.io_dtype))
                out.append(pb.InferenceResponse(output_tensors=[_from_torch("image_embeds", y)]))
            except Exception as e:  # noqa: BLE001
                out.append(_error(f"vision_encoder: {e}"))
        return out


class ContractVisionModel(VisionEncoderModel):
    """Contract target: stands in for the TensorRT plan, with the plan's I/O (the vision build's dtype,
    as the config declares it). `engine_path` (set by the generated model.py) is the plan the real
    model would load; the stand-in computes with the same build's ONNX."""

    engine_path = ""

    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.io_dtype = {v: k for k, v in _TYPE_NAMES.items()}[cfg["input"][0]["data_type"]]
        engine = Path(args["model_repository"]) / self.engine_path  # an absolute engine_path stays as it is
        self._load(engine.resolve().parents[1])


_TYPE_NAMES = {"FP16": "TYPE_FP16", "BF16": "TYPE_BF16", "FP32": "TYPE_FP32"}


# --------------------------------------------------------------------------- tensorrt_llm (reference)


class ReferenceLLMModel:
    """The `tensorrtllm` backend's I/O, computed by the reference executor (decoupled, streaming).

    As in the backend, `execute` only admits requests: each one goes to the in-flight batcher
    (runtime/inflight.py; up to the build's max batch size decode together) and its thread waits for it,
    so that a later `execute` can deliver a `stop` request — the backend's way to stop a
    request by its id, which the entry model uses when its client cancels — and the executor asks before
    every decode step whether its request was stopped or cancelled by Triton (a client that closed its
    stream; asked by the request's own thread every 10 ms, see `_watch`). A cancelled request frees the
    executor within a step or 10 ms."""

    def initialize(self, args):
        self._setup(_build_dir(args))

    def _setup(self, build: Path):
        import os

        import torch

        # intra-op threads of the executor in this stub: it shares the machine with tritonserver, the other
        # stubs and the clients, where idle-spinning OpenMP workers of a second thread cost more than they
        # give on the reference model's small matrices (docs/PERFORMANCE.md)
        torch.set_num_threads(int(os.environ.get("NVLM_EXECUTOR_THREADS", "1")))
        self.build = build
        self.executor = TRTLLMExecutor.load(build / "llm")
        self.limits = read_limits(build)
        # in-flight batching, as the backend does: up to the engine's max batch size decode together
        self.batcher = InflightBatcher(self.executor, self.limits.max_batch_size)
        self.outbox = _Outbox()
        self.stops: dict[str, threading.Event] = {}  # request id → its stop flag, while it runs
        self.stops_lock = threading.Lock()

    def execute(self, requests):
        pb = _pb()
        for request in requests:
            sender = request.get_response_sender()
            try:
                if _scalar(request, "stop", False, bool):
                    self._stop(request, sender, pb)
                    continue
                job = self._admit(request, pb)
            except Exception as e:  # noqa: BLE001 — every failure becomes this request's error
                sender.send(_error(f"tensorrt_llm: {e}"), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            threading.Thread(target=self._run, args=(job, sender, pb), daemon=True).start()
        return None

    def finalize(self):
        self.batcher.close()
        self.outbox.close()

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

    def _rows(self, request, pb, name: str):
        """A [..., rows, hidden] input (the prompt-embedding table, the encoder features) as float32 [rows,
        hidden], or None when absent or empty. The reference target takes any declared dtype."""
        t = pb.get_input_tensor_by_name(request, name)
        if t is None:
            return None
        x = _as_torch(t)
        self._check_dtype(name, x)
        return None if x.numel() == 0 else x.reshape(-1, x.shape[-1]).float()

    def _check_dtype(self, name: str, x) -> None:
        pass

    def _table(self, request, pb):
        return self._rows(request, pb, "prompt_embedding_table")

    def _features(self, request, pb):
        return self._rows(request, pb, "encoder_input_features")

    def _encoder(self, request, pb, input_len: int):
        """NVLM-X/H: the backend's encoder-decoder inputs as the executor's encoder features and key ranges.
        `cross_attention_mask` is [input tokens, keys] as the backend takes it (generated tokens reuse its last
        row); each row must be one contiguous range, NVLM's rule."""
        features = self._features(request, pb)
        mask = _input(request, "cross_attention_mask")
        if features is None:
            if mask is not None and mask.size and mask.any():
                raise ValueError("cross_attention_mask reads image keys, but no encoder_input_features were given")
            return None, None
        keys = features.shape[0]
        self.limits.check_request(keys=keys)
        length = _scalar(request, "encoder_output_lengths", keys, int)
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

    def _admit(self, request, pb):
        """Validate a request against the build's limits and make its executor request (no compute)."""
        ids = _input(request, "input_ids")
        if ids is None or ids.size == 0:
            raise ValueError("input_ids is required and must not be empty")
        n = _scalar(request, "request_output_len", None, int)
        if n is None:
            raise ValueError("request_output_len is required")
        self.limits.check_request(output_len=n, output_name="request_output_len")
        penalties = {k: _scalar(request, k, None, float) for k in LLM_STEP_PENALTIES}
        sampling = Sampling(_scalar(request, "temperature", 0.0, float), _scalar(request, "runtime_top_k", 1, int),
                            _scalar(request, "runtime_top_p", 0.0, float), _scalar(request, "min_tokens", 0, int),
                            _scalar(request, "beam_width", 1, int),
                            tuple((k, v) for k, v in penalties.items() if v is not None)).check(n)
        ids = ids.reshape(-1).astype(np.int64).tolist()
        self.limits.check_request(input_len=len(ids))
        table = self._table(request, pb)
        if table is not None:
            self.limits.check_request(image_tokens=table.shape[0])
        features, ranges = self._encoder(request, pb, len(ids))
        stream = _scalar(request, "streaming", False, bool)
        rid, flag = request.request_id(), threading.Event()
        if rid:
            with self.stops_lock:
                self.stops[rid] = flag
        # len_penalty is checked above and otherwise unused: beam search only, no effect at beam width 1
        req = Request(ids, n, table, encoder_features=features, key_ranges=ranges,
                      end_id=_scalar(request, "end_id", None, int),
                      temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                      seed=_scalar(request, "seed", 0, int), min_length=sampling.min_tokens,
                      repetition_penalty=penalties["repetition_penalty"] or 1.0,
                      presence_penalty=penalties["presence_penalty"] or 0.0,
                      frequency_penalty=penalties["frequency_penalty"] or 0.0,
                      stop_words=from_trtllm(_input(request, "stop_words_list"), "stop_words_list"),
                      bad_words=from_trtllm(_input(request, "bad_words_list"), "bad_words_list"),
                      return_log_probs=_scalar(request, "return_log_probs", False, bool),
                      cancelled=flag.is_set)  # set by a `stop` request or by _run's watch (the client left)
        return req, stream, rid, set(request.requested_output_names()), flag, request.is_cancelled

    def _run(self, job, sender, pb):
        req, stream, rid, wanted, flag, is_cancelled = job
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def emit(tokens, lps, cum):
            out = [pb.Tensor("output_ids", np.asarray([[tokens]], np.int32))]  # [batch=1, beam=1, tokens]
            if not wanted or "sequence_length" in wanted:  # a tensor per token costs: only what was asked for
                out.append(pb.Tensor("sequence_length", np.asarray([[len(tokens)]], np.int32)))
            if req.return_log_probs:  # as the backend returns them: [batch, beam, tokens] and [batch, beam]
                out += [pb.Tensor("output_log_probs", np.asarray([[lps]], np.float32)),
                        pb.Tensor("cum_log_probs", np.asarray([[cum]], np.float32))]
            return _response(pb, wanted, out)

        send = self.outbox.put
        run = _PendingRun(send, lambda tokens, lps, cum: sender.send(emit(tokens, lps, cum)))

        try:  # run.push is called by the batcher's loop: it only appends (and enqueues the run's send)
            result = _watch(self.batcher.submit(req, run.push if stream else None), is_cancelled, flag)
            if stream:
                send(lambda: sender.send(flags=final))
            else:
                send(lambda: sender.send(emit(result.tokens, result.log_probs, result.cum_log_prob), flags=final))
            if result.finish_reason == "cancelled":  # the fault tests read this line in the server log
                print(f"tensorrt_llm: request {rid or '-'} cancelled after {len(result.tokens)} of "
                      f"{req.max_new_tokens} tokens", flush=True)
        except Exception as e:  # noqa: BLE001 — a failure ends this request with an error
            message = f"tensorrt_llm: {e}"
            send(lambda: sender.send(_error(message), flags=final))
        finally:
            if rid:
                with self.stops_lock:
                    self.stops.pop(rid, None)


class ContractLLMModel(ReferenceLLMModel):
    """Contract target: stands in for NVIDIA's `tensorrtllm` backend. Its config carries NVIDIA's inputs,
    outputs and parameters (triton_repo/contract.py); it refuses what the backend refuses, with the
    backend's messages — a missing required parameter or an unknown `gpt_model_type` at load, a
    prompt table whose dtype differs from the engine's or whose rows differ from `prompt_vocab_size`
    per request — and computes with the reference executor on the build that `gpt_model_path`
    (BUILD/engines/llm) belongs to. Triton itself refuses unknown input names and mismatched dtypes."""

    engine_path = ""

    def initialize(self, args):
        self.contract = c = load_contract()
        params = _params(args)
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
        if _torch_dtype_name(x.dtype) == self.engine_dtype:
            return
        if name == "prompt_embedding_table":  # PromptTuningBuffers::validate
            raise ValueError(self.contract.message("table_dtype"))
        # the config declares the engine dtype (${encoder_input_features_data_type}): Triton refuses another
        # before the backend sees it; this keeps a direct caller's mistake as clear
        raise ValueError(f"{name} must be {self.engine_dtype}, the engine's dtype")

    def _table(self, request, pb):
        table = super()._table(request, pb)
        rows = _scalar(request, "prompt_vocab_size", None, int)
        if table is not None and rows is not None and rows != table.shape[0]:
            raise ValueError(self.contract.message("table_rows"))
        return table


# --------------------------------------------------------------------------- postprocessing


class PostprocessingModel:
    def initialize(self, args):
        self.tok = NVLMTokenizer.from_dir(_build_dir(args) / "tokenizer", chat_format=read_chat_format(_build_dir(args)))

    def execute(self, requests):
        pb = _pb()
        out = []
        for request in requests:
            try:
                ids = _input(request, "output_ids").reshape(-1).tolist()
                text = self.tok.decode(ids)
                out.append(pb.InferenceResponse(output_tensors=[pb.Tensor("text_output", np.asarray([text.encode()], object))]))
            except Exception as e:  # noqa: BLE001
                out.append(_error(f"postprocessing: {e}"))
        return out


# --------------------------------------------------------------------------- entry point (BLS)


def _watch(future, is_cancelled, flag: threading.Event, period: float = 0.01):
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


class _AtMostEvery:
    """A costly yes/no check asked at most once per `period` seconds; in between, the last answer stands, and a
    yes stays yes. For `request.is_cancelled()`: each call is a round trip from the stub to tritonserver, and
    asked for every token of every request it cost a round trip per token; a client that goes away is still
    noticed within `period`."""

    def __init__(self, check, period: float = 0.01):
        self.check, self.period = check, period
        self.answer, self.next = False, 0.0

    def __call__(self) -> bool:
        if not self.answer:
            now = time.monotonic()
            if now >= self.next:
                self.answer, self.next = bool(self.check()), now + self.period
        return self.answer


class _PendingRun:
    """A streamed request's tokens not yet sent: each new token joins the run, and the whole run leaves as one
    response when the LLM step's sending thread (`_Outbox`) gets to it. While the sender keeps up that is one
    token per response; when it falls behind (many requests, few cores) a response carries every token made
    since the last one — the `tensorrtllm` backend's streamed `output_ids` are [batch, beam, new tokens] and
    may hold several — instead of a queue of one-token responses that each cost the same fixed work
    downstream (a stub-to-server round trip, the entry's text-delta decode, a gRPC message to the client).
    Order is kept: a run is enqueued when its first token arrives, so it leaves before anything enqueued after
    that token (the final response included)."""

    def __init__(self, enqueue, send):
        self.enqueue, self.send = enqueue, send  # send(tokens, log_probs, cum_log_prob up to the last token)
        self.lock = threading.Lock()
        self.tokens: list[int] = []
        self.lps: list = []
        self.cum = 0.0

    def push(self, tok: int, lp) -> None:
        with self.lock:
            self.tokens.append(tok)
            self.lps.append(lp)
            self.cum += lp or 0.0
            first = len(self.tokens) == 1
        if first:
            self.enqueue(self._flush)

    def _flush(self) -> None:
        with self.lock:
            tokens, lps, cum = self.tokens, self.lps, self.cum
            self.tokens, self.lps = [], []
        if tokens:
            self.send(tokens, lps, cum)


class _Outbox:
    """The LLM step's one sending thread: every streamed token's response and every final response goes
    through it, in order. The batcher's decode loop only enqueues — a send is a round trip from the stub to
    tritonserver, and made inside the loop it held up the whole batch — while all responses still leave
    from one thread: sending from each request's own thread instead hung the bundled server's Python
    backend (r24.10) in the soak test, every stub idle and sends never acknowledged."""

    def __init__(self):
        import queue

        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="llm-step-sender", daemon=True)
        self.thread.start()

    def put(self, send) -> None:
        self.queue.put(send)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while (send := self.queue.get()) is not None:
            try:
                send()
            except Exception:  # noqa: BLE001 — the request is gone (cancelled): nothing to tell
                pass


class ServerBusy(ValueError):
    pass


class Admission:
    """How many requests the entry model carries at once: up to `max_in_flight` run (each on its own worker
    thread, so `execute` returns at once and the model's instance never caps concurrency), up to
    `max_waiting` more wait for a worker in arrival order, and one beyond that is refused at once with a
    "server busy" error (a client retries; an unbounded queue would only turn load into latency)."""

    def __init__(self, max_in_flight: int, max_waiting: int):
        self.max_in_flight, self.max_waiting = max_in_flight, max_waiting
        self.count = 0  # running + waiting
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            if self.count >= self.max_in_flight + self.max_waiting:
                raise ServerBusy(f"server busy: {self.max_in_flight} requests in flight and {self.max_waiting} "
                                 "waiting (the build's max batch size); retry later")
            self.count += 1

    def leave(self) -> None:
        with self.lock:
            self.count -= 1


class _LeavingSender:
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


class EntryModel:
    """Client-facing `nvlm`: tensorrtllm_backend's inputs, images as encoded bytes, streaming.

    Decoupled: `execute` hands each request to a worker thread (`Admission` bounds them by the build's max
    batch size, rendered into the config as `max_in_flight`) and returns, so in-flight requests are bounded
    by what the engine can batch, not by the instance count."""

    def initialize(self, args):
        build = _build_dir(args)
        family = read_family(build)
        known = set(PROMPT_TABLE_INPUTS) | set(ENCODER_INPUTS)  # the two image paths built below
        if not set(family.llm_step_image_inputs) <= known:
            raise RuntimeError(f"the entry model sends image features as a prompt table and as encoder features; "
                               f"family {family.name} takes {family.llm_step_image_inputs}")
        # NVLM-X/H: image keys as the LLM step's encoder inputs (and NVLM-H's thumbnails as table rows)
        self.cross = family.prompt_layout.cross_attention
        self._tag_embeddings = EmbeddingRows(build / "llm")  # NVLM-H: its tags' rows, the built model's own
        self.tok = NVLMTokenizer.from_dir(build / "tokenizer", chat_format=read_chat_format(build))
        self.limits = read_limits(build)
        params = _params(args)
        # the callees' declared dtypes, rendered from the build (vision engine and LLM engine dtypes)
        self.vision_dtype = _torch_dtype(params["vision_dtype"])
        self.table_dtype = _torch_dtype(params["prompt_table_dtype"])
        # the LLM step over a gRPC stream per worker, not decoupled BLS (llm_link.py says why)
        self.llm = LLMLink("tensorrt_llm")
        from concurrent.futures import ThreadPoolExecutor

        n = int(params.get("max_in_flight", self.limits.max_batch_size))
        self.admission = Admission(n, n)
        self.workers = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nvlm-request")

    def finalize(self):
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.llm.close()

    def execute(self, requests):
        pb = _pb()
        for request in requests:
            try:
                self.admission.enter()
            except ServerBusy as e:
                request.get_response_sender().send(_error(str(e)), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.workers.submit(self._work, request)
        return None

    def _work(self, request):
        pb = _pb()
        sender = _LeavingSender(request.get_response_sender(), self.admission.leave,
                                pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        try:
            self._one(request, sender, pb)
        except Exception as e:  # noqa: BLE001 — every failure becomes this request's error
            sender.send(_error(str(e)), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            sender.leave()

    def _call(self, pb, model, inputs, outputs):
        """A BLS call to a non-decoupled model (preprocessing, vision_encoder, postprocessing)."""
        req = pb.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs)
        resp = req.exec()
        if resp.has_error():
            raise ValueError(resp.error().message())
        return resp

    def _stop(self, rid: str) -> None:
        """NVIDIA's way to stop a request in the `tensorrtllm` backend: a request with the same id and
        `stop` set (with the inputs Triton requires). Its own response is empty."""
        stop = [("input_ids", np.zeros((1, 1), np.int32)), ("input_lengths", np.ones((1, 1), np.int32)),
                ("request_output_len", np.ones((1, 1), np.int32)), ("stop", np.ones((1, 1), bool))]
        self.llm.run(stop, ["output_ids"], rid)

    def _one(self, request, sender, pb):
        wanted = set(request.requested_output_names())  # only these go out (_response says why)
        max_tokens = _scalar(request, "max_tokens", None, int)
        if max_tokens is None:
            raise ValueError("max_tokens is required")
        self.limits.check_request(output_len=max_tokens, output_name="max_tokens")
        sampling = Sampling(
            _scalar(request, "temperature", 0.0, float), _scalar(request, "top_k", 1, int),
            _scalar(request, "top_p", 0.0, float), _scalar(request, "min_tokens", 0, int),
            _scalar(request, "beam_width", 1, int),
            tuple((k, _scalar(request, k, 0.0, float)) for k in PENALTIES if _input(request, k) is not None),
        ).check(max_tokens)
        min_tokens = sampling.min_tokens
        decoding = self._decoding(request)
        text = _input(request, "text_input")
        if text is None:
            raise ValueError("text_input is required")
        pre_inputs = [pb.Tensor("text_input", text.reshape(1).astype(object))]
        chat = _input(request, "messages")
        if chat is not None and chat.size:
            pre_inputs.append(pb.Tensor("messages", chat.reshape(1).astype(object)))
        blobs = _input(request, "image_bytes")
        if blobs is not None and blobs.size:
            pre_inputs.append(pb.Tensor("image_bytes", blobs.reshape(-1).astype(object)))
        salt = _input(request, "prompt_table_extra_id")
        if salt is not None and salt.size:
            pre_inputs.append(pb.Tensor("prompt_table_extra_id", salt.reshape(1).astype(np.uint64)))
        pre = self._call(pb, "preprocessing", pre_inputs,
                         ["input_ids", "pixel_values", "image_token_count", "prompt_table_extra_ids"]
                         + (list(CROSS_OUTPUTS) if self.cross else []))
        ids = pb.get_output_tensor_by_name(pre, "input_ids").as_numpy()
        pixels = pb.get_output_tensor_by_name(pre, "pixel_values").as_numpy()
        # Every tensor below is one of the family's llm_step_inputs, in the dtype the contract gives it.
        llm_inputs = [
            ("input_ids", ids.astype(np.int32)),
            ("input_lengths", np.asarray([ids.size], np.int32)),
            ("request_output_len", np.asarray([max_tokens], np.int32)),
            ("end_id", np.asarray([_scalar(request, "end_id", stop_id(self.tok), int)], np.int32)),
            ("streaming", np.asarray([_scalar(request, "stream", False, bool)], bool)),
            ("temperature", np.asarray([sampling.temperature], np.float32)),
            ("runtime_top_k", np.asarray([sampling.top_k], np.int32)),
            ("runtime_top_p", np.asarray([sampling.top_p], np.float32)),
            ("seed", np.asarray([_scalar(request, "seed", 0, int)], np.uint64)),
            ("min_tokens", np.asarray([min_tokens], np.int32)),
        ] + list(decoding.sends)
        if pixels.shape[0]:
            import torch

            x = torch.from_numpy(pixels).to(self.vision_dtype)
            vis = self._call(pb, "vision_encoder", [_from_torch("pixel_values", x)], ["image_embeds"])
            emb = _as_torch(pb.get_output_tensor_by_name(vis, "image_embeds"))  # [tiles, tokens, hidden]
            table, features = emb, None
            if self.cross:
                table, features = self._cross_inputs(pb, pre, emb)
                if features is not None:
                    llm_inputs += features
            if table is not None and table.shape[0]:
                # the engine's dtype: PromptTuningBuffers::validate refuses any other
                table = table.reshape(-1, table.shape[-1]).to(self.table_dtype)
                extra = pb.get_output_tensor_by_name(pre, "prompt_table_extra_ids").as_numpy()
                llm_inputs += [("prompt_embedding_table", table[None]),
                               ("prompt_vocab_size", np.asarray([table.shape[0]], np.int32)),
                               ("prompt_table_extra_ids", extra.astype(np.uint64))]
        if self.cross and not any(name == "encoder_input_features" for name, _ in llm_inputs):
            # no image key: the engine may skip its cross-attention blocks (mllama's switch, which the backend
            # applies when every request of a batch asks); without it they read no key and add nothing anyway
            llm_inputs.append(("skip_cross_attn_blocks", np.asarray([True])))
        # tensorrt_llm batches (max_batch_size > 0): every tensor carries a leading batch dimension of 1
        llm_inputs = [(name, v if name in _BATCHED_BY_SENDER else v[None, ...]) for name, v in llm_inputs]
        stream = _scalar(request, "stream", False, bool)
        tokens: list[int] = []  # every token the engine returned (a stop word's included)
        log_probs: list[float] = []
        released = 0  # tokens passed on to the client so far: always a prefix of `tokens`
        stops = StopFilter(decoding.stop_words)

        text = StreamDecoder(self.tok)
        rid = uuid.uuid4().hex  # the LLM step's request id: a `stop` request names it
        # grouped: every LLM-step response that has arrived is answered by one response to the client
        groups = self.llm.generate(llm_inputs, decoding.outputs, rid, grouped=True)
        stopped = False
        client_gone = _AtMostEvery(request.is_cancelled)
        if stream and not decoding.exclude_input:
            sender.send(_response(pb, wanted, [
                pb.Tensor("text_output", np.asarray([text.push(self._prompt_ids(ids)).encode()], object)),
                pb.Tensor("output_ids", ids.reshape(-1).astype(np.int32))]))
        for group in groups:
            if not stopped and client_gone():  # the client went away: stop generating for it
                stopped = True
                self._stop(rid)
            new = []
            for resp in group:
                out = resp.as_numpy("output_ids")
                if out is None:  # the final, empty response of a stream
                    continue
                got = out.reshape(-1).tolist()
                new += got
                lp = resp.as_numpy("output_log_probs")
                if lp is not None and got:
                    log_probs += lp.reshape(-1).tolist()[-len(got):]
            if not new:
                continue
            tokens += new
            safe = stops.push(new)
            if stream and not stopped:  # one response per group of engine responses, even when its text is held back
                sender.send(_response(pb, wanted, [
                    pb.Tensor("text_output", np.asarray([text.push(safe).encode()], object)),
                    pb.Tensor("output_ids", np.asarray(safe, np.int32))]
                    + self._log_prob_tensors(decoding, log_probs[released:released + len(safe)])))
            released += len(safe)
        if stopped:
            raise ValueError("request cancelled")
        tail = stops.finish()  # held back as a possible stop word's start, and it was not one
        counts = []  # return_num_input_tokens / return_num_output_tokens, on the final response
        if _scalar(request, "return_num_input_tokens", False, bool):
            counts.append(pb.Tensor("num_input_tokens", np.asarray([ids.size], np.int32)))
        if _scalar(request, "return_num_output_tokens", False, bool):
            counts.append(pb.Tensor("num_output_tokens", np.asarray([len(tokens)], np.int32)))
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if stream:
            rest = text.push(tail) + text.finish()  # an incomplete character at the very end: as the full decode has it
            extra = self._log_prob_tensors(decoding, log_probs[released:released + len(tail)],
                                           cum=sum(log_probs[:released + len(tail)]))
            if rest or tail or counts or extra:
                sender.send(_response(pb, wanted, [
                    pb.Tensor("text_output", np.asarray([rest.encode()], object)),
                    pb.Tensor("output_ids", np.asarray(tail, np.int32))] + extra + counts), flags=final)
            else:
                sender.send(flags=final)
        else:
            kept = tokens[:released] + tail
            shown = kept if decoding.exclude_input else self._prompt_ids(ids) + kept
            post = self._call(pb, "postprocessing", [pb.Tensor("output_ids", np.asarray(shown, np.int32))],
                              ["text_output"])
            text_out = pb.get_output_tensor_by_name(post, "text_output").as_numpy()
            returned = kept if decoding.exclude_input else ids.reshape(-1).tolist() + kept
            sender.send(_response(pb, wanted,
                [pb.Tensor("text_output", text_out), pb.Tensor("output_ids", np.asarray(returned, np.int32))]
                + self._log_prob_tensors(decoding, log_probs[:len(kept)], cum=sum(log_probs[:len(kept)])) + counts),
                flags=final)

    def _cross_inputs(self, pb, pre, emb):
        """NVLM-X/H: the prompt-table rows (the tiles whose tokens sit in the sequence: NVLM-H's thumbnails) and
        the `tensorrtllm` backend's encoder inputs — the key sequence as `encoder_input_features` [1, keys,
        hidden] in the engine dtype, `encoder_output_lengths`, and `cross_attention_mask` [1, tokens, keys]
        from each token's key range (runtime/prompt.py). None for the features when the prompt has no key tile."""
        got = {k: pb.get_output_tensor_by_name(pre, k).as_numpy() for k in CROSS_OUTPUTS}
        inline = got["inline_tiles"].reshape(-1).tolist()
        table = emb[inline] if inline else None
        tiles = got["key_tiles"].reshape(-1).tolist()
        if not tiles:
            return table, None
        key_tiles = [KeyTile(t, 0, tuple(int(i) for i in row if i >= 0)) for t, row in zip(tiles, got["key_tag_ids"])]
        keys = key_sequence(emb.float(), key_tiles, self._tag_embeddings)  # [K, hidden]
        mask = ranges_to_mask(got["key_ranges"], keys.shape[0])  # [tokens, K]
        return table, [("encoder_input_features", keys.to(self.table_dtype)[None]),
                       ("encoder_output_lengths", np.asarray([keys.shape[0]], np.int32)),
                       ("cross_attention_mask", mask)]

    def _decoding(self, request) -> "EntryDecoding":
        """The request's decoding controls, checked, as the tensors the LLM step takes (NVIDIA's names)."""
        sent = {k: _scalar(request, k, None, float) for k in PENALTIES}  # checked by Sampling in _one
        sends = [("len_penalty" if k == "length_penalty" else k, np.asarray([v], np.float32))
                 for k, v in sent.items() if v is not None]
        words = {}
        for name in ("stop_words", "bad_words"):
            arr = _input(request, name)
            texts = [] if arr is None else [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in arr.reshape(-1)]
            # each word tokenized alone, as NVIDIA's preprocessing does, and after a space
            words[name] = word_list(self.tok.encode, texts)
            if words[name]:
                sends.append((f"{name}_list", to_trtllm(words[name])))
        log_probs = _scalar(request, "return_log_probs", False, bool)
        # only what the entry reads: every tensor asked for is serialized into each streamed response
        outputs = ["output_ids"]
        if log_probs:
            sends.append(("return_log_probs", np.asarray([True])))
            outputs.append("output_log_probs")  # the cumulative sum is the entry's own (of what it returns)
        return EntryDecoding(sends, outputs, words["stop_words"], log_probs,
                             _scalar(request, "exclude_input_in_output", True, bool))

    @staticmethod
    def _log_prob_tensors(decoding, lps, cum=None):
        """output_log_probs [beam=1, tokens] (and cum_log_probs [beam=1] on the final response), if asked."""
        if not decoding.log_probs:
            return []
        out = [_pb().Tensor("output_log_probs", np.asarray([lps], np.float32))]
        if cum is not None:
            out.append(_pb().Tensor("cum_log_probs", np.asarray([cum], np.float32)))
        return out

    def _prompt_ids(self, ids) -> list[int]:
        """The prompt's text tokens (`exclude_input_in_output` false): image positions carry no text."""
        return [t for t in ids.reshape(-1).tolist() if t < self.tok.vocab_size]


@dataclass(frozen=True)
class EntryDecoding:
    sends: list  # (name, array) for the LLM step, without the batch dimension
    outputs: list[str]  # what the entry asks the LLM step for
    stop_words: tuple  # token sequences the client must not see
    log_probs: bool
    exclude_input: bool  # False: the answer starts with the prompt's text (and output_ids with its ids)

MODEL_CLASSES = {"preprocessing": "PreprocessingModel", "vision_encoder": "VisionEncoderModel",
                 "tensorrt_llm": "ReferenceLLMModel", "postprocessing": "PostprocessingModel", "nvlm": "EntryModel"}
# contract target: stand-ins for the two GPU backends (every other model runs unchanged)
STANDIN_CLASSES = {"vision_encoder": "ContractVisionModel", "tensorrt_llm": "ContractLLMModel"}
