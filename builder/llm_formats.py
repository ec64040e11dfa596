"""LLM weight formats for `nvlm-build llm`: a registry of format objects, validated up front.

Quantized formats reuse NVIDIA Model Optimizer's own configs (deep-copied, never re-typed);
their defaults already leave `lm_head`, vision towers and projectors unquantized. Unquantized
formats go through the streaming converter instead (no model in memory).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .config import NVLMConfig
from .errors import NVLMError


class UnsupportedCombinationError(NVLMError):
    """Format × architecture × parallelism cannot be built; the message says what works."""


@dataclass(frozen=True)
class LLMFormat:
    name: str
    dtype: str  # activation / unquantized-weight dtype of the TensorRT-LLM checkpoint
    modelopt_cfg: str | None  # attribute of modelopt.torch.quantization; None = streaming conversion
    quant_algo: str | None  # what the exported checkpoint's quantization.quant_algo must say
    awq: bool = False  # int4 weights in groups along the input dimension

    @property
    def quantized(self) -> bool:
        return self.modelopt_cfg is not None

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
    LLMFormat("fp8", "bfloat16", "FP8_DEFAULT_CFG", "FP8"),
    LLMFormat("int4_awq", "bfloat16", "INT4_AWQ_CFG", "W4A16_AWQ", awq=True),
    LLMFormat("w4a8_awq", "bfloat16", "W4A8_AWQ_BETA_CFG", "W4A8_AWQ", awq=True),
)}
AWQ_GROUP_SIZES = (64, 128)  # what TensorRT-LLM's W4A16/W4A8 AWQ kernels accept


def get_format(name: str) -> LLMFormat:
    if name not in FORMATS:
        raise UnsupportedCombinationError(f"unknown --quant {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


@dataclass(frozen=True)
class BuildOptions:
    fmt: LLMFormat
    tp: int = 1
    pp: int = 1
    kv_cache_fp8: bool = False
    awq_group_size: int = 128

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


def validate(cfg: NVLMConfig, opts: BuildOptions) -> None:
    """Refuse impossible combinations before any work starts, saying what would work."""
    llm, fmt = cfg.llm, opts.fmt
    if cfg.family != "nvlm-d":
        raise UnsupportedCombinationError(f"the LLM converter supports NVLM-D checkpoints, not {cfg.family}")
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
    if (llm.vocab_size % opts.tp) != 0:
        raise UnsupportedCombinationError(f"vocab_size {llm.vocab_size} is not divisible by --tp {opts.tp}")
    if opts.kv_cache_fp8 and not fmt.quantized:
        raise UnsupportedCombinationError(
            f"--kv-cache-dtype fp8 needs calibrated KV scales; use it with a quantized format (fp8, int4_awq, "
            f"w4a8_awq), not {fmt.name}")
    if fmt.awq:
        g = opts.awq_group_size
        if g not in AWQ_GROUP_SIZES:
            raise UnsupportedCombinationError(f"--awq-group-size {g}: TensorRT-LLM accepts {AWQ_GROUP_SIZES}")
        if not _awq_ok(cfg, opts.tp, g):
            bad = {k: v for k, v in _awq_inputs(cfg, opts.tp).items() if v % g}
            works = [f"TP{t} with group {gs}" for t in (1, 2, 4, 8) for gs in AWQ_GROUP_SIZES
                     if llm.num_heads % t == 0 and llm.num_kv_heads % t == 0 and _awq_ok(cfg, t, gs)]
            detail = ", ".join(f"{k} = {v}" for k, v in bad.items())
            raise UnsupportedCombinationError(
                f"{fmt.name} quantizes in groups of {g} input channels, but at TP{opts.tp} {detail} "
                f"{'is' if len(bad) == 1 else 'are'} not a multiple of {g}. What works for this model: "
                f"{'; '.join(works) if works else 'none — use fp8'} (or fp8 at any TP)."
            )
