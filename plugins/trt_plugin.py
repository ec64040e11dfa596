"""TensorRT registration of nvlm-trt's kernels as AOT Quick Deployable Plugins: `nvlm::normalize_tiles`
(the vision engine's input) and `nvlm::gated_xattn` (NVLM-X/H's gated cross-attention, below).

Why Quick Deployable Plugins with AOT PTX rather than TensorRT-LLM plugins: the kernels are OpenAI
Triton kernels compiled to PTX by `plugins/aot.py` without a GPU, and a QDP embeds that PTX in the
engine (no Python and no shared library at run time, nothing to build per CUDA version); a
TensorRT-LLM plugin would mean C++ sources built against one TensorRT-LLM release.

The vision engine can take uint8 tiles [T, S, S, 3] (4× fewer bytes than fp32 across the wire)
and normalize them on the GPU with `normalize_kernel` from `plugins/tiling_kernels.py`,
compiled ahead of time to PTX and embedded in the engine: no Python at run time.

    inputs : tiles  uint8 [T, S, S, 3]    (T dynamic, the engine's tile-batch dimension)
             table  fp32  [3, 256]        (a network constant: normalization_table(mean, std))
    output :        fp16/bf16/fp32 [T, 3, S, S]
    attrs  : out_dtype "fp16" | "bf16" | "fp32"

How the engine uses it (docs/plugins.md): `register()` once in the build process, then
`insert_normalize_plugin(network, tiles, cfg)` in front of the ONNX graph's `pixel_values`.
TensorRT ≥ 10.7 provides `tensorrt.plugin`; it is imported lazily, so this module can be
imported (and its registration code read) where TensorRT is absent.
"""

from __future__ import annotations

from runtime.core.config import PreprocessConfig
from runtime.core.errors import NVLMError

from .aot import XATTN_BLOCK_M, compile_kernel
from .tiling import normalization_table

PLUGIN_ID = "nvlm::normalize_tiles"
XATTN_PLUGIN_ID = "nvlm::gated_xattn"
_REGISTERED = False
_XATTN_REGISTERED = False


class TensorRTUnavailableError(NVLMError):
    """The TensorRT Python package (≥ 10.7, with tensorrt.plugin) is not installed here."""


def _import_trt(plugin_id: str = PLUGIN_ID):
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise TensorRTUnavailableError(
            f"TensorRT with `tensorrt.plugin` (≥ 10.7) is needed to register {plugin_id} ({e}); run this stage on "
            "a GPU host, e.g. in NVIDIA's TensorRT-LLM 1.2 NGC container"
        ) from None
    return trt, trtp


def register() -> None:
    """Register the plugin's shape function and AOT implementation with TensorRT (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    trt, trtp = _import_trt()
    from typing import Tuple


    out_types = {"fp16": trt.float16, "bf16": trt.bfloat16, "fp32": trt.float32}

    @trtp.register(PLUGIN_ID)
    def _describe(tiles: trtp.TensorDesc, table: trtp.TensorDesc, out_dtype: str) -> trtp.TensorDesc:
        t, s = tiles.shape_expr[0], tiles.shape_expr[1]
        return trtp.from_shape_expr(trtp.ShapeExprs.from_tuple((t, 3, s, s)), dtype=out_types[out_dtype])

    @trtp.aot_impl(PLUGIN_ID)
    def _implement(tiles: trtp.TensorDesc, table: trtp.TensorDesc, out_dtype: str,
                   outputs: Tuple[trtp.TensorDesc], tactic: int):
        kernel = compile_kernel(f"normalize_tiles_{out_dtype}")
        block = 1024  # plugins/aot.py SPECS: BLOCK of normalize_tiles_*
        n_pixels = tiles.shape_expr[0] * tiles.shape_expr[1] * tiles.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(n_pixels, block)
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared
        extra = trtp.SymIntExprs(2)  # kernel scalars after the input pointers: n_pixels, S²
        extra[0] = trtp.SymInt32(n_pixels)
        extra[1] = trtp.SymInt32(tiles.shape_expr[1] * tiles.shape_expr[2])
        return kernel.name, kernel.ptx, launch, extra

    _REGISTERED = True


def insert_normalize_plugin(network, tiles, cfg: PreprocessConfig, out_dtype: str = "fp16"):
    """Add constant table + plugin layer to a TensorRT network; returns the normalized tensor."""
    trt, trtp = _import_trt()
    import numpy as np


    register()
    table = network.add_constant((3, 256), trt.Weights(np.ascontiguousarray(normalization_table(cfg.mean, cfg.std))))
    layer = network.add_plugin(trtp.op.nvlm.normalize_tiles(tiles, table.get_output(0), out_dtype=out_dtype),
                               aot=True)
    return layer.get_output(0)


def register_gated_xattn() -> None:
    """`nvlm::gated_xattn` (idempotent):

        inputs : q [Nq, Hq, 128], k/v [Nk, Hkv, 128] (fp16 or bf16), lo/hi int32 [Nq], gate fp32 [1]
        output : [Nq, Hq, 128] in q's dtype
        attrs  : decode 0 | 1 (block shape: prefill 64 rows, decode one query's heads)

    The launch: grid (cdiv(Nq · G, BLOCK_M), Hkv) with G = Hq / Hkv; the integer arguments are the
    row count, G and the contiguous tensors' strides. Not run here: no TensorRT on this machine."""
    global _XATTN_REGISTERED
    if _XATTN_REGISTERED:
        return
    trt, trtp = _import_trt(XATTN_PLUGIN_ID)
    from typing import Tuple

    names = {trt.float16: "fp16", trt.bfloat16: "bf16"}

    @trtp.register(XATTN_PLUGIN_ID)
    def _describe(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, lo: trtp.TensorDesc,
                  hi: trtp.TensorDesc, gate: trtp.TensorDesc, decode: int) -> trtp.TensorDesc:
        return q.like()

    @trtp.aot_impl(XATTN_PLUGIN_ID)
    def _implement(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, lo: trtp.TensorDesc,
                   hi: trtp.TensorDesc, gate: trtp.TensorDesc, decode: int, outputs: Tuple[trtp.TensorDesc],
                   tactic: int):
        kind = "decode" if decode else "prefill"
        kernel = compile_kernel(f"gated_xattn_{kind}_{names[q.dtype]}")
        nq, hq, dim = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        hkv = k.shape_expr[1]
        group = hq // hkv
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(nq * group, XATTN_BLOCK_M[kind])
        launch.grid_y = hkv
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared
        # after the pointers (q, k, v, lo, hi, gate, out): n_rows, G, then the strides of q, k and out
        values = (nq * group, group, hq * dim, dim, hkv * dim, dim, hq * dim, dim)
        extra = trtp.SymIntExprs(len(values))
        for i, x in enumerate(values):
            extra[i] = trtp.SymInt32(x)
        return kernel.name, kernel.ptx, launch, extra

    _XATTN_REGISTERED = True
