"""Model families: one registered object per NVLM architecture, looked up from the checkpoint.

A `ModelFamily` bundles what nvlm-trt needs to know of one architecture: the HF architecture names
that select it, its config parser, the weight maps of its components, the TensorRT-LLM architecture,
config fields and layout table of its decoder, its prompt layout (where images go in the token
sequence), the tensors that carry image features to its LLM step, and its reference model (a class in runtime/reference.py,
named here as "module:Class" because the reference model sits in a layer above this one and is
resolved there by `runtime.reference.reference_model`). Everything else looks a family up with
`family_for(cfg)`; nothing outside this module names a family. NVLM-X and NVLM-H are registrations
beside NVLM-D (docs/ARCHITECTURE.md, "Add a model family").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

from . import request_schema, trtllm_layout
from .config import (
    IMAGE_END,
    IMAGE_PAD,
    IMAGE_START,
    PROJECTOR_LINEAR,
    PROJECTOR_MLP,
    THUMBNAIL_TAG,
    NVLMConfig,
    parse_nvlm,
    parse_nvlm_xattn,
    top_level_architecture,
)
from .errors import ConfigError, InputError, UnsupportedArchitectureError
from .trtllm_layout import Row
from .weight_map import INTERNVIT, MLP1, MLP1_LINEAR, QWEN2, XATTN_LAYERS, ComponentMap

# component roles (ComponentMap.name): inspect, sizing and the roofline ask for them by role
VISION, PROJECTOR, LLM, XATTN = "vision", "projector", "llm", "xattn"
DECODER_ROLES = (LLM, XATTN)  # the components that make up the decoder (sharded over TP)
# the decoder components a quantization format quantizes: NVLM-X/H's cross-attention blocks stay in 16 bits in
# every format (measured and argued in docs/llm.md, "NVLM-X and NVLM-H")
QUANTIZED_ROLES = (LLM,)


def tile_tags(num_tiles: int) -> list[str]:
    """NVLM's 1-D tile tags in prompt order for an image of `num_tiles` tiles (thumbnail included in the
    count): `<tile_1>` … `<tile_{T-1}>`, `<tile_global_thumbnail>`; a one-tile image gets only the latter."""
    if num_tiles < 1:
        raise InputError(f"an image has at least one tile, got {num_tiles}")
    return [f"<tile_{k}>" for k in range(1, num_tiles)] + [THUMBNAIL_TAG]


def _every_tile(tag: str) -> bool:
    return True


def _no_tile(tag: str) -> bool:
    return False


def _thumbnail(tag: str) -> bool:
    return tag == THUMBNAIL_TAG


def _regular_tile(tag: str) -> bool:
    return tag != THUMBNAIL_TAG


@dataclass(frozen=True)
class PromptLayout:
    """How a family writes one image into the decoder's prompt (docs/prompt_formats.md) and which of its tiles the
    cross-attention layers read. Per tile tag: `in_text(tag)` — the tag's text sits in the decoder sequence;
    `inline(tag)` — tokens_per_tile `<|vision_pad|>` placeholders follow it (the tile's tokens are read by
    self-attention); `keys(tag)` — the tile's tokens are cross-attention keys/values instead. `tag_keys`: the
    tag's own text embeddings precede its tile's tokens among the keys (NVLM-H).

    NVLM-D: every tag in text, every tile inline. NVLM-X: every tag in text, every tile (thumbnail included)
    a key tile, nothing inline. NVLM-H: the thumbnail inline with its tag; the regular tiles key tiles with
    their tags on the key side, so their tags are not in the text."""

    inline: Callable[[str], bool] = _every_tile
    in_text: Callable[[str], bool] = _every_tile
    keys: Callable[[str], bool] = _no_tile
    tag_keys: bool = False

    @property
    def cross_attention(self) -> bool:
        return self.keys is not _no_tile

    def image_pieces(self, num_tiles: int, tokens_per_tile: int) -> list[tuple[str, int | None]]:
        """The image's text in pieces: (text, tile index of the tag it spells, or None); joined, `image_text`."""
        pieces: list[tuple[str, int | None]] = [(IMAGE_START, None)]
        for k, tag in enumerate(tile_tags(num_tiles)):
            if self.in_text(tag):
                pieces.append((tag, k))
            if self.inline(tag):
                pieces.append((IMAGE_PAD * tokens_per_tile, None))
        return pieces + [(IMAGE_END, None)]

    def image_text(self, num_tiles: int, tokens_per_tile: int) -> str:
        return "".join(text for text, _ in self.image_pieces(num_tiles, tokens_per_tile))

    def inline_tokens(self, tiles_per_image, tokens_per_tile: int) -> int:
        """Image placeholders in the decoder sequence (rows of the prompt-embedding table)."""
        return sum(tokens_per_tile * sum(map(self.inline, tile_tags(n))) for n in tiles_per_image)

    def inline_tiles(self, tiles_per_image) -> list[int]:
        """Indices (over all tiles of the request, in order) of the tiles whose tokens sit in the sequence."""
        return self._tiles(tiles_per_image, self.inline)

    def key_tiles(self, tiles_per_image) -> list[int]:
        """Indices (over all tiles of the request, in order) of the tiles read through cross-attention."""
        return self._tiles(tiles_per_image, self.keys)

    @staticmethod
    def _tiles(tiles_per_image, which: Callable[[str], bool]) -> list[int]:
        out, base = [], 0
        for n in tiles_per_image:
            out += [base + k for k, tag in enumerate(tile_tags(n)) if which(tag)]
            base += n
        return out


# What the entry model sends the LLM step (`tensorrt_llm`) for every request, under NVIDIA's names; a family
# adds the tensors that carry its image features (`ModelFamily.llm_step_image_inputs`).
LLM_STEP_TEXT_INPUTS = ("input_ids", "input_lengths", "request_output_len", "streaming")
# the request's decoding parameters (runtime/core/request_schema.py: always, or when the client sets them)
LLM_STEP_DECODING_INPUTS = request_schema.llm_step_inputs()
# sent only to stop a running request (by its request id), NVIDIA's `stop` input: the entry model does when
# its client cancels
LLM_STEP_CONTROL_INPUTS = ("stop",)
# image embeddings as rows of the prompt table, placed at the fake ids vocab_size + k (TensorRT-LLM's
# multimodal path), keyed per image for KV-cache reuse
PROMPT_TABLE_INPUTS = ("prompt_embedding_table", "prompt_vocab_size", "prompt_table_extra_ids")
# image features as the encoder output that cross-attention reads: the `tensorrtllm` backend's
# encoder-decoder inputs (docs/upstream.md, Triton's tensorrtllm backend); which of them NVLM-X/H send is settled with their LLM step
ENCODER_INPUTS = ("encoder_input_features", "encoder_output_lengths", "cross_attention_mask", "skip_cross_attn_blocks")


@dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]  # HF `architectures[0]` values that select this family
    parse: Callable[..., NVLMConfig]  # (raw, family=, architecture=) → typed config
    components: tuple[ComponentMap, ...]  # weight maps, in checkpoint order
    reference: str  # "module:Class" of the reference model
    trtllm_architecture: str  # TensorRT-LLM's name for the decoder (its MODEL_MAP key)
    trtllm_layout: tuple[Row, ...] | None  # None: no TensorRT-LLM converter for this family yet (NVLM-X/H)
    trtllm_config: dict = field(default_factory=dict)  # family-specific fields of the checkpoint config
    # the module of this project's TensorRT-LLM model definition of the decoder, which trtllm-build loads with
    # --model_cls_file (its class: trtllm_architecture); None: TensorRT-LLM's own MODEL_MAP builds it
    engine_model: str | None = None
    prompt_layout: PromptLayout = PromptLayout()  # how images are written into the prompt
    llm_step_image_inputs: tuple[str, ...] = PROMPT_TABLE_INPUTS  # how image features reach the LLM step

    @property
    def llm_step_inputs(self) -> tuple[str, ...]:
        """Every tensor the entry model sends `tensorrt_llm` for this family (triton_repo/models/entry.py)."""
        return LLM_STEP_TEXT_INPUTS + LLM_STEP_DECODING_INPUTS + self.llm_step_image_inputs + LLM_STEP_CONTROL_INPUTS

    def component(self, role: str) -> ComponentMap:
        for c in self.components:
            if c.name == role:
                return c
        raise KeyError(f"family {self.name} has no {role!r} component")


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    taken = {a for f in FAMILIES.values() for a in f.architectures}
    if family.name in FAMILIES or taken & set(family.architectures):
        raise RuntimeError(f"family {family.name} (architectures {family.architectures}) registered twice")
    FAMILIES[family.name] = family
    return family


def supported_architectures() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.architectures)


def family_for_architecture(architecture: str) -> ModelFamily:
    for f in FAMILIES.values():
        if architecture in f.architectures:
            return f
    raise UnsupportedArchitectureError(f"config: architecture {architecture!r} is not supported; supported: "
                                       f"{', '.join(supported_architectures())}")


def family_for(cfg: NVLMConfig | str) -> ModelFamily:
    """The family of a typed config (or a family name)."""
    name = cfg if isinstance(cfg, str) else cfg.family
    if name not in FAMILIES:
        raise UnsupportedArchitectureError(f"model family {name!r} is not registered; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# modelopt 0.47 writes QWenForCausalLM for the same Qwen2 decoder (TensorRT-LLM maps both to QWen)
TRTLLM_ALIASES = {"QWenForCausalLM": "Qwen2ForCausalLM"}


def family_for_trtllm(architecture: str | None) -> ModelFamily:
    """The family whose decoder a TensorRT-LLM checkpoint's `architecture` names."""
    name = TRTLLM_ALIASES.get(architecture, architecture)
    for f in FAMILIES.values():
        if f.trtllm_layout is not None and f.trtllm_architecture == name:
            return f
    known = sorted({f.trtllm_architecture for f in FAMILIES.values() if f.trtllm_layout is not None} | set(TRTLLM_ALIASES))
    raise UnsupportedArchitectureError(f"TensorRT-LLM architecture {architecture!r} is not one nvlm-trt writes "
                                       f"(known: {', '.join(known)})")


# --------------------------------------------------------------------------- entry points


def from_hf(raw: Mapping[str, Any]) -> NVLMConfig:
    """Translate an HF NVLM `config.json` (already parsed) into typed configs, through its family."""
    model_types = {a: a for a in supported_architectures()}  # the released config's model_type is "NVLM_D"
    arch = top_level_architecture(raw, model_types)
    family = family_for_architecture(arch)
    return family.parse(raw, family=family.name, architecture=arch)


def load_config(path: str | Path) -> NVLMConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file} not found: a checkpoint directory must contain the HF config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); re-download or fix the file") from None
    try:
        return from_hf(raw)
    except ConfigError as e:
        raise type(e)(f"{file}: {e}") from None


# --------------------------------------------------------------------------- the families

NVLM_D = register_family(ModelFamily(
    name="nvlm-d",
    architectures=("NVLM_D",),
    parse=parse_nvlm,
    components=(INTERNVIT, MLP1, QWEN2),
    reference="runtime.reference:NVLMReference",  # the base model: image embeddings replace <|vision_pad|>
    trtllm_architecture="Qwen2ForCausalLM",
    # QWenConfig.from_hugging_face would take llm_config.model_type, which the released NVLM-D config
    # sets to "llama" (rejected by TensorRT-LLM); the Qwen model reads qwen_type to size its MLP
    # ("qwen" halves intermediate_size), so it must say qwen2 explicitly.
    trtllm_config={"qwen_type": "qwen2"},
    trtllm_layout=trtllm_layout.QWEN2,
    prompt_layout=PromptLayout(inline=_every_tile),  # every tile's 256 tokens sit in the decoder sequence
    llm_step_image_inputs=PROMPT_TABLE_INPUTS,
))

# NVLM-X and NVLM-H: the paper's cross-attention architectures (arXiv 2409.11402 §3.2). NVIDIA published no
# weights or code; the checkpoint layout is this project's (docs/nvlm_xh_layout.md). Their TensorRT-LLM
# checkpoint is Qwen2's layout plus the gated cross-attention blocks (trtllm_layout.XATTN); the architecture
# names are this project's model definition for GPU hosts (builder/trtllm_nvlm.py), TensorRT-LLM has none.
NVLM_X = register_family(ModelFamily(
    name="nvlm-x",
    architectures=("NVLM_X",),
    parse=partial(parse_nvlm_xattn, projector=PROJECTOR_LINEAR),
    components=(INTERNVIT, MLP1_LINEAR, QWEN2, XATTN_LAYERS),
    reference="runtime.cross_reference:CrossAttentionReference",
    trtllm_architecture="NVLMXForCausalLM",
    trtllm_config={"qwen_type": "qwen2"},
    engine_model="builder.trtllm_nvlm",
    trtllm_layout=trtllm_layout.QWEN2_XATTN,
    # the tags stay in the text (each attends to its own tile); every tile, thumbnail included, is read
    # through the gated cross-attention layers
    prompt_layout=PromptLayout(inline=_no_tile, in_text=_every_tile, keys=_every_tile),
    llm_step_image_inputs=ENCODER_INPUTS,
))

NVLM_H = register_family(ModelFamily(
    name="nvlm-h",
    architectures=("NVLM_H",),
    parse=partial(parse_nvlm_xattn, projector=PROJECTOR_MLP),
    components=(INTERNVIT, MLP1, QWEN2, XATTN_LAYERS),
    reference="runtime.cross_reference:CrossAttentionReference",
    trtllm_architecture="NVLMHForCausalLM",
    trtllm_config={"qwen_type": "qwen2"},
    engine_model="builder.trtllm_nvlm",
    trtllm_layout=trtllm_layout.QWEN2_XATTN,
    # the thumbnail's tokens sit in the sequence as in NVLM-D; the regular tiles, each behind its tag's text
    # embeddings, are cross-attention keys
    prompt_layout=PromptLayout(inline=_thumbnail, in_text=_thumbnail, keys=_regular_tile, tag_keys=True),
    llm_step_image_inputs=PROMPT_TABLE_INPUTS + ENCODER_INPUTS,
))
