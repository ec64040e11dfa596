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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from runtime.core.errors import CheckpointError, InputError
from runtime.core.llm_formats import (
    FP8_MAX,
    kv_cache_is_fp8,
    kv_round,
)
from runtime.decoding import Controls, Decoder

from .cache import CrossKV, KVCache
from .layers import RankLayer, XLayer, read_checkpoint


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool = False):
    """Softmax attention, q [B, H, T, D] against k, v [B, KV, S, D] (GQA: each KV head serves H/KV query
    heads, no copy of the cache), `mask` True where a query may look. torch's fused kernel: one op instead of
    the half-dozen of matmul, scale, mask, softmax, matmul, which at these sizes cost more in dispatch than in
    arithmetic."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                            enable_gqa=q.shape[1] != k.shape[1])



class ReferenceExecutor:
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
    def load(cls, directory: str | Path) -> "ReferenceExecutor":
        """Read a TensorRT-LLM checkpoint directory (loader.read_checkpoint) into an executor."""
        return cls(*read_checkpoint(directory))

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
        ctx = sdpa(q[None], k_all[None], v_all[None], mask, causal=t_len > 1 and start == 0)[0]  # [H, T, D]
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
                out = sdpa(qb, k, v, mask)[0].transpose(0, 1).reshape(-1, self.num_heads * d)
                ctx[rows] = out * live[:, None]
                reads[rows] = live[:, None].float()
            else:
                lo, hi = cross.decode
                if hi <= lo:
                    continue
                ctx[rows] = sdpa(qb, k[:, :, lo:hi], v[:, :, lo:hi], None)[0].transpose(0, 1).reshape(
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
        decoder = Decoder(req.input_ids, self.vocab_size, req.controls)
        cache = KVCache()
        logits = self.prefill(req, cache)[-1]
        reason = "length"
        for step in range(req.max_new_tokens):
            if req.cancelled is not None and req.cancelled():
                reason = "cancelled"
                break
            tok, finished = decoder.step(logits)
            if on_token:
                on_token(index, tok, decoder.log_probs[-1] if req.controls.return_log_probs else None)
            if finished:
                reason = finished
                break
            if step + 1 < req.max_new_tokens:  # no forward pass for a token that will not be sampled
                logits = self.forward([tok], None, cache)[-1]
        return Result(decoder.generated, reason, decoder.log_probs if req.controls.return_log_probs else None)


@dataclass
class Request:
    input_ids: list[int]  # fake ids ≥ vocab_size index prompt_table rows
    max_new_tokens: int
    prompt_table: torch.Tensor | None = None  # [num_image_tokens, hidden]
    # NVLM-X/H: the image features cross-attention reads [keys, hidden] (the `tensorrtllm` backend's
    # encoder_input_features) and, per input token, the [lo, hi) of the keys it reads (runtime/prompt.py)
    encoder_features: torch.Tensor | None = None
    key_ranges: Sequence[tuple[int, int]] | None = None
    controls: Controls = field(default_factory=Controls)  # decoding (runtime/core/request_schema.py)
    # asked before every decode step: True stops the request there (a cancelled client, a `stop` request),
    # so a cancelled request holds the executor for at most one more step
    cancelled: Callable[[], bool] | None = None


@dataclass
class Result:
    tokens: list[int]
    finish_reason: str  # "end_id" | "stop_words" | "length" | "cancelled"
    log_probs: list[float] | None = None  # per generated token, when asked for (runtime/decoding.py)

    @property
    def cum_log_prob(self) -> float | None:
        return None if self.log_probs is None else float(sum(self.log_probs))
