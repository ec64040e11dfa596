"""What both LLM build paths (whole model: builder/llm_build.py; a layer at a time: builder/layerwise.py) do with
modelopt's fake-quantized modules and its export: the stored values, a quiet modelopt, our config.json."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from runtime.core.errors import NVLMError
from runtime.core.llm_formats import FP8_MAX, KV_CACHE_FP8_ALGO, LLMBuildOptions, kv_cache_is_fp8, q8
from runtime.core.trtllm_checkpoint import trtllm_config

log = logging.getLogger(__name__)


def as_stored(model, opts: LLMBuildOptions):
    """Make the fake-quantized model's FP8 weights (and FP8 KV-cache scales) the values the checkpoint stores.

    The export casts W / s to e4m3 (round to nearest, ties to even) and the engine multiplies those bytes by s;
    modelopt's CPU fake quantization reaches the same e4m3 grid through another float computation of W / s,
    and a bf16 weight that sits exactly halfway between two e4m3 values — common, since both W and the
    scale's amax are bf16 values — lands on the other neighbour (measured: 168 → 176 instead of 160 on the
    released-layout test checkpoint, a 2% error in that layer's outputs that the fidelity report then
    charged to the checkpoint). The weights are replaced by q8(W / s) · s from the model's own W and
    scale — not read back from the checkpoint, so a wrong stored value or scale still shows — and the
    weight quantizers switched off; activations stay modelopt's."""
    import torch

    if opts.kv_cache_fp8:
        _kv_as_stored(model)
    if not opts.fmt.fp8_weights:
        return model
    with torch.no_grad():
        for module in model.modules():
            wq = getattr(module, "weight_quantizer", None)
            if wq is None or not wq.is_enabled or getattr(wq, "num_bits", None) != (4, 3) or wq.amax is None:
                continue
            scale = wq.amax.float() / FP8_MAX
            module.weight.copy_((q8(module.weight.float() / scale) * scale).to(module.weight.dtype))
            wq.disable()
    return model


def _kv_as_stored(model) -> None:
    """The FP8 KV cache as the checkpoint stores it: one `kv_cache_scaling_factor` per layer for K and V both —
    the larger of the two scales, each clamped to at least 1.0 (modelopt's export: `get_kv_cache_scaling_factor`
    and its K/V merge) — where modelopt's fake quantization rounds K and V each with its own amax / 448. The
    engine rounds with the stored scale, so the reference does too (measured: the last 0.02–0.05 of the
    FP8-KV fidelity difference)."""
    import torch
    from modelopt.torch.export.quant_utils import get_kv_cache_scaling_factor

    with _quiet():
        for module in model.modules():
            k, v = getattr(module, "k_bmm_quantizer", None), getattr(module, "v_bmm_quantizer", None)
            if k is None or v is None or not (k.is_enabled and v.is_enabled) or k.amax is None or v.amax is None:
                continue
            scales = [x for x in get_kv_cache_scaling_factor(module) if x is not None]
            stored = torch.stack([x.float().reshape(()) for x in scales]).max()
            for q in (k, v):
                q.amax = (stored * FP8_MAX).to(q.amax.dtype).reshape(q.amax.shape)


@contextlib.contextmanager
def _quiet():
    """modelopt prints progress to stdout and warns that tensorrt_llm is absent (harmless on CPU);
    keep both out of the user's output, but in the debug log."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        yield
    if buf.getvalue().strip():
        log.debug("modelopt: %s", buf.getvalue().strip())


def quantized_config(ckpt, opts: LLMBuildOptions, exported: dict) -> dict:
    """Our config.json from the one modelopt's export wrote: its quantization section, checked against the
    format asked for."""
    q = exported["quantization"]
    if q.get("quant_algo") != opts.fmt.quant_algo:
        raise NVLMError(f"modelopt exported quant_algo {q.get('quant_algo')!r}, expected {opts.fmt.quant_algo!r}; "
                        "this modelopt version is not supported")
    if opts.kv_cache_fp8 and not kv_cache_is_fp8(q):
        raise NVLMError(f"modelopt exported kv_cache_quant_algo {q.get('kv_cache_quant_algo')!r}, expected "
                        f"{KV_CACHE_FP8_ALGO!r}")
    config = trtllm_config(ckpt.config, opts, q)
    config["producer"]["modelopt"] = exported.get("producer", {}).get("version")
    return config
