"""`preprocessing`: text_input (+ image_bytes, messages) → the LLM step's input_ids, the tiles' pixel values,
and for NVLM-X/H each token's image-key range (runtime/preprocess.py tiles, runtime/prompt.py writes the prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.core.build_dir import read_chat_format, read_family, read_limits, read_preprocess
from runtime.preprocess import Preprocessed, check_image_count, load_image, preprocess_images
from runtime.prompt import build_prompt, chat_messages, tile_tags, with_image_placeholders
from runtime.tokenizer import NVLMTokenizer

from ..pb import Inputs, build_dir, cuda, error, get_input, scalar, stub


class Preparer:
    """One request's text, chat and images → the outputs below (`prepare`): the LLM step's input_ids (fake ids at
    image positions), the tiles' pixel values and, for NVLM-X/H, the key layout. The preprocessing model runs it
    for every request sent to it; the entry model runs it in its own process for a request without images, where
    the round trip to the preprocessing stub would be a third of the serving path's time to first token (issue
    32) and there is no image work to take elsewhere."""

    def __init__(self, build: Path):
        self.cfg, _ = read_preprocess(build)
        self.layout = read_family(build).prompt_layout
        self.max_images = read_limits(build).max_images_per_request  # the tiling's own check enforces it
        self.tok = NVLMTokenizer.from_dir(build / "tokenizer", chat_format=read_chat_format(build))
        self.vocab = json.loads((build / "llm" / "config.json").read_text())["vocab_size"]

    def prepare(self, text, images: list[bytes], chat, salt: int, tile=None) -> dict[str, np.ndarray]:
        """`text`, `chat`: the request's text_input and messages tensors (chat None or empty: one user turn);
        `tile(images)` → Preprocessed per image (default: on the CPU)."""
        if text is None or text.size == 0:
            raise ValueError("text_input is required")
        prompt = _string(text.reshape(-1)[0])
        if chat is not None and chat.size:  # a whole conversation (JSON) instead of one user turn
            messages = chat_messages(_string(chat.reshape(-1)[0]), len(images))
        else:
            messages = with_image_placeholders(prompt, len(images))
        # refuses more images than the build's limit
        done = (tile or self.tile_on_cpu)(images) if images else []
        p = build_prompt(self.tok, messages, [d.num_tiles for d in done],
                         tokens_per_tile=self.cfg.tokens_per_tile, layout=self.layout)
        s = self.cfg.image_size
        pixels = np.concatenate([d.pixel_values for d in done]) if done else np.zeros((0, 3, s, s), np.float32)
        out = {"input_ids": np.asarray(p.trtllm_input_ids(self.vocab), np.int32),
               "pixel_values": pixels.astype(np.float32),
               "image_token_count": np.asarray([p.num_image_tokens], np.int32),
               "prompt_table_extra_ids": np.asarray(p.prompt_table_extra_ids(images, salt), np.uint64)}
        return out | ({} if p.cross is None else cross_tensors(p.cross))

    def tile_on_cpu(self, images):
        return preprocess_images(images, self.cfg, max_images=self.max_images)


def _string(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class PreprocessingModel:
    """text_input (+ image_bytes, messages) → TensorRT-LLM input_ids (fake ids at image positions), pixel_values."""

    def initialize(self, args):
        self.prep = Preparer(build_dir(args))
        self.gpu = cuda()  # GPU hosts: Pillow-exact Triton kernels (plugins/tiling.py) do the tiling

    def _tile(self, images):
        if not self.gpu:
            return self.prep.tile_on_cpu(images)
        import torch

        from plugins.tiling import tile_image

        check_image_count(len(images), self.prep.max_images)
        out = []
        for blob in images:
            rgb = np.asarray(load_image(blob, copy_rgb=False), dtype=np.uint8)
            tiles, grid = tile_image(torch.from_numpy(rgb).cuda(), self.prep.cfg, "fp32")
            out.append(Preprocessed(tiles.cpu().numpy(), grid, tile_tags(tiles.shape[0])))
        return out

    def execute(self, requests):
        pb = stub()
        out = []
        for request in requests:
            try:
                out.append(self._one(request, pb))
            except Exception as e:  # noqa: BLE001 — every failure becomes this request's error
                out.append(error(f"preprocessing: {e}"))
        return out

    def _one(self, request, pb):
        inputs = Inputs(request)
        blobs = get_input(inputs, "image_bytes")
        images = [] if blobs is None else [bytes(b) for b in blobs.reshape(-1)]
        got = self.prep.prepare(get_input(inputs, "text_input"), images, get_input(inputs, "messages"),
                                scalar(inputs, "prompt_table_extra_id", 0, int), self._tile)
        return pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in got.items()])


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


# the NVLM-X/H outputs (cross_tensors) the entry model asks for
CROSS_OUTPUTS = ("key_ranges", "key_tiles", "key_tag_ids", "inline_tiles")
