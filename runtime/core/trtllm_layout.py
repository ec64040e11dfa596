"""TensorRT-LLM's Qwen2 checkpoint layout, as one table.

Each row is one tensor of a `rank{N}.safetensors` file (rank = pp_rank · tp + tp_rank): its name there,
the released checkpoint tensor(s) it comes from (under `language_model.`), how it splits over TP, which
PP stages hold it, and the role the reference executor gives it. The streaming writer
(runtime/core/trtllm_checkpoint.py: `rank_plan`) and the executor's loader (runtime/executor/) both
read this table; modelopt's export writes the same names (tested tensor for tensor).

Splits over TP (linear weights are (out, in)):
    rows   output rows: column-parallel linears, the embedding and lm_head (use_parallel_embedding)
    cols   input columns: row-parallel linears, whose partial products are summed (all-reduce)
    whole  replicated: norms
    qkv    [q_r; k_r; v_r]: this rank's query heads and KV heads, concatenated
    vocab  rows of the embedding and lm_head: the vocabulary padded with zero rows to a multiple of TP
           (TensorRT-LLM's pad_vocab_size, which its loader checks exactly), then split as `rows`; the
           runtime never samples a padded id (its penalty kernel masks ids ≥ vocab_size, and the
           reference executor drops the padded rows at load)
`{j}` is the layer index local to the PP stage, `{i}` the global one.

NVLM-X/H add their gated cross-attention layers (`XATTN`, stage "xlayer") beside Qwen2's, not among them:
`transformer.xattn_layers.{j}`, where cross-attention layer i (it follows self-attention layer
`cross_attention_layers[i]`) sits on the PP stage that holds that self-attention layer and j counts the
cross-attention layers of that stage. Inside a block the names are TensorRT-LLM's mllama
`CrossAttentionTransformerBlock` (`cross_attention.qkv`/`dense`, `gate_attn`, `gate_ffwd`, `input_layernorm`,
`post_layernorm`, `mlp`), without its q/k layernorms, which NVLM has not. Why beside and not interleaved as
mllama numbers them: Qwen2's layers then keep exactly the names TensorRT-LLM's Qwen and modelopt's export give
them (a quantized build is modelopt's export plus these blocks), and PP needs no renumbering — mllama's own
model asserts "not support PP now" for its interleaved list. config.json records the positions
(`cross_attention_layers`), so the executor and the GPU-host model read them instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import LLMConfig
from .weight_map import LLM_PREFIX

SOURCE_PREFIX = LLM_PREFIX  # the sources below are named under the released checkpoint's LLM prefix
SPLITS = ("rows", "cols", "whole", "qkv", "vocab")
STAGES = ("first", "layer", "xlayer", "last")


@dataclass(frozen=True)
class Row:
    target: str
    source: str | tuple[str, str, str]  # qkv: (q, k, v)
    split: str
    stage: str
    role: str  # what the executor does with it
    when: Callable[[LLMConfig], bool] = lambda llm: True


_L = "transformer.layers.{j}."
_S = "model.layers.{i}."
_ATT = _S + "self_attn."

QWEN2: tuple[Row, ...] = (
    Row("transformer.vocab_embedding.weight", "model.embed_tokens.weight", "vocab", "first", "embedding"),
    Row(_L + "input_layernorm.weight", _S + "input_layernorm.weight", "whole", "layer", "input_norm"),
    Row(_L + "attention.qkv.weight", (_ATT + "q_proj.weight", _ATT + "k_proj.weight", _ATT + "v_proj.weight"),
        "qkv", "layer", "qkv"),
    Row(_L + "attention.qkv.bias", (_ATT + "q_proj.bias", _ATT + "k_proj.bias", _ATT + "v_proj.bias"),
        "qkv", "layer", "qkv", when=lambda llm: llm.qkv_bias),
    Row(_L + "attention.dense.weight", _ATT + "o_proj.weight", "cols", "layer", "dense"),
    Row(_L + "post_layernorm.weight", _S + "post_attention_layernorm.weight", "whole", "layer", "post_norm"),
    # TensorRT-LLM's `fc` is the activated branch (SiLU(gate_proj)), `gate` the multiplied one (up_proj)
    Row(_L + "mlp.fc.weight", _S + "mlp.gate_proj.weight", "rows", "layer", "fc"),
    Row(_L + "mlp.gate.weight", _S + "mlp.up_proj.weight", "rows", "layer", "gate"),
    Row(_L + "mlp.proj.weight", _S + "mlp.down_proj.weight", "cols", "layer", "proj"),
    Row("transformer.ln_f.weight", "model.norm.weight", "whole", "last", "final_norm"),
    Row("lm_head.weight", "lm_head.weight", "vocab", "last", "lm_head"),
)
_X = "transformer.xattn_layers.{j}."
_XS = "model.xattn_layers.{i}."
_XATT = _XS + "cross_attn."

# the gated cross-attention blocks of NVLM-X/H (roles prefixed x_: the executor builds them apart). The
# gates are [1] tensors in the checkpoint dtype, which TensorRT-LLM's mllama block reads as tanh(gate) in
# float32; the k/v rows of the fused qkv project the image features (the encoder output), q the text.
XATTN: tuple[Row, ...] = (
    Row(_X + "input_layernorm.weight", _XS + "input_layernorm.weight", "whole", "xlayer", "x_input_norm"),
    Row(_X + "cross_attention.qkv.weight", (_XATT + "q_proj.weight", _XATT + "k_proj.weight",
                                            _XATT + "v_proj.weight"), "qkv", "xlayer", "x_qkv"),
    Row(_X + "cross_attention.dense.weight", _XATT + "o_proj.weight", "cols", "xlayer", "x_dense"),
    Row(_X + "gate_attn", _XS + "cross_attn_attn_gate", "whole", "xlayer", "x_gate_attn"),
    Row(_X + "post_layernorm.weight", _XS + "post_attention_layernorm.weight", "whole", "xlayer", "x_post_norm"),
    Row(_X + "mlp.fc.weight", _XS + "mlp.gate_proj.weight", "rows", "xlayer", "x_fc"),
    Row(_X + "mlp.gate.weight", _XS + "mlp.up_proj.weight", "rows", "xlayer", "x_gate"),
    Row(_X + "mlp.proj.weight", _XS + "mlp.down_proj.weight", "cols", "xlayer", "x_proj"),
    Row(_X + "gate_ffwd", _XS + "cross_attn_mlp_gate", "whole", "xlayer", "x_gate_ffwd"),
)
QWEN2_XATTN = QWEN2 + XATTN
# every module of the cross-attention blocks, as TensorRT-LLM's quantization `exclude_modules` patterns match
# module names: the blocks stay in 16 bits in every format (docs/llm.md, "Cross-attention layers")
XATTN_MODULES = "transformer.xattn_layers.*"
assert all(r.split in SPLITS and r.stage in STAGES for r in QWEN2_XATTN)
# Quantized checkpoints (modelopt's export) add scales beside the weights: `<linear>.weights_scaling_factor`,
# `activation_scaling_factor`, `prequant_scaling_factor` (read by LLMFormat.dequantize) and, with an FP8
# KV cache, one per attention layer:
KV_SCALE = _L + "attention.kv_cache_scaling_factor"
# NVLM-X/H with an FP8 KV cache: TensorRT-LLM's FP8 KV cache holds the cross-attention's image keys/values too,
# so each gated block carries its scale (calibrated by llm_build.quantize, the same rule as modelopt's)
XKV_SCALE = _X + "cross_attention.kv_cache_scaling_factor"


def xattn_stages(cross_attention_layers, num_layers: int, pp: int) -> list[list[int]]:
    """Per PP stage, the (global) indices of the cross-attention layers it holds, in order: layer i sits with
    self-attention layer cross_attention_layers[i]; its index in its stage's list is its `{j}`."""
    per = num_layers // pp
    return [[i for i, after in enumerate(cross_attention_layers) if after // per == p] for p in range(pp)]


def vocab_rows(vocab_size: int, tp: int) -> int:
    """Rows of the embedding and lm_head over all TP ranks: TensorRT-LLM's pad_vocab_size."""
    return -(-vocab_size // tp) * tp


def target(table: tuple[Row, ...], role: str, j: int | None = None) -> str:
    """The rank-file name of the (first) row of `role`; `j`: the layer index within the PP stage."""
    return next(r for r in table if r.role == role).target.format(j=j)


def prefix(table: tuple[Row, ...], role: str, j: int | None = None) -> str:
    """A linear layer's rank-file prefix: its name without the `weight` / `bias` suffix."""
    return target(table, role, j).rsplit(".", 1)[0] + "."


def source(row: Row, llm: LLMConfig, i: int | None = None):
    """The released name(s) a row reads; lm_head reads the embedding when the two are tied."""
    if row.role == "lm_head" and llm.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return tuple(s.format(i=i) for s in row.source) if isinstance(row.source, tuple) else row.source.format(i=i)
