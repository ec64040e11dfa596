"""NVLM prompt construction: ChatML conversations with 1-D tile tags (DESIGN.md §2.2).

The one implementation used by the reference model, calibration, the Triton preprocessing
model and the clients. Each `<image>` placeholder becomes, in the family's PromptLayout
(runtime/core/families.py; NVLM-D's reads every tile inline):

    <Image> + Σ_tags (tag + tokens_per_tile × <|vision_pad|>) + </Image>

with tags `<tile_1>` … `<tile_{T-1}>`, `<tile_global_thumbnail>` (one-tile images get only the
thumbnail tag). Tags are plain text: with Qwen2's tokenizer "<Image><tile" tokenizes as
"<Image", "><", "tile", so tags must be tokenized in context, never as separate pieces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from runtime.core.config import IMAGE_PAD, IMAGE_PLACEHOLDER
from runtime.core.errors import InputError
from runtime.core.families import PromptLayout, tile_tags

from .tokenizer import IM_END, IM_START, NVLMTokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


__all__ = ["Message", "PromptInputs", "PromptLayout", "build_prompt", "expand_images", "image_text", "tile_tags",
           "with_image_placeholders"]


def image_text(num_tiles: int, tokens_per_tile: int, layout: PromptLayout = PromptLayout()) -> str:
    return layout.image_text(num_tiles, tokens_per_tile)


def render_chatml(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, then the assistant header."""
    parts = []
    for m in messages:
        if m.role not in ROLES:
            raise InputError(f"message role {m.role!r} is not one of {ROLES}")
        if IM_START in m.content or IM_END in m.content:
            raise InputError("message content must not contain the ChatML control tokens <|im_start|> / <|im_end|>")
        parts.append(f"{IM_START}{m.role}\n{m.content}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def expand_images(text: str, tiles_per_image: Sequence[int], tokens_per_tile: int,
                  layout: PromptLayout = PromptLayout()) -> str:
    found = text.count(IMAGE_PLACEHOLDER)
    if found != len(tiles_per_image):
        raise InputError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {len(tiles_per_image)} image(s) were "
            f"given; put one {IMAGE_PLACEHOLDER} where each image belongs"
        )
    if IMAGE_PAD in text.replace(IMAGE_PLACEHOLDER, ""):
        raise InputError(f"the prompt text must not contain {IMAGE_PAD}; use {IMAGE_PLACEHOLDER} placeholders")
    pieces = text.split(IMAGE_PLACEHOLDER)
    out = [pieces[0]]
    for tiles, rest in zip(tiles_per_image, pieces[1:]):
        out += [layout.image_text(tiles, tokens_per_tile), rest]
    return "".join(out)


def with_image_placeholders(prompt: str, num_images: int) -> str:
    """A prompt without <image> placeholders gets one per image, each on its own line, in front —
    what NVLM-D's chat() does."""
    if num_images and IMAGE_PLACEHOLDER not in prompt:
        return f"{IMAGE_PLACEHOLDER}\n" * num_images + prompt
    return prompt


@dataclass(frozen=True)
class PromptInputs:
    """Token ids of one prompt and where its image embeddings go.

    `input_ids` hold the tokenizer's `<|vision_pad|>` id at image positions (the form the
    reference model takes). `trtllm_input_ids(vocab_size)` gives TensorRT-LLM's form: the k-th
    image position carries the fake id vocab_size + k, indexing row k of the
    prompt-embedding table [num_image_tokens, hidden].
    """

    text: str
    input_ids: tuple[int, ...]
    image_positions: tuple[int, ...]  # [num_image_tokens], increasing
    tiles_per_image: tuple[int, ...]
    tokens_per_image: tuple[int, ...]  # image positions of each image, in order (its inline tiles' tokens)

    @property
    def num_image_tokens(self) -> int:
        return len(self.image_positions)

    def trtllm_input_ids(self, vocab_size: int) -> list[int]:
        ids = list(self.input_ids)
        for k, pos in enumerate(self.image_positions):
            ids[pos] = vocab_size + k
        return ids

    def prompt_table_extra_ids(self, images: Sequence[bytes], salt: int = 0) -> list[int]:
        """TensorRT-LLM's `prompt_table_extra_ids`: one UINT64 per input token, 0 for text and the
        image's content key at each of its positions. KV-cache block reuse keys blocks on (token id,
        extra id); the fake ids vocab_size + k are the same for every image, so without these keys
        two requests with the same text and different images would share cached image positions.
        `salt` (the client's `prompt_table_extra_id`) separates caches further, e.g. per tenant."""
        if len(images) != len(self.tiles_per_image):
            raise InputError(f"{len(images)} images for a prompt laid out for {len(self.tiles_per_image)}")
        extra = [0] * len(self.input_ids)
        if not images:
            return extra
        k = 0
        for blob, n in zip(images, self.tokens_per_image):
            key = image_cache_key(blob, salt)
            for pos in self.image_positions[k:k + n]:
                extra[pos] = key
            k += n
        return extra


def image_cache_key(blob: bytes, salt: int = 0) -> int:
    """A non-zero 64-bit key of an image's encoded bytes (and the client's salt)."""
    digest = hashlib.sha256(salt.to_bytes(8, "little") + bytes(blob)).digest()
    return int.from_bytes(digest[:8], "little") or 1


def build_prompt(
    tokenizer: NVLMTokenizer,
    messages: Sequence[Message] | str,
    tiles_per_image: Sequence[int] = (),
    *,
    tokens_per_tile: int,
    layout: PromptLayout = PromptLayout(),
    add_generation_prompt: bool = True,
) -> PromptInputs:
    """Render, expand image placeholders and tokenize. A bare string is one user turn. `layout`: the
    model family's (`family.prompt_layout`); the default reads every tile inline."""
    if isinstance(messages, str):
        messages = [Message("user", messages)]
    text = expand_images(render_chatml(messages, add_generation_prompt), tiles_per_image, tokens_per_tile, layout)
    ids = tokenizer.encode(text)
    positions = tuple(i for i, t in enumerate(ids) if t == tokenizer.image_pad_id)
    expected = layout.inline_tokens(tiles_per_image, tokens_per_tile)
    if len(positions) != expected:  # would mean the tokenizer merged or split <|vision_pad|>
        raise InputError(f"tokenized prompt has {len(positions)} image tokens, expected {expected}")
    per_image = tuple(layout.inline_tokens([n], tokens_per_tile) for n in tiles_per_image)
    return PromptInputs(text, tuple(ids), positions, tuple(tiles_per_image), per_image)
