"""GPU tiling: NVLM's dynamic high-resolution preprocessing on device tensors.

    tile_image(image_u8 [H, W, 3] on the device, cfg) → pixel_values [T, 3, S, S] (fp32/fp16/bf16)
                                                         or uint8 tiles [T, S, S, 3]

The grid choice runs on the host (it is a handful of floating-point comparisons and must be the
reference's own code); the Pillow coefficient tables are computed on the host once per
(input size, output size) and cached on the device; the pixels never leave the device.
Under `TRITON_INTERPRET=1` the same kernels run on CPU tensors (this is how the tests run them).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from runtime.core.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from runtime.preprocess import choose_grid

from .pillow_resample import Coefficients, coefficients

OUT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "uint8": torch.uint8}
import os

from .tiling_kernels import hpass_kernel, normalize_kernel, vpass_tiles_kernel

# GPU: 8 rows × 512 (pixel, channel) pairs per program. The interpreter pays per program and per
# loop iteration, not per element, so there each launch gets one block as wide as the row and as
# tall as fits ~2^19 elements (numpy does the inner work).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_R, BLOCK_J = 8, 512
NORMALIZE_BLOCK = 1 << 18 if _INTERPRET else 1024


def _blocks(rows: int, row_elems: int) -> tuple[int, int]:
    if not _INTERPRET:
        return BLOCK_R, BLOCK_J
    bj = min(1 << 14, triton_next_pow2(row_elems))
    return min(max(1, (1 << 19) // bj), triton_next_pow2(rows)), bj


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def normalization_table(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """[3, 256] float32: the reference's (u8 / 255 − mean) / std for every byte value, same float32 ops."""
    x = np.arange(256, dtype=np.float32) / np.float32(255.0)  # [256]
    return (x[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


@lru_cache(maxsize=256)
def _coefficients(in_size: int, out_size: int) -> Coefficients:
    return coefficients(in_size, out_size)


_DEVICE_CACHE: dict = {}


def _on_device(key, make, device):
    k = (key, str(device))
    if k not in _DEVICE_CACHE:
        if len(_DEVICE_CACHE) > 512:
            _DEVICE_CACHE.clear()
        _DEVICE_CACHE[k] = make().to(device)
    return _DEVICE_CACHE[k]


def _tables(in_size: int, out_size: int, device):
    c = _coefficients(in_size, out_size)
    make = lambda a: (lambda: torch.from_numpy(np.ascontiguousarray(a)))  # noqa: E731
    return (c,
            _on_device(("start", in_size, out_size), make(c.start), device),
            _on_device(("count", in_size, out_size), make(c.count), device),
            _on_device(("coef", in_size, out_size), make(c.weights), device))


def _lut(cfg: PreprocessConfig, device):
    return _on_device(("lut", cfg.mean, cfg.std), lambda: torch.from_numpy(normalization_table(cfg.mean, cfg.std)),
                      device)


def _resize_into(img: torch.Tensor, out_w: int, out_h: int, out: torch.Tensor, lut: torch.Tensor,
                 tile0: int, cols: int, s: int) -> None:
    h, w, _ = img.shape
    _, hs, hn, hk = _tables(w, out_w, img.device)
    cv, vs, vn, vk = _tables(h, out_h, img.device)
    first = int(cv.start[0])  # source rows the vertical pass reads: [first, last)
    last = int(cv.start[-1] + cv.count[-1])
    mid = torch.empty((last - first, out_w, 3), dtype=torch.uint8, device=img.device)  # [rows, W_out, 3]
    br, bj = _blocks(last - first, out_w * 3)
    grid = (triton_cdiv(last - first, br), triton_cdiv(out_w * 3, bj))
    hpass_kernel[grid](img, mid, hs, hn, hk, first, last - first, out_w, img.stride(0), hk.shape[1],
                       BLOCK_R=br, BLOCK_J=bj)
    vs_rel = _on_device(("vstart_rel", h, out_h), lambda: torch.from_numpy(cv.start - first), img.device)
    br, bj = _blocks(out_h, out_w * 3)
    grid = (triton_cdiv(out_h, br), triton_cdiv(out_w * 3, bj))
    vpass_tiles_kernel[grid](mid, out, vs_rel, vn, vk, lut, out_h, out_w, vk.shape[1], cols, tile0, s,
                             OUT_U8=out.dtype == torch.uint8, BLOCK_Y=br, BLOCK_J=bj)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def tile_image(img: torch.Tensor, cfg: PreprocessConfig, out_dtype: str = "fp16") -> tuple[torch.Tensor, tuple[int, int]]:
    """img: [H, W, 3] uint8 RGB (contiguous rows). Returns (tiles, (cols, rows))."""
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.stride(1) != 3 or img.stride(2) != 1:
        raise ValueError(f"expected a [H, W, 3] uint8 tensor with packed pixels, got {img.dtype} {list(img.shape)}")
    s = cfg.image_size
    h, w, _ = img.shape
    cols, rows = choose_grid(w, h, s, cfg.min_tiles, cfg.max_tiles)
    thumb = cfg.use_thumbnail and cols * rows != 1
    t = cols * rows + thumb
    dtype = OUT_DTYPES[out_dtype]
    shape = (t, s, s, 3) if dtype == torch.uint8 else (t, 3, s, s)
    out = torch.empty(shape, dtype=dtype, device=img.device)
    lut = _lut(cfg, img.device)
    _resize_into(img, s * cols, s * rows, out, lut, 0, cols, s)
    if thumb:
        _resize_into(img, s, s, out, lut, cols * rows, 1, s)
    return out, (cols, rows)


def normalize_tiles(tiles_u8: torch.Tensor, cfg: PreprocessConfig, out_dtype: str = "fp16") -> torch.Tensor:
    """uint8 [T, S, S, 3] → [T, 3, S, S] normalized (the TensorRT plugin's computation)."""

    t, s, s2, c = tiles_u8.shape
    if tiles_u8.dtype != torch.uint8 or s != s2 or c != 3 or not tiles_u8.is_contiguous():
        raise ValueError(f"expected contiguous uint8 [T, S, S, 3] tiles, got {tiles_u8.dtype} {list(tiles_u8.shape)}")
    out = torch.empty((t, 3, s, s), dtype=OUT_DTYPES[out_dtype], device=tiles_u8.device)
    n = t * s * s
    normalize_kernel[(triton_cdiv(n, NORMALIZE_BLOCK),)](tiles_u8, _lut(cfg, tiles_u8.device), n, s * s, out,
                                                        BLOCK=NORMALIZE_BLOCK)
    return out
