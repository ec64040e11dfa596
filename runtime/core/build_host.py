"""What a build asks of its host — peak RAM, disk and GPU memory — from config.json and the shards' headers
(`builder/preflight.py` checks them against the host before any heavy work; `inspect` prints them).

The estimates model the stages as they are written today (docs/engine.md, "Host requirements"):

- vision export: the vision tower and projector only (never the decoder), in float32, plus a copy in the export
  dtype, the ONNX graph's initializers, their serialization and onnxruntime's session for the check (four
  copies at the export width; measured on a 72B-shaped slice with 2 vision layers: 12.3 GB against 12.9
  estimated), two more past 2 GiB (external data), and an FP8 Q/DQ model when asked for;
- LLM, streamed (bf16/fp16 without the fidelity report): a tensor at a time, about twice the largest stored
  tensor (read buffer and converted copy);
- LLM with the fidelity report or a quantized format: the whole reference model in float32, the reference
  executor's float32 copy of the built decoder, and for a quantized format modelopt's fake-quantized copy of the
  decoder and its export.

NVLM-D-72B at these rules needs far more than one host has (79 B parameters × 4 bytes is 318 GB): the
preflight says so in the first second instead of an out-of-memory kill after minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import NVLMConfig
from .families import DECODER_ROLES, family_for
from .fsutil import human_bytes
from .inspect import llm_bytes
from .llm_formats import FORMATS, LLMFormat

BASE_RSS = 1_500_000_000  # the interpreter with torch, transformers and modelopt imported, and working room
FLOAT32 = 4
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}  # the vision export's --dtype
VISION_ACTIVATIONS_PER_TILE = 200_000_000  # a check tile through a 32-head, 1,025-token attention (72B: ~135 MB)
CHECK_TILES = 3  # tiles the vision export's check runs through the reference and onnxruntime at once


@dataclass(frozen=True)
class StageNeed:
    stage: str
    ram: int  # peak resident bytes
    disk: int  # bytes written
    why: str


@dataclass(frozen=True)
class HostNeeds:
    stages: tuple[StageNeed, ...]

    @property
    def peak_ram(self) -> int:
        return max((s.ram for s in self.stages), default=0)

    @property
    def peak_stage(self) -> StageNeed:
        return max(self.stages, key=lambda s: s.ram)

    @property
    def disk(self) -> int:
        return sum(s.disk for s in self.stages)

    gpu = 0  # no stage of a CPU build uses a GPU yet

    def summary(self) -> str:
        peak = self.peak_stage
        return (f"preflight: peak RAM ≈ {human_bytes(self.peak_ram)} ({peak.stage}: {peak.why}), disk ≈ "
                f"{human_bytes(self.disk)}, GPU memory: none used")


def _params(cfg: NVLMConfig) -> tuple[int, int]:
    """(vision tower + projector, decoder) parameter counts."""
    comps = family_for(cfg).components
    decoder = sum(c.num_params(cfg) for c in comps if c.name in DECODER_ROLES)
    return sum(c.num_params(cfg) for c in comps) - decoder, decoder


# the vision export goes to external data (protobuf caps a model at 2 GB; well before that) and, from a checkpoint,
# a part at a time past this size in the export dtype (builder/vision_export.py)
EXTERNAL_DATA_BYTES = 1 << 30


def _largest_vision_part(cfg: NVLMConfig) -> int:
    """Parameters of the vision pipeline's largest part (builder/vision_layers.py): the projector or one layer."""
    comps = {c.name: c.num_params(cfg) for c in family_for(cfg).components}
    v = cfg.vision
    layer = (comps.get("vision", 0) - v.num_positions * v.hidden_size) // max(1, v.num_layers)
    return max(comps.get("projector", 0), layer)


def vision_need(cfg: NVLMConfig, dtype_bytes: int, fp8: bool) -> StageNeed:
    vision, _ = _params(cfg)
    if not fp8 and dtype_bytes * vision > EXTERNAL_DATA_BYTES:
        # builder/vision_layers.py: the largest part (the projector, or one InternViT layer) in the export dtype
        # with torch's and onnx's copies of it, the same part in float32 for the check, onnxruntime's session
        part = _largest_vision_part(cfg)
        ram = BASE_RSS + part * (4 * dtype_bytes + FLOAT32) + CHECK_TILES * VISION_ACTIVATIONS_PER_TILE
        return StageNeed("vision", ram, dtype_bytes * vision,
                         "a part at a time: the largest part (projector or one layer) in the export dtype, "
                         "float32 and onnxruntime")
    # an export past protobuf's 2 GiB goes through external data, which costs two more copies (measured: a
    # 72B-shaped slice with 6 vision layers, 2.9 GB in fp16, passed 21.5 GB before it was stopped)
    copies = 4 + (2 if dtype_bytes * vision > 2**31 else 0)
    ram = BASE_RSS + FLOAT32 * vision + copies * dtype_bytes * vision + CHECK_TILES * VISION_ACTIVATIONS_PER_TILE
    disk = dtype_bytes * vision
    if fp8:  # modelopt's ONNX quantization: the graph loaded again and a Q/DQ model written beside it
        ram += 2 * dtype_bytes * vision
        disk += dtype_bytes * vision
    return StageNeed("vision", ram, disk, f"vision tower + projector in float32 and {copies} copies at the export width")


CALIB_TOKENS = 2_048  # tokens of a typical calibration prompt (a 6-tile image is 1,536 image tokens)


def llm_need(cfg: NVLMConfig, fmt: LLMFormat, *, fidelity: bool, largest_tensor: int,
             group_size: int = 128, layerwise: bool = False, calib_size: int = 32) -> StageNeed:
    vision, decoder = _params(cfg)
    disk = llm_bytes(cfg, fmt, group_size)
    if not fidelity and not fmt.quantized:
        return StageNeed("llm", BASE_RSS + 2 * largest_tensor, disk, "streamed a tensor at a time")
    if layerwise:
        # builder/layerwise.py: first the prompts' tiles through the vision tower a part at a time (the largest
        # part in float32) and the token embedding's rows; then one decoder layer in float32 with modelopt's
        # working copies and its export — about 2.5 layers: a 72B-shaped slice peaked at 10.4 GB against 10.3
        # estimated (docs/PERFORMANCE.md) — lm_head and the embedding read in row chunks, and the hidden states
        # carried between layers (in and out)
        llm = cfg.llm
        layer = (decoder - 2 * llm.vocab_size * llm.hidden_size) // max(1, llm.num_layers)
        carried = 2 * FLOAT32 * llm.hidden_size * CALIB_TOKENS * (calib_size if fmt.quantized else 0)
        prepare = FLOAT32 * _largest_vision_part(cfg) + CHECK_TILES * VISION_ACTIVATIONS_PER_TILE
        loop = int(2.5 * FLOAT32 * layer)
        ram = BASE_RSS + max(prepare, loop) + carried
        return StageNeed("llm", ram, disk + (disk if fmt.quantized else 0),
                         "one decoder layer at a time in float32 and the carried activations")
    ram = BASE_RSS + FLOAT32 * (vision + decoder) + FLOAT32 * decoder
    why = "float32 reference + the executor's float32 decoder"
    if fmt.quantized:
        ram += FLOAT32 * decoder + fmt.linear_bytes_per_param(group_size) * decoder
        why += " + modelopt's fake-quantized copy and its export"
    return StageNeed("llm", int(ram), disk, why)


def engine_needs(cfg: NVLMConfig, fmt: LLMFormat, *, vision_dtype_bytes: int = 2, vision_fp8: bool = False,
                 largest_tensor: int, group_size: int = 128, fidelity: bool = True, layerwise: bool = False,
                 calib_size: int = 32) -> HostNeeds:
    return HostNeeds((vision_need(cfg, vision_dtype_bytes, vision_fp8),
                      llm_need(cfg, fmt, fidelity=fidelity, largest_tensor=largest_tensor, group_size=group_size,
                               layerwise=layerwise, calib_size=calib_size)))


def largest_stored_tensor(cfg: NVLMConfig, tensors: dict | None) -> int:
    """Bytes of the largest tensor as stored (the shards' headers), else as bf16 from the config."""
    if tensors:
        return max(t.nbytes for t in tensors.values())
    return 2 * max((math.prod(shape) for comp in family_for(cfg).components for _, _, shape in comp.expand(cfg)),
                   default=0)


def build_host_report(cfg: NVLMConfig, tensors: dict | None = None) -> dict:
    """`inspect`'s "build host" rows: peak RAM and disk of `nvlm-build engine` per format (fp16 vision, the
    fidelity report on), and of the streamed `nvlm-build llm --no-fidelity` for the 16-bit formats."""
    largest = largest_stored_tensor(cfg, tensors)
    rows = []
    for name in ("bf16", "fp8", "int4_awq"):
        fmt = FORMATS[name]
        needs = engine_needs(cfg, fmt, largest_tensor=largest)
        row = {"format": name, "engine_peak_ram_bytes": needs.peak_ram, "engine_peak_stage": needs.peak_stage.stage,
               "engine_disk_bytes": needs.disk, "gpu_bytes": needs.gpu}
        if not fmt.quantized:
            row["llm_streamed_peak_ram_bytes"] = llm_need(cfg, fmt, fidelity=False, largest_tensor=largest).ram
        row["engine_layerwise_peak_ram_bytes"] = engine_needs(cfg, fmt, largest_tensor=largest,
                                                              layerwise=True).peak_ram  # --layerwise on
        rows.append(row)
    return {"largest_tensor_bytes": largest, "rows": rows,
            "conventions": "the stages as written today (runtime/core/build_host.py): engine_* with the whole-model "
                           "float32 reference and executor for the fidelity report and quantization; "
                           "engine_layerwise_* with the decoder a layer at a time (32 calibration prompts); "
                           "no GPU used"}
