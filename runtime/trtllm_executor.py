"""Reference executor of TensorRT-LLM checkpoints (CPU, PyTorch).

This is NOT an engine: it is a plain PyTorch implementation of what a TensorRT-LLM engine built
from a Qwen2 checkpoint computes, reading the checkpoint's own tensors in their stored formats.
It serves the CPU Triton target (speaking the `tensorrtllm` backend's I/O contract) and the
fidelity checks. Each rank's shard is executed as stored — column-parallel outputs concatenated,
row-parallel partial products summed — so TP/PP checkpoints are exercised, not re-merged.

Numerics (what the engine's kernels compute; arithmetic here in float32):
- unquantized:  y = x Wᵀ (+ b)
- FP8:          y = q8(x / a)·a · (W8·s)ᵀ, q8 = round to e4m3 with saturation at ±448
- W4A16_AWQ:    y = (x ⊙ pqs) · (q4 · s_group)ᵀ, int4 packed two per int8 along the output dim
- W4A8_AWQ:     y = q8((x ⊙ pqs) / a)·a · (q8(q4·s_group / s2)·s2)ᵀ
- FP8 KV cache: K, V (after RoPE) stored as q8(k / s_kv), read back ·s_kv
- prompt-embedding table: token ids ≥ vocab_size index rows (id − vocab_size) of the table
- NVLM-X/H gated cross-attention blocks (after the self-attention layers config.json's
  `cross_attention_layers` names; stored in 16 bits in every format):
      x = x + tanh(gate_attn) · dense(attn(q = norm(x), image keys/values))
      x = x + tanh(gate_ffwd) · MLP(norm(x)) · [the row reads at least one key]
  Each token reads the key range `[lo, hi)` the prompt gives it (runtime/prompt.py, `key_ranges`); a
  generated token reads the prompt's last range, as the backend reuses the mask's last row (every key, for
  an NVLM prompt). A request's image keys/values are computed once per cross-attention
  layer from its encoder features (the k/v rows of the fused qkv) and kept beside its KV cache, as
  TensorRT-LLM keeps a cross KV cache; a request without image keys skips the blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Sequence

import torch

from runtime.core import trtllm_layout as layout
from runtime.core.errors import CheckpointError, InputError, UnsupportedArchitectureError
from runtime.core.families import family_for_trtllm
from runtime.core.llm_formats import (
    FP8_MAX,
    LLMFormat,
    UnsupportedCombinationError,
    format_for_algo,
    kv_cache_is_fp8,
    kv_round,
    q8,
)
from runtime.decoding import Controls, Decoder, Words


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


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _optional_float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().reshape(())


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool = False):
    """Softmax attention, q [B, H, T, D] against k, v [B, KV, S, D] (GQA: each KV head serves H/KV query
    heads, no copy of the cache), `mask` True where a query may look. torch's fused kernel: one op instead of
    the half-dozen of matmul, scale, mask, softmax, matmul, which at these sizes cost more in dispatch than in
    arithmetic."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                            enable_gqa=q.shape[1] != k.shape[1])


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


@dataclass
class CrossKV:
    """One request's image keys and values for every cross-attention layer, [KV, keys, D] each: computed
    once from its encoder features and read by every step of the request."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    # the key range of every generated token: the prompt's last row, as the backend reuses the last row of a
    # request's cross_attention_mask for its generation steps (TransformerBuffers::copyCrossAttentionMasks);
    # all the keys for an NVLM prompt, whose last token follows every image
    decode: tuple[int, int] = (0, 0)

    @property
    def num_keys(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


@dataclass
class KVCache:
    """One sequence's cache: per layer a buffer [kv_heads, capacity, D] (fp8 when quantized) filled up to that
    layer's length. Capacity grows by doubling, so a decode step writes one row instead of copying the
    whole cache (what a torch.cat per step cost)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    cross: CrossKV | None = None  # NVLM-X/H: the request's image keys/values (None: no image keys)

    @property
    def length(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def layer_length(self, li: int) -> int:
        return self.lengths[li] if li < len(self.lengths) else 0

    def append(self, li: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add layer li's new keys and values [KV, T, D]."""
        t_len = k.shape[1]
        if li == len(self.keys):
            self.keys.append(k.new_empty(k.shape[0], t_len + 64, k.shape[2]))
            self.values.append(v.new_empty(v.shape[0], t_len + 64, v.shape[2]))
            self.lengths.append(0)
        n = self.lengths[li]
        if n + t_len > self.keys[li].shape[1]:
            cap = max(2 * self.keys[li].shape[1], n + t_len)
            for buffers in (self.keys, self.values):
                grown = buffers[li].new_empty(buffers[li].shape[0], cap, buffers[li].shape[2])
                grown[:, :n] = buffers[li][:, :n]
                buffers[li] = grown
        self.keys[li][:, n:n + t_len] = k
        self.values[li][:, n:n + t_len] = v
        self.lengths[li] = n + t_len

    def layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer li's keys and values so far, [KV, length, D] each (views, no copy)."""
        n = self.lengths[li]
        return self.keys[li][:, :n], self.values[li][:, :n]


def rank_layer(gets: Sequence[Callable[[str], torch.Tensor | None]], table, j: int, fmt: LLMFormat,
               directory: Path) -> RankLayer:
    """Self-attention layer `j` of one PP stage from its TP ranks' getters (name → tensor or None), dequantized
    to float32 by the format: what `TRTLLMExecutor.load` holds per layer, and what the layer-at-a-time fidelity
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


class TRTLLMExecutor:
    def __init__(self, directory: Path, config: dict, layers: list[RankLayer], embedding: torch.Tensor,
                 final_norm: torch.Tensor, lm_head: torch.Tensor, xattn: dict[int, XLayer] | None = None):
        self.directory, self.config = directory, config
        self.layers, self.embedding, self.final_norm, self.lm_head = layers, embedding, final_norm, lm_head
        self.xattn = xattn or {}  # self-attention layer index → the cross-attention block that follows it
        self._xattn_order = {li: j for j, li in enumerate(sorted(self.xattn))}  # its index among the blocks
        c = config
        self.vocab_size = c["vocab_size"]
        self.hidden_size = c["hidden_size"]
        self.num_heads, self.num_kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_size") or self.hidden_size // self.num_heads
        self.eps = c["norm_epsilon"]
        self.tp = c["mapping"]["tp_size"]
        q = c.get("quantization") or {}
        self.kv_fp8 = kv_cache_is_fp8(q)
        self.rotary_base = float(c.get("rotary_base", 10000.0))
        self.rotary_scaling = c.get("rotary_scaling")
        self.max_positions = c["max_position_embeddings"]
        self._plain_inv_freq: torch.Tensor | None = None  # RoPE inverse frequencies at the configured base

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, directory: str | Path) -> "TRTLLMExecutor":
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
        return cls(directory, config, layers, embedding, final_norm, lm_head, xattn)

    # ------------------------------------------------------------------ forward

    def _inv_freq(self, total_len: int) -> torch.Tensor:
        """RoPE inverse frequencies [D/2] for a sequence of `total_len` tokens: the base grows with the length
        past the trained one under dynamic NTK scaling, as transformers and TensorRT-LLM apply it."""
        d, base, rs = self.head_dim, self.rotary_base, self.rotary_scaling
        if rs and rs.get("type") == "dynamic" and total_len > self.max_positions:
            factor = rs["factor"]
            base = base * ((factor * total_len / self.max_positions) - (factor - 1)) ** (d / (d - 2))
            return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        if rs and rs.get("type") not in (None, "dynamic"):
            raise CheckpointError(f"rotary_scaling type {rs.get('type')!r} is not supported by the reference executor")
        if self._plain_inv_freq is None:  # computed once: recomputing it cost every decode step
            self._plain_inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        return self._plain_inv_freq

    def _rope(self, x: torch.Tensor, positions: torch.Tensor, total_lens: int | Sequence[int]) -> torch.Tensor:
        """GPT-NeoX rotary embedding; x: [H, T, D], positions [T]. `total_lens`: the length of the sequence
        the T tokens belong to, or one length per token when each is a different sequence's (a decode
        step's batch: under dynamic NTK scaling each then has its own base)."""
        d = self.head_dim
        if isinstance(total_lens, int):
            inv = self._inv_freq(total_lens)[None, :]  # [1, D/2]
        elif self._inv_freq(max(total_lens)) is self._plain_inv_freq:  # every row on the plain base
            inv = self._plain_inv_freq[None, :]
        else:
            inv = torch.stack([self._inv_freq(t) for t in total_lens])  # [T, D/2]
        ang = positions.float()[:, None] * inv  # [T, D/2]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # [T, D]
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def _qkv(self, layer: RankLayer, x: torch.Tensor):
        """x [T, hidden] → q [T, H, D], k and v [T, KV, D] (column-parallel: each rank gives [q_r; k_r; v_r])."""
        t_len, d = x.shape[0], self.head_dim
        nh, nkv = self.num_heads // self.tp, self.num_kv_heads // self.tp
        qs, ks, vs = [], [], []
        for lin in layer.qkv:
            out = lin(x)  # [T, (nh + 2 nkv) D]
            q, k, v = out.split([nh * d, nkv * d, nkv * d], dim=-1)
            qs.append(q), ks.append(k), vs.append(v)
        return (torch.cat(qs, -1).view(t_len, self.num_heads, d), torch.cat(ks, -1).view(t_len, self.num_kv_heads, d),
                torch.cat(vs, -1).view(t_len, self.num_kv_heads, d))

    def _attend(self, layer: RankLayer, q, k, v, cache: KVCache, li: int) -> torch.Tensor:
        """One sequence's new tokens (q [T, H, D], k, v [T, KV, D]) against its cache, extended here;
        returns the context [T, H·D]."""
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, T, D], [KV, T, D]
        start = cache.layer_length(li)  # layer li's own length so far
        pos = torch.arange(start, start + q.shape[1])
        total = start + q.shape[1]
        return self._attend_rotated(layer, self._rope(q, pos, total), self._rope(k, pos, total), v, cache, li)

    def _attend_rotated(self, layer: RankLayer, q, k, v, cache: KVCache, li: int) -> torch.Tensor:
        """q [H, T, D], k, v [KV, T, D] with RoPE applied: write k, v to the cache and attend; [T, H·D]."""
        t_len, start = q.shape[1], cache.layer_length(li)
        cache.append(li, *self._kv_store(layer, k, v))
        k_all, v_all = self._kv_load(layer, *cache.layer(li))
        # one new token sees every cached position (no mask); a prompt from position 0 is plain causal
        pos = torch.arange(start, start + t_len)
        mask = None if t_len == 1 or start == 0 else torch.arange(start + t_len)[None, :] <= pos[:, None]  # [T, S]
        ctx = _sdpa(q[None], k_all[None], v_all[None], mask, causal=t_len > 1 and start == 0)[0]  # [H, T, D]
        return ctx.transpose(0, 1).reshape(t_len, self.num_heads * self.head_dim)  # [T, H·D]

    def _kv_store(self, layer: RankLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as the cache holds them: fp8 with the layer's scale when the KV cache is quantized."""
        if layer.kv_scale is None or not self.kv_fp8:
            return k, v
        return tuple((x / layer.kv_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn) for x in (k, v))

    def _kv_load(self, layer: RankLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k.dtype != torch.float8_e4m3fn:
            return k, v
        return k.float() * layer.kv_scale, v.float() * layer.kv_scale

    def _attend_step(self, layer: RankLayer, q, k, v, caches: Sequence[KVCache], li: int) -> torch.Tensor:
        """One decode step's attention for a batch: q [B, H, D], k, v [B, KV, D], one new token per sequence
        at its own position. RoPE runs on the batch's rows together (each at its own position and length);
        then each sequence attends over a view of its own cache (one fused op each, no copy): gathering the
        caches into one zero-padded block for a single batched op cost more in copies than it saved once
        prompts hold image tokens (1.8x slower at 1,300 tokens, B 8; benchmarks/decode_step.py). Returns [B, H·D]."""
        starts = [c.layer_length(li) for c in caches]
        pos, totals = torch.tensor(starts), [s + 1 for s in starts]
        q = self._rope(q.transpose(0, 1), pos, totals).transpose(0, 1)  # [H, B, D] rows at their positions
        k = self._rope(k.transpose(0, 1), pos, totals).transpose(0, 1)
        return torch.cat([self._attend_rotated(layer, q[b][:, None], k[b][:, None], v[b][:, None], cache, li)
                          for b, cache in enumerate(caches)])

    def _dense(self, layer: RankLayer, ctx: torch.Tensor) -> torch.Tensor:
        # row-parallel: rank r's dense sees its own heads' context; partial outputs are summed
        per = self.num_heads // self.tp * self.head_dim
        return sum(lin(ctx[:, r * per:(r + 1) * per]) for r, lin in enumerate(layer.dense))

    def _attention(self, layer: RankLayer, x: torch.Tensor, cache: KVCache, li: int) -> torch.Tensor:
        q, k, v = self._qkv(layer, x)
        return self._dense(layer, self._attend(layer, q, k, v, cache, li))

    def _mlp(self, layer: RankLayer, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for fc, gate, proj in zip(layer.fc, layer.gate, layer.proj):
            h = torch.nn.functional.silu(fc(x)) * gate(x)  # fc = gate_proj (activated), gate = up_proj
            out = out + proj(h)
        return out

    # ------------------------------------------------------------------ cross-attention (NVLM-X/H)

    def cross_kv(self, features: torch.Tensor) -> CrossKV:
        """A request's encoder features [keys, hidden] → every cross-attention layer's keys/values, once: the
        k/v rows of each block's fused qkv (no rotary: image keys have no positions)."""
        if not self.xattn:
            raise InputError("encoder features were given to a model without cross-attention layers")
        if features.ndim != 2 or features.shape[1] != self.hidden_size:
            raise InputError(f"encoder features must be [keys, {self.hidden_size}], got {list(features.shape)}")
        x = features.float()
        keys, values = [], []
        for li in sorted(self.xattn):
            xl = self.xattn[li]
            _, k, v = self._qkv(xl, x)  # [K, KV, D] each
            if self.kv_fp8:  # the engine's FP8 KV cache holds the image keys/values too, with the block's scale
                if xl.kv_scale is None:
                    raise CheckpointError(f"{self.directory}: an FP8 KV cache without the cross-attention blocks' "
                                          "kv_cache_scaling_factor; rebuild the checkpoint with this nvlm-trt")
                k, v = kv_round(k, xl.kv_scale), kv_round(v, xl.kv_scale)
            keys.append(k.transpose(0, 1).contiguous())
            values.append(v.transpose(0, 1).contiguous())
        return CrossKV(keys, values)

    def _cross_block(self, li: int, x: torch.Tensor, crosses: Sequence[CrossKV | None],
                     ranges: torch.Tensor | None) -> torch.Tensor:
        """The gated block after self-attention layer li. x [T, hidden]: one sequence's T tokens (len(crosses)
        1, `ranges` [T, 2] the key range of each; None: generated tokens, which read the request's decode
        range) or a decode step's batch, one token per sequence (len(crosses) T, each its request's decode
        range). A row that reads no key gets exactly nothing."""
        xl, d, j = self.xattn[li], self.head_dim, self._xattn_order[li]
        q, _, _ = self._qkv(xl, rms_norm(x, xl.input_norm, self.eps))  # [T, H, D]
        ctx = x.new_zeros(x.shape[0], self.num_heads * d)
        reads = x.new_zeros(x.shape[0], 1)
        one = len(crosses) == 1
        for b, cross in enumerate(crosses):
            if cross is None or cross.num_keys == 0:
                continue
            k, v = cross.keys[j][None], cross.values[j][None]  # [1, KV, K, D]
            rows = slice(None) if one else slice(b, b + 1)
            qb = q[rows].transpose(0, 1)[None]  # [1, H, t, D]
            mask = None
            if one and ranges is not None:
                pos = torch.arange(cross.num_keys)
                mask = (pos[None, :] >= ranges[:, :1]) & (pos[None, :] < ranges[:, 1:])  # [T, K]
                live = mask.any(-1)
                mask[~live] = True  # a row with no keys attends to something harmless; its output is dropped
                out = _sdpa(qb, k, v, mask)[0].transpose(0, 1).reshape(-1, self.num_heads * d)
                ctx[rows] = out * live[:, None]
                reads[rows] = live[:, None].float()
            else:
                lo, hi = cross.decode
                if hi <= lo:
                    continue
                ctx[rows] = _sdpa(qb, k[:, :, lo:hi], v[:, :, lo:hi], None)[0].transpose(0, 1).reshape(
                    -1, self.num_heads * d)
                reads[rows] = 1.0
        if not bool(reads.any()):  # no row reads an image: the block adds exactly nothing (skip_cross_attn_blocks)
            return x
        x = x + xl.gate_attn * self._dense(xl, ctx)
        return x + xl.gate_ffwd * self._mlp(xl, rms_norm(x, xl.post_norm, self.eps)) * reads

    def embed(self, ids: Sequence[int], table: torch.Tensor | None) -> torch.Tensor:
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        fake = ids_t >= self.vocab_size
        if fake.any():
            if table is None:
                raise InputError("input_ids contain prompt-table ids (≥ vocab_size) but no prompt_embedding_table was given")
            rows = ids_t[fake] - self.vocab_size
            if int(rows.max()) >= table.shape[0]:
                raise InputError(f"input id {int(ids_t[fake].max())} points past the {table.shape[0]}-row prompt table")
        if (ids_t < 0).any():
            raise InputError("input_ids must be non-negative")
        x = self.embedding[ids_t.clamp(max=self.vocab_size - 1)]
        if fake.any():
            x = x.clone()
            x[fake] = table[ids_t[fake] - self.vocab_size].float()
        return x  # [T, hidden]

    def forward(self, ids: Sequence[int], table: torch.Tensor | None, cache: KVCache,
                key_ranges: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Run new tokens through the model, extending `cache`; returns logits [T, vocab]. NVLM-X/H: the
        tokens read `cache.cross` (set by `prefill`), each its own `key_ranges` entry (None: generated tokens,
        which read the request's decode range)."""
        x = self.embed(ids, table)
        ranges = None if key_ranges is None else torch.as_tensor(key_ranges, dtype=torch.long).reshape(-1, 2)
        for li, layer in enumerate(self.layers):
            x = x + self._attention(layer, rms_norm(x, layer.input_norm, self.eps), cache, li)
            x = x + self._mlp(layer, rms_norm(x, layer.post_norm, self.eps))
            if li in self.xattn:
                x = self._cross_block(li, x, [cache.cross], ranges)
        return rms_norm(x, self.final_norm, self.eps) @ self.lm_head.T

    def prefill(self, req: "Request", cache: KVCache) -> torch.Tensor:
        """A request's prompt (the context phase): its image keys/values into `cache.cross`, then the prompt
        through the model; logits [T, vocab]."""
        ranges = None
        if req.encoder_features is not None and req.encoder_features.shape[0]:
            n = req.encoder_features.shape[0]
            if req.key_ranges is None or len(req.key_ranges) != len(req.input_ids):
                raise InputError(f"{len(req.input_ids)} input tokens need as many key ranges (the prompt's "
                                 f"cross-attention mask), got {None if req.key_ranges is None else len(req.key_ranges)}")
            ranges = [(int(lo), int(hi)) for lo, hi in req.key_ranges]
            if any(not 0 <= lo <= hi <= n for lo, hi in ranges):
                raise InputError(f"key ranges must lie within the {n} encoder features")
            cache.cross = self.cross_kv(req.encoder_features)
            cache.cross.decode = ranges[-1]
        elif req.key_ranges is not None and any(hi > lo for lo, hi in req.key_ranges):
            raise InputError("key ranges read image keys, but no encoder features were given")
        return self.forward(req.input_ids, req.prompt_table, cache, ranges)

    def decode_step(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> torch.Tensor:
        """One decode step for a batch of sequences, each at its own length: token b extends caches[b].
        The linear layers, RoPE and the KV writes run on the batch's rows together (what in-flight batching
        buys); each sequence attends over its own cache. Returns logits [B, vocab]."""
        x = self.embedding[torch.as_tensor(list(tokens), dtype=torch.long)]  # [B, hidden]
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, rms_norm(x, layer.input_norm, self.eps))  # [B, H, D], [B, KV, D]
            ctx = self._attend_step(layer, q, k, v, caches, li)
            x = x + self._dense(layer, ctx)
            x = x + self._mlp(layer, rms_norm(x, layer.post_norm, self.eps))
            if li in self.xattn:
                x = self._cross_block(li, x, [c.cross for c in caches], None)
        return rms_norm(x, self.final_norm, self.eps) @ self.lm_head.T

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, requests: Sequence["Request"],
                 on_token: Callable[[int, int, float | None], None] | None = None) -> list["Result"]:
        """Independent sequences (any lengths); `on_token(request_index, token, log_prob or None)` streams
        tokens."""
        return [self._generate_one(i, r, on_token) for i, r in enumerate(requests)]

    def _generate_one(self, index: int, req: "Request", on_token) -> "Result":
        if not req.input_ids:
            raise InputError("input_ids is empty")
        if req.max_new_tokens < 1:
            raise InputError(f"request_output_len must be ≥ 1, got {req.max_new_tokens}")
        decoder = Decoder(req.input_ids, self.vocab_size, req.controls())
        cache = KVCache()
        logits = self.prefill(req, cache)[-1]
        reason = "length"
        for step in range(req.max_new_tokens):
            if req.cancelled is not None and req.cancelled():
                reason = "cancelled"
                break
            tok, finished = decoder.step(logits)
            if on_token:
                on_token(index, tok, decoder.log_probs[-1] if req.return_log_probs else None)
            if finished:
                reason = finished
                break
            if step + 1 < req.max_new_tokens:  # no forward pass for a token that will not be sampled
                logits = self.forward([tok], None, cache)[-1]
        return Result(decoder.generated, reason, decoder.log_probs if req.return_log_probs else None)


@dataclass
class Request:
    input_ids: list[int]  # fake ids ≥ vocab_size index prompt_table rows
    max_new_tokens: int
    prompt_table: torch.Tensor | None = None  # [num_image_tokens, hidden]
    # NVLM-X/H: the image features cross-attention reads [keys, hidden] (the `tensorrtllm` backend's
    # encoder_input_features) and, per input token, the [lo, hi) of the keys it reads (runtime/prompt.py)
    encoder_features: torch.Tensor | None = None
    key_ranges: Sequence[tuple[int, int]] | None = None
    end_id: int | None = None
    temperature: float = 0.0
    top_k: int = 1
    top_p: float = 0.0
    seed: int = 0
    min_length: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_words: Words = ()  # token sequences (runtime/decoding.py)
    bad_words: Words = ()
    return_log_probs: bool = False
    # asked before every decode step: True stops the request there (a cancelled client, a `stop` request),
    # so a cancelled request holds the executor for at most one more step
    cancelled: Callable[[], bool] | None = None

    def controls(self) -> Controls:
        return Controls(self.temperature, self.top_k, self.top_p, self.seed, self.end_id, self.min_length,
                        self.repetition_penalty, self.presence_penalty, self.frequency_penalty, self.stop_words,
                        self.bad_words, self.return_log_probs)


@dataclass
class Result:
    tokens: list[int]
    finish_reason: str  # "end_id" | "stop_words" | "length" | "cancelled"
    log_probs: list[float] | None = None  # per generated token, when asked for (runtime/decoding.py)

    @property
    def cum_log_prob(self) -> float | None:
        return None if self.log_probs is None else float(sum(self.log_probs))
