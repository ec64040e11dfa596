"""`nvlm-build vision`: the vision encoder (InternViT → drop CLS → pixel shuffle → mlp1) as ONNX.

    pixel_values [tiles, 3, 448, 448] ─▶ vision_encoder.onnx ─▶ image_embeds [tiles, 256, llm_hidden]

The tile-batch dimension is dynamic (1 … max_batch × max tiles per image). The graph is traced
from the reference model's own `encode_tiles`, so there is one implementation of the pipeline.
Each export is checked with onnxruntime against the float32 reference on fresh random tiles.
Optionally (`--vision-quant fp8`) NVIDIA Model Optimizer's ONNX quantization inserts FP8 Q/DQ
nodes, calibrated on tiles of the built-in calibration scenes; its accuracy against the float32
reference is measured and reported (TensorRT-LLM's own multimodal recipes keep the encoder in fp16;
FP8 roughly halves InternViT-6B's compute, docs/upstream.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from runtime.core.build_host import CHECK_TILES, EXTERNAL_DATA_BYTES  # the preflight's estimate reads them too
from runtime.core.errors import NVLMError
from runtime.core.llm_formats import VisionFormat, get_vision_format
from runtime.core.progress import bar
from runtime.preprocess import preprocess_image
from runtime.reference import VISION_ROLES, reference_model
from runtime.scenes import SCENE_SIZES, synthetic_scene

from .fidelity import vision_task_check
from .vision_layers import VisionParts, export_by_part

log = logging.getLogger(__name__)

OPSET = 17
FP8_OPSET = 19  # float8 Q/DQ needs opset 19
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# onnxruntime check thresholds (max |Δ| / max |ref| over fresh random tiles)
CHECK_THRESHOLDS = {"fp32": 1e-4,  # same math, float32 both sides
                    "fp16": 2e-2}  # fp16 weights and activations through 2+ transformer layers


class VisionExportError(NVLMError):
    """The vision encoder could not be exported or does not match the reference."""


class VisionModels:
    """The vision tower and projector as the export needs them, never more than it needs at once. From a loaded
    reference (the trained default, whose task check runs the whole model): that model, and a cast copy for the
    export dtype. From a checkpoint: the export dtype's model loaded straight from the shards for the trace and
    freed after it, then the float32 reference for the checks — not both, and no float32 copy during the trace
    (NVLM-D-72B's vision tower is 5.9 B parameters: 24 GB in float32)."""

    def __init__(self, reference=None, ckpt=None):
        if (reference is None) == (ckpt is None):
            raise ValueError("give a reference model or a checkpoint")
        self._reference, self._ckpt = reference, ckpt
        self.cfg = reference.cfg if reference is not None else ckpt.config

    def by_part(self, dtype: torch.dtype) -> bool:
        """Export a part at a time (builder/vision_layers.py): a tower from the shards whose export passes
        EXTERNAL_DATA_BYTES (it goes to external data either way). Small towers, and a held reference (the
        trained default, whose task check runs the whole model), trace whole — as before, byte for byte."""
        return self._ckpt is not None and VisionParts(self._ckpt).export_bytes(dtype) > EXTERNAL_DATA_BYTES

    def reference(self):
        """The float32 reference (loaded on first use)."""
        if self._reference is None:
            self._reference = reference_model(self._ckpt, components=VISION_ROLES)
        return self._reference

    def at(self, dtype: torch.dtype):
        """A model in `dtype` for one trace: the reference itself (float32), a cast copy of a held reference, or
        a fresh load from the checkpoint in that dtype (the same rounding: source → dtype)."""
        if dtype == torch.float32:
            return self.reference()
        if self._reference is not None:
            return _cast(self._reference, dtype)
        return reference_model(self._ckpt, dtype=dtype, components=VISION_ROLES)


class VisionEncoder(torch.nn.Module):
    def __init__(self, reference):
        super().__init__()
        self.reference = reference

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.reference.encode_tiles(pixel_values)  # [T, 256, llm_hidden]


def _save(model_proto, path: Path) -> list[str]:
    import onnx

    if model_proto.ByteSize() > EXTERNAL_DATA_BYTES:
        data = path.name + ".data"
        onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [path.name, data]
    onnx.save_model(model_proto, str(path))
    return [path.name]


def _ort_check(path: Path, reference, dtype: str, tiles: int, seed: int) -> float:
    import onnxruntime as ort

    s = reference.cfg.preprocess.image_size
    x = torch.randn(tiles, 3, s, s, generator=torch.Generator().manual_seed(seed))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = x.to(DTYPES[dtype]).numpy() if dtype != "bf16" else None
    if inp is None:
        raise VisionExportError("bf16 ONNX cannot be run by onnxruntime on CPU")
    y = torch.from_numpy(sess.run(None, {"pixel_values": inp})[0].astype(np.float32))
    with torch.no_grad():
        r = reference.encode_tiles(x)
    return float((y - r).abs().max() / r.abs().max())


def _ort_encoder(path: Path, dtype: str):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {"pixel_values": x.to(DTYPES[dtype]).numpy()})[0].astype(np.float32))


def calibration_tiles(reference, count: int = 4) -> np.ndarray:
    """Tiles from the built-in calibration scenes, preprocessed exactly as in serving."""


    tiles = [preprocess_image(synthetic_scene(w, h, 100 + k), config=reference.cfg.preprocess).pixel_values
             for k, (w, h) in enumerate(SCENE_SIZES[:count])]
    return np.concatenate(tiles).astype(np.float32)


def export_vision(models, out: Path, *, dtype: str = "fp16", vision_quant: "str | VisionFormat | None" = None,
                  max_tiles: int = 28, seed: int = 0, task_tokenizer=None) -> dict:
    """Write vision_encoder.onnx (+ .data), optional quantized encoder (vision_encoder.fp8.onnx), and
    vision/config.json. `models`: a `VisionModels`, or a reference model. `task_tokenizer`: the source is the
    trained embedded default (its tokenizer): each encoder onnxruntime can run is also scored on held-out task
    questions against the reference."""
    if dtype not in DTYPES:
        raise VisionExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    quant = vision_quant if isinstance(vision_quant, VisionFormat) else get_vision_format(vision_quant)
    models = models if isinstance(models, VisionModels) else VisionModels(reference=models)
    out.mkdir(parents=True, exist_ok=True)
    cfg = models.cfg
    s, hidden = cfg.preprocess.image_size, cfg.llm.hidden_size

    def export(path: Path, torch_dtype, opset: int) -> list[str]:
        import onnx

        tmp = path.with_suffix(".trace.onnx")
        model = VisionEncoder(models.at(torch_dtype)).eval()
        dummy = torch.zeros(2, 3, s, s, dtype=torch_dtype)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(tmp), input_names=["pixel_values"], output_names=["image_embeds"],
                              dynamic_axes={"pixel_values": {0: "tiles"}, "image_embeds": {0: "tiles"}},
                              opset_version=opset, dynamo=False)
        del model  # the traced copy goes before the graph is read back: one copy of the weights at a time
        proto = onnx.load(str(tmp))
        tmp.unlink()
        for extra in tmp.parent.glob(tmp.name + "*"):
            extra.unlink()
        return _save(proto, path)

    if quant is None and task_tokenizer is None and models.by_part(DTYPES[dtype]):
        parts = VisionParts(models._ckpt)
        with bar(len(parts.names()), "exporting the vision encoder to ONNX a part at a time", unit="part") as advance:
            files, part_rel = export_by_part(models._ckpt, out, dtype=DTYPES[dtype], opset=OPSET,
                                             check_tiles=CHECK_TILES, seed=seed, check=dtype in CHECK_THRESHOLDS,
                                             progress=advance)
        reference = None
    else:
        with bar(None, "exporting the vision encoder to ONNX (trace, then save)", unit="file") as advance:
            files = export(out / "vision_encoder.onnx", DTYPES[dtype], OPSET)
            advance(1)
        reference, part_rel = models.reference(), None
    checks = {}
    if dtype in CHECK_THRESHOLDS:
        rel = part_rel if reference is None else _ort_check(out / "vision_encoder.onnx", reference, dtype,
                                                            CHECK_TILES, seed)
        checks["onnx_vs_reference"] = {"metric": "max |Δ| / max |ref| on fresh random tiles (onnxruntime CPU)",
                                       "value": rel, "threshold": CHECK_THRESHOLDS[dtype],
                                       "passed": rel <= CHECK_THRESHOLDS[dtype]}
        if rel > CHECK_THRESHOLDS[dtype]:
            raise VisionExportError(f"exported {dtype} vision encoder deviates from the reference by {rel:.2e} "
                                    f"(threshold {CHECK_THRESHOLDS[dtype]:.0e})")
    else:
        checks["onnx_vs_reference"] = {"metric": "not run: onnxruntime has no bf16 kernels on CPU", "value": None,
                                       "threshold": None, "passed": True}
    if quant is not None:
        files += _quantized(reference, out, export, quant)  # its fp32 trace uses the reference itself
        rel = _ort_check(out / quant.onnx_name(), reference, "fp32", CHECK_TILES, seed)
        checks[f"{quant.name}_vs_fp32_reference"] = {"metric": "max |Δ| / max |ref| on fresh random tiles (reported)",
                                           "value": rel, "threshold": None, "passed": True}
    if task_tokenizer is not None:
        runnable = ([("onnx", "vision_encoder.onnx", dtype)] if dtype in CHECK_THRESHOLDS else []) + (
            [(quant.name, quant.onnx_name(), "fp32")] if quant is not None else [])
        for name, file, in_dtype in runnable:
            check = vision_task_check(_ort_encoder(out / file, in_dtype), reference, task_tokenizer, name)
            checks[check.name] = {"metric": check.metric, "value": check.value, "threshold": check.threshold,
                                  "passed": check.passed}
            if not check.passed:
                raise VisionExportError(f"the {name} vision encoder loses task accuracy: {check.value:.3f} against "
                                        f"a threshold of {check.threshold:.3f} ({check.why})")
    info = {
        "onnx": "vision_encoder.onnx", "fp8_onnx": quant.onnx_name() if quant else None,
        "files": files, "dtype": dtype, "opset": OPSET, "vision_quant": quant.name if quant else None,
        "input": {"name": "pixel_values", "shape": [-1, 3, s, s], "dtype": dtype},
        "output": {"name": "image_embeds", "shape": [-1, cfg.preprocess.tokens_per_tile, hidden], "dtype": dtype},
        "max_tiles": max_tiles, "checks": checks,
    }
    (out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _cast(reference, dtype):
    import copy

    return copy.deepcopy(reference).to(dtype)


def _quantized(reference, out: Path, export, quant: VisionFormat) -> list[str]:
    """Q/DQ encoder with modelopt's ONNX quantization, calibrated on real preprocessed tiles."""
    src = out / f"vision_encoder.fp32-for-{quant.onnx_suffix}.onnx"
    written = export(src, torch.float32, FP8_OPSET)
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise VisionExportError(f"--vision-quant {quant.name} needs modelopt's ONNX dependencies ({e}); install "
                                "nvlm-trt[onnx]") from None
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), _quiet_modelopt_logs():
        warnings.simplefilter("ignore")
        quantize(onnx_path=str(src), quantize_mode=quant.modelopt_mode, calibration_data=calibration_tiles(reference),
                 output_path=str(out / quant.onnx_name()), calibration_eps=["cpu"])
    for f in written:
        (out / f).unlink(missing_ok=True)
    return [p.name for p in out.glob("vision_encoder.fp8.onnx*")]


@contextlib.contextmanager
def _quiet_modelopt_logs():
    logger = logging.getLogger("modelopt")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
