"""What every Python model of the repository does with the Python backend's `triton_python_backend_utils`
(imported lazily: it exists only inside a Triton stub): read inputs, cross BF16 tensors as DLPack, answer
with an error, find the build the repository serves."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_LENGTH = struct.Struct("<I")  # a BYTES element's length, as Triton serializes it


def stub():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def shortcut_single_bytes(pb_utils) -> None:
    """`pb_utils.Tensor` serializes a BYTES array by calling back into `pb_utils.serialize_byte_tensor` (Python: an
    np.nditer loop over the elements), and the entry model builds one per streamed response (`text_output`). A
    one-element array holding bytes takes a shortcut with the same result (the element's length as 4 little-endian
    bytes, then the element); anything else goes to the original. Installed once per stub process."""
    original = pb_utils.serialize_byte_tensor
    if getattr(original, "nvlm_shortcut", False):
        return

    def serialize_byte_tensor(tensor):
        if tensor.size == 1 and tensor.dtype == np.object_:
            item = tensor.item()
            if type(item) is bytes:
                return _LENGTH.pack(len(item)) + item
        return original(tensor)

    serialize_byte_tensor.nvlm_shortcut = True
    pb_utils.serialize_byte_tensor = serialize_byte_tensor


def build_dir(args) -> Path:
    """The build this repository serves: its `build_dir` parameter, relative to the repository root
    (`args["model_repository"]` is the model's own directory) unless absolute."""
    cfg = json.loads(args["model_config"])
    return (Path(args["model_repository"]).parent / cfg["parameters"]["build_dir"]["string_value"]).resolve()


def model_parameters(args) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


class Inputs:
    """One request's input tensors by name, listed once. pb_utils.get_input_tensor_by_name lists all of a request's
    inputs again (a Python object per tensor) for every name it looks up, and a request is read by ~30 names (its
    decoding parameters): that was 0.5-0.7 ms of the time to first token in each of the entry model and the LLM
    step (issue 32)."""

    __slots__ = ("tensors",)

    def __init__(self, request):
        self.tensors = {t.name(): t for t in request.inputs()}

    def tensor(self, name):
        """The pb_utils.Tensor (None if absent): for a BF16 input, which has no NumPy view (as_torch)."""
        return self.tensors.get(name)


def get_input(inputs: Inputs, name, default=None):
    t = inputs.tensors.get(name)
    return default if t is None else t.as_numpy()


def scalar(inputs: Inputs, name, default, cast):
    v = get_input(inputs, name)
    if v is None or v.size == 0:
        return default
    return cast(v.reshape(-1)[0])


# Triton dtype names ↔ torch dtypes. numpy has no bfloat16: tensors whose dtype a config declares as
# BF16 cross the Python backend as DLPack (torch) tensors, never through as_numpy().
def torch_dtype(name: str):
    import torch

    return {"FP16": torch.float16, "BF16": torch.bfloat16, "FP32": torch.float32}[name]


def torch_dtype_name(dtype) -> str:
    import torch

    return {torch.float16: "FP16", torch.bfloat16: "BF16", torch.float32: "FP32"}.get(dtype, str(dtype))


TYPE_NAMES = {"FP16": "TYPE_FP16", "BF16": "TYPE_BF16", "FP32": "TYPE_FP32"}


def as_torch(tensor):
    """A pb_utils.Tensor of any dtype (BF16 included) as a torch tensor."""
    import torch

    return torch.from_dlpack(tensor.to_dlpack())


def from_torch(name: str, x):
    import torch.utils.dlpack

    return stub().Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(x.contiguous()))


def cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def error(message: str):
    p = stub()
    return p.InferenceResponse(output_tensors=[], error=p.TritonError(message))


def response(p, wanted: set, tensors: list):
    """A streamed response with only the outputs its request asked for (`wanted`; empty: all). The bundled
    Python backend (r24.10) drops unrequested outputs inside `response_sender.send`, which runs without the GIL
    (ResponseSender::Send → PruneOutputTensors → ~PbTensor), so their NumPy arrays were freed off the GIL,
    corrupting the interpreter's heap (python_backend 2082a3c, fixed in r24.12): they are dropped here instead."""
    if wanted:
        tensors = [t for t in tensors if t.name() in wanted]
    return p.InferenceResponse(output_tensors=tensors)
