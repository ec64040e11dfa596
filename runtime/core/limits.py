"""What a build accepts: the engines' limits, which every served model checks on each request."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

from .config import PreprocessConfig
from .errors import EngineToolError, InputError
from .families import PromptLayout, tile_tags

QUEUE_PER_BATCH = 8  # the default waiting room, in max batch sizes


@dataclass(frozen=True)
class EngineLimits:
    """What a build's engines and every model of its Triton repository accept. The one source: the
    engine build resolves it against the checkpoint's preprocessing (`resolve`), records it in the
    manifest (`limits`), and serving, the in-process pipeline and the benchmark read it back
    (`runtime.core.build_dir.read_limits`); `check_request` is what every served model checks."""
    max_batch_size: int = 8
    max_tiles_per_image: int | None = None  # None: the checkpoint's (max tiles + thumbnail, 7 for NVLM)
    max_images_per_request: int = 1  # the one default for images per request
    max_input_text_len: int = 2048  # text tokens beside the image tokens
    max_output_len: int = 1024
    tokens_per_tile: int | None = None  # always the checkpoint's (256 for NVLM: pixel shuffle of 32×32)
    # from the family's prompt layout, at a full image (max_tiles_per_image tiles): the image tokens it puts
    # in the decoder sequence (None: every tile's, NVLM-D; NVLM-H: the thumbnail's; NVLM-X: 0) and the
    # cross-attention keys it gives (NVLM-X/H; NVLM-H's include its tags' tokens)
    inline_tokens_per_image: int | None = None
    keys_per_image: int = 0
    # requests the entry model lets wait for a place beyond the max batch size before it answers "server busy"
    # (None: QUEUE_PER_BATCH × max batch size; nvlm-serve --max-queue overrides it when serving)
    max_queue: int | None = None

    def resolve(self, pre: PreprocessConfig, layout: PromptLayout | None = None,
                tag_tokens: Callable[[str], int] | None = None) -> "EngineLimits":
        """Tokens per tile from the checkpoint's preprocessing, and its tiles per image unless given; with the
        family's `layout` (and, where tags are keys, `tag_tokens(tag)`: a tag's token count), its image
        tokens and keys per image."""
        tiles = self.max_tiles_per_image if self.max_tiles_per_image is not None else pre.max_tiles_per_image
        for name, v in (("max batch size", self.max_batch_size), ("tiles per image", tiles),
                        ("images per request", self.max_images_per_request),
                        ("input length", self.max_input_text_len), ("output length", self.max_output_len)):
            if v < 1:
                raise EngineToolError(f"{name} must be ≥ 1, got {v}")
        if self.max_queue is not None and self.max_queue < 0:
            raise EngineToolError(f"max queue must be ≥ 0, got {self.max_queue}")
        per = pre.tokens_per_tile
        inline, keys = self.inline_tokens_per_image, self.keys_per_image
        if layout is not None:  # every count grows with the tile count: a full image is the largest
            inline = layout.inline_tokens([tiles], per)
            keys = sum(per + (tag_tokens(tag) if layout.tag_keys else 0) for tag in tile_tags(tiles) if layout.keys(tag))
        return replace(self, max_tiles_per_image=tiles, tokens_per_tile=per,
                       inline_tokens_per_image=tiles * per if inline is None else inline, keys_per_image=keys)

    def record(self) -> dict:
        """The manifest's `limits`: the fields and what trtllm-build is sized from."""
        return {**asdict(self), "max_input_len": self.max_input_len, "max_seq_len": self.max_seq_len,
                "max_multimodal_len": self.max_multimodal_len, "max_vision_tiles": self.max_vision_tiles,
                "max_encoder_input_len": self.max_encoder_input_len}

    @classmethod
    def from_record(cls, rec: dict) -> "EngineLimits":
        # records made before the per-family counts: NVLM-D's (every tile inline, no keys)
        extra = {"inline_tokens_per_image": rec["max_tiles_per_image"] * rec["tokens_per_tile"], "keys_per_image": 0,
                 "max_queue": None}
        return cls(**{k: rec[k] if k in rec else extra[k] for k in cls.__dataclass_fields__})

    @property
    def queue_bound(self) -> int:
        """Requests that may wait beyond the batch: a closed-loop client at 4× the max batch size queues, as
        under Triton's own schedulers (unbounded unless told otherwise), instead of being refused."""
        return self.max_queue if self.max_queue is not None else QUEUE_PER_BATCH * self.max_batch_size

    @property
    def max_multimodal_len(self) -> int:
        """Prompt-table rows over the batch (trtllm-build --max_multimodal_len)."""
        return self.max_batch_size * self.max_images_per_request * self.inline_tokens_per_image

    @property
    def max_image_tokens_per_request(self) -> int:
        return self.max_images_per_request * self.inline_tokens_per_image

    @property
    def max_encoder_input_len(self) -> int:
        """Cross-attention keys of one request (trtllm-build --max_encoder_input_len); 0 without cross-attention."""
        return self.max_images_per_request * self.keys_per_image

    @property
    def max_input_len(self) -> int:
        return self.max_input_text_len + self.max_image_tokens_per_request

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_output_len

    @property
    def max_vision_tiles(self) -> int:
        return self.max_batch_size * self.max_images_per_request * self.max_tiles_per_image

    @property
    def max_tiles_per_request(self) -> int:
        return self.max_images_per_request * self.max_tiles_per_image

    def check_request(self, *, tiles: int | None = None, input_len: int | None = None,
                      image_tokens: int | None = None, output_len: int | None = None, keys: int | None = None,
                      output_name: str = "the output length") -> None:
        """The one check of a request against the build's limits, called by every model of a served build
        (the entry model and each internal model, which clients can reach directly) before it computes:
        an InputError that names the limit, never an allocation sized by the client. `output_name`: the
        input that carries the output length (max_tokens, request_output_len). The image count is the
        tiling's own check (runtime.preprocess.check_image_count), which serving feeds this build's limit."""
        rebuild = "send less, or rebuild with a larger limit (nvlm-build engine --help)"
        if tiles is not None and tiles > self.max_tiles_per_request:
            raise InputError(f"{tiles} tiles is above this build's limit of {self.max_tiles_per_request} tiles per "
                             f"request ({self.max_images_per_request} images × {self.max_tiles_per_image} tiles); "
                             f"{rebuild}")
        if input_len is not None and input_len > self.max_input_len:
            raise InputError(f"input is {input_len} tokens, above the maximum input length {self.max_input_len} "
                             f"(text + image tokens); {rebuild}")
        if image_tokens is not None and image_tokens > self.max_image_tokens_per_request:
            raise InputError(f"{image_tokens} image tokens is above this build's limit of "
                             f"{self.max_image_tokens_per_request} image tokens per request; {rebuild}")
        if keys is not None and keys > self.max_encoder_input_len:
            raise InputError(f"{keys} cross-attention keys (encoder features) is above this build's limit of "
                             f"{self.max_encoder_input_len} per request; {rebuild}")
        if output_len is not None and not 1 <= output_len <= self.max_output_len:
            raise InputError(f"{output_name} must be in 1…{self.max_output_len}, got {output_len}")
