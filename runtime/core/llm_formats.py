"""Quantization formats: each one class instance, the one place that describes it.

An `LLMFormat` says everything nvlm-trt needs to know of an LLM weight format: its name (the
`--quant` choice), the modelopt configuration (deep-copied from modelopt, never re-typed; its
defaults leave `lm_head`, vision towers and projectors unquantized), the TensorRT-LLM `quant_algo`
the exported checkpoint carries, bytes per parameter (inspect, sizing, the roofline), the AWQ group
sizes TensorRT-LLM accepts, whether it computes in FP8, and how the reference executor dequantizes
a stored linear layer. `VisionFormat` does the same for the vision encoder's FP8 ONNX.
Unquantized formats go through the streaming converter (no model in memory).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .config import NVLMConfig
from .errors import NVLMError
from .families import family_for


class UnsupportedCombinationError(NVLMError):
    """Format × architecture × parallelism cannot be built; the message says what works."""


FP8_MAX = 448.0  # float8 e4m3


def q8(x):
    """Round to float8 e4m3 (saturating) and back."""
    import torch

    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def kv_scale(amax: float) -> float:
    """The FP8 KV-cache scale a checkpoint stores for an attention whose keys/values reach `amax`: amax / 448,
    at least 1.0 (modelopt's export clamps it so: `get_kv_cache_scaling_factor`)."""
    return max(float(amax) / FP8_MAX, 1.0)


def kv_round(x, scale):
    """Keys or values as an FP8 KV cache with `scale` gives them back: q8(x / scale) · scale."""
    return q8(x.float() / scale) * scale


def unpack_int4(packed):
    """[out/2, in] int8 → [out, in] float in [-8, 7]: byte (p, i) holds rows 2p (low nibble), 2p+1 (high)."""
    import torch

    b = packed.view(torch.uint8).to(torch.int16)
    lo = ((b & 0xF) ^ 8) - 8
    hi = ((b >> 4) ^ 8) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1, packed.shape[1]).float()


@dataclass(frozen=True)
class StoredLinear:
    """A linear layer as the engine computes it, dequantized: y = act(x ⊙ pqs) Wᵀ (+ b)."""
    weight: object  # float32 [out, in]
    prequant_scale: object | None = None  # AWQ: per input channel, applied before quantizing x
    act_scale: object | None = None  # FP8 activations: x → q8(x / a)·a


@dataclass(frozen=True)
class LLMFormat:
    name: str
    dtype: str  # activation / unquantized-weight dtype of the TensorRT-LLM checkpoint
    modelopt_cfg: str | None  # attribute of modelopt.torch.quantization; None = streaming conversion
    quant_algo: str | None  # what the exported checkpoint's quantization.quant_algo must say
    weight_bits: int = 16  # of the decoder's linear weights
    fp8_compute: bool = False  # GEMMs run at the FP8 rate (FP8 activations)
    group_sizes: tuple[int, ...] = ()  # AWQ: groups of input channels TensorRT-LLM 1.2 accepts
    plan_kv_fp8: bool = False  # inspect's memory plan and the roofline pair it with an FP8 KV cache
    fp8_context_fmha: bool = False  # with an FP8 KV cache, trtllm-build --use_fp8_context_fmha (Hopper)

    @property
    def quantized(self) -> bool:
        return self.modelopt_cfg is not None

    @property
    def awq(self) -> bool:  # int4 weights in groups along the input dimension
        return bool(self.group_sizes)

    @property
    def fp8_weights(self) -> bool:  # per-tensor FP8 weights, stored as e4m3 bytes with one scale
        return self.quant_algo == "FP8"

    def linear_bytes_per_param(self, group_size: int = 128) -> float:
        """Bytes per decoder linear weight: AWQ adds one 16-bit scale per group of input channels."""
        return self.weight_bits / 8 + (2.0 / group_size if self.awq else 0.0)

    def dequantize(self, get, prefix: str) -> StoredLinear:
        """What the engine computes from the stored tensors `prefix`+… of one rank (`get(name)` → tensor
        or None). Formats as TensorRT-LLM stores them:
        FP8: W8·s, activations q8(x/a)·a; W4A16_AWQ: int4 packed two per int8 along the output dim,
        one scale per group; W4A8_AWQ: W4A16 re-quantized to FP8 with a second scale, FP8 activations."""
        import torch

        w = get(prefix + "weight")
        if self.quant_algo is None or w.dtype in (torch.bfloat16, torch.float16, torch.float32):
            return StoredLinear(w.float())  # unquantized (or a layer the format leaves in 16 bits)
        if self.fp8_weights:
            return StoredLinear(w.float() * get(prefix + "weights_scaling_factor").float(),
                                act_scale=get(prefix + "activation_scaling_factor").float())
        q = unpack_int4(w)
        s = get(prefix + "weights_scaling_factor").float()  # [out, in / group]
        weight = q * s.repeat_interleave(q.shape[1] // s.shape[1], dim=1)
        pqs = get(prefix + "prequant_scaling_factor").float()
        if self.quant_algo == "W4A16_AWQ":
            return StoredLinear(weight, prequant_scale=pqs)
        s2 = get(prefix + "weights_scaling_factor_2").float()
        return StoredLinear(q8(weight / s2) * s2, prequant_scale=pqs,
                            act_scale=get(prefix + "activation_scaling_factor").float())

    def modelopt_config(self, kv_cache_fp8: bool, awq_group_size: int) -> dict:
        import modelopt.torch.quantization as mtq

        cfg = copy.deepcopy(getattr(mtq, self.modelopt_cfg))
        entries = list(cfg["quant_cfg"])
        if self.awq and awq_group_size != 128:
            for e in entries:
                block = e.get("cfg", {}).get("block_sizes") if isinstance(e.get("cfg"), dict) else None
                if block and -1 in block:
                    block[-1] = awq_group_size
                for sub in e.get("cfg", []) if isinstance(e.get("cfg"), list) else []:
                    if "block_sizes" in sub and -1 in sub["block_sizes"]:
                        sub["block_sizes"][-1] = awq_group_size
        if kv_cache_fp8:
            entries += copy.deepcopy(list(mtq.FP8_KV_CFG["quant_cfg"]))
        cfg["quant_cfg"] = entries
        return cfg


FORMATS: dict[str, LLMFormat] = {f.name: f for f in (
    LLMFormat("bf16", "bfloat16", None, None),
    LLMFormat("fp16", "float16", None, None),
    LLMFormat("fp8", "bfloat16", "FP8_DEFAULT_CFG", "FP8", weight_bits=8, fp8_compute=True, plan_kv_fp8=True,
              fp8_context_fmha=True),
    LLMFormat("int4_awq", "bfloat16", "INT4_AWQ_CFG", "W4A16_AWQ", weight_bits=4, group_sizes=(64, 128)),
    # TensorRT-LLM 1.2's groupwise quantized linear layers refuse W4A8-AWQ with group size 64
    # (validate_group_size raises NotImplementedError): 128 only.
    LLMFormat("w4a8_awq", "bfloat16", "W4A8_AWQ_BETA_CFG", "W4A8_AWQ", weight_bits=4, fp8_compute=True,
              group_sizes=(128,)),
)}
ALGOS: dict[str | None, LLMFormat] = {f.quant_algo: f for f in FORMATS.values() if f.quantized}
ALGOS[None] = FORMATS["bf16"]


# --kv-cache-dtype: "auto" keeps the engine's activation dtype; "fp8" is a calibrated FP8 KV cache
# (kv_cache_quant_algo FP8, one scale per attention layer)
KV_CACHE_DTYPES = ("auto", "fp8")


KV_CACHE_FP8_ALGO = "FP8"  # a TensorRT-LLM checkpoint's quantization.kv_cache_quant_algo for the FP8 cache


def kv_cache_is_fp8(quantization: dict | None) -> bool:
    """Whether a TensorRT-LLM checkpoint's quantization section declares the FP8 KV cache."""
    return (quantization or {}).get("kv_cache_quant_algo") == KV_CACHE_FP8_ALGO


def awq_group_help() -> str:
    """The --awq-group-size choices per format, from the formats themselves."""
    return "; ".join(f"{f.name}: {' or '.join(map(str, f.group_sizes))}" for f in FORMATS.values() if f.awq)


def kv_cache_fp8(choice: str | None) -> bool:
    """Whether a --kv-cache-dtype choice (as given or as recorded in a manifest) is the FP8 cache."""
    return choice == KV_CACHE_DTYPES[1]


def kv_cache_name(fp8: bool) -> str:
    return KV_CACHE_DTYPES[1] if fp8 else KV_CACHE_DTYPES[0]


def get_format(name: str) -> LLMFormat:
    if name not in FORMATS:
        raise UnsupportedCombinationError(f"unknown --quant {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_for_algo(quant_algo: str | None) -> LLMFormat:
    """The format of a TensorRT-LLM checkpoint, from its `quantization.quant_algo`."""
    if quant_algo not in ALGOS:
        known = ", ".join(str(a) for a in ALGOS)
        raise UnsupportedCombinationError(f"quant_algo {quant_algo!r} is not one of nvlm-trt's formats ({known})")
    return ALGOS[quant_algo]


@dataclass(frozen=True)
class VisionFormat:
    """A quantized vision encoder: an extra Q/DQ ONNX written by modelopt's ONNX quantization."""
    name: str
    modelopt_mode: str  # modelopt.onnx.quantization quantize_mode
    onnx_suffix: str  # vision_encoder.<suffix>.onnx
    bytes_per_param: float
    fp8_compute: bool

    def onnx_name(self) -> str:
        return f"vision_encoder.{self.onnx_suffix}.onnx"


VISION_FORMATS: dict[str, VisionFormat] = {"fp8": VisionFormat("fp8", "fp8", "fp8", 1.0, True)}


def get_vision_format(name: str | None) -> VisionFormat | None:
    if name is None:
        return None
    if name not in VISION_FORMATS:
        raise UnsupportedCombinationError(f"--vision-quant {name!r}: choose one of {', '.join(VISION_FORMATS)}")
    return VISION_FORMATS[name]


@dataclass(frozen=True)
class LLMBuildOptions:
    fmt: LLMFormat
    tp: int = 1
    pp: int = 1
    kv_cache_fp8: bool = False
    awq_group_size: int = 128
    # how calibration, fidelity and served prompts are rendered (runtime/chat_format.py): the release's
    # model.chat() format by default, or "tokenizer" (its chat_template)
    chat_format: str = "release"

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def _awq_inputs(cfg: NVLMConfig, tp: int) -> dict[str, int]:
    """Input dimension of every quantized GEMM on one TP rank (column-parallel ones see the full input)."""
    llm = cfg.llm
    return {"qkv / fc / gate (hidden_size)": llm.hidden_size,
            f"attention.dense (heads·head_dim / TP{tp})": llm.num_heads * llm.head_dim // tp,
            f"mlp.proj (intermediate_size / TP{tp})": llm.intermediate_size // tp}


def _awq_ok(cfg: NVLMConfig, tp: int, group: int) -> bool:
    return all(d % group == 0 for d in _awq_inputs(cfg, tp).values())


def validate(cfg: NVLMConfig, opts: LLMBuildOptions) -> None:
    """Refuse impossible combinations before any work starts, saying what would work."""
    llm, fmt = cfg.llm, opts.fmt
    if family_for(cfg).trtllm_layout is None:
        raise UnsupportedCombinationError(
            f"{cfg.architecture} ({cfg.family}): no TensorRT-LLM converter for this family yet, so it cannot be built; "
            "`nvlm-build inspect` and `nvlm-build reference` run it on the CPU reference")
    if opts.tp < 1 or opts.pp < 1:
        raise UnsupportedCombinationError(f"--tp and --pp must be ≥ 1 (got {opts.tp}, {opts.pp})")
    if llm.num_heads % opts.tp or llm.num_kv_heads % opts.tp:
        ok = [t for t in (1, 2, 4, 8, 16) if llm.num_heads % t == 0 and llm.num_kv_heads % t == 0]
        raise UnsupportedCombinationError(
            f"--tp {opts.tp} must divide the {llm.num_heads} attention heads and {llm.num_kv_heads} KV heads; "
            f"valid: {ok}")
    if llm.num_layers % opts.pp:
        ok = [p for p in range(1, llm.num_layers + 1) if llm.num_layers % p == 0 and p <= 16]
        raise UnsupportedCombinationError(f"--pp {opts.pp} must divide the {llm.num_layers} layers; valid: {ok}")
    if opts.kv_cache_fp8 and not fmt.quantized:
        raise UnsupportedCombinationError(
            f"--kv-cache-dtype fp8 needs calibrated KV scales; use it with a quantized format (fp8, int4_awq, "
            f"w4a8_awq), not {fmt.name}")
    if fmt.awq:
        g = opts.awq_group_size
        if g not in fmt.group_sizes:
            raise UnsupportedCombinationError(
                f"--awq-group-size {g}: TensorRT-LLM 1.2 accepts {' or '.join(map(str, fmt.group_sizes))} for "
                f"{fmt.name}")
        if not _awq_ok(cfg, opts.tp, g):
            bad = {k: v for k, v in _awq_inputs(cfg, opts.tp).items() if v % g}
            works = [f"TP{t} with group {gs}" for t in (1, 2, 4, 8) for gs in fmt.group_sizes
                     if llm.num_heads % t == 0 and llm.num_kv_heads % t == 0 and _awq_ok(cfg, t, gs)]
            detail = ", ".join(f"{k} = {v}" for k, v in bad.items())
            raise UnsupportedCombinationError(
                f"{fmt.name} quantizes in groups of {g} input channels, but at TP{opts.tp} {detail} "
                f"{'is' if len(bad) == 1 else 'are'} not a multiple of {g}. What works for this model: "
                f"{'; '.join(works) if works else 'none — use fp8'} (or fp8 at any TP)."
            )
