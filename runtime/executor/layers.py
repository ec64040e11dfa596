"""The reference executor's view of a TensorRT-LLM checkpoint: each rank's linear layers in their stored
format (`Linear`), a decoder layer's and a cross-attention block's tensors per rank, and the loader that reads
a checkpoint directory into them (safetensors, opened lazily)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Sequence

import torch

from runtime.core import trtllm_layout as layout
from runtime.core.errors import CheckpointError, UnsupportedArchitectureError
from runtime.core.families import family_for_trtllm
from runtime.core.llm_formats import (
    LLMFormat,
    UnsupportedCombinationError,
    format_for_algo,
    q8,
)


class Linear:
    """One rank's shard of a linear layer in its stored format; dequantized once at load by the
    format (runtime/core/llm_formats.py: LLMFormat.dequantize)."""

    def __init__(self, get: Callable[[str], torch.Tensor | None], prefix: str, fmt: LLMFormat):
        self.bias = get(prefix + "bias")
        self.bias = None if self.bias is None else self.bias.float()
        stored = fmt.dequantize(get, prefix)
        self.w, self.pqs, self.act_scale = stored.weight, stored.prequant_scale, stored.act_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pqs is not None:
            x = x * self.pqs
        if self.act_scale is not None:
            x = q8(x / self.act_scale) * self.act_scale
        y = x @ self.w.T
        return y if self.bias is None else y + self.bias


def _optional_float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().reshape(())


# --------------------------------------------------------------------------- checkpoint


@dataclass
class Block:
    """A decoder block's norms and linear layers, one entry per TP rank for the sharded ones."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: list[Linear]
    dense: list[Linear]
    fc: list[Linear]
    gate: list[Linear]
    proj: list[Linear]


@dataclass
class RankLayer(Block):
    """Self-attention layer j of one PP stage."""

    kv_scale: torch.Tensor | None


@dataclass
class XLayer(Block):
    """One gated cross-attention block (NVLM-X/H): q/k/v/dense and the MLP computed as a RankLayer's."""

    gate_attn: torch.Tensor  # tanh already applied, float32 scalar
    gate_ffwd: torch.Tensor
    kv_scale: torch.Tensor | None = None  # an FP8 KV cache's scale for the block's image keys/values


def rank_layer(gets: Sequence[Callable[[str], torch.Tensor | None]], table, j: int, fmt: LLMFormat,
               directory: Path) -> RankLayer:
    """Self-attention layer `j` of one PP stage from its TP ranks' getters (name → tensor or None), dequantized
    to float32 by the format: what `ReferenceExecutor.load` holds per layer, and what the layer-at-a-time fidelity
    report (builder/layerwise.py) loads and frees one layer at a time."""
    kv = gets[0](layout.KV_SCALE.format(j=j))

    def linears(role):
        return [Linear(g, layout.prefix(table, role, j), fmt) for g in gets]

    layer = RankLayer(input_norm=gets[0](layout.target(table, "input_norm", j)).float(),
                      post_norm=gets[0](layout.target(table, "post_norm", j)).float(),
                      qkv=linears("qkv"), dense=linears("dense"), fc=linears("fc"), gate=linears("gate"),
                      proj=linears("proj"), kv_scale=None if kv is None else kv.float())
    if any(lin.bias is not None for lin in layer.dense + layer.proj):
        # TensorRT-LLM adds a row-parallel bias once after the all-reduce; Qwen2 has none
        raise CheckpointError(f"{directory}: row-parallel biases (dense/proj) are not expected in Qwen2")
    return layer


def x_layer(gets: Sequence[Callable[[str], torch.Tensor | None]], table, j: int,
            fmt_of: Callable[[str], LLMFormat], where: str) -> XLayer:
    """Gated cross-attention block `j` of one PP stage from its TP ranks' getters (`fmt_of(prefix)`: the format a
    module is stored in; the blocks are excluded from quantization)."""
    def xlinears(role):
        prefix = layout.prefix(table, role, j)
        return [Linear(g, prefix, fmt_of(prefix)) for g in gets]

    def whole(role):
        t = gets[0](layout.target(table, role, j))
        if t is None:
            raise CheckpointError(f"{where}: {layout.target(table, role, j)} missing")
        return t.float()

    return XLayer(
        input_norm=whole("x_input_norm"), post_norm=whole("x_post_norm"), qkv=xlinears("x_qkv"),
        dense=xlinears("x_dense"), fc=xlinears("x_fc"), gate=xlinears("x_gate"), proj=xlinears("x_proj"),
        gate_attn=whole("x_gate_attn").reshape(()).tanh(), gate_ffwd=whole("x_gate_ffwd").reshape(()).tanh(),
        kv_scale=_optional_float(gets[0](layout.XKV_SCALE.format(j=j))))


def excluded_format(config: dict, fmt: LLMFormat) -> Callable[[str], LLMFormat]:
    """The format a module of a checkpoint is stored in: TensorRT-LLM keeps a module that the quantization's
    `exclude_modules` matches unquantized."""
    excluded = (config.get("quantization") or {}).get("exclude_modules") or []
    plain = format_for_algo(None)
    return lambda prefix: plain if any(fnmatch(prefix.rstrip("."), pat) for pat in excluded) else fmt


def read_checkpoint(directory: str | Path) -> tuple:
    """A TensorRT-LLM checkpoint directory → (directory, config, self-attention layers, embedding, final norm,
    lm_head, cross-attention blocks): the arguments of `ReferenceExecutor`."""
    from safetensors import safe_open


    directory = Path(directory)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} not found: not a TensorRT-LLM checkpoint directory")
    config = json.loads(cfg_file.read_text())
    try:
        family = family_for_trtllm(config.get("architecture"))
        table = family.trtllm_layout
    except UnsupportedArchitectureError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    m = config["mapping"]
    tp, pp = m["tp_size"], m["pp_size"]
    try:
        fmt = format_for_algo((config.get("quantization") or {}).get("quant_algo"))
    except UnsupportedCombinationError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    ranks = []
    for r in range(tp * pp):
        f = directory / f"rank{r}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{f} missing: the config says world size {tp * pp}")
        ranks.append(safe_open(str(f), framework="pt"))

    def getter(rank):
        keys = set(ranks[rank].keys())
        return lambda name: ranks[rank].get_tensor(name) if name in keys else None

    fmt_of = excluded_format(config, fmt)

    layers, per_stage = [], config["num_hidden_layers"] // pp
    after = list(config.get("cross_attention_layers") or [])
    if after and not family.prompt_layout.cross_attention:
        raise CheckpointError(f"{cfg_file}: cross_attention_layers in a {config.get('architecture')} checkpoint")
    if family.prompt_layout.cross_attention and not after:
        raise CheckpointError(f"{cfg_file}: a {config.get('architecture')} checkpoint needs cross_attention_layers")
    xattn: dict[int, XLayer] = {}
    for p in range(pp):
        gets = [getter(p * tp + t) for t in range(tp)]
        for j, i in enumerate(layout.xattn_stages(after, config["num_hidden_layers"], pp)[p]):
            xattn[after[i]] = x_layer(gets, table, j, fmt_of, f"{directory}: cross-attention layer {i}, PP "
                                                               f"stage {p}")
        layers.extend(rank_layer(gets, table, j, fmt, directory) for j in range(per_stage))
    first = [getter(t) for t in range(tp)]
    last = [getter((pp - 1) * tp + t) for t in range(tp)]
    # rows split over TP (use_parallel_embedding): the ranks' slices, concatenated; the vocabulary is
    # padded to a multiple of TP with zero rows, which TensorRT-LLM's loader checks exactly and its
    # sampler masks — here they are dropped, so a padded id is never produced
    embedding = torch.cat([g(layout.target(table, "embedding")).float() for g in first])
    lm_head = torch.cat([g(layout.target(table, "lm_head")).float() for g in last])
    vocab, rows = config["vocab_size"], layout.vocab_rows(config["vocab_size"], tp)
    for name, t in (("embedding", embedding), ("lm_head", lm_head)):
        if t.shape[0] != rows:
            raise CheckpointError(f"{directory}: {name} has {t.shape[0]} rows over TP{tp}; TensorRT-LLM expects "
                                  f"vocab_size {vocab} padded to a multiple of TP ({rows})")
    embedding, lm_head = embedding[:vocab], lm_head[:vocab]
    final_norm = last[0](layout.target(table, "final_norm")).float()
    return directory, config, layers, embedding, final_norm, lm_head, xattn
