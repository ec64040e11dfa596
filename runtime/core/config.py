"""Typed NVLM configuration: the one place where an HF `config.json` is read.

`runtime.core.families.from_hf(raw)` turns the checkpoint's JSON into these frozen dataclasses through the
family registered for its architecture (`parse_nvlm` here is the nested NVLM layout's parser);
everything after it takes those objects, never raw dicts. The vision tower and the LLM backbone are
dispatched by architecture name through small registries, so a new backbone is one registered
parser, not another branch.

Facts encoded here come from the released `nvidia/NVLM-D-72B` config (docs/released_layout.md):
- the top level is `architectures: ["NVLM_D"]` with nested `vision_config` / `llm_config`;
- `llm_config.model_type` says "llama" while `llm_config.architectures` is
  `["Qwen2ForCausalLM"]` — we dispatch on `architectures` and only fall back to an
  unambiguous `model_type`;
- `auto_map` points at remote code (`configuration_nvlm_d.NVLM_D_Config`); we never run it,
  everything needed is read here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from .errors import ConfigError, UnsupportedArchitectureError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Prompt-side constants of NVLM-D (released chat code and vLLM's nvlm_d.py).
IMAGE_PLACEHOLDER = "<image>"
IMAGE_START = "<Image>"
IMAGE_END = "</Image>"
IMAGE_PAD = "<|vision_pad|>"
THUMBNAIL_TAG = "<tile_global_thumbnail>"

# InternViT-6B as NVLM-D releases it runs 7 padding heads beside its 25 (modeling_intern_vit.py,
# InternAttention.__init__); a config.json does not say so, the weights' qkv rows do.
RELEASE_DUMMY_HEADS = 7


# --------------------------------------------------------------------------- components


@dataclass(frozen=True)
class VisionConfig:
    """InternViT (InternViT-6B-448px-V1-5 for NVLM-D-72B)."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int
    norm_type: str  # "rms_norm" | "layer_norm"
    norm_eps: float
    qk_normalization: bool
    qkv_bias: bool
    hidden_act: str
    dtype: str
    # Padding ("dummy") heads: NVLM-D's released InternViT adds 7 heads of zeros-by-design to the 25 real ones
    # so that 32 heads divide by 8 (modeling_intern_vit.py, InternAttention: `num_dummy_heads = 7`; vLLM's
    # nvlm_d.py passes the same). qkv, q_norm/k_norm and proj are sized for heads + padding heads; the q/k RMS
    # variance is still taken over the first hidden_size channels (docs/released_layout.md).
    num_dummy_heads: int = 0
    # where num_dummy_heads came from: "config" (vision_config.num_dummy_heads), "release" (not stated: the
    # released code's constant, for config-only plans), "weights" (the qkv rows of a checkpoint's weights)
    dummy_heads_source: str = "config"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def attn_heads(self) -> int:
        """Heads the attention runs: the real ones and the padding heads."""
        return self.num_heads + self.num_dummy_heads

    @property
    def attn_dim(self) -> int:
        """Width of q, k and v (and proj's input): attn_heads × head_dim; hidden_size without padding."""
        return self.attn_heads * self.head_dim

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def num_positions(self) -> int:
        """Patch tokens plus the CLS token."""
        return self.num_patches + 1


PROJECTOR_MLP, PROJECTOR_LINEAR = "mlp", "linear"


@dataclass(frozen=True)
class ProjectorConfig:
    """`mlp1`. NVLM-D and NVLM-H ("mlp"): LayerNorm → Linear(no bias) → GELU → Linear(no bias); NVLM-X
    ("linear", the paper's one-layer projector): LayerNorm → Linear(no bias) straight to the LLM width."""

    input_size: int  # vision hidden × (1 / downsample_ratio)²
    hidden_size: int  # the LLM's intermediate size in the released model code (unused by "linear")
    output_size: int  # the LLM's hidden size
    # `nn.LayerNorm(...)` in the released modeling code: torch's default epsilon.
    norm_eps: float = 1e-5
    kind: str = PROJECTOR_MLP


@dataclass(frozen=True)
class RopeScaling:
    type: str
    factor: float


@dataclass(frozen=True)
class LLMConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: RopeScaling | None
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    dtype: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def applied_rope_scaling(self) -> RopeScaling | None:
        """The RoPE scaling the model really runs with: none. NVLM-D-72B's config states
        {"type": "dynamic", "factor": 3.0}, but the release runs on transformers 4.39.3 (its Dockerfile), whose
        Qwen2 never reads rope_scaling (Qwen2RotaryEmbedding(head_dim, max_position_embeddings, base) only;
        Qwen2 honours it from 4.45): the released model is plain RoPE with rope_theta at every position, also
        past max_position_embeddings. The reference and the TensorRT-LLM config follow the release
        (docs/released_layout.md, "rope_scaling"); `rope_scaling` keeps what config.json states."""
        return None

    def to_transformers(self):
        """The equivalent `transformers.Qwen2Config` (the field's own LLM implementation)."""
        from transformers import Qwen2Config

        rope_scaling = None
        if self.applied_rope_scaling is not None:
            rope_scaling = {"type": self.applied_rope_scaling.type, "rope_type": self.applied_rope_scaling.type,
                            "factor": self.applied_rope_scaling.factor}
        return Qwen2Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            use_sliding_window=False,
            attention_dropout=0.0,
        )


@dataclass(frozen=True)
class PreprocessConfig:
    """Dynamic high-resolution tiling and prompt layout (docs/upstream.md, docs/prompt_formats.md)."""

    image_size: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    dynamic_image_size: bool
    downsample_ratio: float
    ps_version: str  # "v1" | "v2": v2 transposes back after the pixel shuffle
    tokens_per_tile: int
    template: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def max_tiles_per_image(self) -> int:
        """Tiles of the largest grid plus the thumbnail."""
        return self.max_tiles + (1 if self.use_thumbnail and self.max_tiles > 1 else 0)


@dataclass(frozen=True)
class NVLMConfig:
    family: str  # the registered ModelFamily's name (runtime/core/families.py)
    architecture: str  # top-level HF architecture name, e.g. "NVLM_D"
    vision: VisionConfig
    projector: ProjectorConfig
    llm: LLMConfig
    preprocess: PreprocessConfig
    select_layer: int
    dtype: str
    # NVLM-X / NVLM-H: cross-attention layer j follows self-attention layer cross_attention_layers[j]
    # (sorted); empty for NVLM-D
    cross_attention_layers: tuple[int, ...] = ()


# --------------------------------------------------------------------------- registries

LLM_PARSERS: dict[str, Callable[[Mapping[str, Any]], LLMConfig]] = {}
VISION_PARSERS: dict[str, Callable[[Mapping[str, Any]], VisionConfig]] = {}

# `model_type` values that identify an LLM architecture unambiguously. "llama" is absent on
# purpose: the released NVLM-D config says "llama" for what is really Qwen2.
_LLM_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM"}
_VISION_MODEL_TYPES = {"intern_vit_6b": "InternVisionModel"}


def _register(table: dict, name: str):
    def deco(fn):
        if name in table:
            raise RuntimeError(f"{name} registered twice")
        table[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- field access


class _Fields:
    """Reads typed fields from one JSON object, naming the key path in every error."""

    def __init__(self, raw: Mapping[str, Any], where: str):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a JSON object, got {type(raw).__name__}")
        self.raw, self.where = raw, where

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = ...):
        if key not in self.raw or self.raw[key] is None:
            if default is ...:
                raise ConfigError(f"{self.where}.{key} is missing; the checkpoint's config.json must set it")
            return default
        value = self.raw[key]
        # bool is an int subclass: never accept true/false for a number field.
        bad_bool = isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))
        if bad_bool or not isinstance(value, typ):
            raise ConfigError(f"{self.where}.{key} = {value!r} has the wrong type (expected {_typename(typ)})")
        return value

    def size(self, key: str, default: Any = ...) -> int:
        """A count or dimension: an int ≥ 1 (a zero head count would divide by zero later)."""
        value = self.get(key, int, default)
        if value is not None and value < 1:
            raise ConfigError(f"{self.where}.{key} = {value} must be a positive integer")
        return value

    def sub(self, key: str) -> "_Fields":
        return _Fields(self.get(key, dict), f"{self.where}.{key}")

    def architecture(self, model_types: Mapping[str, str]) -> str:
        archs = self.raw.get("architectures")
        if archs:
            if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
                raise ConfigError(f"{self.where}.architectures must be a list of strings, got {archs!r}")
            return archs[0]
        model_type = self.raw.get("model_type")
        if model_type in model_types:
            return model_types[model_type]
        raise ConfigError(
            f"{self.where} has no 'architectures' and its model_type {model_type!r} does not identify one "
            f"(known model types: {sorted(model_types)}); add e.g. \"architectures\": [\"Qwen2ForCausalLM\"]"
        )


def _typename(typ) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__


_NUM = (int, float)


# --------------------------------------------------------------------------- parsers


@_register(VISION_PARSERS, "InternVisionModel")
def _parse_internvit(raw: Mapping[str, Any]) -> VisionConfig:
    f = _Fields(raw, "vision_config")
    cfg = VisionConfig(
        architecture="InternVisionModel",
        hidden_size=f.size("hidden_size"),
        num_layers=f.size("num_hidden_layers"),
        num_heads=f.size("num_attention_heads"),
        intermediate_size=f.size("intermediate_size"),
        image_size=f.size("image_size"),
        patch_size=f.size("patch_size"),
        num_channels=f.size("num_channels", 3),
        norm_type=f.get("norm_type", str, "rms_norm"),
        norm_eps=float(f.get("layer_norm_eps", _NUM, 1e-6)),
        qk_normalization=f.get("qk_normalization", bool, False),
        qkv_bias=f.get("qkv_bias", bool, False),
        hidden_act=f.get("hidden_act", str, "gelu"),
        dtype=f.get("torch_dtype", str, "bfloat16"),
    )
    dummy = raw.get("num_dummy_heads")
    if dummy is None:  # the release's config.json does not state it: its modeling code's constant
        cfg = replace(cfg, num_dummy_heads=RELEASE_DUMMY_HEADS, dummy_heads_source="release")
    else:
        _check(isinstance(dummy, int) and not isinstance(dummy, bool) and dummy >= 0,
               f"vision_config.num_dummy_heads = {dummy!r} must be a non-negative integer")
        cfg = replace(cfg, num_dummy_heads=dummy, dummy_heads_source="config")
    _check(cfg.norm_type in ("rms_norm", "layer_norm"),
           f"vision_config.norm_type {cfg.norm_type!r} is not one of 'rms_norm', 'layer_norm'")
    _check(cfg.hidden_size % cfg.num_heads == 0,
           f"vision_config.hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_heads}")
    _check(cfg.image_size % cfg.patch_size == 0,
           f"vision_config.image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    _check(cfg.hidden_act == "gelu", f"vision_config.hidden_act {cfg.hidden_act!r}: only 'gelu' (InternViT) is supported")
    return cfg


@_register(LLM_PARSERS, "Qwen2ForCausalLM")
def _parse_qwen2(raw: Mapping[str, Any]) -> LLMConfig:
    f = _Fields(raw, "llm_config")
    rope_scaling = None
    rs = raw.get("rope_scaling")
    if rs:
        rsf = f.sub("rope_scaling")
        rope_scaling = RopeScaling(type=str(rs.get("rope_type") or rsf.get("type", str)),
                                   factor=float(rsf.get("factor", _NUM)))
    hidden = f.size("hidden_size")
    heads = f.size("num_attention_heads")
    cfg = LLMConfig(
        architecture="Qwen2ForCausalLM",
        hidden_size=hidden,
        num_layers=f.size("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=f.size("num_key_value_heads", heads),
        intermediate_size=f.size("intermediate_size"),
        vocab_size=f.size("vocab_size"),
        max_position_embeddings=f.size("max_position_embeddings", 32768),
        rope_theta=float(f.get("rope_theta", _NUM, 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(f.get("rms_norm_eps", _NUM, 1e-6)),
        hidden_act=f.get("hidden_act", str, "silu"),
        # Qwen2 always has q/k/v biases and no o_proj bias; `attention_bias` in the released
        # config says true, which agrees. transformers' Qwen2 ignores the key.
        qkv_bias=True,
        tie_word_embeddings=f.get("tie_word_embeddings", bool, False),
        bos_token_id=f.get("bos_token_id", int, None),
        eos_token_id=f.get("eos_token_id", int, None),
        dtype=f.get("torch_dtype", str, "bfloat16"),
    )
    _check(cfg.hidden_size % cfg.num_heads == 0,
           f"llm_config.hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_heads}")
    _check(cfg.num_heads % cfg.num_kv_heads == 0,
           f"llm_config.num_attention_heads {cfg.num_heads} is not a multiple of num_key_value_heads {cfg.num_kv_heads}")
    _check(raw.get("attention_bias", True) is not False,
           "llm_config.attention_bias is false, but Qwen2ForCausalLM always has q/k/v biases")
    _check(cfg.hidden_act == "silu", f"llm_config.hidden_act {cfg.hidden_act!r}: Qwen2 uses 'silu'")
    _check(not raw.get("use_sliding_window", False),
           "llm_config.use_sliding_window is true; sliding-window attention is not supported by this converter")
    return cfg


def parse_nvlm(raw: Mapping[str, Any], *, family: str, architecture: str) -> NVLMConfig:
    """The nested NVLM config (top level + `vision_config` + `llm_config`), cross-checked."""
    f = _Fields(raw, "config")
    vision_raw, llm_raw = f.get("vision_config", dict), f.get("llm_config", dict)
    vision = _dispatch(VISION_PARSERS, _Fields(vision_raw, "vision_config").architecture(_VISION_MODEL_TYPES),
                       "vision_config")(vision_raw)
    llm = _dispatch(LLM_PARSERS, _Fields(llm_raw, "llm_config").architecture(_LLM_MODEL_TYPES),
                    "llm_config")(llm_raw)

    ratio = float(f.get("downsample_ratio", _NUM))
    inv = 1.0 / ratio if ratio > 0 else 0.0
    _check(ratio > 0 and abs(inv - round(inv)) < 1e-9,
           f"config.downsample_ratio {ratio} must be 1/k for an integer k (NVLM uses 0.5)")
    scale = int(round(inv))
    _check(vision.patches_per_side % scale == 0,
           f"the vision grid ({vision.patches_per_side}×{vision.patches_per_side} patches) is not divisible by "
           f"1/downsample_ratio = {scale}")
    image_size = f.get("force_image_size", int, vision.image_size)
    _check(image_size == vision.image_size,
           f"config.force_image_size {image_size} differs from vision_config.image_size {vision.image_size}; "
           "position-embedding interpolation is not supported")
    ps_version = f.get("ps_version", str, "v1")
    _check(ps_version in ("v1", "v2"), f"config.ps_version {ps_version!r} is not 'v1' or 'v2'")
    select_layer = f.get("select_layer", int, -1)
    _check(-vision.num_layers <= select_layer < 0 or 0 < select_layer <= vision.num_layers,
           f"config.select_layer {select_layer} is outside the vision tower's {vision.num_layers} layers")
    template = f.get("template", str, "chatml")
    _check(template == "chatml", f"config.template {template!r}: only 'chatml' (NVLM-D) is supported")
    min_tiles = f.get("min_dynamic_patch", int, 1)
    max_tiles = f.get("max_dynamic_patch", int, 6)
    _check(1 <= min_tiles <= max_tiles,
           f"config.min_dynamic_patch {min_tiles} / max_dynamic_patch {max_tiles}: need 1 ≤ min ≤ max")

    projector = ProjectorConfig(
        input_size=vision.hidden_size * scale * scale,
        hidden_size=llm.intermediate_size,
        output_size=llm.hidden_size,
    )
    preprocess = PreprocessConfig(
        image_size=image_size,
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        use_thumbnail=f.get("use_thumbnail", bool, True),
        dynamic_image_size=f.get("dynamic_image_size", bool, True),
        downsample_ratio=ratio,
        ps_version=ps_version,
        tokens_per_tile=vision.num_patches // (scale * scale),
        template=template,
    )
    return NVLMConfig(
        family=family,
        architecture=architecture,
        vision=vision,
        projector=projector,
        llm=llm,
        preprocess=preprocess,
        select_layer=select_layer,
        dtype=f.get("torch_dtype", str, llm.dtype),
    )


def parse_nvlm_xattn(raw: Mapping[str, Any], *, family: str, architecture: str,
                     projector: str = PROJECTOR_MLP) -> NVLMConfig:
    """NVLM-X / NVLM-H: the nested NVLM config plus the top-level `cross_attention_layers` (the layout this
    project defines, docs/nvlm_xh_layout.md), with the projector kind of the family."""
    cfg = parse_nvlm(raw, family=family, architecture=architecture)
    layers = raw.get("cross_attention_layers")
    _check(isinstance(layers, list) and len(layers) > 0,
           f"config.cross_attention_layers is {'missing' if layers is None else repr(layers)}; {architecture} needs "
           "the sorted indices of the self-attention layers that a cross-attention layer follows, e.g. [7, 15, …, 79]")
    _check(all(isinstance(i, int) and not isinstance(i, bool) for i in layers),
           f"config.cross_attention_layers = {layers!r} must hold integers")
    n = cfg.llm.num_layers
    bad = [i for i in layers if not 0 <= i < n]
    _check(not bad, f"config.cross_attention_layers has {bad}, outside the decoder's {n} layers "
                    f"(llm_config.num_hidden_layers); valid positions are 0…{n - 1}")
    _check(all(a < b for a, b in zip(layers, layers[1:])),
           f"config.cross_attention_layers = {layers} must be strictly increasing (one cross-attention layer "
           "after a self-attention layer at most)")
    return replace(cfg, cross_attention_layers=tuple(layers), projector=replace(cfg.projector, kind=projector))


def _dispatch(table: Mapping[str, Callable], name: str, where: str):
    try:
        return table[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"{where}: architecture {name!r} is not supported; supported: {', '.join(sorted(table))}"
        ) from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def top_level_architecture(raw: Mapping[str, Any], model_types: Mapping[str, str]) -> str:
    """The checkpoint's architecture name: `architectures[0]`, else an unambiguous `model_type`."""
    return _Fields(raw, "config").architecture(model_types)
