"""The embedded default: a tiny, deterministic NVLM-D checkpoint in the released layout, and its NVLM-X and
NVLM-H siblings in the layout this project defines for them (docs/nvlm_xh_layout.md).

Same file layout and config quirks as `nvidia/NVLM-D-72B` (nested config, `llm_config.model_type`
"llama" with `architectures: ["Qwen2ForCausalLM"]`, `auto_map` to remote code, bf16 weights in
several safetensors shards with an index, a Qwen2-style byte-level BPE tokenizer with ChatML and
`<|vision_pad|>`), the real image geometry (448-pixel tiles, patch 14, 256 tokens per tile), and
every LLM linear input dimension a multiple of 128 so that INT4-AWQ (block 128) applies, also at TP2.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ConfigError
from .families import family_for, from_hf
from .fsutil import publish_dir

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Deterministic training text for the demo tokenizer: chat and image vocabulary, so that
# prompts tokenize into a realistic mix of merged words and bytes.
_CORPUS = """
You are a helpful assistant. Describe the image in detail. What is shown in this picture?
The image shows a red square, a blue circle and a green triangle on a white background.
Read the text in the image. How many objects are there? Answer with a single word.
The chart compares latency and throughput of the vision encoder and the language model.
A photo of a cat sitting on a wooden table next to a cup of coffee in the morning light.
<Image><tile_1><tile_2><tile_3><tile_4><tile_5><tile_6><tile_global_thumbnail></Image>
user assistant system question answer tile image thumbnail picture document table figure
What colour is the shape in tile 1? red. What shape is in tile 2? circle. Which tile has the blue shape?
tile 3. How many shapes are there? 4. green yellow square triangle colour shape shapes tile 1 tile 2 tile 4
"""


@dataclass(frozen=True)
class DemoDims:
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 256
    llm_hidden: int = 256
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 512
    tokenizer_vocab: int = 512
    max_position_embeddings: int = 8192
    architecture: str = "NVLM_D"
    # NVLM-X/H: a gated cross-attention layer after each of these self-attention layers
    cross_attention_layers: tuple[int, ...] = ()


# Presets by family: the same dimensions, so that prefill times and accuracy compare like for like. X and H
# put a cross-attention layer after both decoder layers, so both positions and j > 0 are exercised.
VARIANTS = {
    "d": DemoDims(),
    "x": DemoDims(architecture="NVLM_X", cross_attention_layers=(0, 1)),
    "h": DemoDims(architecture="NVLM_H", cross_attention_layers=(0, 1)),
}
# The trained embedded default (nvlm-build demo-train, issue 17): NVLM-D's preset with a deeper vision tower
# (four layers: shape needs spatial context that two layers of 14-pixel patches do not give).
DEMO_TRAINED_DIMS = DemoDims(vision_layers=4)


def trained_dims(variant: str) -> DemoDims:
    """The dimensions a trained default of `variant` has: its preset with the trained default's vision tower
    (NVLM-X and NVLM-H trained with the same recipe, for the architecture comparison in docs/demo_model.md)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown demo variant {variant!r}; available: {sorted(VARIANTS)}")
    return replace(VARIANTS[variant], vision_layers=DEMO_TRAINED_DIMS.vision_layers)

# tanh(1.0) ≈ 0.76: the cross-attention layers move the residual stream as much as a self-attention layer
DEMO_GATE = 1.0


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def demo_config(dims: DemoDims, vocab_size: int, im_end_id: int, eot_id: int) -> dict:
    arch = dims.architecture
    mod = arch.lower()
    cfg = {
        "_commit_hash": None,
        "architectures": [arch],
        "auto_map": {
            "AutoConfig": f"configuration_{mod}.{arch}_Config",
            "AutoModel": f"modeling_{mod}.{arch}_Model",
            "AutoModelForCausalLM": f"modeling_{mod}.{arch}_Model",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "bos_token_id": eot_id,
            "eos_token_id": im_end_id,
            "hidden_act": "silu",
            "hidden_size": dims.llm_hidden,
            "intermediate_size": dims.llm_intermediate,
            "max_position_embeddings": dims.max_position_embeddings,
            "mlp_bias": False,
            "model_type": "llama",  # the released config's quirk, kept on purpose
            "num_attention_heads": dims.llm_heads,
            "num_hidden_layers": dims.llm_layers,
            "num_key_value_heads": dims.llm_kv_heads,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"factor": 3.0, "type": "dynamic"},
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": vocab_size,
        },
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "model_type": arch,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "chatml",
        "torch_dtype": "bfloat16",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": dims.vision_hidden,
            "image_size": 448,
            "intermediate_size": dims.vision_mlp,
            "layer_norm_eps": 1e-06,
            "model_type": "intern_vit_6b",
            "norm_type": "rms_norm",
            "num_attention_heads": dims.vision_heads,
            "num_channels": 3,
            "num_hidden_layers": dims.vision_layers,
            "patch_size": 14,
            "qk_normalization": True,
            "qkv_bias": False,
            "torch_dtype": "bfloat16",
            "use_flash_attn": True,
        },
    }
    if dims.cross_attention_layers:
        cfg["cross_attention_layers"] = list(dims.cross_attention_layers)
    return cfg


def _init_tensor(name: str, shape: tuple[int, ...], gen):
    """Deterministic weights with sane scales: norms and layer scales near 1, the rest small."""
    import torch

    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
        return torch.full(shape, DEMO_GATE)
    is_norm = "norm" in name and leaf == "weight" or name.endswith("mlp1.0.weight")
    if is_norm or leaf in ("ls1", "ls2"):
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if leaf == "bias":
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = shape[-1] if len(shape) == 2 else max(1, int(torch.tensor(shape[1:]).prod()))
    std = 0.02 if len(shape) != 2 else min(0.5, fan_in ** -0.5)
    return std * torch.randn(shape, generator=gen)


def with_padding_heads_count(cfg, count: int):
    """The config with `count` vision padding heads."""
    return replace(cfg, vision=replace(cfg.vision, num_dummy_heads=count))


def _condition_llm_head(tensors: dict, gen) -> None:
    """Give the random LLM a trained model's decisiveness.

    With i.i.d. random weights every next-token distribution is nearly flat, so argmax flips under
    any perturbation (even float summation order through an FP8 rounding boundary) and top-1
    agreement says nothing about a quantized build. Here token embeddings are N(0, 1) rows and
    lm_head row u is the embedding of a fixed permutation σ(u), scaled by 1/√hidden: the residual
    stream carrying token t favours σ⁻¹(t) by a wide margin, while the decoder layers (same scale as
    the residual) still move the logits substantially, so broken layers are visible in every check.
    """
    import torch

    emb_name, head_name = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    emb = torch.randn(tensors[emb_name].shape, generator=gen)
    perm = torch.randperm(emb.shape[0], generator=gen)
    tensors[emb_name] = emb.to(torch.bfloat16)
    if head_name in tensors:
        tensors[head_name] = (emb[perm] / emb.shape[1] ** 0.5).to(torch.bfloat16)


def demo_parts(dims: DemoDims, vocab_size: int | None = None):
    """(raw HF config, typed config, tokenizer) of a demo model: what its checkpoint holds besides weights."""
    tok = build_tokenizer(dims.tokenizer_vocab)
    if vocab_size is None:
        vocab_size = _round_up(tok.get_vocab_size(), 128)
    elif vocab_size < tok.get_vocab_size():
        raise ConfigError(f"vocab_size {vocab_size} is below the demo tokenizer's {tok.get_vocab_size()} tokens")
    raw_cfg = demo_config(dims, vocab_size, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    return raw_cfg, from_hf(raw_cfg), tok


# The trained NVLM-D embedded default (`nvlm-build demo-train`, issue 17): bf16 weights under the released
# names, and a card with the command, seed, checksum and held-out accuracy that produced them.
TRAINED_WEIGHTS = Path(__file__).parent / "assets" / "nvlm_d_demo_trained.safetensors"


# Written into a demo checkpoint with trained weights: builds of it check task accuracy in their fidelity report.
TASK_MARKER = "nvlm_trt_demo.json"


def trained_available() -> bool:
    return TRAINED_WEIGHTS.is_file()


def is_trained_default(directory: str | Path) -> bool:
    """Whether a checkpoint is a trained embedded default (it answers demo_model/task.py's questions)."""
    marker = Path(directory) / TASK_MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("task") == "tile_task/v1"


def write_demo_checkpoint(out: str | Path, *, variant: str = "d", seed: int = 0, num_shards: int = 2,
                          force: bool = False, vocab_size: int | None = None, weights: str | Path = "random") -> Path:
    """Generate the embedded default into `out` (atomically: temp dir, then rename). `vocab_size`: the
    model's vocabulary (rows of the embedding and the LM head), at least the tokenizer's; by default the
    tokenizer's rounded up to 128. Tests use odd sizes: quantized exports pad the LM head's rows.
    `weights`: "random" (seeded, conditioned to be decisive), "trained" (the packaged NVLM-D weights trained on
    the tile task), or a safetensors file of released-name weights (a `demo-train` output)."""
    import torch
    from safetensors.torch import save_file

    if variant not in VARIANTS:
        raise ConfigError(f"unknown demo variant {variant!r}; available: {sorted(VARIANTS)}")
    dims = VARIANTS[variant] if weights == "random" else trained_dims(variant)
    raw_cfg, cfg, tok = demo_parts(dims, vocab_size)

    if weights == "random":
        gen = torch.Generator().manual_seed(seed)
        # drawn as before the released layout's padding heads were adopted, then given zero padding heads (as the
        # trained default is): the seeded random model the older tests were written against computes the same
        # function; padding heads with non-zero weights are tested on tests/released_layout_writer.py's checkpoint
        plain = with_padding_heads_count(cfg, 0)
        tensors = {}
        for comp in family_for(plain).components:
            for source, _, shape in comp.expand(plain):
                tensors[source] = _init_tensor(source, shape, gen).to(torch.bfloat16).contiguous()
        tensors = {n: t.contiguous() for n, t in with_padding_heads(tensors, cfg.vision).items()}
        _condition_llm_head(tensors, gen)
    else:
        tensors = _trained_tensors(cfg, TRAINED_WEIGHTS if weights == "trained" else Path(weights), variant)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(raw_cfg, indent=2) + "\n")
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "Qwen2Tokenizer", "model_max_length": dims.max_position_embeddings,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
            "chat_template": CHAT_TEMPLATE, "add_prefix_space": False,
        }, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({
            "eos_token_id": [raw_cfg["llm_config"]["eos_token_id"]], "do_sample": False}, indent=2) + "\n")
        _write_shards(tensors, tmp, num_shards, save_file)
        if weights != "random":
            (tmp / TASK_MARKER).write_text(json.dumps({"task": "tile_task/v1", "weights": str(weights)}) + "\n")

    return publish_dir(Path(out), write, force=force)


def _trained_tensors(cfg, path: Path, variant: str) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConfigError(f"trained weights {path} not found; `nvlm-build demo-train` writes them, or use "
                          "--weights random")
    tensors = with_padding_heads(load_file(str(path)), cfg.vision)
    expected = {source: shape for comp in family_for(cfg).components for source, _, shape in comp.expand(cfg)}
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != expected:
        raise ConfigError(f"{path}: its tensors do not fit the variant {variant!r} demo architecture "
                          f"(missing {sorted(set(expected) - set(got))[:3]}, unexpected {sorted(set(got) - set(expected))[:3]}, "
                          f"reshaped {sorted(n for n in set(got) & set(expected) if got[n] != expected[n])[:3]})")
    return {n: t.contiguous() for n, t in tensors.items()}


def with_padding_heads(tensors: dict, vision) -> dict:
    """Weights trained without the vision attention's padding heads, adapted to a config that has them
    (the packaged default was trained before the released layout's 7 padding heads were adopted): the padding
    heads' q, k and v rows and proj's columns are zero, their norm scales one. A zero q and k give uniform
    scores over zero values, and proj reads zeros, so the model computes the same function (the variance of
    the q/k norms comes from the real heads either way); tests/test_released_layout.py checks it."""
    import torch

    pad, d = vision.num_dummy_heads, vision.head_dim
    out = dict(tensors)
    for name, t in tensors.items():
        if not name.startswith("vision_model.encoder.layers.") or not pad:
            continue
        if name.endswith("attn.qkv.weight") and t.shape[0] == 3 * vision.hidden_size:
            q = t.view(3, vision.num_heads * d, -1)
            out[name] = torch.cat([q, q.new_zeros(3, pad * d, q.shape[-1])], 1).reshape(-1, q.shape[-1])
        elif name.endswith("attn.qkv.bias") and t.shape[0] == 3 * vision.hidden_size:
            out[name] = torch.cat([t.view(3, -1), t.new_zeros(3, pad * d)], 1).reshape(-1)
        elif name.endswith(("attn.q_norm.weight", "attn.k_norm.weight")) and t.shape[0] == vision.hidden_size:
            out[name] = torch.cat([t, t.new_ones(pad * d)])
        elif name.endswith("attn.proj.weight") and t.shape[1] == vision.hidden_size:
            out[name] = torch.cat([t, t.new_zeros(t.shape[0], pad * d)], 1)
    return out


def _write_shards(tensors: dict, directory: Path, num_shards: int, save_file) -> None:
    """Split in name order into `num_shards` files of about equal size, plus the index."""
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    budget = total / num_shards
    groups: list[list[str]] = [[]]
    acc = 0
    for n in names:
        size = tensors[n].numel() * tensors[n].element_size()
        if groups[-1] and acc + size > budget and len(groups) < num_shards:
            groups.append([])
            acc = 0
        groups[-1].append(n)
        acc += size
    weight_map = {}
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
