"""NVLM-X/H engines for GPU hosts, checked where no GPU is: the attention-layer plan the C++ runtime reads
(runtime/core/xattn_engine.py), the trtllm-build command that loads this project's model definition, the options
such an engine refuses, and the serving parameters it needs. The model definition itself (builder/trtllm_nvlm.py)
needs TensorRT-LLM and has not run; here only its clear failure without it is checked."""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

from runtime.core.errors import ConfigError
from runtime.core.families import NVLM_D, NVLM_H, NVLM_X, family_for, from_hf
from runtime.core.gpu_host import engine_gap, trtllm_build_args
from runtime.core.limits import EngineLimits
from runtime.core.llm_formats import LLMBuildOptions, get_format
from runtime.core.trtllm_checkpoint import trtllm_config, unquantized_section
from runtime.core.xattn_engine import EngineLayers, cross_kv_cache_fraction, engine_layers
from tests.conftest import ROOT
from triton_repo.check import cross_fraction_problem


def _checkpoint_config(variant: str) -> tuple[dict, object]:
    raw = json.loads((ROOT / "tests" / "fixtures" / f"nvlm_{variant}_72b_config.json").read_text())
    cfg = from_hf(raw)
    return trtllm_config(cfg, LLMBuildOptions(get_format("bf16")), unquantized_section()), cfg


def _limits(cfg) -> EngineLimits:
    return EngineLimits(max_batch_size=8, max_input_text_len=2048, max_output_len=1024).resolve(
        cfg.preprocess, family_for(cfg).prompt_layout, lambda tag: 5)


def test_the_72b_engine_gives_every_attention_module_its_own_row():
    """NVLM-X-72B: 80 Qwen2 layers with 8 KV heads and 10 cross-attention layers (after layers 7, 15, …, 79).
    The runtime sees 90 attention layers; layer k ↦ k, cross-attention layer i ↦ 80 + i, so every index below 90
    is taken exactly once; the self cache has 8 heads on the first 80 and 0 on the rest, the cross cache the
    reverse; each cache has two pools (8 heads and 0 heads)."""
    ckpt, _ = _checkpoint_config("x")
    plan = engine_layers(ckpt)
    assert plan.decoder_layers == 80 and plan.cross_attention_layers == tuple(range(7, 80, 8))
    assert plan.attention_layers == 90
    idx = [plan.self_index(k) for k in range(80)] + [plan.cross_index(i) for i in range(10)]
    assert sorted(idx) == list(range(90))
    assert plan.kv_heads_per_layer == [8] * 80 + [0] * 10
    assert plan.cross_kv_heads_per_layer == [0] * 80 + [8] * 10
    assert plan.kv_cache_pools == plan.cross_kv_cache_pools == 2
    engine = {**ckpt, **plan.pretrained_config_fields()}
    assert engine["num_hidden_layers"] == 90 and engine["cross_attention"] is True
    assert len(engine["num_kv_heads_per_layer"]) == len(engine["num_kv_heads_per_cross_attn_layer"]) == 90
    assert engine_layers(engine) == plan  # the engine's own config converts to the same plan


def test_a_plan_without_cross_attention_or_outside_the_decoder_is_refused():
    with pytest.raises(ConfigError, match="no cross_attention_layers"):
        engine_layers({"num_hidden_layers": 4, "num_attention_heads": 4})
    with pytest.raises(ConfigError, match="must follow layers"):
        EngineLayers(4, (1, 4), 2)


@pytest.mark.parametrize("variant, fraction", [
    # by hand: X reads 7 × 256 = 1,792 keys over 10 layers and keeps 2,048 + 1,024 = 3,072 tokens over 80:
    # 17,920 / (17,920 + 245,760) = 0.068 → 0.07. H reads 6 × 261 = 1,566 keys over 10 layers and keeps
    # 2,048 + 256 + 1,024 = 3,328 tokens over 80: 15,660 / (15,660 + 266,240) = 0.0556 → 0.06
    ("x", 0.07), ("h", 0.06)])
def test_the_cross_kv_cache_share_fits_both_caches_at_full_load(variant, fraction):
    ckpt, cfg = _checkpoint_config(variant)
    limits = _limits(cfg)
    got = cross_kv_cache_fraction(engine_layers(ckpt), max_encoder_input_len=limits.max_encoder_input_len,
                                  max_seq_len=limits.max_seq_len)
    assert got == fraction


def test_trtllm_build_loads_the_projects_model_definition():
    """NVLM-X-72B at TP4: the command names the model file and class, and builds the four ranks in one process
    (trtllm-build imports the file as the module `models`, which spawned workers could not import)."""
    _, cfg = _checkpoint_config("x")
    args = trtllm_build_args(Path("llm"), Path("engines/llm"), LLMBuildOptions(get_format("fp8"), tp=4), _limits(cfg),
                             ("/opt/nvlm/builder/trtllm_nvlm.py", "NVLMXForCausalLM"))
    f = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}
    assert f["--model_cls_file"] == "/opt/nvlm/builder/trtllm_nvlm.py" and f["--model_cls_name"] == "NVLMXForCausalLM"
    assert f["--workers"] == "1" and f["--max_encoder_input_len"] == "1792"
    # NVLM-D keeps TensorRT-LLM's own Qwen2 and parallel rank builds
    d = trtllm_build_args(Path("llm"), Path("engines/llm"), LLMBuildOptions(get_format("fp8"), tp=4), _limits(cfg))
    assert "--model_cls_file" not in d and d[d.index("--workers") + 1] == "4"


@pytest.mark.parametrize("family", [NVLM_X, NVLM_H])
def test_options_an_xattn_engine_cannot_take_are_refused_with_the_reason(family):
    assert engine_gap(family, LLMBuildOptions(get_format("fp8"), tp=4)) is None
    assert engine_gap(family, LLMBuildOptions(get_format("int4_awq"))) is None
    assert engine_gap(family, LLMBuildOptions(get_format("fp8"), kv_cache_fp8=True)) is None
    assert "PP = 1" in engine_gap(family, LLMBuildOptions(get_format("bf16"), pp=2))
    # NVLM-D: TensorRT-LLM's Qwen2 takes both
    assert engine_gap(NVLM_D, LLMBuildOptions(get_format("bf16"), pp=2)) is None
    assert engine_gap(NVLM_D, LLMBuildOptions(get_format("fp8"), kv_cache_fp8=True)) is None


def test_the_cross_kv_cache_share_is_set_exactly_when_the_engine_has_cross_attention():
    """The backend's own refusals (TrtGptModelInflightBatching), with its messages."""
    assert "Must set crossKvCacheFraction" in cross_fraction_problem({}, cross=True)
    assert "Do not set crossKvCacheFraction" in cross_fraction_problem({"cross_kv_cache_fraction": "0.1"}, cross=False)
    assert "between 0 and 1" in cross_fraction_problem({"cross_kv_cache_fraction": "1.5"}, cross=True)
    assert cross_fraction_problem({"cross_kv_cache_fraction": "0.07"}, cross=True) is None
    assert cross_fraction_problem({}, cross=False) is None


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_the_model_definition_without_tensorrt_llm_names_the_release_to_use():
    with pytest.raises(ImportError, match=r"needs TensorRT-LLM 1\.2 with TensorRT .*nvcr\.io/nvidia/tensorrt-llm"):
        importlib.import_module("builder.trtllm_nvlm")


def _assigned_attributes(tree, cls: str) -> set[str]:
    """The `self.X = …` names of a class's __init__ in builder/trtllm_nvlm.py (read, not imported: it needs
    TensorRT-LLM)."""
    import ast

    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {t.attr for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def test_the_model_definition_holds_the_modules_the_checkpoint_names():
    """TensorRT-LLM loads a rank file by matching its names against the model's parameter tree (a missing one is
    fatal). The definition's module attributes are read from its source and checked against the layout table's
    names: every top-level module and every module of a gated block that XATTN / QWEN2 write."""
    import ast

    from runtime.core import trtllm_layout as layout

    tree = ast.parse((ROOT / "builder" / "trtllm_nvlm.py").read_text())
    block = {r.target.split(".")[3] for r in layout.XATTN}  # transformer.xattn_layers.{j}.<module>...
    assert block == {"input_layernorm", "cross_attention", "gate_attn", "post_layernorm", "mlp", "gate_ffwd"}
    assert block <= _assigned_attributes(tree, "GatedCrossAttentionBlock")
    model = {r.target.split(".")[1] for r in layout.QWEN2_XATTN if r.target.startswith("transformer.")}
    assert model == {"vocab_embedding", "layers", "xattn_layers", "ln_f"}
    assert model <= _assigned_attributes(tree, "NVLMXModel")
    top = {r.target.split(".")[0] for r in layout.QWEN2_XATTN}
    assert top == {"transformer", "lm_head"} and top <= _assigned_attributes(tree, "NVLMXForCausalLM")
