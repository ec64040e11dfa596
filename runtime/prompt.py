"""NVLM prompt construction: conversations in a chat format (runtime/chat_format.py) with 1-D tile tags
(docs/prompt_formats.md), and for the
cross-attention families (NVLM-X, NVLM-H) which image keys each token reads.

The one implementation used by the reference model, calibration, the Triton preprocessing
model and the clients. Each `<image>` placeholder becomes, in the family's PromptLayout
(runtime/core/families.py; NVLM-D's reads every tile inline):

    <Image> + Σ_tags (tag + tokens_per_tile × <|vision_pad|>) + </Image>

with tags `<tile_1>` … `<tile_{T-1}>`, `<tile_global_thumbnail>` (one-tile images get only the
thumbnail tag). Tags are plain text: with Qwen2's tokenizer "<Image><tile" tokenizes as
"<Image", "><", "tile", so tags must be tokenized in context, never as separate pieces.

Cross-attention (docs/nvlm_xh_layout.md): a request's keys/values are its key tiles in order (NVLM-X: every
tile; NVLM-H: the regular tiles, each behind the embeddings of its tag's own tokens). Each query token reads
one contiguous key range `[lo, hi)`, given by `key_ranges`: a token belongs to the text piece in which its
first character lies (tokenizer offsets), since BPE merges across tag boundaries ("><"); the tokens of a tag
in the text whose tile is a key tile read only that tile; every other token reads all key tiles of the
images whose `<Image>` opens at or before its first character; tokens before the first image read nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

from runtime.core.config import IMAGE_PAD, IMAGE_PLACEHOLDER
from runtime.core.errors import InputError
from runtime.core.families import PromptLayout, tile_tags

from .chat_format import ROLES, ChatFormat, Message, get_chat_format
from .tokenizer import NVLMTokenizer

__all__ = ["ROLES", "chat_messages", "CrossInputs", "KeyTile", "Message", "PromptInputs", "key_ranges", "mask_to_ranges",
           "ranges_to_mask", "PromptLayout", "build_prompt", "expand_images", "image_text", "tile_tags",
           "with_image_placeholders"]


def image_text(num_tiles: int, tokens_per_tile: int, layout: PromptLayout = PromptLayout()) -> str:
    return layout.image_text(num_tiles, tokens_per_tile)


def render_chatml(messages: Sequence[Message], add_generation_prompt: bool = True,
                  chat_format: str | ChatFormat | None = None, tokenizer: NVLMTokenizer | None = None) -> str:
    """The conversation as prompt text in `chat_format` (runtime/chat_format.py); by default the tokenizer's
    chosen format, and without a tokenizer the release's."""
    if chat_format is None and tokenizer is not None:
        chat_format = tokenizer.chat_format
    return get_chat_format(chat_format).render(messages, tokenizer, add_generation_prompt)


@dataclass(frozen=True)
class ImageSpan:
    """Where one expanded image sits in the prompt text."""

    open_char: int  # index of its `<Image>`
    tags: tuple[tuple[int, int, int], ...]  # (tile index within the image, first char, end char) of its tags in text


def expand_images(text: str, tiles_per_image: Sequence[int], tokens_per_tile: int,
                  layout: PromptLayout = PromptLayout()) -> str:
    return expand_images_with_spans(text, tiles_per_image, tokens_per_tile, layout)[0]


def expand_images_with_spans(text: str, tiles_per_image: Sequence[int], tokens_per_tile: int,
                             layout: PromptLayout = PromptLayout()) -> tuple[str, list[ImageSpan]]:
    found = text.count(IMAGE_PLACEHOLDER)
    if found != len(tiles_per_image):
        raise InputError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {len(tiles_per_image)} image(s) were "
            f"given; put one {IMAGE_PLACEHOLDER} where each image belongs"
        )
    if IMAGE_PAD in text.replace(IMAGE_PLACEHOLDER, ""):
        raise InputError(f"the prompt text must not contain {IMAGE_PAD}; use {IMAGE_PLACEHOLDER} placeholders")
    pieces = text.split(IMAGE_PLACEHOLDER)
    out, spans, pos = [pieces[0]], [], len(pieces[0])
    for tiles, rest in zip(tiles_per_image, pieces[1:]):
        open_char, tags = pos, []
        for piece, tile in layout.image_pieces(tiles, tokens_per_tile):
            if tile is not None:
                tags.append((tile, pos, pos + len(piece)))
            out.append(piece)
            pos += len(piece)
        spans.append(ImageSpan(open_char, tuple(tags)))
        out.append(rest)
        pos += len(rest)
    return "".join(out), spans


def with_image_placeholders(prompt: str, num_images: int) -> str:
    """A prompt without <image> placeholders gets one per image, each on its own line, in front —
    what NVLM-D's chat() does."""
    if num_images and IMAGE_PLACEHOLDER not in prompt:
        return f"{IMAGE_PLACEHOLDER}\n" * num_images + prompt
    return prompt


CHAT_ROLES = ROLES


def chat_messages(raw: str, num_images: int) -> list[Message]:
    """A conversation sent as JSON (`[{"role": ..., "content": ...}, ...]`, the entry's `messages` input) →
    messages. Images sit where their <image> placeholders are; a conversation without any gets them in
    front of its first user turn, as a single prompt does (`with_image_placeholders`)."""
    try:
        items = json.loads(raw)
    except ValueError as e:
        raise InputError(f"messages is not valid JSON: {e}") from None
    if not isinstance(items, list) or not items:
        raise InputError("messages must be a non-empty JSON list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"messages[{i}] must be {{\"role\": one of {', '.join(CHAT_ROLES)}, \"content\": text}}")
        out.append(Message(m["role"], m["content"]))
    if out[-1].role != "user":
        raise InputError("the last message must be the user's (the model answers it)")
    if num_images and not any(IMAGE_PLACEHOLDER in m.content for m in out):
        first = next(i for i, m in enumerate(out) if m.role == "user")
        out[first] = Message("user", with_image_placeholders(out[first].content, num_images))
    return out


@dataclass(frozen=True)
class KeyTile:
    """One tile among a request's cross-attention keys: keys [start, start + len(tag_ids) + tokens_per_tile)."""

    tile: int  # row of the request's pixel values (its tiles over all images, in order)
    start: int  # its first key
    tag_ids: tuple[int, ...] = ()  # NVLM-H: its tag's tokens, whose embeddings come first


@dataclass(frozen=True)
class CrossInputs:
    """What a cross-attention model (NVLM-X/H) needs beside the token ids: the key sequence and, per token,
    the key range it reads."""

    key_tiles: tuple[KeyTile, ...]
    num_keys: int
    key_ranges: tuple[tuple[int, int], ...]  # [input tokens] of [lo, hi)
    inline_tiles: tuple[int, ...]  # tiles whose tokens sit in the sequence (NVLM-H: the thumbnails)

    @property
    def decode_range(self) -> tuple[int, int]:
        """The range of every generated token: all images opened before it, i.e. every key."""
        return (0, self.num_keys)


def ranges_to_mask(ranges: Sequence[tuple[int, int]], num_keys: int):
    """Key ranges as the `tensorrtllm` backend's `cross_attention_mask`: bool [tokens, keys], row i True on
    [lo_i, hi_i)."""
    import numpy as np

    r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    keys = np.arange(num_keys)
    return (keys[None, :] >= r[:, :1]) & (keys[None, :] < r[:, 1:])


def mask_to_ranges(mask) -> list[tuple[int, int]]:
    """A `cross_attention_mask` [tokens, keys] back to one `[lo, hi)` per row; NVLM's rule gives every token one
    contiguous range (or none), so any other row is refused."""
    import numpy as np

    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise InputError(f"cross_attention_mask must be [tokens, keys], got shape {list(m.shape)}")
    out = []
    for i, row in enumerate(m):
        on = np.flatnonzero(row)
        lo, hi = (int(on[0]), int(on[-1]) + 1) if on.size else (0, 0)
        if on.size and on.size != hi - lo:
            raise InputError(f"cross_attention_mask row {i} is not one contiguous key range (NVLM's tokens each "
                             "read one range of image keys: runtime/prompt.py, key_ranges)")
        out.append((lo, hi))
    return out


def key_ranges(token_starts: Sequence[int], images: Sequence[tuple[int, int, int]],
               tags: Sequence[tuple[int, int, int, int]]) -> list[tuple[int, int]]:
    """Per token, the `[lo, hi)` of the keys it reads (the rule in the module docstring).

    token_starts: first character of each token; images: (open char, first key, end key) per image, in
    order; tags: (first char, end char, first key, end key) of each tag in the text whose tile is a key
    tile. Keys of later images follow earlier ones, so "all images opened so far" is one range [0, hi)."""
    ranges = []
    t = i = 0
    hi = 0  # end key of the images opened so far
    for c in token_starts:
        while i < len(images) and images[i][0] <= c:
            hi = images[i][2]
            i += 1
        while t < len(tags) and tags[t][1] <= c:  # tags wholly before this token
            t += 1
        if t < len(tags) and tags[t][0] <= c:
            ranges.append((tags[t][2], tags[t][3]))
        else:
            ranges.append((0, hi))
    return ranges


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
    cross: CrossInputs | None = None  # cross-attention families only

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
    chat_format: str | ChatFormat | None = None,
) -> PromptInputs:
    """Render in `chat_format` (default: the tokenizer's, normally the release's), expand image placeholders and tokenize. A bare
    string is one user turn. `layout`: the model family's (`family.prompt_layout`); the default reads every
    tile inline."""
    if isinstance(messages, str):
        messages = [Message("user", messages)]
    text, spans = expand_images_with_spans(render_chatml(messages, add_generation_prompt, chat_format, tokenizer),
                                           tiles_per_image, tokens_per_tile, layout)
    ids, starts = tokenizer.encode_offsets(text)
    positions = tuple(i for i, t in enumerate(ids) if t == tokenizer.image_pad_id)
    expected = layout.inline_tokens(tiles_per_image, tokens_per_tile)
    if len(positions) != expected:  # would mean the tokenizer merged or split <|vision_pad|>
        raise InputError(f"tokenized prompt has {len(positions)} image tokens, expected {expected}")
    per_image = tuple(layout.inline_tokens([n], tokens_per_tile) for n in tiles_per_image)
    cross = None
    if layout.cross_attention:
        cross = _cross_inputs(tokenizer, layout, tiles_per_image, tokens_per_tile, spans, starts)
    return PromptInputs(text, tuple(ids), positions, tuple(tiles_per_image), per_image, cross)


def _cross_inputs(tokenizer: NVLMTokenizer, layout: PromptLayout, tiles_per_image: Sequence[int],
                  tokens_per_tile: int, spans: Sequence[ImageSpan], starts: Sequence[int]) -> CrossInputs:
    key_tiles, images, tags = [], [], []
    base = cursor = 0
    for n, span in zip(tiles_per_image, spans):
        first, tile_keys = cursor, {}
        for k, tag in enumerate(tile_tags(n)):
            if layout.keys(tag):
                # NVLM-H's tags sit on the key side, each tokenized on its own (no text around it there)
                tag_ids = tuple(tokenizer.encode(tag)) if layout.tag_keys else ()
                key_tiles.append(KeyTile(base + k, cursor, tag_ids))
                tile_keys[k] = (cursor, cursor + len(tag_ids) + tokens_per_tile)
                cursor = tile_keys[k][1]
        images.append((span.open_char, first, cursor))
        tags += [(lo, hi, *tile_keys[k]) for k, lo, hi in span.tags if k in tile_keys]
        base += n
    return CrossInputs(tuple(key_tiles), cursor, tuple(key_ranges(starts, images, tags)),
                       tuple(layout.inline_tiles(tiles_per_image)))
