"""`nvlm-build llm` a decoder layer at a time: quantization and the fidelity report for models far larger than RAM.

The whole-model path (builder/llm_build.py) holds the reference decoder, modelopt's fake-quantized copy and the
executor's copy in float32: for NVLM-D-72B, ~900 GB. TensorRT-LLM's own FP8 flow needs "more than 210 GB" of GPU
memory for a 70B model (NVIDIA/TensorRT-LLM#1331, #1849); llama.cpp, ExLlamaV2 and AutoGPTQ quantize layer by layer.
This path is the sequential scheme, built on modelopt's own calibrators and export:

    prompts ─▶ input embeddings (vision tower + token embedding only)
    for each decoder layer i (one float32 layer resident):
        load it as a one-layer Qwen2 (layer_stream.one_layer_model)
        carry the reference hidden states of calibration and fidelity prompts through it (unquantized)
        mtq.quantize it with the calibration prompts' inputs to layer i    ─┐ what the whole-model path computes:
        modelopt's export of it → layer i's tensors in every rank file      │ its calibration passes run the layers
        fake-quantized (as stored) hidden states of the fidelity prompts   ─┘ unquantized, so layer i sees the same
        keep layer i's tensors and, when cheap, the carried states (--resume)    inputs (tested: byte-identical)
    merge into rank files (safetensors' layout) + config.json
    fidelity: the built checkpoint a layer at a time (layer_stream.ExecutorStack), logits in vocabulary chunks

Resume: the work folder OUT.layerwise holds each finished layer's tensors and the hidden states carried past the
last saved layer; `--resume` continues from there and the result is byte-identical. The carried states are saved
after a layer when they are small (CARRY_SAVE_BYTES) or when CARRY_SAVE_SECONDS have passed since the last save:
at 512 calibration prompts of NVLM-D-72B they are tens of GB.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from runtime.core import trtllm_layout as layout
from runtime.core.checkpoint import Checkpoint
from runtime.core.errors import NVLMError
from runtime.core.llm_formats import LLMBuildOptions, kv_scale
from runtime.core.progress import bar, track
from runtime.core.trtllm_checkpoint import (
    SAFETENSORS_DTYPES,
    TORCH_DTYPES,
    SafetensorsStreamWriter,
    count_tensors,
    rank_plan,
    safetensors_order,
    write_unquantized,
)

from . import fidelity as fid
from . import layer_stream as ls
from .calibration import sample_prompts
from .modelopt_glue import _quiet, as_stored, quantized_config
from .vision_layers import PartEncoder, VisionParts

log = logging.getLogger(__name__)

CARRY_SAVE_BYTES = 1 << 30
CARRY_SAVE_SECONDS = 600.0
_LAYER = "transformer.layers.0."
# fault injection for the resume test: exit hard (no cleanup, like a kill) after this layer is saved
_EXIT_AFTER_ENV = "NVLM_TEST_EXIT_AFTER_LAYER"


class ResumeError(NVLMError):
    """--resume was asked for, but the work folder is missing or was made by another build."""


class _TokenEmbedding(nn.Module):
    """The decoder's token embedding alone, rows read from the shard as prompts ask for them, in float32: what
    NVLMReference.embed reads through `llm.get_input_embeddings()` when the decoder itself is not loaded."""

    def __init__(self, stack: ls.ReferenceStack):
        super().__init__()
        self.stack = stack

    def get_input_embeddings(self):
        return lambda ids: self.stack.token_rows(ids.reshape(-1).tolist()).reshape(*ids.shape, -1)


def prepare(ckpt: Checkpoint, tokenizer, stack: ls.ReferenceStack, samples, fidelity: bool):
    """Calibration prompts' and fidelity prompts' input embeddings, from the vision tower and projector a part at
    a time (vision_layers.PartEncoder) and the token embedding's rows — never the decoder, never the whole
    tower (InternViT-6B is 24 GB in float32). Returns (calibration embeds [1, L, H] each, their CrossInputs,
    fidelity PromptRuns, theirs)."""
    parts = VisionParts(ckpt)
    model = parts.model  # every component on the meta device: the prompts' bookkeeping, no weights
    model.llm = _TokenEmbedding(stack)
    model.encode_images = encoder = PartEncoder(parts)

    def embed_all():
        calib = []
        for p, pv in sample_prompts(samples, model, tokenizer):
            with torch.no_grad():
                emb, _ = model.prefill_inputs(torch.tensor([p.input_ids]), pv, tokenizer.image_pad_id, p.cross)
                features = None
                if p.cross is not None and p.cross.key_tiles:  # NVLM-X/H: the image keys the gated blocks read
                    _, features = model.engine_image_inputs(model.encode_images(pv), p.cross)
            calib.append((emb, ls.CrossInput(features, _ranges(p.cross and p.cross.key_ranges, emb))))
        runs = fid.prepare_prompts(model, tokenizer) if fidelity else []
        return calib, runs

    embed_all()  # records every prompt's tiles
    log.info("encoding the prompts' images, a vision part at a time")
    encoder.run()
    calib, runs = embed_all()
    return ([e for e, _ in calib], [c for _, c in calib], runs,
            [ls.CrossInput(r.features, _ranges(r.key_ranges, r.embeds)) for r in runs])


def _ranges(key_ranges, embeds: torch.Tensor) -> torch.Tensor:
    """A prompt's key ranges [L, 2] (no cross-attention: every row reads nothing)."""
    if key_ranges is None:
        return torch.zeros(embeds.shape[1], 2, dtype=torch.long)
    return torch.as_tensor(key_ranges, dtype=torch.long).reshape(-1, 2)


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".layerwise")


def _fingerprint(ckpt: Checkpoint, opts: LLMBuildOptions, samples) -> dict:
    return {"source": str(ckpt.directory), "source_bytes": ckpt.total_bytes, "format": opts.fmt.name,
            "kv_cache_fp8": opts.kv_cache_fp8, "awq_group_size": opts.awq_group_size, "tp": opts.tp, "pp": opts.pp,
            "chat_format": opts.chat_format, "calibration": [s.prompt for s in samples]}


class _Work:
    """OUT.layerwise: layer{i}.safetensors (layer i's tensors, keyed "rank:name"), carry.pt, build.json."""

    def __init__(self, path: Path, fingerprint: dict, resume: bool | None):
        """`resume`: True continues (refused unless the folder holds a build of the same options), False starts
        over, None continues when it does and starts over otherwise (the engine build's own --resume)."""
        self.path = path
        meta = path / "build.json"
        if resume is None:
            resume = meta.is_file() and json.loads(meta.read_text()) == fingerprint
        self.resumed = resume
        if resume:
            if not meta.is_file():
                raise ResumeError(f"--resume: {path} holds no earlier layer-at-a-time build; run without --resume")
            if json.loads(meta.read_text()) != fingerprint:
                raise ResumeError(f"--resume: {path} was made by a build with other options or another source; "
                                  "run without --resume to start over")
        else:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            meta.write_text(json.dumps(fingerprint, indent=2) + "\n")
        self._saved_at = time.monotonic()

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer{i:05d}.safetensors"

    def load_carry(self) -> dict | None:
        f = self.path / "carry.pt"
        return torch.load(f) if f.is_file() else None

    def save_carry(self, carry: dict, *, force: bool = False) -> bool:
        size = sum(t.numel() * t.element_size() for k in ("calib", "ref", "fake") for t in carry[k])
        if not (force or size <= CARRY_SAVE_BYTES or time.monotonic() - self._saved_at >= CARRY_SAVE_SECONDS):
            return False
        tmp = self.path / "carry.pt.tmp"
        torch.save(carry, tmp)
        os.replace(tmp, self.path / "carry.pt")
        self._saved_at = time.monotonic()
        return True


def _quantize_layer(model, opts: LLMBuildOptions, calib: list[torch.Tensor]) -> None:
    import modelopt.torch.quantization as mtq

    cfg = opts.fmt.modelopt_config(opts.kv_cache_fp8, opts.awq_group_size)

    def forward_loop(m):  # modelopt runs it once per calibration pass (AWQ: several)
        with torch.no_grad():
            for h in calib:
                m(inputs_embeds=h)

    with _quiet():
        mtq.quantize(model, cfg, forward_loop=forward_loop)


def _export_layer(model, opts: LLMBuildOptions, scratch: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """modelopt's export of the one-layer model: layer i's tensors of every rank ("rank:name", the name inside
    the layer), the exported config.json and the rank files' metadata."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from safetensors import safe_open

    shutil.rmtree(scratch, ignore_errors=True)
    with _quiet():
        export_tensorrt_llm_checkpoint(model, decoder_type="qwen", dtype=torch.bfloat16, export_dir=str(scratch),
                                       inference_tensor_parallel=opts.tp, inference_pipeline_parallel=1)
    exported = json.loads((scratch / "config.json").read_text())
    tensors, metadata = {}, {}
    for t in range(opts.tp):
        with safe_open(str(scratch / f"rank{t}.safetensors"), framework="pt") as fh:
            metadata = fh.metadata() or {}
            for name in fh.keys():
                if name.startswith(_LAYER):
                    tensors[f"{t}:{name[len(_LAYER):]}"] = fh.get_tensor(name)
    shutil.rmtree(scratch, ignore_errors=True)
    return tensors, exported, metadata


def _merge(ckpt: Checkpoint, opts: LLMBuildOptions, work: _Work, out: Path, metadata: dict,
           cross_kv_scales: list[float] | None = None) -> None:
    """Rank files from the per-layer tensors and the unquantized embedding, final norm and lm_head (the rows
    modelopt exports in the checkpoint dtype), laid out as safetensors' `save_file` lays them out."""
    from safetensors import safe_open

    per = ckpt.config.llm.num_layers // opts.pp
    dtype = TORCH_DTYPES[opts.fmt.dtype]
    for rank in range(opts.world_size):
        t, p = rank % opts.tp, rank // opts.tp
        entries = {r.name: (dtype, r.shape, r.produce) for r in rank_plan(ckpt, opts, rank)
                   if not r.name.startswith("transformer.layers.")}
        for j in range(per):
            path = str(work.layer_file(p * per + j))
            with safe_open(path, framework="pt") as fh:
                for key in fh.keys():
                    r, name = key.split(":", 1)
                    if int(r) == t:
                        sl = fh.get_slice(key)
                        entries[f"transformer.layers.{j}.{name}"] = (
                            _TORCH_OF[sl.get_dtype()], tuple(sl.get_shape()), partial(_read, path, key))
        if cross_kv_scales:  # NVLM-X/H with an FP8 KV cache: each block's scale, like its self-attention's
            like = layout.KV_SCALE.format(j=0)
            kv_dtype, kv_shape, _ = entries[like]
            stages = layout.xattn_stages(ckpt.config.cross_attention_layers, ckpt.config.llm.num_layers, opts.pp)
            for jl, i in enumerate(stages[p]):
                entries[layout.XKV_SCALE.format(j=jl)] = (kv_dtype, kv_shape, partial(
                    lambda s, d, sh: torch.full(sh, s, dtype=d), cross_kv_scales[i], kv_dtype, kv_shape))
        names = sorted(entries, key=lambda n: safetensors_order(n, entries[n][0]))
        writer = SafetensorsStreamWriter(out / f"rank{rank}.safetensors",
                                         [(n, entries[n][0], entries[n][1]) for n in names], metadata or None,
                                         metadata_first=True)
        for n in names:
            writer.write(n, entries[n][2]())
        writer.close()


def _read(path: str, key: str) -> torch.Tensor:
    """One tensor of a per-layer file, the file mapped only for the read (pages a kept mapping touched would
    stay resident: the whole quantized model by the end of the merge)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        return fh.get_tensor(key)


_TORCH_OF = {v: k for k, v in SAFETENSORS_DTYPES.items()}  # safetensors dtype name → torch dtype


def _through_blocks(stack: ls.ReferenceStack, i: int, streams: dict, crosses: dict, kv_scales: list | None,
                    amax: list | None) -> None:
    """NVLM-X/H: every carried stream through the gated blocks that follow layer i (unquantized, as modelopt's
    export leaves them). `amax`: collect each block's largest |key| / |value| over the calibration prompts (the
    FP8 KV scale, modelopt's rule); the "fake" stream reads its image keys/values rounded with `kv_scales`."""
    for j in stack.after.get(i, []):
        block = stack.xblock(j)
        if amax is not None:
            with torch.no_grad():
                for c in crosses["calib"]:
                    if c.reads:
                        k, v = block.cross_attn.key_values(c.features.to(stack.device))
                        amax[j] = max(amax[j], float(k.abs().max()), float(v.abs().max()))
            if kv_scales is not None:
                kv_scales[j] = kv_scale(amax[j])
        for name, hidden in streams.items():
            scale = kv_scales[j] if (name == "fake" and kv_scales is not None) else None
            cs = crosses["calib" if name == "calib" else "runs"]
            streams[name] = [ls.run_block(block, h.to(stack.device), c, c.ranges, scale).cpu()
                             for h, c in zip(hidden, cs)]
        del block


def quantize_layerwise(ckpt: Checkpoint, opts: LLMBuildOptions, work_path: Path, tmp: Path, *,
                       stack: ls.ReferenceStack, calib: list[torch.Tensor], calib_cross: list, runs, run_cross: list,
                       samples, resume: bool | None) -> tuple[dict, dict]:
    """Calibrate, export and fake-quantize layer by layer (per-layer work in `work_path`); write the rank files
    and config.json into `tmp`. Returns (config, carried hidden states of the fidelity prompts after the last
    layer: "ref", "fake" and, NVLM-X/H with an FP8 KV cache, "fake_bare" — its image keys/values not rounded —
    and "cross_kv_scales")."""
    work = _Work(work_path, _fingerprint(ckpt, opts, samples), resume)
    carry = work.load_carry() if work.resumed else None
    start = 0 if carry is None else carry["done"] + 1
    cross_fp8 = opts.kv_cache_fp8 and bool(ckpt.config.cross_attention_layers)
    n_blocks = len(ckpt.config.cross_attention_layers)
    if carry is None:
        carry = {"done": -1, "calib": calib, "ref": [r.embeds for r in runs], "fake": [r.embeds for r in runs],
                 "exported": None, "metadata": None, "amax": [0.0] * n_blocks,
                 "cross_kv_scales": [None] * n_blocks if cross_fp8 else None}
        if cross_fp8:
            carry["fake_bare"] = [r.embeds for r in runs]
    elif start:
        log.info("resuming after decoder layer %d of %d (%s)", start - 1, stack.num_layers, work.path)
    device = stack.device
    crosses = {"calib": calib_cross, "runs": run_cross}
    t_first = None
    for i in track(range(start, stack.num_layers), f"quantizing {opts.fmt.name} a layer at a time",
                   total=stack.num_layers - start, unit="layer"):
        t0 = time.perf_counter()
        model = stack.layer(i)
        calib_in = [h.to(device) for h in carry["calib"]]
        carry["calib"] = [ls.run_layer(model, h).cpu() for h in calib_in]
        carry["ref"] = [ls.run_layer(model, h.to(device)).cpu() for h in carry["ref"]]
        _quantize_layer(model, opts, calib_in)
        del calib_in
        tensors, carry["exported"], carry["metadata"] = _export_layer(model, opts, work.path / "scratch")
        save_file(tensors, str(work.layer_file(i)), metadata=carry["metadata"] or None)
        del tensors
        as_stored(model, opts)
        for name in ("fake", "fake_bare") if cross_fp8 else ("fake",):
            carry[name] = [ls.run_layer(model, h.to(device)).cpu() for h in carry[name]]
        del model
        ls.release_memory()  # modelopt's quantizers and hooks hold reference cycles: free the layer now
        streams = {k: carry[k] for k in ("calib", "ref", "fake", "fake_bare") if k in carry}
        _through_blocks(stack, i, streams, crosses, carry["cross_kv_scales"], carry["amax"])
        carry.update(streams)
        carry["done"] = i
        work.save_carry(carry, force=i == stack.num_layers - 1)
        if t_first is None and stack.num_layers - start > 1:
            t_first = time.perf_counter() - t0
            log.info("decoder layer %d took %.1f s: about %.0f min for the remaining %d", i, t_first,
                     t_first * (stack.num_layers - i - 1) / 60, stack.num_layers - i - 1)
        if os.environ.get(_EXIT_AFTER_ENV) == str(i):
            os._exit(137)
    _merge(ckpt, opts, work, tmp, carry["metadata"], carry["cross_kv_scales"])
    config = quantized_config(ckpt, opts, carry["exported"])
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config, carry


def fidelity_layerwise(fmt_name: str, tmp: Path, stack: ls.ReferenceStack, runs, run_cross: list,
                       carried: dict | None) -> fid.Measured:
    """The fidelity report's measurements, a layer at a time: the built checkpoint in `tmp` through the
    executor's arithmetic; the reference (and for quantized formats modelopt's fake-quantized layers) from the
    hidden states `quantize_layerwise` carried, or, unquantized, a reference pass here with greedy decoding. The
    logits are reduced a vocabulary chunk at a time (fidelity.Reducer), never held whole."""
    built = ls.ExecutorStack(tmp)
    caches = [ls.KVCache() for _ in runs]
    hidden = [built.token_rows(r.trt_ids, r.table) for r in runs]
    hidden = ls.executor_pass(built, hidden, caches, run_cross)
    greedy_same = None
    if carried is None:  # unquantized: the reference pass, and both greedy
        want, ref_hidden = ls.greedy_reference(stack, [r.embeds for r in runs], fid.GREEDY_TOKENS, run_cross)
        got = ls.greedy_executor(built, hidden, caches, fid.GREEDY_TOKENS, run_cross)
        greedy_same = sum(a == b for a, b in zip(want, got))
    else:
        ref_hidden = carried["ref"]
    del caches
    final = {"ex": torch.cat([built.final_hidden(h) for h in hidden]),
             "ref": torch.cat([stack.final_hidden(h[0]) for h in ref_hidden])}
    pairs = fid.PAIRS_UNQUANTIZED
    if carried is not None:
        final["fq"] = torch.cat([stack.final_hidden(h[0]) for h in carried["fake"]])
        pairs = fid.PAIRS_QUANTIZED
        if "fake_bare" in carried:
            final["fq_bare"] = torch.cat([stack.final_hidden(h[0]) for h in carried["fake_bare"]])
            pairs = fid.PAIRS_QUANTIZED_CROSS_KV
    reducer = fid.Reducer(pairs)
    for lo, hi in track(ls.vocab_chunks(stack), f"fidelity: {fmt_name} logits", unit="chunk"):
        ref_head, ex_head = stack.head_rows(lo, hi), built.head_rows(lo, hi)
        chunk = {"ex": final["ex"] @ ex_head.T, "ref": final["ref"] @ ref_head.T}
        for name in ("fq", "fq_bare"):  # modelopt leaves lm_head unquantized: the reference's rows
            if name in final:
                chunk[name] = final[name] @ ref_head.T
        reducer.add(chunk, lo)
    return fid.Measured(reducer, torch.cat([r.text for r in runs]), len(runs), greedy_same, kv_fp8=built.math.kv_fp8)


def build_layerwise(ckpt: Checkpoint, opts: LLMBuildOptions, work_path: Path, tmp: Path, *, tokenizer, samples,
                    fidelity: bool, device: torch.device, resume: bool | None = False):
    """The layer-at-a-time build into `tmp`: (config, fidelity.Measured or None). Unquantized formats are written
    by the streaming converter first (as without the fidelity report)."""
    ls.bounded_heap()
    stack = ls.ReferenceStack(ckpt, getattr(torch, opts.fmt.dtype), device)
    calib, calib_cross, runs, run_cross = prepare(ckpt, tokenizer, stack, samples if opts.fmt.quantized else [],
                                                  fidelity)
    carried = None
    if opts.fmt.quantized:
        config, carried = quantize_layerwise(ckpt, opts, work_path, tmp, stack=stack, calib=calib,
                                             calib_cross=calib_cross, runs=runs, run_cross=run_cross,
                                             samples=samples, resume=resume)
    else:
        with bar(count_tensors(ckpt, opts), f"converting to {opts.fmt.name}", unit="tensor") as advance:
            config = write_unquantized(ckpt, opts, tmp, progress=advance)
    measured = fidelity_layerwise(opts.fmt.name, tmp, stack, runs, run_cross, carried) if fidelity else None
    return config, measured
