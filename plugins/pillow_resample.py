"""Pillow's BICUBIC resampling, re-derived so that a GPU kernel can reproduce it bit for bit.

Pillow (`libImaging/Resample.c`) resizes 8-bit images in two separable passes, horizontal
first, each pass an integer multiply-accumulate with fixed-point coefficients:

    coefficients (double): scale = in/out, filterscale = max(scale, 1), support = 2·filterscale,
        center = (i + 0.5)·scale, xmin = int(center − support + 0.5) clamped to ≥ 0,
        count = int(center + support + 0.5) clamped to ≤ in, minus xmin,
        w_t = bicubic((t + xmin − center + 0.5) / filterscale), a = −0.5, normalized by Σ w
    fixed point: k_t = trunc(w_t · 2²² ± 0.5)                      (PRECISION_BITS = 22)
    pixel: v = clamp((2²¹ + Σ_t src[xmin + t] · k_t) >> 22, 0, 255)   (uint8 between passes)

torch's bicubic (a = −0.75, no widened support when downscaling, float math) is a different
function, which is why this module exists. `coefficients()` computes the tables with the same
double-precision operations in the same order as Pillow; `resample_reference()` applies them
with numpy integers and is tested to equal `PIL.Image.resize` exactly. The Triton kernels in
`plugins/tiling_kernels.py` consume the same tables.

Caveat, recorded for ports: Pillow's x86-64 wheels evaluate these doubles without fused
multiply-add; a build that contracts to FMA (e.g. some aarch64 builds) may differ in a last bit
of a coefficient, and hence rarely by one level in a pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRECISION_BITS = 32 - 8 - 2
BICUBIC_SUPPORT = 2.0
_A = -0.5


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@dataclass(frozen=True)
class Coefficients:
    """One pass: output i reads src[start[i] : start[i] + count[i]] with weights[i, :count[i]]."""

    start: np.ndarray  # [out] int32
    count: np.ndarray  # [out] int32
    weights: np.ndarray  # [out, ksize] int32, zero past count

    @property
    def ksize(self) -> int:
        return self.weights.shape[1]


def coefficients(in_size: int, out_size: int) -> Coefficients:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for BICUBIC over the full box."""
    scale = float(np.float32(in_size) - np.float32(0.0)) / out_size  # box edges are C floats
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    i = np.arange(out_size, dtype=np.float64)
    center = 0.0 + (i + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.trunc(center - support + 0.5).astype(np.int64)
    xmin = np.maximum(xmin, 0)
    xmax = np.trunc(center + support + 0.5).astype(np.int64)
    xmax = np.minimum(xmax, in_size)
    count = xmax - xmin
    t = np.arange(ksize, dtype=np.float64)
    w = _bicubic((t[None, :] + xmin[:, None] - center[:, None] + 0.5) * ss)  # [out, ksize]
    valid = t[None, :] < count[:, None]
    w = np.where(valid, w, 0.0)
    ww = np.zeros(out_size)
    for col in range(ksize):  # Pillow sums left to right; keep the order for identical rounding
        ww = ww + w[:, col]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    scaled = w * (1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    fixed = np.where(valid, fixed, 0).astype(np.int32)
    return Coefficients(xmin.astype(np.int32), count.astype(np.int32), fixed)


def _apply(src: np.ndarray, c: Coefficients, axis: int) -> np.ndarray:
    """One integer pass along `axis` of an [H, W, C] uint8 array."""
    src = np.moveaxis(src.astype(np.int64), axis, 0)  # [in, …]
    acc = np.full((len(c.start),) + src.shape[1:], 1 << (PRECISION_BITS - 1), dtype=np.int64)
    for t in range(c.ksize):
        idx = np.minimum(c.start + t, src.shape[0] - 1)  # weight is 0 where t ≥ count
        acc += src[idx] * c.weights[:, t].reshape((-1,) + (1,) * (src.ndim - 1))
    out = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resample_reference(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """[H, W, C] uint8 → [height, width, C] uint8, equal to Pillow's BICUBIC `resize`."""
    h, w = img.shape[:2]
    out = img
    if width != w:
        out = _apply(out, coefficients(w, width), axis=1)
    if height != h:
        out = _apply(out, coefficients(h, height), axis=0)
    return out
