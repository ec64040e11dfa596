"""`nvlm-build llm`: NVLM-D's Qwen2 decoder → TensorRT-LLM checkpoint, with a fidelity report.

    validate options ─▶ resolve calibration data ─▶ (unquantized) stream shards → rank files
                                                  └ (quantized) modelopt quantize with multimodal
                                                    calibration → modelopt export → our config.json
                     ─▶ reports/fidelity.json ─▶ nvlm_build.json ─▶ atomic publish

Everything is written into a temporary directory beside OUT and renamed into place at the end,
so an interrupted build never leaves an OUT that looks complete; an existing OUT is replaced
only with --force. A build whose fidelity checks fail is not published (the report is kept next
to OUT as OUT.fidelity-failed.json).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import time
from pathlib import Path

from runtime.core import __version__
from runtime.core.build_host import HostNeeds, largest_stored_tensor, llm_need
from runtime.core.checkpoint import Checkpoint
from runtime.core.demo_checkpoint import is_trained_default
from runtime.core.errors import InputError, NVLMError, OutputExistsError
from runtime.core.fsutil import publish_dir
from runtime.core.llm_formats import LLMBuildOptions, kv_cache_name, kv_scale, validate
from runtime.core.progress import bar, track
from runtime.core.trtllm_checkpoint import (
    add_cross_attention,
    count_tensors,
    repad_vocab,
    write_unquantized,
)
from runtime.executor import ReferenceExecutor
from runtime.reference import reference_model
from runtime.tokenizer import NVLMTokenizer

from . import layer_stream
from . import preflight as host
from .calibration import builtin_samples, embed_samples, load_calib_data, select
from .fidelity import build_report, finish, task_check
from .layerwise import build_layerwise, work_dir
from .modelopt_glue import _quiet, as_stored, quantized_config
from .preflight import MARGIN, check, remedies_for

log = logging.getLogger(__name__)


class FidelityError(NVLMError):
    """The built checkpoint does not compute what the reference computes."""


def quantize(reference, opts: LLMBuildOptions, embeds: list):
    """modelopt fake-quantization of a copy of the reference LLM (its Qwen2 decoder), calibrated on `embeds`
    (calibration.CalibInput). NVLM-X/H: the copy keeps the reference's cross-attention hooks, so it runs with
    the reference's own gated blocks, unquantized — as the checkpoint stores them (docs/llm.md)."""
    import modelopt.torch.quantization as mtq

    model = copy.deepcopy(reference.llm).eval()
    cfg = opts.fmt.modelopt_config(opts.kv_cache_fp8, opts.awq_group_size)

    def forward_loop(m):  # modelopt runs it once per calibration pass (AWQ: several)
        for sample in track(embeds, f"calibrating {opts.fmt.name}", unit="sample"):
            sample.run(m)

    with _quiet():
        mtq.quantize(model, cfg, forward_loop=forward_loop)
    return model


@contextlib.contextmanager
def _cross_kv_amax(reference):
    """The largest |key| or |value| each gated cross-attention block of `reference` computes while the block is
    active (a list, one per block; empty for NVLM-D): what an FP8 KV cache's scale for the block's image
    keys/values is calibrated from, as modelopt calibrates the self-attention's from its k/v amax."""
    import torch

    blocks = list(getattr(reference, "xattn", []))
    amax = [0.0] * len(blocks)

    def watch(j):
        def hook(module, args, out):
            amax[j] = max(amax[j], float(out.detach().abs().max())) if out.numel() else amax[j]
        return hook

    handles = [proj.register_forward_hook(watch(j)) for j, b in enumerate(blocks)
               for proj in (b.cross_attn.k_proj, b.cross_attn.v_proj)]
    try:
        with torch.no_grad():
            yield amax
    finally:
        for h in handles:
            h.remove()


def export(model, ckpt, opts: LLMBuildOptions, out: Path, cross_kv_scales: list[float] | None = None) -> dict:
    """modelopt's TensorRT-LLM export, then our config.json (modelopt 0.47 writes architecture
    "QWenForCausalLM" without qwen_type, which TensorRT-LLM would build as Qwen-1).

    The export runs on `model` itself, not a copy: it unifies the scales of layers that TensorRT-LLM
    fuses (q/k/v, gate/up: shared input amax, max weight amax, averaged AWQ pre-quant scales) in
    place, so that afterwards the fake-quantized model computes exactly what the checkpoint stores —
    which is what the fidelity report compares against."""
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    with _quiet():
        export_tensorrt_llm_checkpoint(model, decoder_type="qwen", dtype=torch.bfloat16,
                                       export_dir=str(out), inference_tensor_parallel=opts.tp,
                                       inference_pipeline_parallel=opts.pp)
    repad_vocab(out, ckpt.config, opts.tp, opts.pp)  # modelopt pads AWQ vocabularies to 64; TensorRT-LLM to TP
    if ckpt.config.cross_attention_layers:  # NVLM-X/H: modelopt knows the Qwen2 decoder, not the gated blocks
        add_cross_attention(ckpt, opts, out, kv_scales=cross_kv_scales)
    config = quantized_config(ckpt, opts, json.loads((out / "config.json").read_text()))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


LAYERWISE_MODES = ("auto", "on", "off")


def choose_layerwise(ckpt, opts: LLMBuildOptions, mode: str, *, fidelity: bool, calib_size: int) -> bool:
    """Whether the build runs a decoder layer at a time (builder/layerwise.py). `auto`: when the whole-model path
    would not fit this host's RAM; `on`/`off` force it."""
    if mode not in LAYERWISE_MODES:
        raise InputError(f"--layerwise {mode!r}: use one of {', '.join(LAYERWISE_MODES)}")
    if mode == "off" or not (fidelity or opts.fmt.quantized):
        return False  # the streamed conversion already holds one tensor at a time
    if mode == "on":
        return True
    whole = llm_need(ckpt.config, opts.fmt, fidelity=fidelity, largest_tensor=largest_stored_tensor(
        ckpt.config, ckpt.tensors), group_size=opts.awq_group_size)
    return whole.ram * MARGIN > host.available_ram()


def _build_whole(ckpt, opts: LLMBuildOptions, tmp: Path, samples, *, fidelity: bool) -> tuple[dict, dict | None]:
    """The whole-model path: the reference in float32, modelopt on a copy of its decoder, the report on both."""
    import torch

    reference = tokenizer = fake = cross_kv_scales = None
    if fidelity or opts.fmt.quantized:
        # the decoder as the build stores its 16-bit weights: NVLM-D-72B's F32 q/k/v rounded to the checkpoint
        # dtype, so that "same weights" holds for the fidelity report and modelopt quantizes what is exported
        reference = reference_model(ckpt, decoder_stored_as=getattr(torch, opts.fmt.dtype))
        tokenizer = NVLMTokenizer.from_dir(ckpt.directory, chat_format=opts.chat_format)
        tokenizer.check_vocab(ckpt.config.llm.vocab_size)
    if opts.fmt.quantized:
        log.info("calibrating %s on %d multimodal samples", opts.fmt.name, len(samples))
        with _cross_kv_amax(reference) as amax:  # NVLM-X/H: the image keys/values, computed while embedding
            embeds = list(track(embed_samples(samples, reference, tokenizer), "embedding calibration samples",
                                total=len(samples), unit="sample"))
        fake = quantize(reference, opts, embeds)
        # NVLM-X/H with an FP8 KV cache: one scale per gated block, by modelopt's rule; the comparison model
        # of the fidelity report rounds its image keys/values with them too (fidelity.build_report)
        cross_kv_scales = [kv_scale(a) for a in amax] if opts.kv_cache_fp8 and amax else None
        config = export(fake, ckpt, opts, tmp, cross_kv_scales)
        as_stored(fake, opts)
    else:
        with bar(count_tensors(ckpt, opts), f"converting to {opts.fmt.name}", unit="tensor") as advance:
            config = write_unquantized(ckpt, opts, tmp, progress=advance)
    report = None
    if fidelity:
        report = build_report(opts.fmt.name, opts.fmt.quantized, ReferenceExecutor.load(tmp), reference, tokenizer, fake,
                              cross_kv_scales=cross_kv_scales, task=is_trained_default(ckpt.directory))
    return config, report


def _build_by_layer(ckpt, opts: LLMBuildOptions, work: Path, tmp: Path, samples, *, fidelity: bool, device,
                    resume: bool | None) -> tuple[dict, dict | None]:
    """The layer-at-a-time path (builder/layerwise.py) and its report."""
    import torch

    tokenizer = NVLMTokenizer.from_dir(ckpt.directory, chat_format=opts.chat_format)
    tokenizer.check_vocab(ckpt.config.llm.vocab_size)
    if opts.fmt.quantized:
        log.info("calibrating %s on %d multimodal samples, a decoder layer at a time", opts.fmt.name, len(samples))
    config, measured = build_layerwise(ckpt, opts, work, tmp, tokenizer=tokenizer, samples=samples,
                                       fidelity=fidelity, device=device, resume=resume)
    if not fidelity:
        return config, None
    extra = []
    if is_trained_default(ckpt.directory):  # the embedded default is tiny: its task questions run whole
        extra.append(task_check(ReferenceExecutor.load(tmp), reference_model(
            ckpt, decoder_stored_as=getattr(torch, opts.fmt.dtype)), tokenizer))
    return config, finish(opts.fmt.name, measured, extra)


def build_llm(ckpt_path, out, opts: LLMBuildOptions, *, calib_data=None, calib_size: int = 32, force: bool = False,
              fidelity: bool = True, preflight: bool = True, layerwise: str = "auto", device: str = "auto",
              resume: bool | None = False, layer_work: Path | None = None) -> dict:
    """Build and publish; returns the summary written to OUT/nvlm_build.json (plus the wall seconds).
    `layerwise`: auto|on|off (`choose_layerwise`); `device`: where the layer-at-a-time path computes (auto: CUDA
    when there is one); `resume`: continue a killed layer-at-a-time quantization from its work folder (None:
    when that folder holds one of these options); `layer_work`: that folder (default OUT.layerwise)."""
    out = Path(out)
    ckpt = Checkpoint.open(ckpt_path)
    validate(ckpt.config, opts)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it, or choose another output")
    by_layer = choose_layerwise(ckpt, opts, layerwise, fidelity=fidelity, calib_size=calib_size)
    work = Path(layer_work) if layer_work is not None else work_dir(out)
    if resume and not (by_layer and opts.fmt.quantized):
        raise InputError("--resume continues a layer-at-a-time quantization: it needs a quantized --quant and "
                         "--layerwise on (or auto on a host where the whole model does not fit)")
    dev = layer_stream.resolve_device(device) if by_layer else None
    largest = largest_stored_tensor(ckpt.config, ckpt.tensors)
    needs = HostNeeds((llm_need(ckpt.config, opts.fmt, fidelity=fidelity, largest_tensor=largest,
                                group_size=opts.awq_group_size, layerwise=by_layer, calib_size=calib_size),))
    log.info("%s%s", needs.summary(), f"; a decoder layer at a time on {dev}" if by_layer else "")
    if preflight:
        check(needs, out, command="nvlm-build llm", remedies=remedies_for(ckpt.config, opts.fmt, needs,
                                                                          fidelity=fidelity, largest_tensor=largest))
    samples = None
    if opts.fmt.quantized:  # resolve calibration data before any heavy work
        samples = select(load_calib_data(calib_data) if calib_data else builtin_samples(max(calib_size, 4)), calib_size)
    summary: dict = {}

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        if by_layer:
            config, report = _build_by_layer(ckpt, opts, work, tmp, samples, fidelity=fidelity, device=dev,
                                             resume=resume)
        else:
            config, report = _build_whole(ckpt, opts, tmp, samples, fidelity=fidelity)
        if report is not None:
            (tmp / "reports").mkdir()
            (tmp / "reports" / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
            if not report["passed"]:
                failed = out.with_name(out.name + ".fidelity-failed.json")
                failed.write_text(json.dumps(report, indent=2) + "\n")
                bad = [c["name"] for c in report["checks"] if not c["passed"]]
                raise FidelityError(f"fidelity checks failed ({', '.join(bad)}); report kept in {failed}; "
                                    "nothing was published")
        summary.update({
            "tool": "nvlm-trt", "version": __version__, "stage": "llm", "source": str(ckpt.directory),
            "format": opts.fmt.name, "tp": opts.tp, "pp": opts.pp, "kv_cache_dtype": kv_cache_name(True) if opts.kv_cache_fp8 else None,
            "awq_group_size": opts.awq_group_size if opts.fmt.awq else None,
            "calibration": None if samples is None else {
                "source": str(calib_data) if calib_data else "builtin", "samples": len(samples),
                "multimodal": sum(s.image is not None for s in samples)},
            "quantization": config["quantization"], "fidelity_passed": None if report is None else report["passed"],
            "layerwise": by_layer,
            "seconds": round(time.perf_counter() - t0, 2),
        })
        # wall time is returned, not written: two identical builds give byte-identical checkpoints
        (tmp / "nvlm_build.json").write_text(
            json.dumps({k: v for k, v in summary.items() if k != "seconds"}, indent=2) + "\n")

    publish_dir(out, write, force=force)
    if by_layer:  # published: the per-layer work is no longer needed for a resume
        shutil.rmtree(work, ignore_errors=True)
    return summary
