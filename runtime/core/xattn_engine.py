"""NVLM-X/H engines as TensorRT-LLM's C++ runtime sees them: attention-layer indices, per-layer KV heads, and
the serving parameters that follow from them.

Pure (no TensorRT-LLM), so that it is tested here: the GPU-host model definition (builder/trtllm_nvlm.py), the
trtllm-build command (runtime/core/gpu_host.py) and the Triton repository (triton_repo/specs.py) all read it.
What it encodes, read from NVIDIA's sources (TensorRT-LLM 1.x; none of it has run here):

- gptJsonConfig.cpp: an engine has cross-attention when `pretrained_config.cross_attention` is true (or it is
  named DecoderModel; the runtime never tests for a model name otherwise); `max_encoder_input_len` comes from
  `build_config`; `num_kv_heads_per_layer` and `num_kv_heads_per_cross_attn_layer` must each hold one entry per
  attention layer (`num_hidden_layers`), full head counts (the runtime divides by TP).
- kvCacheManager.cpp / gptAttentionPlugin.cpp: the self and the cross KV cache each keep one pool per distinct
  head count (0 included) and map every attention layer to (pool, index in pool); an attention module finds its
  row by its `local_layer_idx`. So every attention module gets its own index below `num_hidden_layers`, and the
  two head lists say which cache it uses: a Qwen2 layer has KV heads in the self cache and 0 in the cross cache,
  a cross-attention layer the reverse — the same scheme as TensorRT-LLM's mllama config.
- modelConfig.h: the cross list is not offset by the PP rank's first layer (the self list is), so an engine
  with PP > 1 would give the wrong heads to later stages: X/H engines are built with PP = 1.
- trtGptModelInflightBatching.cpp: "Must set crossKvCacheFraction for encoder-decoder model" — the share of
  the KV memory that goes to the cross cache is required with cross-attention and refused without it.

This project's indices: Qwen2 layer k → k, cross-attention layer i → num_decoder_layers + i (its position in
the decoder is `cross_attention_layers[i]`, which is the model definition's business, not the runtime's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from .errors import ConfigError

# the fields of an engine's `pretrained_config` that the C++ runtime reads for cross-attention, beside
# TensorRT-LLM's usual ones; `num_decoder_layers` is ours (the Qwen2 layers), kept so the config converts once
ENGINE_FIELDS = ("cross_attention", "num_hidden_layers", "num_decoder_layers", "num_kv_heads_per_layer",
                 "num_kv_heads_per_cross_attn_layer")


@dataclass(frozen=True)
class EngineLayers:
    """The attention layers of an NVLM-X/H engine as the C++ runtime indexes them."""
    decoder_layers: int  # Qwen2 self-attention layers
    cross_attention_layers: tuple[int, ...]  # cross-attention layer i follows Qwen2 layer cross_attention_layers[i]
    num_kv_heads: int

    def __post_init__(self):
        if not self.cross_attention_layers:
            raise ConfigError("an engine with cross-attention needs at least one cross-attention layer")
        if any(not 0 <= a < self.decoder_layers for a in self.cross_attention_layers):
            raise ConfigError(f"cross_attention_layers {list(self.cross_attention_layers)} must follow layers of the "
                              f"{self.decoder_layers}-layer decoder")

    @property
    def attention_layers(self) -> int:
        """`num_hidden_layers` as the runtime counts them: every module with its own KV-cache row."""
        return self.decoder_layers + len(self.cross_attention_layers)

    def self_index(self, k: int) -> int:
        return k

    def cross_index(self, i: int) -> int:
        return self.decoder_layers + i

    @property
    def kv_heads_per_layer(self) -> list[int]:
        return [self.num_kv_heads] * self.decoder_layers + [0] * len(self.cross_attention_layers)

    @property
    def cross_kv_heads_per_layer(self) -> list[int]:
        return [0] * self.decoder_layers + [self.num_kv_heads] * len(self.cross_attention_layers)

    @property
    def kv_cache_pools(self) -> int:
        """First dimension of `kv_cache_block_offsets` and `host_kv_cache_pool_pointers`: one pool per distinct
        head count (0 included), for the cross cache as for the self cache."""
        return len(set(self.kv_heads_per_layer))

    @property
    def cross_kv_cache_pools(self) -> int:
        return len(set(self.cross_kv_heads_per_layer))

    def pretrained_config_fields(self) -> dict:
        """What the engine's `pretrained_config` carries beyond the checkpoint's config.json."""
        return {"cross_attention": True, "num_hidden_layers": self.attention_layers,
                "num_decoder_layers": self.decoder_layers, "num_kv_heads_per_layer": self.kv_heads_per_layer,
                "num_kv_heads_per_cross_attn_layer": self.cross_kv_heads_per_layer}


def engine_layers(config: Mapping) -> EngineLayers:
    """From a TensorRT-LLM checkpoint's config.json (`num_hidden_layers`: the Qwen2 layers) or an engine's
    `pretrained_config` (which adds `num_decoder_layers`, the Qwen2 layers, and counts every attention layer in
    `num_hidden_layers`): the one conversion, safe to apply twice."""
    layers = config.get("cross_attention_layers")
    if not layers:
        raise ConfigError("config has no cross_attention_layers: not an NVLM-X/H decoder")
    decoder = config.get("num_decoder_layers") or config["num_hidden_layers"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    return EngineLayers(int(decoder), tuple(int(a) for a in layers), int(kv))


def cross_kv_cache_fraction(layers: EngineLayers, *, max_encoder_input_len: int, max_seq_len: int) -> float:
    """The backend's `cross_kv_cache_fraction`: the share of the KV-cache memory the cross cache gets. Sized so
    that both caches fill together at full load — every request with its largest key count and sequence: the
    cross cache holds max_encoder_input_len tokens per cross-attention layer, the self cache max_seq_len tokens
    per Qwen2 layer, at the same bytes per token and layer (same KV heads and head size). Rounded up to the
    hundredth, so the cross cache (which a request needs whole before it starts) is never the short one."""
    if max_encoder_input_len < 1 or max_seq_len < 1:
        raise ConfigError("cross_kv_cache_fraction needs positive max_encoder_input_len and max_seq_len")
    cross = len(layers.cross_attention_layers) * max_encoder_input_len
    selfs = layers.decoder_layers * max_seq_len
    return min(0.95, math.ceil(100 * cross / (cross + selfs)) / 100)
