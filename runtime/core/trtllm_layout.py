"""TensorRT-LLM's Qwen2 checkpoint layout, as one table.

Each row is one tensor of a `rank{N}.safetensors` file (rank = pp_rank · tp + tp_rank): its name there,
the released checkpoint tensor(s) it comes from (under `language_model.`), how it splits over TP, which
PP stages hold it, and the role the reference executor gives it. The streaming writer
(runtime/core/trtllm_checkpoint.py: `rank_plan`) and the executor's loader (runtime/trtllm_executor.py) both
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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import LLMConfig
from .weight_map import LLM_PREFIX

SOURCE_PREFIX = LLM_PREFIX  # the sources below are named under the released checkpoint's LLM prefix
SPLITS = ("rows", "cols", "whole", "qkv", "vocab")
STAGES = ("first", "layer", "last")


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
assert all(r.split in SPLITS and r.stage in STAGES for r in QWEN2)
# Quantized checkpoints (modelopt's export) add scales beside the weights: `<linear>.weights_scaling_factor`,
# `activation_scaling_factor`, `prequant_scaling_factor` (read by LLMFormat.dequantize) and, with an FP8
# KV cache, one per attention layer:
KV_SCALE = _L + "attention.kv_cache_scaling_factor"


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
