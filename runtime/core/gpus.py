"""The GPUs nvlm-trt plans for, in one table: peak dense rates and bandwidth (the roofline), memory (inspect's
memory plan, the engine build's GPU memory budget). Figures: NVIDIA's H100 and H200 datasheets, dense (no
sparsity) — docs/upstream.md, "Hardware figures"."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float
    fp8_tflops: float
    hbm_tbps: float
    memory_bytes: int


GPUS = {
    "h100-sxm": GPU("H100 SXM", 990.0, 1979.0, 3.35, 80 * GIB),
    "h100-pcie": GPU("H100 PCIe", 756.0, 1513.0, 2.0, 80 * GIB),
    "h200": GPU("H200", 990.0, 1979.0, 4.8, 141 * GIB),
}
