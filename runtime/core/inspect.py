"""`nvlm-build inspect`: what a checkpoint is, and whether it fits H100s.

Works from `config.json` alone: parameter counts come from the weight-map tables (the same
tables that load and validate weights), so users can plan before downloading 150 GB. When
weights are present, their shards, bytes and dtypes are reported too.

Memory-plan conventions (stated in the output, see docs/inspect.md):
- the LLM's linear weights take the format's bytes per parameter (bf16 2, fp8 1, int4-AWQ
  0.5 plus one fp16 scale per 128-weight group); embeddings, lm_head, norms and biases stay
  16-bit (modelopt's defaults leave lm_head unquantized);
- LLM weights and KV heads are split evenly over TP ranks (KV heads replicated when TP
  exceeds them); the vision encoder and projector run unsharded in 16-bit on GPU 0, so the
  reported per-GPU figure is GPU 0's, the largest;
- a fixed reserve covers activations, workspace and the CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint, plan_config, refuse_pickle
from .config import NVLMConfig
from .families import DECODER_ROLES, QUANTIZED_ROLES, family_for
from .gpus import GPUS
from .llm_formats import FORMATS

SCHEMA = "nvlm-trt/inspect/v1"
GIB = 1024**3
H100_MEMORY_BYTES = GPUS["h100-sxm"].memory_bytes
RESERVE_BYTES = 6 * GIB
DEFAULT_KV_TOKENS = 32768  # e.g. 4 concurrent requests of 8k tokens, or 16 of 2k
TP_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class LLMBreakdown:
    embedding: int
    lm_head: int
    linear: int  # 2-D weights inside decoder layers: what quantization touches
    other: int  # norms and biases

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.linear + self.other


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def llm_breakdown(cfg: NVLMConfig, roles: tuple[str, ...] = DECODER_ROLES) -> LLMBreakdown:
    """Parameters of the decoder (its self-attention stack and, NVLM-X/H, its cross-attention layers: both sit
    on the LLM's GPUs, sharded over TP, and are what quantization touches), by kind."""
    parts = {"embedding": 0, "lm_head": 0, "linear": 0, "other": 0}
    rows = [row for comp in family_for(cfg).components if comp.name in roles for row in comp.expand(cfg)]
    for _, target, shape in rows:
        if "embed_tokens" in target:
            key = "embedding"
        elif target.startswith("lm_head"):
            key = "lm_head"
        elif len(shape) == 2:
            key = "linear"
        else:
            key = "other"
        parts[key] += _numel(shape)
    return LLMBreakdown(**parts)


def llm_bytes(cfg: NVLMConfig, fmt, group_size: int = 128, *, embedding: bool = True) -> int:
    """Bytes of the decoder's weights in format `fmt` (an LLMFormat): the linear layers of the quantized
    components at the format's width, everything else in 16 bits — norms, lm_head, the embedding (unless
    `embedding` is False: decoding reads one row of it) and NVLM-X/H's cross-attention blocks."""
    every, quantized = llm_breakdown(cfg), llm_breakdown(cfg, QUANTIZED_ROLES)
    plain = every.linear - quantized.linear + every.lm_head + every.other + (every.embedding if embedding else 0)
    return int(quantized.linear * fmt.linear_bytes_per_param(group_size) + 2 * plain)


def kv_bytes_per_token(cfg: NVLMConfig, dtype_bytes: int, tp: int = 1) -> int:
    """K and V for every layer of one token, on one TP rank."""
    kv_heads_per_rank = max(1, cfg.llm.num_kv_heads // tp)
    return 2 * cfg.llm.num_layers * kv_heads_per_rank * cfg.llm.head_dim * dtype_bytes


def cross_kv_bytes_per_key(cfg: NVLMConfig, dtype_bytes: int, tp: int = 1) -> int:
    """NVLM-X/H: K and V of one image key for every cross-attention layer, on one TP rank (0 for NVLM-D)."""
    kv_heads_per_rank = max(1, cfg.llm.num_kv_heads // tp)
    return 2 * len(cfg.cross_attention_layers) * kv_heads_per_rank * cfg.llm.head_dim * dtype_bytes


# A tile tag written alone ("<tile_3>") is about five tokens with Qwen2's tokenizer ("<", "tile", "_", "3",
# ">"): NVLM-H's key side carries one per regular tile. (Tags in the decoder text count as text tokens.)
TAG_TOKENS = 5


@dataclass(frozen=True)
class RequestShape:
    """Sizes of one request in a family's layout: what prefill computes and the KV cache holds."""

    decoder_tokens: int  # the self-attention sequence: text (tile tags included) + inline image tokens
    key_tokens: int  # the cross-attention keys (NVLM-X/H), 0 for NVLM-D


def request_shape(cfg: NVLMConfig, tiles_per_image, text_tokens: int) -> RequestShape:
    layout, per_tile = family_for(cfg).prompt_layout, cfg.preprocess.tokens_per_tile
    keys = len(layout.key_tiles(tiles_per_image)) * (per_tile + (TAG_TOKENS if layout.tag_keys else 0))
    return RequestShape(text_tokens + layout.inline_tokens(tiles_per_image, per_tile), keys)


def memory_plan(cfg: NVLMConfig, kv_tokens: int = DEFAULT_KV_TOKENS,
                gpu_bytes: int = H100_MEMORY_BYTES, reserve_bytes: int = RESERVE_BYTES) -> dict:
    vision_params = sum(c.num_params(cfg) for c in family_for(cfg).components if c.name not in DECODER_ROLES)
    vision_bytes = 2 * vision_params
    plans = []
    for fmt in FORMATS.values():  # AWQ at its default group of 128 input channels
        decoder_bytes = llm_bytes(cfg, fmt)
        kv_dtype_bytes = 1 if fmt.plan_kv_fp8 else 2
        for tp in TP_SIZES:
            weights = decoder_bytes // tp + vision_bytes
            kv = kv_tokens * kv_bytes_per_token(cfg, kv_dtype_bytes, tp)
            total = weights + kv + reserve_bytes
            plans.append({
                "weights": fmt.name, "kv_cache_dtype": "fp8" if kv_dtype_bytes == 1 else "bf16", "tp": tp,
                "llm_weight_bytes": decoder_bytes, "llm_weight_bytes_per_gpu": decoder_bytes // tp,
                "vision_weight_bytes": vision_bytes, "weight_bytes_per_gpu": weights,
                "kv_cache_bytes_per_gpu": kv, "reserve_bytes": reserve_bytes, "total_bytes_per_gpu": total,
                "fits": total <= gpu_bytes,
                "max_kv_tokens": max(0, (gpu_bytes - weights - reserve_bytes)
                                     // kv_bytes_per_token(cfg, kv_dtype_bytes, tp)),
            })
    return {
        "gpu": "H100 80GB", "gpu_memory_bytes": gpu_bytes, "kv_budget_tokens": kv_tokens,
        "kv_bytes_per_token": {"bf16": kv_bytes_per_token(cfg, 2), "fp8": kv_bytes_per_token(cfg, 1)},
        # NVLM-X/H: the image keys' cross-attention cache, per key (a 7-tile X image has 1,792 keys)
        "cross_kv_bytes_per_key": {"bf16": cross_kv_bytes_per_key(cfg, 2), "fp8": cross_kv_bytes_per_key(cfg, 1)},
        "conventions": "LLM linear weights in the format; embeddings, lm_head, norms, biases 16-bit; "
                       "vision+projector 16-bit unsharded on GPU 0; KV heads split over TP; "
                       f"{reserve_bytes // GIB} GiB reserve",
        "plans": plans,
    }


def inspect(path: str | Path, kv_tokens: int = DEFAULT_KV_TOKENS) -> dict:
    path = Path(path)
    cfg = plan_config(path)
    comps = []
    for comp in family_for(cfg).components:
        comps.append({"name": comp.name, "parameters": comp.num_params(cfg)})
    b = llm_breakdown(cfg)
    report = {
        "schema": SCHEMA,
        "checkpoint": str(path),
        "architecture": cfg.architecture,
        "family": cfg.family,
        "vision_architecture": cfg.vision.architecture,
        "llm_architecture": cfg.llm.architecture,
        "dimensions": {
            "vision": {"hidden": cfg.vision.hidden_size, "layers": cfg.vision.num_layers, "heads": cfg.vision.num_heads,
                       "padding_heads": cfg.vision.num_dummy_heads, "padding_heads_from": cfg.vision.dummy_heads_source,
                       "mlp": cfg.vision.intermediate_size, "image_size": cfg.vision.image_size,
                       "patch_size": cfg.vision.patch_size},
            "projector": {"kind": cfg.projector.kind, "input": cfg.projector.input_size,
                          "hidden": cfg.projector.hidden_size, "output": cfg.projector.output_size},
            "llm": {"hidden": cfg.llm.hidden_size, "layers": cfg.llm.num_layers, "heads": cfg.llm.num_heads,
                    "kv_heads": cfg.llm.num_kv_heads, "intermediate": cfg.llm.intermediate_size,
                    "vocab": cfg.llm.vocab_size, "rope_theta": cfg.llm.rope_theta,
                    "cross_attention_layers": list(cfg.cross_attention_layers)},
            "tokens_per_tile": cfg.preprocess.tokens_per_tile,
            "max_tiles_per_image": cfg.preprocess.max_tiles_per_image,
        },
        "components": comps,
        "llm_parameters": {"embedding": b.embedding, "lm_head": b.lm_head, "linear": b.linear, "other": b.other},
        "total_parameters": sum(c["parameters"] for c in comps),
        "weights": _weights_summary(path, cfg),
        "memory_plan": memory_plan(cfg, kv_tokens),
    }
    return report


def _weights_summary(path: Path, cfg: NVLMConfig) -> dict | None:
    """Shards, bytes and dtypes per component when the weights are present (validated)."""
    if not path.is_dir():
        return None
    if not any(path.glob("*.safetensors")):
        refuse_pickle(path)  # pickle weights present: refused with the conversion recipe, not "absent"
        return None

    ckpt = Checkpoint.open(path)
    result = ckpt.validate()
    per_comp = {}
    for comp, rows in result.rows.items():
        infos = [ckpt.tensors[src] for src, _, _ in rows]
        dtypes: dict[str, int] = {}
        stored: dict[str, int] = {}
        for i in infos:
            dtypes[i.dtype] = dtypes.get(i.dtype, 0) + _numel(i.shape)
            stored[i.dtype] = stored.get(i.dtype, 0) + i.nbytes
        per_comp[comp] = {"bytes": sum(i.nbytes for i in infos), "dtypes": dtypes, "bytes_by_dtype": stored}
    by_dtype: dict[str, int] = {}
    for t in ckpt.tensors.values():  # NVLM-D-72B stores its q/k/v (LLM and vision) in F32 beside bf16
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    return {"shards": ckpt.shards, "total_bytes": ckpt.total_bytes, "tensors": len(ckpt.tensors),
            "bytes_by_dtype": by_dtype, "vision_padding_heads": ckpt.config.vision.num_dummy_heads,
            "components": per_comp}


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB"


def format_report(r: dict) -> str:
    lines = [f"{r['checkpoint']}: {r['architecture']} ({r['family']}), vision {r['vision_architecture']}, "
             f"LLM {r['llm_architecture']}",
             f"parameters: {r['total_parameters'] / 1e9:,.3f} B"]
    weights = r["weights"]
    for c in r["components"]:
        extra = ""
        if weights:
            w = weights["components"][c["name"]]
            extra = f"  {_gb(w['bytes'])}  " + ", ".join(f"{d} {_gb(b)}" for d, b in sorted(w["bytes_by_dtype"].items()))
        lines.append(f"  {c['name']:<10} {c['parameters']:>16,d} params{extra}")
    if weights:
        lines.append(f"shards ({len(weights['shards'])}): {', '.join(weights['shards'])}")
    else:
        lines.append("weights: not present (config-only inspection)")
    mp = r["memory_plan"]
    lines.append(f"H100 80GB memory plan (KV budget {mp['kv_budget_tokens']:,} tokens; KV per token "
                 f"{mp['kv_bytes_per_token']['bf16']:,} B bf16 / {mp['kv_bytes_per_token']['fp8']:,} B fp8):")
    if r["dimensions"]["llm"]["cross_attention_layers"]:
        xl = r["dimensions"]["llm"]["cross_attention_layers"]
        lines.append(f"  + {len(xl)} gated cross-attention layers after decoder layers {xl}; their image-key cache is "
                     f"{mp['cross_kv_bytes_per_key']['bf16']:,} B bf16 per key (a 7-tile image: "
                     f"{7 * r['dimensions']['tokens_per_tile']:,} keys), outside the KV budget above")
    lines.append(f"  {'weights':<9}{'tp':>3}  {'weights/GPU':>14}  {'KV/GPU':>12}  {'total/GPU':>12}  fits")
    for p in mp["plans"]:
        lines.append(f"  {p['weights']:<9}{p['tp']:>3}  {_gb(p['weight_bytes_per_gpu']):>14}  "
                     f"{_gb(p['kv_cache_bytes_per_gpu']):>12}  {_gb(p['total_bytes_per_gpu']):>12}  "
                     f"{'yes' if p['fits'] else 'no'}")
    lines.append(f"  ({mp['conventions']})")
    host = r.get("build_host")
    if host:
        lines.append("build host for `nvlm-build engine` (vision fp16, fidelity report on):")
        lines.append(f"  {'weights':<9}  {'peak RAM':>12}  {'layer at a time':>15}  {'disk':>12}  GPU")
        for row in host["rows"]:
            streamed = row.get("llm_streamed_peak_ram_bytes")
            extra = f"   (`llm --no-fidelity`: {_gb(streamed)})" if streamed else ""
            layerwise = row.get("engine_layerwise_peak_ram_bytes")
            lines.append(f"  {row['format']:<9}  {_gb(row['engine_peak_ram_bytes']):>12}  "
                         f"{_gb(layerwise) if layerwise else '—':>15}  {_gb(row['engine_disk_bytes']):>12}  "
                         f"none{extra}")
        lines.append(f"  ({host['conventions']})")
    return "\n".join(lines)
