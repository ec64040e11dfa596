"""Gated cross-attention for NVLM-X / NVLM-H, as one OpenAI Triton kernel (issue 14, point 4).

    out[i, h] = tanh(gate) · softmax(q[i, h] · K[lo_i:hi_i, h_kv]ᵀ · scale) · V[lo_i:hi_i, h_kv]

Queries of many sequences are packed without padding ([Nq, Hq, D]); the image keys/values of all
sequences are packed the same way ([Nk, Hkv, D]); each query reads one contiguous key range
[lo_i, hi_i) of the packed keys (NVLM-X: a tile tag sees its tile, other text sees every tile of the
images before it; the range function lives with the model family). A query with an empty range gets
exactly zero, as the whole cross-attention block adds nothing for text that sees no image.

Layout of the work: one program per (block of BLOCK_M rows, KV head), where the rows are the
(query, query head) pairs that share that KV head (GQA: G = Hq / Hkv query heads per KV head), so
decode (one query per sequence) still fills a block with G heads of the same query. A program walks
only the key blocks between the smallest `lo` and the largest `hi` of its rows — blocks outside are
skipped, not masked — with a flash-style online softmax in fp32; rows whose range does not cover a
key get -inf there. The tanh gate is applied in the epilogue. The same kernel serves prefill (many
queries per sequence) and decode (one).

fp16 and bf16 inputs; fp32 accumulation; the output in the inputs' dtype. Under the Triton interpreter
(Triton 3.7) `tl.dot` on bf16 operands returns garbage, so there `DOT_F32` upcasts bf16 operands to
fp32 before the dots (same inputs, fp32 products); the compiled kernel multiplies bf16 on the tensor
cores, which only a GPU run checks (scripts/gpu_check.py).
"""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl


@triton.jit
def gated_xattn_kernel(q_ptr, k_ptr, v_ptr, lo_ptr, hi_ptr, gate_ptr, out_ptr,
                       n_rows, G, stride_qn, stride_qh, stride_kn, stride_kh, stride_on, stride_oh,
                       D: tl.constexpr, SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_F32: tl.constexpr):
    # the gate is a tensor (a learned weight, an engine input), the scale a compile-time constant: a
    # TensorRT plugin's extra launch arguments can only be integers
    pid_m = tl.program_id(0)
    hkv = tl.program_id(1)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows: (query, head within the group)
    rmask = r < n_rows
    qi = r // G
    h = hkv * G + r % G
    d = tl.arange(0, D)
    q = tl.load(q_ptr + qi.to(tl.int64)[:, None] * stride_qn + h[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    lo = tl.load(lo_ptr + qi, mask=rmask, other=0)
    hi = tl.load(hi_ptr + qi, mask=rmask, other=0)
    hi = tl.where(rmask, hi, lo)  # rows past the end: an empty range
    # the key blocks any row of this block reads; none when every range is empty
    start = tl.min(tl.where(hi > lo, lo, 2147483647), axis=0)
    end = tl.max(tl.where(hi > lo, hi, 0), axis=0)
    start = (start // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # [BN] packed key indices
        kmask = n < end
        kv_off = n.to(tl.int64)[:, None] * stride_kn + hkv * stride_kh + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=kmask[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * SCALE  # [BM, BN] fp32
        inside = (n[None, :] >= lo[:, None]) & (n[None, :] < hi[:, None])
        s = tl.where(inside, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=kmask[:, None], other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # epilogue: normalise, zero for empty rows, and the gate tanh(α) = 1 − 2 / (e^{2α} + 1)
    gate = tl.load(gate_ptr).to(tl.float32)
    tanh_gate = 1.0 - 2.0 / (tl.exp(2.0 * gate) + 1.0)
    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0) * tanh_gate
    tl.store(out_ptr + qi.to(tl.int64)[:, None] * stride_on + h[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def block_sizes(group: int, decode: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): rows per program and keys per step. Prefill: 64 rows (queries of one
    sequence share most of their ranges) × 64 keys, which fits sm_90's shared memory at head 128 in
    fp16/bf16. Decode: one query's G heads per block (at least 16 rows, tl.dot's minimum), so that a
    block does not walk the keys of several sequences."""
    if decode:
        return max(16, 1 << (group - 1).bit_length()), 64
    return 64, 64


def gated_cross_attention(q, k, v, lo, hi, gate: float, sm_scale: float | None = None, *, decode: bool = False,
                          block_m: int | None = None, block_n: int | None = None):
    """q [Nq, Hq, D], k/v [Nk, Hkv, D] (fp16 or bf16, same dtype), lo/hi [Nq] int32 key ranges into the
    packed keys; returns [Nq, Hq, D] in q's dtype. `decode`: one query per sequence (block sizes)."""
    import torch

    nq, hq, dim = q.shape
    hkv = k.shape[1]
    if k.shape != v.shape or k.shape[2] != dim or hq % hkv or q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}: "
                         "need k and v of one shape, the same head size, Hq a multiple of Hkv and one dtype")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"fp16 or bf16 inputs, got {q.dtype}")
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"head size {dim} must be a power of two ≥ 16")
    if lo.shape != (nq,) or hi.shape != (nq,):
        raise ValueError(f"lo and hi must be [{nq}] (one key range per query)")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lo, hi = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    group = hq // hkv
    bm, bn = block_sizes(group, decode)
    bm, bn = block_m or bm, block_n or bn
    out = torch.empty_like(q)
    rows = nq * group
    grid = (triton.cdiv(max(rows, 1), bm), hkv)
    gate_t = gate if torch.is_tensor(gate) else torch.tensor([float(gate)], dtype=torch.float32, device=q.device)
    gated_xattn_kernel[grid](q, k, v, lo, hi, gate_t.float().reshape(1), out,
                             rows, group, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                             out.stride(0), out.stride(1), D=dim, SCALE=sm_scale or 1.0 / math.sqrt(dim),
                             BLOCK_M=bm, BLOCK_N=bn,
                             DOT_F32=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")
    return out


def gated_cross_attention_reference(q, k, v, lo, hi, gate: float, sm_scale: float | None = None):
    """The definition, one query at a time in float32 (no masking tricks): what the kernel must equal."""
    import torch

    nq, hq, dim = q.shape
    group = hq // k.shape[1]
    scale = sm_scale or 1.0 / math.sqrt(dim)
    out = torch.zeros(nq, hq, dim, dtype=torch.float32)
    for i in range(nq):
        a, b = int(lo[i]), int(hi[i])
        if b <= a:
            continue
        keys = k[a:b].float().repeat_interleave(group, dim=1)  # [n, Hq, D]
        vals = v[a:b].float().repeat_interleave(group, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), keys) * scale, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", w, vals)
    return out * math.tanh(gate)
