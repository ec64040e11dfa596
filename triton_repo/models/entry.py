"""`nvlm`, the client-facing entry model (BLS, decoupled): preprocessing → vision_encoder (images only) →
tensorrt_llm over a gRPC stream → the answer, streamed as text deltas or whole (postprocessing)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import numpy as np

from runtime.chat_format import stop_id
from runtime.core.build_dir import read_family, read_limits
from runtime.core.families import ENCODER_INPUTS, PROMPT_TABLE_INPUTS
from runtime.core.trtllm_checkpoint import EmbeddingRows
from runtime.cross_reference import key_sequence
from runtime.prompt import KeyTile, ranges_to_mask

from ..keeper import MAX_QUEUE_ENV
from ..llm_link import LLMLink
from ..pacer import Pacer
from ..pb import (
    Inputs,
    as_torch,
    build_dir,
    error,
    from_torch,
    get_input,
    model_parameters,
    scalar,
    shortcut_single_bytes,
    stub,
    torch_dtype,
)
from ..serving_core import (
    Admission,
    LeavingSender,
    ServerBusy,
    SharedCount,
    entry_decoding,
    is_probe,
    shared_count_path,
    stream_interval,
)
from .answering import Answering
from .preprocessing import CROSS_OUTPUTS, Preparer

# the LLM step's tensors that the entry model builds with their batch dimension already (torch, any dtype)
_BATCHED_BY_SENDER = ("prompt_embedding_table", "encoder_input_features")


class EntryModel:
    """Client-facing `nvlm`: tensorrtllm_backend's inputs, images as encoded bytes, streaming.

    Decoupled: `execute` hands each request to a worker thread (`Admission` bounds them by the build's max
    batch size, rendered into the config as `max_in_flight`) and returns, so in-flight requests are bounded
    by what the engine can batch, not by the instance count."""

    def initialize(self, args):
        build = build_dir(args)
        family = read_family(build)
        known = set(PROMPT_TABLE_INPUTS) | set(ENCODER_INPUTS)  # the two image paths built below
        if not set(family.llm_step_image_inputs) <= known:
            raise RuntimeError(f"the entry model sends image features as a prompt table and as encoder features; "
                               f"family {family.name} takes {family.llm_step_image_inputs}")
        # NVLM-X/H: image keys as the LLM step's encoder inputs (and NVLM-H's thumbnails as table rows)
        self.cross = family.prompt_layout.cross_attention
        self._tag_embeddings = EmbeddingRows(build / "llm")  # NVLM-H: its tags' rows, the built model's own
        self.prep = Preparer(build)  # a request without images is prepared here (Preparer says why)
        self.tok = self.prep.tok
        self.limits = read_limits(build)
        params = model_parameters(args)
        # the callees' declared dtypes, rendered from the build (vision engine and LLM engine dtypes)
        self.vision_dtype = torch_dtype(params["vision_dtype"])
        self.table_dtype = torch_dtype(params["prompt_table_dtype"])
        # the LLM step over a gRPC stream per worker, not decoupled BLS (llm_link.py says why)
        self.llm = LLMLink("tensorrt_llm")
        self.interval = stream_interval()
        from concurrent.futures import ThreadPoolExecutor

        n = int(params.get("max_in_flight", self.limits.max_batch_size))
        # nvlm-serve --max-queue sets NVLM_MAX_QUEUE for the server it starts; else the build's limit
        waiting = int(os.environ.get(MAX_QUEUE_ENV) or params.get("max_queue", self.limits.queue_bound))
        # several instances (processes, for the CPU per streamed token) share one count: the bounds are the model's
        instances = sum(g.get("count", 1) for g in json.loads(args["model_config"]).get("instance_group", [])) or 1
        shared = SharedCount(shared_count_path("admission")) if instances > 1 else None
        self.admission = Admission(n, waiting, shared)
        self.workers = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nvlm-request")
        self.pacer = Pacer()  # streamed answers after their first response (pacer.py says why one thread)
        shortcut_single_bytes(stub())  # text_output, once per streamed response

    def finalize(self):
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.pacer.close()
        self.llm.close()

    def execute(self, requests):
        pb = stub()
        for request in requests:
            if is_probe(request):  # the keeper's health probe never takes a user's place (nor waits for one)
                threading.Thread(target=self._work, args=(request, False), daemon=True).start()
                continue
            try:
                self.admission.enter()
            except ServerBusy as e:
                request.get_response_sender().send(error(str(e)), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.workers.submit(self._work, request)
        return None

    def _work(self, request, admitted: bool = True):
        pb = stub()
        sender = LeavingSender(request.get_response_sender(), self.admission.leave if admitted else (lambda: None),
                               pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        paced = False
        try:
            paced = self._one(request, sender, pb)
        except Exception as e:  # noqa: BLE001 — every failure becomes this request's error
            sender.send(error(str(e)), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            if not paced:  # else the pacer sends its final response, which gives its place back
                sender.leave()

    def call_model(self, pb, model, inputs, outputs):
        """A BLS call to a non-decoupled model (preprocessing, vision_encoder, postprocessing)."""
        req = pb.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs)
        resp = req.exec()
        if resp.has_error():
            raise ValueError(resp.error().message())
        return resp

    def _one(self, request, sender, pb) -> bool:
        """Prepare `request`, send it to the LLM step and answer it; True when its answer was handed to the pacer,
        which sends its final response."""
        inputs = Inputs(request)
        max_tokens = scalar(inputs, "max_tokens", None, int)
        if max_tokens is None:
            raise ValueError("max_tokens is required")
        self.limits.check_request(output_len=max_tokens, output_name="max_tokens")
        decoding = entry_decoding(lambda name: get_input(inputs, name), max_tokens, self.tok.encode,
                                  stop_id(self.tok), scalar(inputs, "exclude_input_in_output", True, bool))
        text = get_input(inputs, "text_input")
        if text is None:
            raise ValueError("text_input is required")
        chat = get_input(inputs, "messages")
        blobs = get_input(inputs, "image_bytes")
        if blobs is None or not blobs.size:
            # no image: the prompt is made here, by the preprocessing model's own code, not one stub hop away
            pre = self.prep.prepare(text, [], chat, 0)
        else:
            pre = self._preprocess(pb, inputs, text, chat, blobs)
        ids, pixels = pre["input_ids"], pre["pixel_values"]
        stream = scalar(inputs, "stream", False, bool)
        # Every tensor below is one of the family's llm_step_inputs, in the dtype the contract gives it; the
        # decoding parameters' tensors come from the request schema (runtime/core/request_schema.py).
        llm_inputs = [
            ("input_ids", ids.astype(np.int32)),
            ("input_lengths", np.asarray([ids.size], np.int32)),
            ("request_output_len", np.asarray([max_tokens], np.int32)),
            ("streaming", np.asarray([stream], bool)),
        ] + list(decoding.sends)
        if pixels.shape[0]:
            llm_inputs += self._image_inputs(pb, pre, pixels)
        if self.cross and not any(name == "encoder_input_features" for name, _ in llm_inputs):
            # no image key: the engine may skip its cross-attention blocks (mllama's switch, which the backend
            # applies when every request of a batch asks); without it they read no key and add nothing anyway
            llm_inputs.append(("skip_cross_attn_blocks", np.asarray([True])))
        # tensorrt_llm batches (max_batch_size > 0): every tensor carries a leading batch dimension of 1
        llm_inputs = [(name, v if name in _BATCHED_BY_SENDER else v[None, ...]) for name, v in llm_inputs]
        rid = uuid.uuid4().hex  # the LLM step's request id: a `stop` request names it
        out = Answering(self, request, sender, pb, decoding, inputs, ids, stream, rid)
        if stream and not decoding.exclude_input:
            out.send_prompt()
        if stream and self.interval > 0:
            # the first response at once, from this thread; the rest from the pacer's, one run per interval
            out.call = self.llm.open(llm_inputs, decoding.outputs, rid)
            try:
                out.on_group([out.call.first()] + out.call.take())
            except BaseException:
                out.call.abandon()
                raise
            if out.finished:
                return False
            self.pacer.add(out, time.monotonic() + self.interval)
            out.call.paced(lambda: self.pacer.wake(out))  # the final response need not wait for the interval
            return True
        # grouped: every LLM-step response that has arrived is answered by one response to the client
        for group in self.llm.generate(llm_inputs, decoding.outputs, rid, grouped=True, interval=self.interval):
            out.on_group(group)
        return False

    def _preprocess(self, pb, inputs, text, chat, blobs) -> dict:
        """A request with images through the preprocessing model (BLS): its outputs by name."""
        sent = [pb.Tensor("text_input", text.reshape(1).astype(object)),
                pb.Tensor("image_bytes", blobs.reshape(-1).astype(object))]
        if chat is not None and chat.size:
            sent.append(pb.Tensor("messages", chat.reshape(1).astype(object)))
        salt = get_input(inputs, "prompt_table_extra_id")
        if salt is not None and salt.size:
            sent.append(pb.Tensor("prompt_table_extra_id", salt.reshape(1).astype(np.uint64)))
        names = ["input_ids", "pixel_values", "prompt_table_extra_ids"] + (list(CROSS_OUTPUTS) if self.cross else [])
        got = self.call_model(pb, "preprocessing", sent, names)
        return {name: pb.get_output_tensor_by_name(got, name).as_numpy() for name in names}

    def _image_inputs(self, pb, pre: dict, pixels) -> list:
        """The image tiles through `vision_encoder`, as the LLM step's image inputs: prompt-table rows and, for
        NVLM-X/H, the encoder inputs. `pre`: the preprocessing model's outputs by name."""
        import torch

        x = torch.from_numpy(pixels).to(self.vision_dtype)
        vis = self.call_model(pb, "vision_encoder", [from_torch("pixel_values", x)], ["image_embeds"])
        emb = as_torch(pb.get_output_tensor_by_name(vis, "image_embeds"))  # [tiles, tokens, hidden]
        table, out = emb, []
        if self.cross:
            table, features = self._cross_inputs(pb, pre, emb)
            out += features or []
        if table is not None and table.shape[0]:
            # the engine's dtype: PromptTuningBuffers::validate refuses any other
            table = table.reshape(-1, table.shape[-1]).to(self.table_dtype)
            extra = pre["prompt_table_extra_ids"]
            out += [("prompt_embedding_table", table[None]),
                    ("prompt_vocab_size", np.asarray([table.shape[0]], np.int32)),
                    ("prompt_table_extra_ids", extra.astype(np.uint64))]
        return out

    def _cross_inputs(self, pb, pre: dict, emb):
        """NVLM-X/H: the prompt-table rows (the tiles whose tokens sit in the sequence: NVLM-H's thumbnails) and
        the `tensorrtllm` backend's encoder inputs — the key sequence as `encoder_input_features` [1, keys,
        hidden] in the engine dtype, `encoder_output_lengths`, and `cross_attention_mask` [1, tokens, keys]
        from each token's key range (runtime/prompt.py). None for the features when the prompt has no key tile."""
        inline = pre["inline_tiles"].reshape(-1).tolist()
        table = emb[inline] if inline else None
        tiles = pre["key_tiles"].reshape(-1).tolist()
        if not tiles:
            return table, None
        key_tiles = [KeyTile(t, 0, tuple(int(i) for i in row if i >= 0)) for t, row in zip(tiles, pre["key_tag_ids"])]
        keys = key_sequence(emb.float(), key_tiles, self._tag_embeddings)  # [K, hidden]
        mask = ranges_to_mask(pre["key_ranges"], keys.shape[0])  # [tokens, K]
        return table, [("encoder_input_features", keys.to(self.table_dtype)[None]),
                       ("encoder_output_lengths", np.asarray([keys.shape[0]], np.int32)),
                       ("cross_attention_mask", mask)]

    def prompt_text_ids(self, ids) -> list[int]:
        """The prompt's text tokens (`exclude_input_in_output` false): image positions carry no text."""
        return [t for t in ids.reshape(-1).tolist() if t < self.tok.vocab_size]

