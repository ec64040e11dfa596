"""The TensorRT-LLM checkpoint config.json, field by field, with where each value comes from.

TensorRT-LLM's checkpoint loader (`tensorrt_llm/models/modeling_utils.py: PretrainedConfig`,
`models/qwen/config.py: QWenConfig`, `models/__init__.py: MODEL_MAP`) reads these keys; the
expected values are derived here from the NVLM-D-72B fixture (docs/released_layout.md) and the build options.
"""

import pytest

from runtime.core.families import from_hf
from runtime.core.llm_formats import LLMBuildOptions, get_format
from runtime.core.trtllm_checkpoint import trtllm_config, unquantized_section

# field → (expected value for NVLM-D-72B FP8 TP2 + FP8 KV, source)
EXPECTED = {
    "architecture": ("Qwen2ForCausalLM", "MODEL_MAP key of TensorRT-LLM's QWenForCausalLM for Qwen2"),
    "qwen_type": ("qwen2", "fixed: llm_config.model_type says 'llama' in the released NVLM-D config; "
                           "'qwen' would halve intermediate_size in QWenDecoderLayer"),
    "dtype": ("bfloat16", "format's activation dtype (bf16 for fp8/awq)"),
    "logits_dtype": ("float32", "full-precision logits for sampling"),
    "num_hidden_layers": (80, "llm_config.num_hidden_layers"),
    "num_attention_heads": (64, "llm_config.num_attention_heads"),
    "num_key_value_heads": (8, "llm_config.num_key_value_heads"),
    "hidden_size": (8192, "llm_config.hidden_size"),
    "intermediate_size": (29568, "llm_config.intermediate_size"),
    "head_size": (128, "hidden_size / num_attention_heads"),
    "vocab_size": (152064, "llm_config.vocab_size (embedding rows, not tokenizer length)"),
    "max_position_embeddings": (32768, "llm_config.max_position_embeddings"),
    "hidden_act": ("silu", "llm_config.hidden_act"),
    "norm_epsilon": (1e-6, "llm_config.rms_norm_eps"),
    "position_embedding_type": ("rope_gpt_neox", "Qwen2 rotary: rotate-half (GPT-NeoX) layout"),
    "rotary_base": (1e6, "llm_config.rope_theta"),
    "rotary_scaling": (None, "none: the release (transformers 4.39.3 Qwen2) ignores llm_config.rope_scaling "
                              "(docs/released_layout.md)"),
    "attn_bias": (True, "Qwen2 has q/k/v biases (fused into attention.qkv.bias)"),
    "mlp_bias": (False, "llm_config.mlp_bias / Qwen2 MLP has none"),
    "use_parallel_embedding": (True, "vocab rows split over TP, as modelopt exports them"),
    "embedding_sharding_dim": (0, "split along the vocabulary"),
    "share_embedding_table": (False, "lm_head is a separate tensor"),
    "tie_word_embeddings": (False, "llm_config.tie_word_embeddings"),
    "mapping": ({"world_size": 2, "tp_size": 2, "pp_size": 1}, "--tp / --pp"),
}


@pytest.fixture(scope="module")
def config(config_72b):
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
    return trtllm_config(from_hf(config_72b), LLMBuildOptions(get_format("fp8"), tp=2, kv_cache_fp8=True), quant)


@pytest.mark.parametrize("field", list(EXPECTED))
def test_field(config, field):
    value, source = EXPECTED[field]
    assert config[field] == value, source


def test_quantization_section_is_passed_through(config):
    assert config["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}


def test_unquantized_section(config_72b):
    c = trtllm_config(from_hf(config_72b), LLMBuildOptions(get_format("fp16")), unquantized_section())
    assert c["dtype"] == "float16" and c["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}


def test_every_field_is_documented(config):
    assert set(config) - {"quantization", "producer"} == set(EXPECTED)
