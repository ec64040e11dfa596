"""The served pipeline of a build's reference target, computed in-process (no Triton).

Preprocessing, the vision encoder through onnxruntime on the exported ONNX, and the reference
executor of the TensorRT-LLM checkpoint — the steps the reference target's Triton models chain, with
the same prompt layout, embedding-table dtype and end id. It is the oracle the serving tests compare
the server's tokens with, and the baseline of Triton's overhead (benchmarks/triton_overhead.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.chat_format import stop_id
from runtime.core.build_dir import engine_dtype, read_chat_format, read_family, read_limits, read_preprocess
from runtime.core.request_schema import Controls
from runtime.core.trtllm_checkpoint import EmbeddingRows
from runtime.cross_reference import key_sequence
from runtime.executor import ReferenceExecutor, Request
from runtime.preprocess import preprocess_images
from runtime.prompt import build_prompt, with_image_placeholders
from runtime.tokenizer import NVLMTokenizer


class LocalPipeline:
    def __init__(self, build: str | Path, *, max_images: int | None = None):
        import onnxruntime as ort

        build = Path(build)
        self.llm_dir = build / "llm"
        self._tag_embeddings = EmbeddingRows(self.llm_dir)  # NVLM-H: its tags' rows, read once
        self.executor = ReferenceExecutor.load(build / "llm")
        # the served table crosses Triton in the engine's dtype (PromptTuningBuffers::validate)
        self.table_dtype = engine_dtype(json.loads((build / "llm" / "config.json").read_text()))
        self.tok = NVLMTokenizer.from_dir(build / "tokenizer", chat_format=read_chat_format(build))
        self.cfg, _ = read_preprocess(build)
        self.layout = read_family(build).prompt_layout
        self.max_images = max_images if max_images is not None else read_limits(build).max_images_per_request
        self.vision = ort.InferenceSession(str(build / "vision" / "vision_encoder.onnx"),
                                           providers=["CPUExecutionProvider"])

    def generate(self, prompt: str, images: list[bytes], max_tokens: int) -> list[int]:
        """Greedy token ids for one request, as the served `nvlm` model would return them."""
        return self.run(prompt, images, max_tokens).tokens

    def run(self, prompt: str, images: list[bytes], max_tokens: int, **controls):
        """The executor's Result for one request; `controls`: Controls fields (penalties, stop_words and
        bad_words as token sequences, return_log_probs, sampling)."""
        import torch


        done = preprocess_images(images, self.cfg, max_images=self.max_images) if images else []
        p = build_prompt(self.tok, with_image_placeholders(prompt, len(images)), [d.num_tiles for d in done],
                         tokens_per_tile=self.cfg.tokens_per_tile, layout=self.layout)
        table = features = None
        if done:
            emb = self.vision.run(None, {"pixel_values": np.concatenate([d.pixel_values for d in done])})[0]
            emb = torch.from_numpy(emb.astype(np.float32))  # [tiles, tokens, hidden]
            table = emb
            if p.cross is not None:  # NVLM-X/H: thumbnails (H) in the table, the key tiles as encoder features
                inline = list(p.cross.inline_tiles)
                table = emb[inline] if inline else None
                if p.cross.key_tiles:
                    features = key_sequence(emb, p.cross.key_tiles, self._tag_embeddings)
            # both cross Triton in the engine's dtype (PromptTuningBuffers::validate; the encoder input's template)
            dtype = {"BF16": torch.bfloat16, "FP16": torch.float16, "FP32": torch.float32}[self.table_dtype]
            table = None if table is None else table.reshape(-1, emb.shape[-1]).to(dtype).float()
            features = None if features is None else features.to(dtype).float()
        req = Request(p.trtllm_input_ids(self.executor.vocab_size), max_tokens, table,
                      encoder_features=features, key_ranges=None if features is None else p.cross.key_ranges,
                      controls=Controls(**{"end_id": stop_id(self.tok), **controls}))
        return self.executor.generate([req])[0]
