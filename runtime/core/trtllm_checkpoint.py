"""TensorRT-LLM checkpoint format for NVLM-D's Qwen2 decoder: config, names, streaming conversion.

A TensorRT-LLM checkpoint is `config.json` plus one `rank{N}.safetensors` per rank
(rank = pp_rank · tp + tp_rank). The names and how each splits over TP are the layout table of
runtime/core/trtllm_layout.py, TensorRT-LLM's Qwen layout as NVIDIA Model Optimizer exports it (the
streaming converter's output is tested equal to modelopt's unquantized export, tensor for tensor,
at TP1, TP2 and PP2).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from . import trtllm_layout as layout
from .config import NVLMConfig
from .errors import CheckpointError
from .families import DECODER_ROLES, family_for, family_for_trtllm
from .llm_formats import LLMBuildOptions
from .trtllm_layout import SOURCE_PREFIX, Row

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
                      torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32"}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------- config.json


def trtllm_config(cfg: NVLMConfig, opts: LLMBuildOptions, quantization: dict) -> dict:
    """The checkpoint's config.json. Each field's source is documented in tests/test_trtllm_config.py."""
    llm, family = cfg.llm, family_for(cfg)
    rotary_scaling = None  # the released model runs plain RoPE: LLMConfig.applied_rope_scaling
    if llm.applied_rope_scaling is not None:
        rotary_scaling = {"type": llm.applied_rope_scaling.type, "factor": llm.applied_rope_scaling.factor}
    config = {
        # the family's decoder as TensorRT-LLM's MODEL_MAP names it, and its own fields (runtime/core/families.py)
        "architecture": family.trtllm_architecture,
        **family.trtllm_config,
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
    if cfg.cross_attention_layers:
        # NVLM-X/H (runtime/core/trtllm_layout.py, XATTN): where the gated blocks run, what they read, and
        # mllama's switch for a request without images (the blocks are skipped, adding exactly nothing)
        config.update({
            "cross_attention_layers": list(cfg.cross_attention_layers),
            "encoder_hidden_size": llm.hidden_size,  # image features arrive projected to the LLM width
            "skip_cross_attn_blocks": True,
        })
        if quantization.get("quant_algo"):
            excluded = list(quantization.get("exclude_modules") or [])
            config["quantization"] = {**quantization, "exclude_modules": excluded + [layout.XATTN_MODULES]}
    return config


def unquantized_section() -> dict:
    return {"quant_algo": None, "kv_cache_quant_algo": None}


# --------------------------------------------------------------------------- streaming writer


class SafetensorsStreamWriter:
    """Writes a safetensors file tensor by tensor: the header (all names, dtypes, shapes and
    offsets) is known up front from the conversion plan, so each tensor's bytes can be appended
    as soon as it is produced and then dropped."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None, *,
                 metadata_first: bool = False):
        """`metadata_first`: the `__metadata__` entry leads the header, as safetensors' own writer puts it (with
        `safetensors_order` entries, the file is then byte for byte what `save_file` writes)."""
        header, offset = ({"__metadata__": metadata} if metadata and metadata_first else {}), 0
        for name, dtype, shape in entries:
            n = dtype.itemsize
            for d in shape:
                n *= d
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        if metadata and not metadata_first:
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


# safetensors' dtype enum, in its order: `save_file` lays tensors out by dtype, this order reversed, then by name
_SAFETENSORS_ENUM = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
                     "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")


def safetensors_order(name: str, dtype: torch.dtype) -> tuple[int, str]:
    """Sort key of a tensor in a file safetensors' `save_file` writes (what modelopt's export writes)."""
    return -_SAFETENSORS_ENUM.index(SAFETENSORS_DTYPES[dtype]), name


# --------------------------------------------------------------------------- streaming conversion


@dataclass(frozen=True)
class RankTensor:
    name: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]  # reads what it needs from the source checkpoint


def rank_plan(ckpt, opts: LLMBuildOptions, rank: int) -> list[RankTensor]:
    """Every tensor of one rank file, in write order, each with the function that computes it: the rows
    of the layout table (runtime/core/trtllm_layout.py) this rank holds, split as the table says."""
    llm = ckpt.config.llm
    tp, pp = opts.tp, opts.pp
    t, p = rank % tp, rank // tp
    dtype = TORCH_DTYPES[opts.fmt.dtype]
    d = llm.head_dim
    nh, nkv = llm.num_heads // tp, llm.num_kv_heads // tp  # heads on this rank
    family = family_for(ckpt.config)
    shapes = {name: shape for c in family.components if c.name in DECODER_ROLES
              for name, _, shape in c.expand(ckpt.config)}

    def src(name: str) -> torch.Tensor:
        return ckpt.get(SOURCE_PREFIX + name)

    def tensor(row: Row, i: int | None) -> tuple[tuple[int, ...], Callable[[], torch.Tensor]]:
        name = layout.source(row, llm, i)
        if row.split == "qkv":
            q, k, v = name
            rest = shapes[SOURCE_PREFIX + q][1:]
            return ((nh + 2 * nkv) * d, *rest), lambda: torch.cat([
                src(q)[t * nh * d:(t + 1) * nh * d], src(k)[t * nkv * d:(t + 1) * nkv * d],
                src(v)[t * nkv * d:(t + 1) * nkv * d]]).to(dtype)
        full = shapes[SOURCE_PREFIX + name]
        if row.split == "vocab":
            n = layout.vocab_rows(full[0], tp) // tp

            def rows_of_rank() -> torch.Tensor:
                x = src(name)[t * n:(t + 1) * n]  # the last rank's slice may be short: zero rows pad it
                return torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])]).to(dtype)

            return (n, *full[1:]), rows_of_rank
        if row.split == "rows":
            n = full[0] // tp
            return (n, *full[1:]), lambda: src(name)[t * n:(t + 1) * n].to(dtype)
        if row.split == "cols":
            n = full[1] // tp
            return (full[0], n), lambda: src(name)[:, t * n:(t + 1) * n].to(dtype)
        return full, lambda: src(name).to(dtype)

    stage_rows = {stage: [r for r in family.trtllm_layout if r.stage == stage and r.when(llm)]
                  for stage in layout.STAGES}
    plan: list[RankTensor] = []
    per_rank = llm.num_layers // pp
    xattn = layout.xattn_stages(ckpt.config.cross_attention_layers, llm.num_layers, pp)[p]
    for stage, layers in (("first", [None] if p == 0 else []),
                          ("layer", [(j, p * per_rank + j) for j in range(per_rank)]),
                          ("xlayer", list(enumerate(xattn))),  # (index in the stage, global index)
                          ("last", [None] if p == pp - 1 else [])):
        for at in layers:
            j, i = (None, None) if at is None else at
            for row in stage_rows[stage]:
                shape, produce = tensor(row, i)
                plan.append(RankTensor(row.target.format(j=j), tuple(shape), produce))
    return plan


def write_unquantized(ckpt, opts: LLMBuildOptions, out: Path, progress=None) -> dict:
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


def add_cross_attention(ckpt, opts: LLMBuildOptions, out: Path, kv_scales: list[float] | None = None) -> int:
    """NVLM-X/H, quantized formats: modelopt's export holds the Qwen2 decoder; add the gated cross-attention
    blocks (the layout's "xlayer" rows, in the checkpoint's 16-bit dtype: they are not quantized) to each
    rank file, which is rewritten once. `kv_scales` (an FP8 KV cache): one per block, in block order, written
    as the block's `kv_cache_scaling_factor` in the dtype and shape of the self-attention's. Returns how many
    tensors were added."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cfg = ckpt.config
    if opts.kv_cache_fp8 and (kv_scales is None or len(kv_scales) != len(cfg.cross_attention_layers)):
        raise CheckpointError("an FP8 KV cache needs one calibrated scale per cross-attention block")
    stages = layout.xattn_stages(cfg.cross_attention_layers, cfg.llm.num_layers, opts.pp)
    added = 0
    for rank in range(opts.world_size):
        rows = [r for r in rank_plan(ckpt, opts, rank) if r.name.startswith(layout.XATTN_MODULES.rstrip("*"))]
        if not rows:
            continue
        f = out / f"rank{rank}.safetensors"
        with safe_open(str(f), framework="pt") as fh:
            metadata = fh.metadata()
        tensors = load_file(str(f))
        clash = [r.name for r in rows if r.name in tensors]
        if clash:
            raise CheckpointError(f"{f}: the export already holds {clash[0]}")
        new = {r.name: r.produce().contiguous() for r in rows}
        if opts.kv_cache_fp8:
            like = tensors[layout.KV_SCALE.format(j=0)]
            for j, i in enumerate(stages[rank // opts.tp]):
                new[layout.XKV_SCALE.format(j=j)] = torch.full_like(like, kv_scales[i])
        tensors.update(new)
        save_file(tensors, str(f), metadata=metadata)
        added += len(new)
    return added


def embedding_rows(directory: Path, ids) -> torch.Tensor:
    """Rows of a TensorRT-LLM checkpoint's token embedding [len(ids), hidden], float32, read from the first
    PP stage's rank files (the rows are split over TP, vocabulary-padded; each file is opened once). NVLM-H's
    serving takes its tag embeddings (cross-attention keys) from here, so that they are the built model's own."""
    from safetensors import safe_open

    cfg = json.loads((Path(directory) / "config.json").read_text())
    tp, vocab = cfg["mapping"]["tp_size"], cfg["vocab_size"]
    table = family_for_trtllm(cfg.get("architecture")).trtllm_layout
    name, per_rank = layout.target(table, "embedding"), layout.vocab_rows(vocab, tp) // tp
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise CheckpointError(f"token id {bad[0]} is outside the vocabulary ({vocab})")
    rows = torch.zeros(len(ids), cfg["hidden_size"])
    for rank in sorted({i // per_rank for i in ids}):
        with safe_open(str(Path(directory) / f"rank{rank}.safetensors"), framework="pt") as fh:
            part = fh.get_slice(name)
            for k, i in enumerate(ids):
                if i // per_rank == rank:
                    rows[k] = part[i % per_rank:i % per_rank + 1].float()[0]
    return rows


class EmbeddingRows:
    """`embedding_rows` of one checkpoint, each id read once and kept: NVLM-H's few tag ids, asked for by every
    request of a served build."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._rows: dict[int, torch.Tensor] = {}

    def __call__(self, ids) -> torch.Tensor:
        ids = [int(i) for i in ids]
        missing = sorted({i for i in ids if i not in self._rows})
        if missing:
            self._rows.update(zip(missing, embedding_rows(self.directory, missing)))
        return torch.stack([self._rows[i] for i in ids]) if ids else embedding_rows(self.directory, [])


def count_tensors(ckpt, opts: LLMBuildOptions) -> int:
    return sum(len(rank_plan(ckpt, opts, r)) for r in range(opts.world_size))


def repad_vocab(directory: Path, cfg: NVLMConfig, tp: int, pp: int) -> bool:
    """Bring an exported checkpoint's embedding and lm_head to TensorRT-LLM's vocabulary rows.

    modelopt pads both to a multiple of 64 for AWQ formats (`pad_embedding_lm_head`) and writes that as
    `vocab_size`; TensorRT-LLM 1.2 builds them with `pad_vocab_size(vocab_size, tp)` rows and its loader
    checks shapes exactly, while our config.json keeps the real `vocab_size` (a padded one would let the
    runtime sample ids that are not tokens). The padded rows are zeros, so trimming them loses nothing.
    Rewrites the rank files that hold them; returns whether it did."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    table, vocab = family_for(cfg).trtllm_layout, cfg.llm.vocab_size
    rows = layout.vocab_rows(vocab, tp)
    # the tensors to re-pad (by rank file), found from the files' headers alone: most exports need none
    todo: dict[int, list[str]] = {}
    for role, ranks in (("embedding", range(tp)), ("lm_head", range((pp - 1) * tp, pp * tp))):
        name = layout.target(table, role)
        stem = name.rsplit(".", 1)[0] + "."
        shapes, extra = [], []
        for r in ranks:
            with safe_open(str(Path(directory) / f"rank{r}.safetensors"), framework="pt") as fh:
                shapes.append(fh.get_slice(name).get_shape()[0])
                extra += sorted(k for k in fh.keys() if k.startswith(stem) and k != name)
        if sum(shapes) == rows:
            continue
        if extra:
            raise CheckpointError(f"{directory}: a quantized {role} ({extra[0]}) cannot be re-padded; "
                                  "keep it unquantized (modelopt's default)")
        for r in ranks:
            todo.setdefault(r, []).append(name)
    if not todo:
        return False
    files = {r: Path(directory) / f"rank{r}.safetensors" for r in todo}
    tensors = {r: load_file(str(f)) for r, f in files.items()}
    n = rows // tp
    for name in {x for names in todo.values() for x in names}:
        ranks = sorted(r for r, names in todo.items() if name in names)
        full = torch.cat([tensors[r][name] for r in ranks])
        if full[vocab:].abs().sum() != 0:
            raise CheckpointError(f"{directory}: {name} rows beyond vocab_size {vocab} are not zero padding")
        full = torch.cat([full[:vocab], full.new_zeros(rows - vocab, *full.shape[1:])])
        for k, r in enumerate(ranks):
            tensors[r][name] = full[k * n:(k + 1) * n].contiguous()
    for r, f in files.items():  # each rank file rewritten once, with its own metadata
        with safe_open(str(f), framework="pt") as fh:
            metadata = fh.metadata()
        save_file(tensors[r], str(f), metadata=metadata)
    return True
