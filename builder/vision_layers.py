"""The vision encoder exported a part at a time: InternViT-6B without holding InternViT-6B.

A whole-tower trace holds the tower in the export dtype, torch's copy of its initializers, the graph read back
and its serialization; the check then adds the float32 tower and onnxruntime's session — for NVLM-D-72B's
5.9 B-parameter tower in fp16, far past a modest host. Here the pipeline is cut where it is a chain:

    pixel_values ─▶ embeddings ─▶ layer 0 ─▶ … ─▶ layer (select_layer) ─▶ head (drop CLS, pixel shuffle, mlp1)
                                                                           ─▶ image_embeds

Each part is loaded alone from the shards (its parameters assigned into a model built on the meta device),
traced by torch's exporter into a scratch file, checked, and appended to one ONNX model whose initializers all
live in one external data file (`vision_encoder.onnx.data`, written part by part; the graph itself is a few MB).
Names inside a part get the part's prefix; parts meet at the tensors `x1`, `x2`, … .

The check is the whole-tower check, chained: the same fresh random tiles run through each part's onnxruntime
session (its output feeding the next part, as inside the whole graph) and through the float32 reference part,
each stream carried; max |Δ| / max |ref| is taken at image_embeds. Only one part's models are resident.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch

from runtime.core.checkpoint import Checkpoint
from runtime.core.families import DECODER_ROLES, PROJECTOR, VISION, family_for
from runtime.reference import reference_class

from .layer_stream import bounded_heap, release_memory

DATA_ALIGN = 4096  # each initializer's offset in the data file (mmap-friendly, as onnx's own writer aligns)


class _Head(torch.nn.Module):
    """The last part: the reference's own `project` (its projector is this module's only parameters)."""

    def __init__(self, model):
        super().__init__()
        self.__dict__["_model"] = model  # not a submodule: the rest of the model stays out of the trace
        self.projector = model.projector

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._model.project(hidden)


class VisionParts:
    """The vision pipeline's parts of a checkpoint, each materialized on demand in a dtype."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.cfg = ckpt, ckpt.config
        roles = {c.name for c in family_for(self.cfg).components} | set(DECODER_ROLES)
        self.model = reference_class(self.cfg)(self.cfg, skip=frozenset(roles))  # all on the meta device
        plan = ckpt.validate()
        self.rows = {VISION: plan.rows[VISION], PROJECTOR: plan.rows[PROJECTOR]}
        v = self.cfg.vision
        s = self.cfg.select_layer
        self.depth = s if s > 0 else v.num_layers + 1 + s

    def names(self) -> list[str]:
        return ["embeddings", *(f"layer{k}" for k in range(self.depth)), "head"]

    def _where(self, name: str):
        """(module, component, prefix of its weights' targets)."""
        if name == "embeddings":
            return self.model.vision.embeddings, VISION, "embeddings."
        if name == "head":
            return _Head(self.model), PROJECTOR, ""
        k = int(name[len("layer"):])
        return self.model.vision.encoder.layers[k], VISION, f"encoder.layers.{k}."

    def export_bytes(self, dtype: torch.dtype) -> int:
        """The vision tower and projector's size in `dtype`."""
        import math

        return dtype.itemsize * sum(math.prod(shape) for rows in self.rows.values() for _, _, shape in rows)

    @contextlib.contextmanager
    def part(self, name: str, dtype: torch.dtype):
        """The part, its weights read from the shards in `dtype`; back on the meta device afterwards."""
        module, component, prefix = self._where(name)
        target = module.projector if name == "head" else module
        state = {t[len(prefix):]: self.ckpt.get(src).to(dtype) for src, t, _ in self.rows[component]
                 if t.startswith(prefix)}
        target.load_state_dict(state, strict=True, assign=True)
        del state
        try:
            yield module.eval()
        finally:
            target.to("meta")
            release_memory()

    def example(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A 2-tile input of the part (the tile axis is dynamic in the export)."""
        p, v = self.cfg.preprocess, self.cfg.vision
        if name == "embeddings":
            return torch.zeros(2, v.num_channels, p.image_size, p.image_size, dtype=dtype)
        return torch.zeros(2, 1 + v.patches_per_side ** 2, v.hidden_size, dtype=dtype)


class PartEncoder:
    """`encode_images` for a reference whose vision tower is not loaded (the layer-at-a-time LLM build): asked
    for a prompt's tiles, it first records them and answers zeros; `run()` then encodes every recorded prompt a
    part at a time in float32 (each part loaded once, each prompt's tiles as one batch, as the whole tower
    encodes them), and from then on it answers the real embeddings. Callers run their preparation twice."""

    def __init__(self, parts: VisionParts):
        self.parts = parts
        self.pending: dict[bytes, torch.Tensor] = {}
        self.results: dict[bytes, torch.Tensor] = {}

    @staticmethod
    def _key(pixel_values: torch.Tensor) -> bytes:
        import hashlib

        return hashlib.sha1(pixel_values.detach().float().contiguous().numpy().tobytes()).digest()

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pv = pixel_values.float()
        key = self._key(pv)
        if key in self.results:
            return self.results[key]
        self.pending[key] = pv
        p = self.parts.cfg.preprocess
        return torch.zeros(pv.shape[0], p.tokens_per_tile, self.parts.cfg.llm.hidden_size)

    def run(self) -> None:
        keys, xs = list(self.pending), list(self.pending.values())
        for name in self.parts.names():
            with self.parts.part(name, torch.float32) as module, torch.no_grad():
                xs = [module(x) for x in xs]
        self.results.update(zip(keys, xs))
        self.pending.clear()


def _trace(module, example: torch.Tensor, path: Path, inp: str, out: str, opset: int) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[inp], output_names=[out],
                          dynamic_axes={inp: {0: "tiles"}, out: {0: "tiles"}}, opset_version=opset, dynamo=False)


class _Composer:
    """One ONNX model from parts: nodes and initializer stubs kept, initializer bytes appended to one data file."""

    def __init__(self, path: Path):
        self.path = path
        self.data_name = path.name + ".data"
        self._data = open(path.parent / self.data_name, "wb")
        self.nodes, self.inits, self.value_info = [], [], []
        self.first_input = self.last_output = self.opset = None

    def add(self, part_path: Path, prefix: str) -> None:
        import onnx
        from onnx.external_data_helper import set_external_data

        m = onnx.load(str(part_path))
        g = m.graph
        keep = {i.name for i in g.input} | {o.name for o in g.output}

        def rename(n: str) -> str:
            return n if (not n or n in keep) else f"{prefix}/{n}"

        for node in g.node:
            node.name = rename(node.name)
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            self.nodes.append(node)
        for t in g.initializer:
            t.name = rename(t.name)
            raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
            pad = -self._data.tell() % DATA_ALIGN
            self._data.write(b"\0" * pad)
            offset = self._data.tell()
            self._data.write(raw)
            for field in ("float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(field)
            t.raw_data = raw  # onnx's helper wants the bytes present when it records where they went
            set_external_data(t, self.data_name, offset, len(raw))
            t.data_location = onnx.TensorProto.EXTERNAL
            t.ClearField("raw_data")
            self.inits.append(t)
        for vi in g.value_info:
            vi.name = rename(vi.name)
            self.value_info.append(vi)
        if self.first_input is None:
            self.first_input = g.input[0]
        self.last_output = g.output[0]
        self.opset = list(m.opset_import)

    def finish(self) -> list[str]:
        import onnx

        self._data.close()
        graph = onnx.helper.make_graph(self.nodes, "vision_encoder", [self.first_input], [self.last_output],
                                       initializer=self.inits, value_info=self.value_info)
        model = onnx.helper.make_model(graph, opset_imports=self.opset, producer_name="nvlm-trt")
        onnx.save_model(model, str(self.path))  # the graph only: every initializer is already external
        return [self.path.name, self.data_name]


def export_by_part(ckpt: Checkpoint, out: Path, *, dtype: torch.dtype, opset: int, check_tiles: int, seed: int,
                   check: bool, progress=None) -> tuple[list[str], float | None]:
    """vision_encoder.onnx (+ .data) written a part at a time into `out`; returns (files, the chained
    onnxruntime-vs-float32-reference figure, or None when not checked)."""
    import onnxruntime as ort

    bounded_heap()
    parts = VisionParts(ckpt)
    names = parts.names()
    s = ckpt.config.preprocess.image_size
    x_ref = torch.randn(check_tiles, 3, s, s, generator=torch.Generator().manual_seed(seed))
    x_ort = x_ref.to(dtype).numpy() if check else None
    composer = _Composer(out / "vision_encoder.onnx")
    scratch = out / ".parts"
    scratch.mkdir(exist_ok=True)
    for k, name in enumerate(names):
        inp = "pixel_values" if k == 0 else f"x{k}"
        outp = "image_embeds" if k == len(names) - 1 else f"x{k + 1}"
        path = scratch / f"{name}.onnx"
        with parts.part(name, dtype) as module:
            _trace(module, parts.example(name, dtype), path, inp, outp, opset)
        if check:
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            x_ort = sess.run(None, {inp: x_ort})[0]
            del sess
            with parts.part(name, torch.float32) as module, torch.no_grad():
                x_ref = module(x_ref)
        composer.add(path, name)
        for f in scratch.iterdir():
            f.unlink()
        if progress:
            progress(1)
    scratch.rmdir()
    files = composer.finish()
    rel = None
    if check:
        y = torch.from_numpy(np.asarray(x_ort).astype(np.float32))
        rel = float((y - x_ref).abs().max() / x_ref.abs().max())
    return files, rel
