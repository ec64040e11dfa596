"""TensorRT-LLM checkpoint format for NVLM-D's Qwen2 decoder: config, names, streaming conversion.

A TensorRT-LLM checkpoint is `config.json` plus one `rank{N}.safetensors` per rank
(rank = pp_rank · tp + tp_rank). Names and splits below are TensorRT-LLM's Qwen layout as
NVIDIA Model Optimizer exports it (the streaming converter's output is tested equal to
modelopt's unquantized export, tensor for tensor, at TP1, TP2 and PP2):

    transformer.vocab_embedding.weight          rows split over TP (use_parallel_embedding), PP rank 0
    transformer.layers.{j}.input_layernorm.weight
    transformer.layers.{j}.attention.qkv.{weight,bias}   [q_r; k_r; v_r] of this rank's heads
    transformer.layers.{j}.attention.dense.weight        o_proj, input columns split over TP
    transformer.layers.{j}.post_layernorm.weight
    transformer.layers.{j}.mlp.fc.weight        gate_proj (the activated branch), rows split
    transformer.layers.{j}.mlp.gate.weight      up_proj, rows split
    transformer.layers.{j}.mlp.proj.weight      down_proj, input columns split
    transformer.ln_f.weight, lm_head.weight     last PP rank; lm_head rows split over TP

`{j}` is the layer index local to the PP rank. Linear weights are (out, in).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .config import NVLMConfig
from .llm_formats import BuildOptions

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
                      torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32"}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------- config.json


def trtllm_config(cfg: NVLMConfig, opts: BuildOptions, quantization: dict) -> dict:
    """The checkpoint's config.json. Each field's source is documented in tests/test_trtllm_config.py."""
    llm = cfg.llm
    rotary_scaling = None
    if llm.rope_scaling is not None:
        rotary_scaling = {"type": llm.rope_scaling.type, "factor": llm.rope_scaling.factor}
    return {
        # TensorRT-LLM's MODEL_MAP sends "Qwen2ForCausalLM" to QWenForCausalLM.
        "architecture": "Qwen2ForCausalLM",
        # QWenConfig.from_hugging_face would take llm_config.model_type, which the released NVLM-D
        # config sets to "llama" (rejected by TensorRT-LLM); the Qwen model reads qwen_type to size
        # its MLP ("qwen" halves intermediate_size), so it must say qwen2 explicitly.
        "qwen_type": "qwen2",
        "dtype": opts.fmt.dtype,
        "logits_dtype": "float32",
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "head_size": llm.head_dim,
        "vocab_size": llm.vocab_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "hidden_act": llm.hidden_act,
        "norm_epsilon": llm.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": llm.rope_theta,
        "rotary_scaling": rotary_scaling,
        "attn_bias": llm.qkv_bias,  # Qwen2: q/k/v biases (fused into qkv.bias); no o_proj bias
        "mlp_bias": False,
        "use_parallel_embedding": True,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "mapping": {"world_size": opts.world_size, "tp_size": opts.tp, "pp_size": opts.pp},
        "quantization": quantization,
        "producer": {"name": "nvlm-trt", "version": __version__},
    }


def unquantized_section() -> dict:
    return {"quant_algo": None, "kv_cache_quant_algo": None}


# --------------------------------------------------------------------------- streaming writer


class SafetensorsStreamWriter:
    """Writes a safetensors file tensor by tensor: the header (all names, dtypes, shapes and
    offsets) is known up front from the conversion plan, so each tensor's bytes can be appended
    as soon as it is produced and then dropped."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None):
        header, offset = {}, 0
        for name, dtype, shape in entries:
            n = dtype.itemsize
            for d in shape:
                n *= d
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors writes it
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._expected = [(n, d, tuple(s)) for n, d, s in entries]
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, exp_dtype, exp_shape = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (exp_name, exp_dtype, exp_shape):
            raise RuntimeError(f"stream order broken: got {name} {tensor.dtype} {tuple(tensor.shape)}, "
                               f"planned {exp_name} {exp_dtype} {exp_shape}")
        self._fh.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))  # no extra copy
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise RuntimeError(f"{len(self._expected) - self._next} planned tensors were never written")
        self._fh.close()


# --------------------------------------------------------------------------- streaming conversion


@dataclass(frozen=True)
class RankTensor:
    name: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]  # reads what it needs from the source checkpoint


def rank_plan(ckpt, opts: BuildOptions, rank: int) -> list[RankTensor]:
    """Every tensor of one rank file, in write order, each with the function that computes it."""
    cfg = ckpt.config
    llm = cfg.llm
    tp, pp = opts.tp, opts.pp
    t, p = rank % tp, rank // tp
    dtype = TORCH_DTYPES[opts.fmt.dtype]
    d = llm.head_dim
    nh, nkv = llm.num_heads // tp, llm.num_kv_heads // tp  # heads on this rank
    inter = llm.intermediate_size // tp
    vocab = llm.vocab_size // tp

    def src(name: str) -> torch.Tensor:
        return ckpt.get("language_model." + name)

    def rows(name, lo, n):
        return lambda: src(name)[lo:lo + n].to(dtype)

    def cols(name, lo, n):
        return lambda: src(name)[:, lo:lo + n].to(dtype)

    def whole(name):
        return lambda: src(name).to(dtype)

    def qkv(i, part):
        base = f"model.layers.{i}.self_attn."
        return lambda: torch.cat([src(base + "q_proj." + part)[t * nh * d:(t + 1) * nh * d],
                                  src(base + "k_proj." + part)[t * nkv * d:(t + 1) * nkv * d],
                                  src(base + "v_proj." + part)[t * nkv * d:(t + 1) * nkv * d]]).to(dtype)

    h = llm.hidden_size
    plan: list[RankTensor] = []
    if p == 0:
        plan.append(RankTensor("transformer.vocab_embedding.weight", (vocab, h),
                               rows("model.embed_tokens.weight", t * vocab, vocab)))
    per_rank = llm.num_layers // pp
    qkv_out = (nh + 2 * nkv) * d
    for j in range(per_rank):
        i = p * per_rank + j  # global layer index
        pre, L = f"transformer.layers.{j}.", f"model.layers.{i}."
        plan += [
            RankTensor(pre + "input_layernorm.weight", (h,), whole(L + "input_layernorm.weight")),
            RankTensor(pre + "attention.qkv.weight", (qkv_out, h), qkv(i, "weight")),
            RankTensor(pre + "attention.qkv.bias", (qkv_out,), qkv(i, "bias")),
            RankTensor(pre + "attention.dense.weight", (h, nh * d), cols(L + "self_attn.o_proj.weight", t * nh * d, nh * d)),
            RankTensor(pre + "post_layernorm.weight", (h,), whole(L + "post_attention_layernorm.weight")),
            RankTensor(pre + "mlp.fc.weight", (inter, h), rows(L + "mlp.gate_proj.weight", t * inter, inter)),
            RankTensor(pre + "mlp.gate.weight", (inter, h), rows(L + "mlp.up_proj.weight", t * inter, inter)),
            RankTensor(pre + "mlp.proj.weight", (h, inter), cols(L + "mlp.down_proj.weight", t * inter, inter)),
        ]
    if p == pp - 1:
        plan.append(RankTensor("transformer.ln_f.weight", (h,), whole("model.norm.weight")))
        lm_src = "model.embed_tokens.weight" if llm.tie_word_embeddings else "lm_head.weight"
        plan.append(RankTensor("lm_head.weight", (vocab, h), rows(lm_src, t * vocab, vocab)))
    return plan


def write_unquantized(ckpt, opts: BuildOptions, out: Path, progress=None) -> dict:
    """Stream an unquantized (bf16/fp16) checkpoint: one tensor in memory at a time, q/k/v fused per layer."""
    dtype = TORCH_DTYPES[opts.fmt.dtype]
    for rank in range(opts.world_size):
        plan = sorted(rank_plan(ckpt, opts, rank), key=lambda r: r.name)  # modelopt's (sorted) order
        writer = SafetensorsStreamWriter(out / f"rank{rank}.safetensors", [(r.name, dtype, r.shape) for r in plan],
                                         metadata={"format": "pt", "producer": "nvlm-trt"})
        for r in plan:
            writer.write(r.name, r.produce())
            if progress:
                progress(1)
        writer.close()
    config = trtllm_config(ckpt.config, opts, unquantized_section())
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def count_tensors(ckpt, opts: BuildOptions) -> int:
    return sum(len(rank_plan(ckpt, opts, r)) for r in range(opts.world_size))
