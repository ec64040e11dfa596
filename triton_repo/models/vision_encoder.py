"""`vision_encoder`: pixel_values → image_embeds, on the exported ONNX with onnxruntime (reference target), or
standing in for the TensorRT plan with the plan's I/O (contract target)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.core.build_dir import read_limits

from ..pb import TYPE_NAMES, as_torch, build_dir, error, from_torch, stub, torch_dtype


class VisionEncoderModel:
    """pixel_values → image_embeds with onnxruntime on the exported ONNX (the engine's CPU stand-in).
    Reference target: FP32 in and out, whatever dtype the ONNX computes in."""

    io_dtype = "FP32"

    def initialize(self, args):
        self._load(build_dir(args))

    def _load(self, build: Path):
        import onnxruntime as ort

        self.limits = read_limits(build)
        info = json.loads((build / "vision" / "config.json").read_text())
        self.onnx_dtype = {"fp32": np.float32, "fp16": np.float16}.get(info["dtype"], np.float32)
        self.sess = ort.InferenceSession(str(build / "vision" / info["onnx"]), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        import torch

        pb = stub()
        out = []
        for request in requests:
            try:
                t = pb.get_input_tensor_by_name(request, "pixel_values")
                self.limits.check_request(tiles=t.shape()[0])  # from the shape: the data is not touched
                x = as_torch(t).float().numpy()
                y = self.sess.run(None, {"pixel_values": x.astype(self.onnx_dtype)})[0]
                y = torch.from_numpy(y.astype(np.float32)).to(torch_dtype(self.io_dtype))
                out.append(pb.InferenceResponse(output_tensors=[from_torch("image_embeds", y)]))
            except Exception as e:  # noqa: BLE001
                out.append(error(f"vision_encoder: {e}"))
        return out


class StandInVisionModel(VisionEncoderModel):
    """Contract target: stands in for the TensorRT plan, with the plan's I/O (the vision build's dtype,
    as the config declares it). `engine_path` (set by the generated model.py) is the plan the real
    model would load; the stand-in computes with the same build's ONNX."""

    engine_path = ""

    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.io_dtype = {v: k for k, v in TYPE_NAMES.items()}[cfg["input"][0]["data_type"]]
        engine = Path(args["model_repository"]) / self.engine_path  # an absolute engine_path stays as it is
        self._load(engine.resolve().parents[1])
