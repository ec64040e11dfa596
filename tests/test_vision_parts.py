"""The vision encoder exported a part at a time (builder/vision_layers.py) computes what the whole-tower export
computes: one ONNX model with every initializer in one external data file, checked chained part by part."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import builder.vision_export as ve
from runtime.core.checkpoint import Checkpoint
from runtime.core.demo_checkpoint import write_demo_checkpoint
from runtime.reference import VISION_ROLES, reference_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("vp") / "ckpt", seed=3)


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": x})[0].astype(np.float32)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_by_part_equals_whole_tower(ckpt, tmp_path, monkeypatch, dtype):
    c = Checkpoint.open(ckpt)
    whole = ve.export_vision(ve.VisionModels(ckpt=c), tmp_path / "whole", dtype=dtype)
    monkeypatch.setattr(ve, "EXTERNAL_DATA_BYTES", 0)  # every tower counts as big: the part-at-a-time path
    parted = ve.export_vision(ve.VisionModels(ckpt=c), tmp_path / "parts", dtype=dtype)
    assert parted["files"] == ["vision_encoder.onnx", "vision_encoder.onnx.data"]
    assert not (tmp_path / "parts" / ".parts").exists()
    model = onnx.load(str(tmp_path / "parts" / "vision_encoder.onnx"), load_external_data=False)
    assert model.graph.initializer and all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["pixel_values"] and [o.name for o in model.graph.output] == ["image_embeds"]
    # the chained check measured what the whole check measures, and passed
    a, b = whole["checks"]["onnx_vs_reference"]["value"], parted["checks"]["onnx_vs_reference"]["value"]
    assert parted["checks"]["onnx_vs_reference"]["passed"] and b == pytest.approx(a, rel=0.5, abs=1e-6)
    # the composed model on fresh tiles: the whole export's outputs and the float32 reference's
    x = torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(11))
    np_x = x.to(ve.DTYPES[dtype]).numpy()
    y_parts, y_whole = _run(tmp_path / "parts" / "vision_encoder.onnx", np_x), _run(tmp_path / "whole" / "vision_encoder.onnx", np_x)
    ref = reference_model(c, components=VISION_ROLES).encode_images(x).numpy()
    scale = np.abs(ref).max()
    tol = 1e-5 if dtype == "fp32" else 2e-2
    assert np.abs(y_parts - ref).max() / scale <= tol
    assert np.abs(y_parts - y_whole).max() / scale <= tol
    # and a wrong one is told apart: another tile's embeddings
    assert np.abs(y_parts[::-1] - ref).max() / scale > 0.1
