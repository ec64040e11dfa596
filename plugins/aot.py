"""Ahead-of-time compilation of the tiling and gated cross-attention kernels for Hopper (sm_90), with no GPU present.

`compile_kernel(name)` returns the PTX, entry name and launch metadata that TensorRT's
`@trtp.aot_impl` needs, so engines embed the kernels with no Python at run time. Must run
in a process where `TRITON_INTERPRET` is unset (the interpreter replaces compilation).

    python -m plugins.aot [--arch 90] [--out DIR]   # compile all, print a JSON summary
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import tiling_kernels, xattn_kernels

H100_MAX_SHARED_BYTES = 227 * 1024  # opt-in dynamic shared memory per block on sm_90
XATTN_HEAD = 128  # NVLM-X/H-72B's head size (Qwen2-72B: 8192 / 64 heads)
XATTN_BLOCK_M = {"prefill": 64, "decode": 16}


@dataclass(frozen=True)
class KernelSpec:
    kernel: str  # attribute of `module`
    signature: dict
    constexprs: dict
    module: object = tiling_kernels


def _specs() -> dict[str, KernelSpec]:
    specs = {
        "hpass": KernelSpec("hpass_kernel", {
            "src_ptr": "*u8", "dst_ptr": "*u8", "start_ptr": "*i32", "count_ptr": "*i32", "coef_ptr": "*i32",
            "row0": "i32", "n_rows": "i32", "dst_w": "i32", "src_row_stride": "i32", "ksize": "i32",
            "BLOCK_R": "constexpr", "BLOCK_J": "constexpr"}, {"BLOCK_R": 8, "BLOCK_J": 512}),
    }
    for out in ("u8", "fp32", "fp16", "bf16"):
        specs[f"vpass_tiles_{out}"] = KernelSpec("vpass_tiles_kernel", {
            "mid_ptr": "*u8", "out_ptr": f"*{out}", "start_ptr": "*i32", "count_ptr": "*i32", "coef_ptr": "*i32",
            "lut_ptr": "*fp32", "out_h": "i32", "out_w": "i32", "ksize": "i32", "cols": "i32", "tile0": "i32",
            "S": "i32", "OUT_U8": "constexpr", "BLOCK_Y": "constexpr", "BLOCK_J": "constexpr"},
            {"OUT_U8": out == "u8", "BLOCK_Y": 8, "BLOCK_J": 512})
    for out in ("fp32", "fp16", "bf16"):
        specs[f"normalize_tiles_{out}"] = KernelSpec("normalize_kernel", {
            "src_ptr": "*u8", "lut_ptr": "*fp32", "n_pixels": "i32", "S2": "i32", "out_ptr": f"*{out}",
            "BLOCK": "constexpr"}, {"BLOCK": 1024})
    # gated cross-attention at NVLM-X-72B's head size (128): prefill blocks of 64 rows, decode blocks of 16
    # (one query's 8 heads per KV head, padded to tl.dot's minimum)
    for dt in ("fp16", "bf16"):
        for kind, block_m in XATTN_BLOCK_M.items():
            specs[f"gated_xattn_{kind}_{dt}"] = KernelSpec("gated_xattn_kernel", {
                "q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "lo_ptr": "*i32", "hi_ptr": "*i32",
                "gate_ptr": "*fp32", "out_ptr": f"*{dt}", "n_rows": "i32", "G": "i32",
                "stride_qn": "i32", "stride_qh": "i32", "stride_kn": "i32", "stride_kh": "i32", "stride_on": "i32",
                "stride_oh": "i32", "D": "constexpr", "SCALE": "constexpr", "BLOCK_M": "constexpr",
                "BLOCK_N": "constexpr", "DOT_F32": "constexpr"},
                {"D": XATTN_HEAD, "SCALE": XATTN_HEAD ** -0.5, "BLOCK_M": block_m, "BLOCK_N": 64, "DOT_F32": False},
                xattn_kernels)
    return specs


SPECS = _specs()


@dataclass(frozen=True)
class CompiledKernel:
    name: str  # entry point in the PTX
    ptx: str
    shared: int  # static shared memory bytes
    num_warps: int
    arch: int


def compile_kernel(key: str, arch: int = 90) -> CompiledKernel:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (run it in a separate process)")
    import triton
    from triton.backends.compiler import GPUTarget


    spec = SPECS[key]
    src = triton.compiler.ASTSource(fn=getattr(spec.module, spec.kernel), signature=spec.signature,
                                    constexprs=spec.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    md = compiled.metadata
    return CompiledKernel(md.name, compiled.asm["ptx"], int(md.shared), int(md.num_warps), arch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", type=Path, help="write <key>.ptx files here")
    args = ap.parse_args(argv)
    summary = {}
    for key in SPECS:
        k = compile_kernel(key, args.arch)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{key}.ptx").write_text(k.ptx)
        summary[key] = {"name": k.name, "shared": k.shared, "num_warps": k.num_warps, "ptx_bytes": len(k.ptx),
                        "target": next((ln.split()[1] for ln in k.ptx.splitlines() if ln.startswith(".target")), None)}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
