"""Declarative weight maps: released checkpoint names → component module names.

Each component (vision tower, projector, LLM) is a table of `Tensor` rows: the released
name, the name inside our component module, and the shape the config implies. `{i}` is the
layer index and expands over that component's layer count. Tensors that exist in some
checkpoints but carry no information (e.g. rotary `inv_freq` buffers) are listed as drops,
with the reason. `plan()` checks completeness both ways and reports every offender.

The same tables give the parameter counts that `nvlm-build inspect` prints, so the map,
the shape checks and the memory plan cannot disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

from .config import NVLMConfig
from .errors import ShapeMismatchError, WeightMapError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Tensor:
    source: str  # released name, "{i}" = layer index
    target: str  # name in the component's state dict
    shape: Callable[[NVLMConfig], Shape]
    when: Callable[[NVLMConfig], bool] = lambda c: True


@dataclass(frozen=True)
class Drop:
    pattern: str  # regex over released names
    why: str


@dataclass(frozen=True)
class ComponentMap:
    name: str
    layers: Callable[[NVLMConfig], int]  # how far "{i}" expands
    tensors: tuple[Tensor, ...]
    drops: tuple[Drop, ...] = ()

    def expand(self, cfg: NVLMConfig) -> list[tuple[str, str, Shape]]:
        """(source, target, shape) for every tensor this config needs."""
        rows = []
        for t in self.tensors:
            if not t.when(cfg):
                continue
            layer_ids = range(self.layers(cfg)) if "{i}" in t.source else [None]
            for i in layer_ids:
                rows.append((t.source.format(i=i), t.target.format(i=i), tuple(t.shape(cfg))))
        return rows

    def num_params(self, cfg: NVLMConfig) -> int:
        total = 0
        for _, _, shape in self.expand(cfg):
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


# --------------------------------------------------------------------------- NVLM-D tables

V = lambda c: c.vision  # noqa: E731  (short accessors keep the tables one row per tensor)
L = lambda c: c.llm  # noqa: E731

_VIT = "vision_model."
_VIT_LAYER = _VIT + "encoder.layers.{i}."

INTERNVIT = ComponentMap(
    name="vision",
    layers=lambda c: c.vision.num_layers,
    tensors=(
        Tensor(_VIT + "embeddings.class_embedding", "embeddings.class_embedding",
               lambda c: (1, 1, V(c).hidden_size)),
        Tensor(_VIT + "embeddings.patch_embedding.weight", "embeddings.patch_embedding.weight",
               lambda c: (V(c).hidden_size, V(c).num_channels, V(c).patch_size, V(c).patch_size)),
        Tensor(_VIT + "embeddings.patch_embedding.bias", "embeddings.patch_embedding.bias",
               lambda c: (V(c).hidden_size,)),
        Tensor(_VIT + "embeddings.position_embedding", "embeddings.position_embedding",
               lambda c: (1, V(c).num_positions, V(c).hidden_size)),
        # attn_dim = (heads + padding heads) × head_dim: 4096 in NVLM-D-72B, hidden_size without padding
        Tensor(_VIT_LAYER + "attn.qkv.weight", "encoder.layers.{i}.attn.qkv.weight",
               lambda c: (3 * V(c).attn_dim, V(c).hidden_size)),
        Tensor(_VIT_LAYER + "attn.qkv.bias", "encoder.layers.{i}.attn.qkv.bias",
               lambda c: (3 * V(c).attn_dim,), when=lambda c: c.vision.qkv_bias),
        Tensor(_VIT_LAYER + "attn.q_norm.weight", "encoder.layers.{i}.attn.q_norm.weight",
               lambda c: (V(c).attn_dim,), when=lambda c: c.vision.qk_normalization),
        Tensor(_VIT_LAYER + "attn.k_norm.weight", "encoder.layers.{i}.attn.k_norm.weight",
               lambda c: (V(c).attn_dim,), when=lambda c: c.vision.qk_normalization),
        Tensor(_VIT_LAYER + "attn.proj.weight", "encoder.layers.{i}.attn.proj.weight",
               lambda c: (V(c).hidden_size, V(c).attn_dim)),
        Tensor(_VIT_LAYER + "attn.proj.bias", "encoder.layers.{i}.attn.proj.bias",
               lambda c: (V(c).hidden_size,)),
        Tensor(_VIT_LAYER + "mlp.fc1.weight", "encoder.layers.{i}.mlp.fc1.weight",
               lambda c: (V(c).intermediate_size, V(c).hidden_size)),
        Tensor(_VIT_LAYER + "mlp.fc1.bias", "encoder.layers.{i}.mlp.fc1.bias",
               lambda c: (V(c).intermediate_size,)),
        Tensor(_VIT_LAYER + "mlp.fc2.weight", "encoder.layers.{i}.mlp.fc2.weight",
               lambda c: (V(c).hidden_size, V(c).intermediate_size)),
        Tensor(_VIT_LAYER + "mlp.fc2.bias", "encoder.layers.{i}.mlp.fc2.bias",
               lambda c: (V(c).hidden_size,)),
        Tensor(_VIT_LAYER + "norm1.weight", "encoder.layers.{i}.norm1.weight", lambda c: (V(c).hidden_size,)),
        Tensor(_VIT_LAYER + "norm1.bias", "encoder.layers.{i}.norm1.bias", lambda c: (V(c).hidden_size,),
               when=lambda c: c.vision.norm_type == "layer_norm"),
        Tensor(_VIT_LAYER + "norm2.weight", "encoder.layers.{i}.norm2.weight", lambda c: (V(c).hidden_size,)),
        Tensor(_VIT_LAYER + "norm2.bias", "encoder.layers.{i}.norm2.bias", lambda c: (V(c).hidden_size,),
               when=lambda c: c.vision.norm_type == "layer_norm"),
        Tensor(_VIT_LAYER + "ls1", "encoder.layers.{i}.ls1", lambda c: (V(c).hidden_size,)),
        Tensor(_VIT_LAYER + "ls2", "encoder.layers.{i}.ls2", lambda c: (V(c).hidden_size,)),
    ),
)

# mlp1 is an nn.Sequential: index 0 a LayerNorm over the shuffled width, index 2 (NVLM-D) the GELU, which has
# no weights.
_MLP1_NORM = (
    Tensor("mlp1.0.weight", "norm.weight", lambda c: (c.projector.input_size,)),
    Tensor("mlp1.0.bias", "norm.bias", lambda c: (c.projector.input_size,)),
)
MLP1 = ComponentMap(
    name="projector",
    layers=lambda c: 0,
    tensors=_MLP1_NORM + (
        Tensor("mlp1.1.weight", "fc1.weight", lambda c: (c.projector.hidden_size, c.projector.input_size)),
        Tensor("mlp1.3.weight", "fc2.weight", lambda c: (c.projector.output_size, c.projector.hidden_size)),
    ),
)

# NVLM-X's one-layer projector (the paper's 12800 → 8192): the same LayerNorm, then one Linear to the LLM width.
MLP1_LINEAR = ComponentMap(
    name="projector",
    layers=lambda c: 0,
    tensors=_MLP1_NORM + (
        Tensor("mlp1.1.weight", "fc.weight", lambda c: (c.projector.output_size, c.projector.input_size)),
    ),
)

LLM_PREFIX = "language_model."  # where the LLM sits in the released checkpoint
_LM_LAYER = LLM_PREFIX + "model.layers.{i}."


def _q_out(c):
    return L(c).num_heads * L(c).head_dim


def _kv_out(c):
    return L(c).num_kv_heads * L(c).head_dim


QWEN2 = ComponentMap(
    name="llm",
    layers=lambda c: c.llm.num_layers,
    tensors=(
        Tensor(LLM_PREFIX + "model.embed_tokens.weight", "model.embed_tokens.weight",
               lambda c: (L(c).vocab_size, L(c).hidden_size)),
        Tensor(_LM_LAYER + "input_layernorm.weight", "model.layers.{i}.input_layernorm.weight",
               lambda c: (L(c).hidden_size,)),
        Tensor(_LM_LAYER + "self_attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight",
               lambda c: (_q_out(c), L(c).hidden_size)),
        Tensor(_LM_LAYER + "self_attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias", lambda c: (_q_out(c),)),
        Tensor(_LM_LAYER + "self_attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
               lambda c: (_kv_out(c), L(c).hidden_size)),
        Tensor(_LM_LAYER + "self_attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias", lambda c: (_kv_out(c),)),
        Tensor(_LM_LAYER + "self_attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight",
               lambda c: (_kv_out(c), L(c).hidden_size)),
        Tensor(_LM_LAYER + "self_attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias", lambda c: (_kv_out(c),)),
        Tensor(_LM_LAYER + "self_attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight",
               lambda c: (L(c).hidden_size, _q_out(c))),
        Tensor(_LM_LAYER + "post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight",
               lambda c: (L(c).hidden_size,)),
        Tensor(_LM_LAYER + "mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight",
               lambda c: (L(c).intermediate_size, L(c).hidden_size)),
        Tensor(_LM_LAYER + "mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight",
               lambda c: (L(c).intermediate_size, L(c).hidden_size)),
        Tensor(_LM_LAYER + "mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight",
               lambda c: (L(c).hidden_size, L(c).intermediate_size)),
        Tensor(LLM_PREFIX + "model.norm.weight", "model.norm.weight", lambda c: (L(c).hidden_size,)),
        Tensor(LLM_PREFIX + "lm_head.weight", "lm_head.weight", lambda c: (L(c).vocab_size, L(c).hidden_size),
               when=lambda c: not c.llm.tie_word_embeddings),
    ),
    drops=(
        Drop(r"language_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
             "rotary frequencies are recomputed from rope_theta; older exports saved them as buffers"),
    ),
)

# NVLM-X / NVLM-H: the gated cross-attention layers, `{i}` = j, the j-th cross-attention layer (it follows
# self-attention layer cross_attention_layers[j]). Names are transformers' mllama names
# (MllamaCrossAttentionDecoderLayer) without its q/k norms; projections have no biases; the gates are [1].
_XATTN_LAYER = LLM_PREFIX + "model.xattn_layers.{i}."


def _h(c):
    return (L(c).hidden_size,)


XATTN_LAYERS = ComponentMap(
    name="xattn",
    layers=lambda c: len(c.cross_attention_layers),
    tensors=(
        Tensor(_XATTN_LAYER + "input_layernorm.weight", "{i}.input_layernorm.weight", _h),
        Tensor(_XATTN_LAYER + "cross_attn.q_proj.weight", "{i}.cross_attn.q_proj.weight",
               lambda c: (_q_out(c), L(c).hidden_size)),
        Tensor(_XATTN_LAYER + "cross_attn.k_proj.weight", "{i}.cross_attn.k_proj.weight",
               lambda c: (_kv_out(c), L(c).hidden_size)),
        Tensor(_XATTN_LAYER + "cross_attn.v_proj.weight", "{i}.cross_attn.v_proj.weight",
               lambda c: (_kv_out(c), L(c).hidden_size)),
        Tensor(_XATTN_LAYER + "cross_attn.o_proj.weight", "{i}.cross_attn.o_proj.weight",
               lambda c: (L(c).hidden_size, _q_out(c))),
        Tensor(_XATTN_LAYER + "cross_attn_attn_gate", "{i}.cross_attn_attn_gate", lambda c: (1,)),
        Tensor(_XATTN_LAYER + "post_attention_layernorm.weight", "{i}.post_attention_layernorm.weight", _h),
        Tensor(_XATTN_LAYER + "mlp.gate_proj.weight", "{i}.mlp.gate_proj.weight",
               lambda c: (L(c).intermediate_size, L(c).hidden_size)),
        Tensor(_XATTN_LAYER + "mlp.up_proj.weight", "{i}.mlp.up_proj.weight",
               lambda c: (L(c).intermediate_size, L(c).hidden_size)),
        Tensor(_XATTN_LAYER + "mlp.down_proj.weight", "{i}.mlp.down_proj.weight",
               lambda c: (L(c).hidden_size, L(c).intermediate_size)),
        Tensor(_XATTN_LAYER + "cross_attn_mlp_gate", "{i}.cross_attn_mlp_gate", lambda c: (1,)),
    ),
)

# --------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """Where every expected tensor comes from, per component."""

    rows: dict[str, list[tuple[str, str, Shape]]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def expected_shapes(self) -> dict[str, Shape]:
        return {src: shape for rows in self.rows.values() for src, _, shape in rows}


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def plan(source_names: Iterable[str], cfg: NVLMConfig, components: Iterable[ComponentMap]) -> Plan:
    """Check that the checkpoint's tensors and the tables of its family's `components` match exactly."""
    components = tuple(components)
    present = set(source_names)
    result, expected = Plan(), set()
    for comp in components:
        rows = comp.expand(cfg)
        result.rows[comp.name] = rows
        expected.update(src for src, _, _ in rows)
    drop_res = [re.compile(d.pattern) for comp in components for d in comp.drops]
    result.dropped = sorted(n for n in present - expected if any(r.fullmatch(n) for r in drop_res))
    missing = expected - present
    extra = present - expected - set(result.dropped)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
        if extra:
            parts.append(f"unexpected tensors ({len(extra)}): {_listing(extra)}")
        raise WeightMapError(
            "checkpoint tensors do not match the config's architecture — " + "; ".join(parts)
            + ". Check that config.json belongs to these weights (layer counts, tie_word_embeddings, qkv_bias)."
        )
    return result


# --------------------------------------------------------------------------- what the weights say

_QKV_LAYER0 = _VIT + "encoder.layers.0.attn.qkv.weight"


def vision_padding_from_weights(cfg: NVLMConfig, shapes: Mapping[str, Shape]) -> NVLMConfig:
    """The config with the vision attention's padding heads read from the weights: qkv rows ÷ 3 ÷ head_dim −
    heads (NVLM-D-72B: 12288 / 3 / 128 − 25 = 7). Older checkpoints (and the layout before the release was
    read closely) have none. A count stated in config.json must agree; a qkv whose rows give no whole head
    count is left to the shape check, which names the tensor."""
    v = cfg.vision
    shape = shapes.get(_QKV_LAYER0)
    if shape is None or len(shape) != 2 or shape[0] % (3 * v.head_dim):
        return cfg
    found = shape[0] // (3 * v.head_dim) - v.num_heads
    if found < 0:
        return cfg
    if v.dummy_heads_source == "config" and found != v.num_dummy_heads:
        raise ShapeMismatchError(
            f"vision_config.num_dummy_heads is {v.num_dummy_heads} but {_QKV_LAYER0} has {shape[0]} rows = 3 × "
            f"({v.num_heads} + {found}) heads × {v.head_dim}: the weights hold {found} padding heads; fix or remove "
            "the config key")
    return replace(cfg, vision=replace(v, num_dummy_heads=found, dummy_heads_source="weights"))
