"""Roofline lower bounds for NVLM on H100s: what no implementation can beat.

    TTFT ≥ vision FLOPs / vision peak  +  prefill FLOPs / (LLM peak · TP)
    TPOT ≥ (LLM weight bytes + KV bytes read) per GPU / HBM bandwidth

FLOPs count multiply-adds as 2. Vision: every linear of InternViT over 1025 tokens per tile, the
attention score and value products, and mlp1 over 256 tokens per tile; the vision encoder runs on
one GPU. Prefill: every decoder linear over the prompt, the attention products (causal: half of
S²), lm_head for the last position only; NVLM-X/H add their cross-attention layers: q, o and the MLP
over the prompt, k and v over the image keys, and the attention products of every prompt token with
every key (an upper bound: X's tile tags read one tile); a request without image keys skips them. The prompt is the family's decoder sequence
(`inspect.request_shape`: text tokens, tile tags included, plus the tiles read inline — all of them
for NVLM-D, the thumbnail for NVLM-H, none for NVLM-X). Decode reads every weight byte once per token
plus the KV cache of the context and, NVLM-X/H, the image keys' cross-attention cache. Peak rates from docs/upstream.md, Hardware figures (configurable): H100 SXM 990 dense bf16
TFLOP/s, 1979 fp8, 3.35 TB/s HBM. Weight formats' compute rates: bf16/fp16 and int4_awq (W4A16
computes in 16 bit) at the bf16 rate; fp8 and w4a8_awq at the fp8 rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.core.build_dir import read_manifest
from runtime.core.checkpoint import plan_config
from runtime.core.config import NVLMConfig
from runtime.core.errors import InputError
from runtime.core.families import LLM, PROJECTOR, family_for
from runtime.core.gpus import GPU, GPUS  # noqa: F401  (GPU, GPUS: the roofline's hardware, re-exported for bench)
from runtime.core.inspect import cross_kv_bytes_per_key, kv_bytes_per_token, llm_breakdown, llm_bytes, request_shape
from runtime.core.llm_formats import get_format, get_vision_format, kv_cache_fp8


def vision_flops(cfg: NVLMConfig, tiles: int) -> float:
    v = cfg.vision
    n = v.num_positions  # 1025 tokens per tile (CLS included)
    # qkv and proj run at the attention width (padding heads included: NVLM-D-72B computes 32 heads, 25 real)
    per_layer_linear = 2 * n * (4 * v.hidden_size * v.attn_dim + 2 * v.hidden_size * v.intermediate_size)
    per_layer_attn = 2 * 2 * n * n * v.attn_dim  # QKᵀ and (softmax)V
    mlp1 = family_for(cfg).component(PROJECTOR).num_params(cfg)
    projector = 2 * cfg.preprocess.tokens_per_tile * mlp1
    return tiles * (v.num_layers * (per_layer_linear + per_layer_attn) + projector)


def prefill_flops(cfg: NVLMConfig, prompt_tokens: int, key_tokens: int = 0) -> float:
    llm = cfg.llm
    linear = 2 * prompt_tokens * llm_breakdown(cfg, (LLM,)).linear  # the self-attention stack
    attention = llm.num_layers * 2 * 2 * (prompt_tokens * prompt_tokens / 2) * llm.num_heads * llm.head_dim
    lm_head = 2 * llm.hidden_size * llm.vocab_size  # the last position's logits
    return linear + attention + lm_head + cross_attention_flops(cfg, prompt_tokens, key_tokens)


def cross_attention_flops(cfg: NVLMConfig, prompt_tokens: int, key_tokens: int) -> float:
    llm, n = cfg.llm, len(cfg.cross_attention_layers) if key_tokens else 0  # no keys: the blocks are skipped
    q_dim, kv_dim = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    query_side = 2 * llm.hidden_size * q_dim + 3 * llm.hidden_size * llm.intermediate_size  # q, o, the MLP
    key_side = 2 * llm.hidden_size * kv_dim  # k, v: once per key and request
    attention = 2 * 2 * prompt_tokens * key_tokens * q_dim
    return n * (2 * prompt_tokens * query_side + 2 * key_tokens * key_side + attention)


def llm_weight_bytes(cfg: NVLMConfig, fmt: str) -> float:
    return llm_bytes(cfg, get_format(fmt), embedding=False)  # decode reads one embedding row, not the table


@dataclass(frozen=True)
class Roofline:
    gpu: str
    fmt: str
    tp: int
    tiles: int
    prompt_tokens: int
    context_tokens: int
    key_tokens: int
    vision_tflop: float
    prefill_tflop: float
    ttft_ms: float
    tpot_ms: float
    weight_gb_per_gpu: float
    kv_gb_per_gpu: float

    def as_dict(self) -> dict:
        return asdict(self)


def roofline(cfg: NVLMConfig, fmt: str, tp: int, *, tiles: int = 7, text_tokens: int = 64,
             output_tokens: int = 128, gpu: GPU = GPUS["h100-sxm"], kv_fp8: bool | None = None,
             vision_fp8: bool = False) -> Roofline:
    shape = request_shape(cfg, [tiles] if tiles else [], text_tokens)
    prompt, keys = shape.decoder_tokens, shape.key_tokens
    llm_peak = (gpu.fp8_tflops if get_format(fmt).fp8_compute else gpu.bf16_tflops) * 1e12
    vision_peak = (gpu.fp8_tflops if vision_fp8 else gpu.bf16_tflops) * 1e12
    vf, pf = vision_flops(cfg, tiles), prefill_flops(cfg, prompt, keys)
    ttft = vf / vision_peak + pf / (llm_peak * tp)
    kv_fp8 = get_format(fmt).plan_kv_fp8 if kv_fp8 is None else kv_fp8
    context = prompt + output_tokens // 2  # mean context over the generated tokens
    weights = llm_weight_bytes(cfg, fmt) / tp
    kv_bytes = 1 if kv_fp8 else 2
    kv = context * kv_bytes_per_token(cfg, kv_bytes, tp) + keys * cross_kv_bytes_per_key(cfg, kv_bytes, tp)
    tpot = (weights + kv) / (gpu.hbm_tbps * 1e12)
    return Roofline(gpu.name, fmt, tp, tiles, prompt, context, keys, vf / 1e12, pf / 1e12, ttft * 1e3, tpot * 1e3,
                    weights / 1e9, kv / 1e9)


def decode_bound(r: Roofline, cfg: NVLMConfig, batch: int, gpu: GPU) -> dict:
    """The decode throughput bound at `batch` requests in flight: each step reads the weights once and every
    request's KV cache (memory bound), and computes ~2 FLOP per LLM parameter per request (compute bound); the
    slower of the two sets the step. Tokens/s over the whole deployment (all TP ranks together)."""
    per_gpu_bytes = r.weight_gb_per_gpu * 1e9 + batch * r.kv_gb_per_gpu * 1e9
    memory_s = per_gpu_bytes / (gpu.hbm_tbps * 1e12)
    params = llm_weight_bytes(cfg, "bf16") / 2
    peak = (gpu.fp8_tflops if get_format(r.fmt).fp8_compute else gpu.bf16_tflops) * 1e12
    compute_s = batch * 2 * params / r.tp / peak
    step = max(memory_s, compute_s)
    return {"batch": batch, "step_ms": step * 1e3, "bound": "memory" if memory_s >= compute_s else "compute",
            "tokens_per_s": batch / step}


# --------------------------------------------------------------------------- a build's roofline


@dataclass(frozen=True)
class BuildFacts:
    """What a roofline needs from a build: the NVLM config and the options it was built with."""

    cfg: NVLMConfig
    fmt: str
    tp: int
    kv_fp8: bool | None
    vision_fp8: bool
    served_target: str | None  # "trt" (engines on GPUs) or "reference" (the CPU stand-in)


def served_target(manifest: dict) -> str | None:
    """What a build's Triton repository serves: "trt" (engines on GPUs) or "reference" (CPU stand-in)."""
    return manifest.get("stages", {}).get("triton_repo", {}).get("details", {}).get("target")


def build_facts(path: str | Path, *, checkpoint: str | Path | None = None, quant: str | None = None,
                tp: int | None = None, manifest: dict | None = None) -> BuildFacts:
    """From a build directory (its manifest.json names the source checkpoint and the options), or
    from a checkpoint / config.json directly (then quant and tp come from the arguments)."""

    path = Path(path)
    m = manifest if manifest is not None else read_manifest(path)
    source, kv_fp8, vision_fp8, target = path, None, False, None
    if m is not None:
        opts = m["options"]
        source = Path(checkpoint) if checkpoint else Path(m["source"]["path"])
        quant, tp = quant or opts["quant"], tp or opts["tp"]
        kv_fp8 = kv_cache_fp8(opts.get("kv_cache_dtype"))
        vision = get_vision_format(opts.get("vision_quant"))
        vision_fp8 = vision is not None and vision.fp8_compute
        target = served_target(m)
    elif checkpoint:
        source = Path(checkpoint)
    if not (source / "config.json").is_file() and not source.is_file():
        raise InputError(f"{source}: no config.json — pass a build directory whose source checkpoint is still there, "
                         "the checkpoint itself, or --checkpoint DIR")
    return BuildFacts(plan_config(source), quant or "bf16", tp or 1, kv_fp8, vision_fp8, target)


def facts_roofline(facts: BuildFacts, gpu: GPU, *, tiles: int, text_tokens: int, output_tokens: int) -> Roofline:
    return roofline(facts.cfg, facts.fmt, facts.tp, tiles=tiles, text_tokens=text_tokens,
                    output_tokens=output_tokens, gpu=gpu, kv_fp8=facts.kv_fp8, vision_fp8=facts.vision_fp8)
