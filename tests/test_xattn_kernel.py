"""The gated cross-attention kernel (plugins/xattn_kernels.py) under the Triton interpreter, against its
float32 definition and against PyTorch's scaled_dot_product_attention with a dense mask, on fresh
random inputs: ragged packed batches with NVLM-X-style key ranges, GQA, empty ranges, one-tile ranges,
decode, fp16 and bf16.

Tolerances (max |Δ| over outputs of magnitude ≤ ~1, inputs standard normal): fp16 4e-3, bf16 3e-2 —
the output is stored in the inputs' dtype (fp16 keeps 11 significant bits, bf16 8) after fp32
accumulation of the same half-precision products.
"""

import math

import pytest
import torch

from plugins.xattn_kernels import gated_cross_attention, gated_cross_attention_reference

TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
TILE = 16  # keys per tile here (256 in NVLM)


def x_ranges(prompt: list, key_base: int) -> tuple[list[int], list[int], int]:
    """Key ranges of one NVLM-X-style sequence, written independently of the model code: `prompt` is a
    list of "t" (text), ("img", tiles) (an image opening) and ("tag", k) (tile tag k of the last image).
    Text sees every tile of the images opened before it; a tag sees its tile only; text before the first
    image sees nothing. Returns lo, hi per query and the sequence's number of keys."""
    lo, hi, keys, last_start = [], [], 0, None
    first = key_base
    for tok in prompt:
        if tok == "t":
            lo.append(first)
            hi.append(first if last_start is None else key_base + keys)
        elif tok[0] == "img":
            last_start = key_base + keys
            keys += tok[1] * TILE
            lo.append(first)
            hi.append(key_base + keys)  # the <Image> token itself sees the image it opens
        else:  # ("tag", k): tile k of the last image
            a = last_start + (tok[1] - 1) * TILE
            lo.append(a)
            hi.append(a + TILE)
    return lo, hi, keys


def packed_batch(gen, dtype, hq=8, hkv=2, dim=32):
    prompts = [
        ["t", "t", ("img", 3), ("tag", 1), ("tag", 2), ("tag", 3), "t", "t"],  # text before: empty rows
        [("img", 1), ("tag", 1), "t", ("img", 2), ("tag", 1), ("tag", 2), "t", "t", "t"],  # two images
        ["t", "t", "t"],  # no image at all: every row empty
        [("img", 7)] + [("tag", k) for k in range(1, 8)] + ["t"] * 20,  # NVLM's 7 tiles, longer text
    ]
    lo, hi, base = [], [], 0
    for p in prompts:
        a, b, n = x_ranges(p, base)
        lo += a
        hi += b
        base += n
    nq, nk = len(lo), base
    q = torch.randn(nq, hq, dim, generator=gen).to(dtype)
    k = torch.randn(nk, hkv, dim, generator=gen).to(dtype)
    v = torch.randn(nk, hkv, dim, generator=gen).to(dtype)
    return q, k, v, torch.tensor(lo), torch.tensor(hi)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_ragged_gqa_equals_the_definition(dtype):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs each run
    q, k, v, lo, hi = packed_batch(gen, dtype)
    gate = float(torch.empty(1).uniform_(1, 2, generator=gen)) * (1 if torch.rand(1, generator=gen) < 0.5 else -1)
    out = gated_cross_attention(q, k, v, lo, hi, gate, block_m=16, block_n=16)
    ref = gated_cross_attention_reference(q, k, v, lo, hi, gate)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[dtype], err
    empty = hi <= lo
    assert empty.any() and torch.equal(out[empty], torch.zeros_like(out[empty]))  # exactly zero
    # the test can tell a wrong range from a right one: one key more changes the answer beyond tolerance
    shifted = gated_cross_attention_reference(q, k, v, lo, torch.where(empty, hi, hi + 1).clamp(max=k.shape[0]),
                                              gate)
    assert (shifted - ref).abs().max().item() > 3 * TOL[dtype]


def test_equals_sdpa_with_a_dense_mask():
    """An independent check of the definition: PyTorch's attention with the dense boolean mask."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, k, v, lo, hi = packed_batch(gen, torch.float16, hq=4, hkv=4)
    gate = 0.9
    out = gated_cross_attention(q, k, v, lo, hi, gate, block_m=16, block_n=16).float()
    n = torch.arange(k.shape[0])
    mask = (n[None, :] >= lo[:, None]) & (n[None, :] < hi[:, None])  # [Nq, Nk]
    rows = mask.any(1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1)[:, rows], k.float().transpose(0, 1), v.float().transpose(0, 1),
        attn_mask=mask[rows]).transpose(0, 1) * math.tanh(gate)
    assert (out[rows] - dense).abs().max().item() <= TOL[torch.float16]
    assert torch.equal(out[~rows], torch.zeros_like(out[~rows]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_one_query_per_sequence(dtype):
    """Decode: one new token per sequence, each seeing its own images' keys (here 1–7 tiles, packed)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    tiles = [1, 3, 7, 2, 5]
    starts = torch.tensor([0] + [t * TILE for t in tiles]).cumsum(0)
    lo, hi = starts[:-1], starts[1:]
    hq, hkv, dim = 16, 2, 64
    q = torch.randn(len(tiles), hq, dim, generator=gen).to(dtype)
    k = torch.randn(int(starts[-1]), hkv, dim, generator=gen).to(dtype)
    v = torch.randn(int(starts[-1]), hkv, dim, generator=gen).to(dtype)
    out = gated_cross_attention(q, k, v, lo, hi, -0.4, decode=True, block_n=32)
    ref = gated_cross_attention_reference(q, k, v, lo, hi, -0.4)
    assert (out.float() - ref).abs().max().item() <= TOL[dtype]


def test_one_tile_ranges_and_the_gate():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = torch.randn(6, 2, 16, generator=gen).half()
    k = torch.randn(6 * TILE, 1, 16, generator=gen).half()
    v = torch.randn(6 * TILE, 1, 16, generator=gen).half()
    lo = torch.arange(6) * TILE
    hi = lo + TILE
    out = gated_cross_attention(q, k, v, lo, hi, 1.3, block_m=16, block_n=16)
    assert (out.float() - gated_cross_attention_reference(q, k, v, lo, hi, 1.3)).abs().max() <= TOL[torch.float16]
    assert torch.equal(gated_cross_attention(q, k, v, lo, hi, 0.0, block_m=16, block_n=16), torch.zeros_like(q))
    negated = gated_cross_attention(q, k, v, lo, hi, -1.3, block_m=16, block_n=16)
    assert torch.allclose(negated.float(), -out.float(), atol=2e-3)


def test_bad_inputs_are_refused():
    q = torch.zeros(2, 4, 32, dtype=torch.float16)
    k = torch.zeros(8, 3, 32, dtype=torch.float16)
    lo = hi = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        gated_cross_attention(q, k, k, lo, hi, 1.0)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        gated_cross_attention(q.float(), k[:, :2].float(), k[:, :2].float(), lo, hi, 1.0)
    with pytest.raises(ValueError, match="one key range per query"):
        gated_cross_attention(q, k[:, :2], k[:, :2], lo[:1], hi[:1], 1.0)
