"""OpenAI Triton kernels for NVLM's tiling on the GPU, Pillow-exact.

Three kernels, all integer-exact against Pillow (see `plugins/pillow_resample.py` for the
arithmetic they reproduce):

- `hpass_kernel`: horizontal BICUBIC pass, uint8 [H, W, 3] → uint8 [rows, W_out, 3], only over
  the source rows the vertical pass will read (as Pillow does).
- `vpass_tiles_kernel`: vertical pass fused with the row-major crop into tiles, the ImageNet
  normalization (a per-channel 256-entry float32 table built with the reference's float32
  operations, so values are bit-identical to the CPU reference) and the [T, 3, S, S] layout,
  stored as fp32 / fp16 / bf16 — or as uint8 [T, S, S, 3] tiles for an engine that normalizes on
  its own input (the TensorRT plugin path).
- `normalize_kernel`: uint8 tiles [T, S, S, 3] → [T, 3, S, S] normalized; the kernel behind the
  TensorRT plugin `nvlm::normalize_tiles` (plugins/trt_plugin.py), so the vision engine can take
  uint8 tiles, 4× fewer bytes than fp32 across PCIe or the network.

Accumulation is int32, exactly Pillow's `int ss`; products and sums stay below 2³¹ because the
fixed-point weights carry 22 fractional bits for 8-bit pixels (Pillow's own bound). Every load
is masked: out-of-bounds loads crash the interpreter.
"""

import triton
import triton.language as tl

# Pillow's fixed point: PRECISION_BITS = 32 - 8 - 2 = 22 fractional bits; accumulators start at
# 2**21 (one half) so that the final >> 22 rounds. Written as literals in the kernels because the
# interpreter cannot use constexpr globals in arithmetic.
PRECISION_BITS = 22


@triton.jit
def hpass_kernel(src_ptr, dst_ptr, start_ptr, count_ptr, coef_ptr,
                 row0, n_rows, dst_w, src_row_stride, ksize,
                 BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] destination rows
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)  # [BJ] flattened (x, channel)
    x = j // 3
    ch = j % 3
    rmask = rows < n_rows
    jmask = x < dst_w
    start = tl.load(start_ptr + x, mask=jmask, other=0)
    count = tl.load(count_ptr + x, mask=jmask, other=0)
    src_rows = (row0 + rows).to(tl.int64) * src_row_stride  # [BR]
    acc = tl.full([BLOCK_R, BLOCK_J], 2097152, tl.int32)
    for t in range(0, ksize):
        w = tl.load(coef_ptr + x * ksize + t, mask=jmask, other=0)  # [BJ]
        valid = jmask & (t < count)
        col = (start + t) * 3 + ch
        px = tl.load(src_ptr + src_rows[:, None] + col[None, :], mask=rmask[:, None] & valid[None, :], other=0)
        acc += px.to(tl.int32) * w[None, :]
    v = tl.minimum(tl.maximum(acc >> 22, 0), 255).to(tl.uint8)
    dst = rows.to(tl.int64)[:, None] * (dst_w * 3) + j[None, :]
    tl.store(dst_ptr + dst, v, mask=rmask[:, None] & jmask[None, :])


@triton.jit
def vpass_tiles_kernel(mid_ptr, out_ptr, start_ptr, count_ptr, coef_ptr, lut_ptr,
                       out_h, out_w, ksize, cols, tile0, S,
                       OUT_U8: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_J: tl.constexpr):
    pid_y = tl.program_id(0)
    pid_j = tl.program_id(1)
    y = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)  # [BY] output rows of the resized image
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)  # [BJ] flattened (x, channel)
    x = j // 3
    ch = j % 3
    ymask = y < out_h
    jmask = x < out_w
    start = tl.load(start_ptr + y, mask=ymask, other=0)  # relative to the first row of `mid`
    count = tl.load(count_ptr + y, mask=ymask, other=0)
    row_len = out_w * 3
    acc = tl.full([BLOCK_Y, BLOCK_J], 2097152, tl.int32)
    for t in range(0, ksize):
        w = tl.load(coef_ptr + y * ksize + t, mask=ymask, other=0)  # [BY]
        valid = ymask & (t < count)
        src = (start + t).to(tl.int64)[:, None] * row_len + j[None, :]
        px = tl.load(mid_ptr + src, mask=valid[:, None] & jmask[None, :], other=0)
        acc += px.to(tl.int32) * w[:, None]
    u8 = tl.minimum(tl.maximum(acc >> 22, 0), 255)  # [BY, BJ] int32 in [0, 255]
    mask = ymask[:, None] & jmask[None, :]
    tile = tile0 + (y // S)[:, None] * cols + (x // S)[None, :]  # row-major tile index
    yy = (y % S)[:, None]
    xx = (x % S)[None, :]
    if OUT_U8:
        off = tile.to(tl.int64) * (S * S * 3) + yy * (S * 3) + xx * 3 + ch[None, :]  # [T, S, S, 3]
        tl.store(out_ptr + off, u8.to(tl.uint8), mask=mask)
    else:
        val = tl.load(lut_ptr + ch[None, :] * 256 + u8, mask=mask, other=0.0)  # fp32, bit-exact table
        off = tile.to(tl.int64) * (3 * S * S) + ch[None, :] * (S * S) + yy * S + xx  # [T, 3, S, S]
        tl.store(out_ptr + off, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def normalize_kernel(src_ptr, lut_ptr, n_pixels, S2, out_ptr, BLOCK: tl.constexpr):
    # Parameter order (inputs, scalars, outputs) is the calling convention of TensorRT's AOT
    # Quick Deployable Plugins, which launch this kernel inside the vision engine.
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # pixel index over T·S·S
    mask = p < n_pixels
    t = p // S2
    q = p % S2
    for c in tl.static_range(3):
        u = tl.load(src_ptr + p * 3 + c, mask=mask, other=0).to(tl.int32)  # [T, S, S, 3] uint8
        v = tl.load(lut_ptr + c * 256 + u, mask=mask, other=0.0)
        tl.store(out_ptr + t * (3 * S2) + c * S2 + q, v.to(out_ptr.dtype.element_ty), mask=mask)  # [T, 3, S, S]
