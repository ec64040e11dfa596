"""Typed configuration: the released NVLM-D config, its quirks, and every cross-check."""

import copy
import json

import pytest

from runtime.core.errors import ConfigError, UnsupportedArchitectureError
from runtime.core.families import from_hf, load_config, supported_architectures


def test_released_72b_config_parses(config_72b):
    cfg = from_hf(config_72b)
    assert cfg.family == "nvlm-d" and cfg.architecture == "NVLM_D"
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.num_heads) == (3200, 45, 25)
    assert cfg.vision.qk_normalization and not cfg.vision.qkv_bias and cfg.vision.norm_type == "rms_norm"
    assert cfg.projector.input_size == 12800 and cfg.projector.hidden_size == 29568 and cfg.projector.output_size == 8192
    llm = cfg.llm
    assert llm.architecture == "Qwen2ForCausalLM"  # despite model_type "llama"
    assert (llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads) == (8192, 80, 64, 8)
    assert (llm.intermediate_size, llm.vocab_size, llm.rope_theta, llm.rms_norm_eps) == (29568, 152064, 1e6, 1e-6)
    assert llm.rope_scaling.type == "dynamic" and llm.rope_scaling.factor == 3.0
    p = cfg.preprocess
    assert (p.image_size, p.max_tiles, p.use_thumbnail, p.ps_version, p.tokens_per_tile) == (448, 6, True, "v2", 256)
    assert p.max_tiles_per_image == 7
    assert cfg.select_layer == -1


def test_llama_model_type_quirk_dispatches_on_architectures(config_72b):
    assert config_72b["llm_config"]["model_type"] == "llama"
    assert from_hf(config_72b).llm.architecture == "Qwen2ForCausalLM"


def test_llama_model_type_without_architectures_is_refused(config_72b):
    raw = copy.deepcopy(config_72b)
    del raw["llm_config"]["architectures"]
    with pytest.raises(ConfigError, match="llm_config.*model_type 'llama'"):
        from_hf(raw)
    raw["llm_config"]["model_type"] = "qwen2"
    assert from_hf(raw).llm.architecture == "Qwen2ForCausalLM"


def test_unsupported_architecture_lists_supported(config_72b):
    raw = copy.deepcopy(config_72b)
    raw["architectures"] = ["LlavaForConditionalGeneration"]
    with pytest.raises(UnsupportedArchitectureError) as e:
        from_hf(raw)
    assert "LlavaForConditionalGeneration" in str(e.value)
    for name in supported_architectures():
        assert name in str(e.value)
    raw = copy.deepcopy(config_72b)
    raw["llm_config"]["architectures"] = ["MistralForCausalLM"]
    with pytest.raises(UnsupportedArchitectureError, match="Qwen2ForCausalLM"):
        from_hf(raw)


@pytest.mark.parametrize("path, value, message", [
    (("vision_config", "num_attention_heads"), 24, "not divisible by num_attention_heads"),
    (("llm_config", "num_attention_heads"), 60, "not divisible by num_attention_heads"),
    (("llm_config", "num_key_value_heads"), 7, "not a multiple of num_key_value_heads"),
    (("downsample_ratio",), 0.3, "downsample_ratio"),
    (("ps_version",), "v3", "ps_version"),
    (("force_image_size",), 224, "force_image_size"),
    (("select_layer",), -46, "select_layer"),
    (("max_dynamic_patch",), 0, "max_dynamic_patch"),
    (("template",), "llama3", "template"),
    (("llm_config", "hidden_size"), "8192", "wrong type"),
    (("llm_config", "attention_bias"), False, "attention_bias"),
])
def test_inconsistent_configs_are_refused(config_72b, path, value, message):
    raw = copy.deepcopy(config_72b)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        from_hf(raw)


def test_missing_key_names_the_key(config_72b):
    raw = copy.deepcopy(config_72b)
    del raw["llm_config"]["vocab_size"]
    with pytest.raises(ConfigError, match=r"llm_config\.vocab_size is missing"):
        from_hf(raw)


def test_load_config_names_the_file(tmp_path, config_72b):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_config(tmp_path)
    raw = copy.deepcopy(config_72b)
    raw["ps_version"] = "v9"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config\.json.*ps_version"):
        load_config(tmp_path)


def test_configs_are_frozen(config_72b):
    cfg = from_hf(config_72b)
    with pytest.raises(Exception):
        cfg.llm.hidden_size = 1


def test_no_remote_code_needed(tmp_path, config_72b):
    """transformers' AutoConfig wants to run the checkpoint's code for this config; we do not."""
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(config_72b))
    with pytest.raises(Exception, match="trust_remote_code|configuration_nvlm_d|NVLM_D"):
        transformers.AutoConfig.from_pretrained(str(tmp_path), trust_remote_code=False)
    assert load_config(tmp_path).architecture == "NVLM_D"


def test_llm_config_round_trips_to_transformers(config_72b):
    q = from_hf(config_72b).llm.to_transformers()
    assert (q.hidden_size, q.num_hidden_layers, q.num_key_value_heads, q.rope_theta) == (8192, 80, 8, 1e6)


def test_families_are_registered_objects(config_72b, demo_ckpt):
    """A family is looked up from the checkpoint's architecture; an unknown one is a typed error that
    lists the known ones, for the HF architecture, the family name and the TensorRT-LLM architecture."""
    from dataclasses import replace

    from runtime.core.errors import UnsupportedArchitectureError
    from runtime.core.families import (
        FAMILIES,
        LLM,
        family_for,
        family_for_architecture,
        family_for_trtllm,
        register_family,
    )
    from runtime.reference import NVLMReference, reference_model

    cfg = from_hf(config_72b)
    family = family_for(cfg)
    assert family is family_for_architecture("NVLM_D") and cfg.family == family.name
    assert family.component(LLM).num_params(cfg) > 70e9
    assert family_for_trtllm("Qwen2ForCausalLM") is family is family_for_trtllm("QWenForCausalLM")
    with pytest.raises(UnsupportedArchitectureError, match="known: nvlm-d"):
        family_for("nvlm-z")
    with pytest.raises(UnsupportedArchitectureError, match="'LlamaForCausalLM'.*known: .*Qwen2ForCausalLM"):
        family_for_trtllm("LlamaForCausalLM")
    with pytest.raises(RuntimeError, match="registered twice"):
        register_family(replace(family, name="copy"))  # same architectures
    assert list(FAMILIES) == [family.name, "nvlm-x", "nvlm-h"]
    assert type(reference_model(demo_ckpt)) is NVLMReference
