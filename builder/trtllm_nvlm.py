"""NVLM-X and NVLM-H decoders as TensorRT-LLM 1.2 engine-path models, for `trtllm-build --model_cls_file`.

NOT RUN: TensorRT-LLM cannot be installed where this project is developed, so this file has never built an
engine. It is written against TensorRT-LLM's sources (1.x; the files and what was taken from each are in
docs/engine.md, "NVLM-X/H engines"), and what could be checked without TensorRT-LLM is checked in
runtime/core/xattn_engine.py and tests/test_xattn_engine.py. Importing it without TensorRT-LLM fails with the
release to use.

The model, against the reference (runtime/cross_reference.py, whose tokens the served CPU targets match):
- the Qwen2 layers are TensorRT-LLM's own (`QWenDecoderLayer`, the layer its Qwen2 model builds), loaded from the
  same `transformer.layers.{k}` names as an NVLM-D build;
- after Qwen2 layer `cross_attention_layers[i]` runs gated cross-attention block i
  (`transformer.xattn_layers.{i}`, runtime/core/trtllm_layout.py XATTN), built on TensorRT-LLM's mllama engine
  block: `Attention(cross_attention=True)` without rotary embedding or q/k norms, whose fused qkv projects the
  text (q) and the encoder output (k, v: the request's image keys), then
      h = h + tanh(gate_attn) · where(reads, XAttn(norm(h)), 0)
      h = h + tanh(gate_ffwd) · where(reads, MLP(norm(h)), 0)
  where `reads` (a token reads at least one key) is the maximum of its `cross_attention_mask` row. A `where`, not
  a product as in mllama, so that whatever the attention kernel makes of a row with every key masked (NaN
  included) never reaches the sum. A batch in which every request asks `skip_cross_attn_blocks` (the entry
  model asks when a request has no image key) keeps h as it is;
- NVLM-H's thumbnail tokens come through the prompt table (`vocab_embedding(ids, table, tasks, vocab_size)`,
  which trtllm-build turns into TensorRT-LLM's PromptTuningEmbedding when --max_multimodal_len > 0), exactly as
  NVLM-D's image tokens do.

How the C++ runtime indexes the attention layers (one index per self- and per cross-attention layer, per-layer
head lists, two KV-cache pools each) is runtime/core/xattn_engine.py; the engine config carries it.

Loaded by trtllm-build through `SourceFileLoader('models', path)`: absolute imports only. It registers both
classes in TensorRT-LLM's MODEL_MAP when imported, because `PretrainedConfig.from_dict` looks the checkpoint's
`architecture` up there (a KeyError otherwise) to find the config class. Rank builds run in one process
(`--workers 1`, runtime/core/gpu_host.py), as spawned workers could not import the module `models` again.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict

import numpy as np

try:
    import tensorrt as trt
    from tensorrt_llm._common import default_net
    from tensorrt_llm._utils import pad_vocab_size
    from tensorrt_llm.functional import (
        Conditional,
        PositionEmbeddingType,
        Tensor,
        constant,
        gather_last_token_logits,
        gt,
        reduce,
        tanh,
        where,
    )
    from tensorrt_llm.layers import (
        Attention,
        AttentionMaskParams,
        AttentionMaskType,
        AttentionParams,
        ColumnLinear,
        Embedding,
        GatedMLP,
        KeyValueCacheParams,
        RmsNorm,
    )
    from tensorrt_llm.models import MODEL_MAP
    from tensorrt_llm.models.modeling_utils import PretrainedModel
    from tensorrt_llm.models.qwen.config import QWenConfig
    from tensorrt_llm.models.qwen.model import QWenDecoderLayer
    from tensorrt_llm.module import Module, ModuleList
    from tensorrt_llm.parameter import Parameter
except ImportError as e:  # a CPU machine, or a TensorRT-LLM without the engine path
    raise ImportError(f"builder/trtllm_nvlm.py is the NVLM-X/H model definition for trtllm-build and needs "
                      f"TensorRT-LLM 1.2 with TensorRT (NGC container nvcr.io/nvidia/tensorrt-llm/release:1.2.x, "
                      f"or deploy/Dockerfile): {e}") from None

from runtime.core.xattn_engine import engine_layers


class NVLMXConfig(QWenConfig):
    """Qwen2's config plus the cross-attention layers, converted once to the engine's layer indexing: every
    field of runtime/core/xattn_engine.EngineLayers.pretrained_config_fields lands in the engine's
    `pretrained_config`, which the C++ runtime reads (`to_dict` writes every attribute)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name, value in engine_layers(vars(self)).pretrained_config_fields().items():
            setattr(self, name, value)
        if self.mapping.pp_size > 1:
            raise ValueError(f"{self.architecture} engines are built with PP = 1 (the runtime's cross-attention "
                             "head list is not offset by the pipeline stage); use tensor parallelism")


def _zero_unless(reads: Tensor, x: Tensor) -> Tensor:
    """x on the rows that read a key, 0 elsewhere. The zero is made in x's dtype: trtllm-build networks are
    strongly typed, and TensorRT's select takes both sides in one type (a Python 0.0 would be float32)."""
    return where(reads, x, constant(np.zeros(1, np.float32)).cast(x.dtype))


def _tanh_gate(gate: Parameter, dtype) -> Tensor:
    # tanh in float32, as mllama's block computes it, then the activation dtype
    return tanh(gate.value.cast(trt.float32)).cast(dtype)


class GatedCrossAttentionBlock(Module):
    """One gated cross-attention layer; `layer_idx`: its attention-layer index for the runtime's KV caches."""

    def __init__(self, config: NVLMXConfig, layer_idx: int):
        super().__init__()
        mapping, dtype = config.mapping, config.dtype
        self.input_layernorm = RmsNorm(normalized_shape=config.hidden_size, eps=config.norm_epsilon, dtype=dtype)
        self.cross_attention = Attention(
            local_layer_idx=layer_idx, hidden_size=config.hidden_size, attention_head_size=config.head_size,
            num_attention_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
            max_position_embeddings=config.max_position_embeddings, dtype=dtype,
            attention_mask_type=AttentionMaskType.causal,  # mllama's setting; the plugin applies the custom mask
            bias=False, dense_bias=False,  # NVLM's cross-attention projections have no biases
            position_embedding_type=PositionEmbeddingType.learned_absolute,  # no rotary: keys are image tokens
            cross_attention=True, qk_layernorm=False,
            tp_group=mapping.tp_group, tp_size=mapping.tp_size, tp_rank=mapping.tp_rank,
            quant_mode=config.quant_mode)
        self.gate_attn = Parameter(shape=(1,), dtype=dtype)
        self.post_layernorm = RmsNorm(normalized_shape=config.hidden_size, eps=config.norm_epsilon, dtype=dtype)
        self.mlp = GatedMLP(hidden_size=config.hidden_size, ffn_hidden_size=config.intermediate_size,
                            hidden_act=config.hidden_act, bias=False, dtype=dtype,
                            tp_group=mapping.tp_group, tp_size=mapping.tp_size, quant_mode=config.quant_mode)
        self.gate_ffwd = Parameter(shape=(1,), dtype=dtype)

    def forward(self, hidden_states: Tensor, *, encoder_output: Tensor, reads: Tensor, attention_mask_params,
                kv_cache_params, attention_params, cross_kv_cache_gen: Tensor, skip: Tensor | None, use_cache: bool):
        block_input = hidden_states
        attention = self.cross_attention(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask_params.cross_attention_mask,
            attention_packed_mask=attention_mask_params.cross_attention_packed_mask,
            encoder_output=encoder_output, use_cache=use_cache, kv_cache_params=kv_cache_params,
            attention_params=attention_params, cross_kv_cache_gen=cross_kv_cache_gen, skip_attn=skip)
        present = None
        if use_cache:
            attention, present = attention
        hidden_states = block_input + _tanh_gate(self.gate_attn, attention.dtype) * _zero_unless(reads, attention)

        # The MLP half only runs when some request reads keys; the attention plugin cannot sit inside a
        # TensorRT conditional (mllama's comment), so it runs above with its own skip flag.
        if skip is not None:
            branch = Conditional(skip)
            skipped = branch.add_input(block_input)
            hidden_states = branch.add_input(hidden_states)
            reads = branch.add_input(reads)
        mlp = self.mlp(self.post_layernorm(hidden_states))
        hidden_states = hidden_states + _tanh_gate(self.gate_ffwd, mlp.dtype) * _zero_unless(reads, mlp)
        if skip is not None:
            hidden_states = branch.add_output(skipped, hidden_states)
        return (hidden_states, present) if use_cache else hidden_states


def _layer_cache(params: KeyValueCacheParams, past) -> KeyValueCacheParams:
    """One layer's view of the KV-cache inputs: the pools, offsets and mapping are shared, each attention
    module finds its own rows by its layer index."""
    return KeyValueCacheParams(
        past_key_value=[past], host_past_key_value_lengths=params.host_past_key_value_lengths,
        host_max_attention_window_sizes=params.host_max_attention_window_sizes,
        host_sink_token_length=params.host_sink_token_length, cache_indirection=params.cache_indirection,
        kv_cache_block_offsets=params.kv_cache_block_offsets,
        host_kv_cache_block_offsets=params.host_kv_cache_block_offsets,
        host_kv_cache_pool_pointers=params.host_kv_cache_pool_pointers,
        host_kv_cache_pool_mapping=params.host_kv_cache_pool_mapping,
        cross_kv_cache_block_offsets=params.cross_kv_cache_block_offsets,
        host_cross_kv_cache_block_offsets=params.host_cross_kv_cache_block_offsets,
        host_cross_kv_cache_pool_pointers=params.host_cross_kv_cache_pool_pointers,
        host_cross_kv_cache_pool_mapping=params.host_cross_kv_cache_pool_mapping)


class NVLMXModel(Module):
    def __init__(self, config: NVLMXConfig):
        super().__init__()
        self.plan = plan = engine_layers(vars(config))
        # plain Embedding, as TensorRT-LLM's Qwen model: the build makes it parallel (use_parallel_embedding)
        # and a prompt-tuning embedding (--max_multimodal_len) after construction
        self.vocab_embedding = Embedding(config.vocab_size, config.hidden_size, dtype=config.dtype)
        self.layers = ModuleList([QWenDecoderLayer(config, plan.self_index(k)) for k in range(plan.decoder_layers)])
        self.xattn_layers = ModuleList([GatedCrossAttentionBlock(config, plan.cross_index(i))
                                        for i in range(len(plan.cross_attention_layers))])
        self.ln_f = RmsNorm(normalized_shape=config.hidden_size, eps=config.norm_epsilon, dtype=config.dtype)

    def forward(self, input_ids: Tensor, encoder_output: Tensor, use_cache, attention_mask_params, kv_cache_params,
                attention_params, cross_kv_cache_gen, skip_cross_attn_blocks=None, prompt_embedding_table=None,
                prompt_tasks=None, prompt_vocab_size=None):
        table = [prompt_embedding_table, prompt_tasks, prompt_vocab_size] if prompt_embedding_table is not None else []
        hidden_states = self.vocab_embedding(input_ids, *table)
        # a token reads at least one key: the maximum of its mask row ([tokens, 1], the runtime's last row for
        # generated tokens), computed once for every block
        mask = attention_mask_params.cross_attention_mask
        reads = gt(reduce(mask.cast(trt.float32), trt.ReduceOperation.MAX, dim=-1, keepdim=True), 0.5)
        kv_cache_params.fill_none_tensor_list(self.plan.attention_layers)
        pasts = kv_cache_params.past_key_value
        after = {layer: i for i, layer in enumerate(self.plan.cross_attention_layers)}
        presents = []
        for k, layer in enumerate(self.layers):
            out = layer(hidden_states, use_cache=use_cache, attention_params=attention_params,
                        kv_cache_params=_layer_cache(kv_cache_params, pasts[self.plan.self_index(k)]))
            hidden_states = out[0] if use_cache else out
            presents += [out[1]] if use_cache else []
            if k in after:
                i = after[k]
                out = self.xattn_layers[i](
                    hidden_states, encoder_output=encoder_output, reads=reads,
                    attention_mask_params=attention_mask_params, attention_params=attention_params,
                    kv_cache_params=_layer_cache(kv_cache_params, pasts[self.plan.cross_index(i)]),
                    cross_kv_cache_gen=cross_kv_cache_gen, skip=skip_cross_attn_blocks, use_cache=use_cache)
                hidden_states = out[0] if use_cache else out
                presents += [out[1]] if use_cache else []
        hidden_states = self.ln_f(hidden_states)
        return (hidden_states, tuple(presents)) if use_cache else hidden_states


class NVLMXForCausalLM(PretrainedModel):
    config_class = NVLMXConfig

    def __init__(self, config: NVLMXConfig):
        super().__init__(config)
        Attention.create_attention_const_params(self, config)  # the rotary tables of the Qwen2 layers
        self.position_embedding_type = config.position_embedding_type
        self.transformer = NVLMXModel(config)
        mapping = config.mapping
        # the checkpoint's lm_head rows are the vocabulary padded to a multiple of TP (trtllm_layout `vocab`)
        self.lm_head = ColumnLinear(config.hidden_size, pad_vocab_size(config.vocab_size, mapping.tp_size),
                                    bias=False, dtype=config.dtype, tp_group=mapping.tp_group, tp_size=mapping.tp_size,
                                    gather_output=True)

    def forward(self, input_ids: Tensor, encoder_output: Tensor, use_cache=True, attention_mask_params=None,
                last_token_ids=None, kv_cache_params=None, attention_params=None, cross_kv_cache_gen=None,
                skip_cross_attn_blocks=None, prompt_embedding_table=None, prompt_tasks=None, prompt_vocab_size=None):
        attention_params = Attention.fill_attention_params(self, attention_params)
        hidden_states = self.transformer(
            input_ids, encoder_output, use_cache, attention_mask_params, kv_cache_params, attention_params,
            cross_kv_cache_gen, skip_cross_attn_blocks, prompt_embedding_table, prompt_tasks, prompt_vocab_size)
        if use_cache:
            hidden_states, _ = hidden_states  # the paged KV cache is written in place: no present outputs
        hidden_states = gather_last_token_logits(hidden_states, last_token_ids,
                                                 default_net().plugin_config.remove_input_padding)
        logits = self.lm_head(hidden_states)
        logits.mark_output("logits", self.config.logits_dtype)
        return logits

    def prepare_inputs(self, max_batch_size, max_input_len, max_seq_len, max_num_tokens, use_cache=True,
                       max_beam_width=1, prompt_embedding_table_size=0, max_encoder_input_len=None, **unused):
        """The engine's inputs: a decoder-only model's (as the C++ runtime feeds Qwen2) plus the encoder and
        cross-KV-cache inputs it feeds an engine with cross-attention (named and shaped as TensorRT-LLM's mllama
        declares them). TensorRT-LLM's builder passes `max_encoder_input_len` only to models named DecoderModel
        or *mllama* (builder.py), so for this one it is read from the trtllm-build command line it runs under,
        the same flag the builder writes into the engine's build_config."""
        net = default_net().plugin_config
        if not (net.gpt_attention_plugin and net.remove_input_padding and net.paged_kv_cache and use_cache):
            raise ValueError("NVLM-X/H engines need --gpt_attention_plugin, --remove_input_padding enable and "
                             "--kv_cache_type paged (runtime/core/gpu_host.py trtllm_build_args passes them)")
        enc = max_encoder_input_len or _command_line_int("--max_encoder_input_len")
        if enc < 1:
            raise ValueError("NVLM-X/H engines need --max_encoder_input_len ≥ 1 (the image keys of one request)")
        plan, dtype, hidden = self.transformer.plan, self.config.dtype, self.config.hidden_size
        layers, block = plan.attention_layers, net.tokens_per_block
        bb = _range(max_batch_size * max_beam_width, low=1)
        tokens = [1, max_batch_size * max_beam_width, max(max_num_tokens, max_batch_size * max_beam_width)]
        enc_len = [0, (enc + 1) // 2, enc]  # 0: a generation step carries no encoder tokens
        enc_tokens = [0, (enc * max_batch_size + 1) // 2, enc * max_batch_size]

        def t(name, trt_dtype, shape, dims):
            return Tensor(name=name, dtype=trt_dtype, shape=shape, dim_range=OrderedDict(dims))

        i32, i64 = trt.int32, trt.int64
        per_seq = [("batch_size_beam_width", [bb])]
        input_ids = t("input_ids", i32, [-1], [("num_tokens", [tokens])])
        attention_params = AttentionParams(
            sequence_length=t("sequence_length", i32, [-1], per_seq),
            context_lengths=t("context_lengths", i32, [-1], per_seq),
            host_context_lengths=t("host_context_lengths", i32, [-1], per_seq),
            max_context_length=max_input_len,
            host_request_types=t("host_request_types", i32, [-1], per_seq),
            host_runtime_perf_knobs=t("host_runtime_perf_knobs", i64, [16], [("perf_knob_size", [16])]),
            host_context_progress=t("host_context_progress", i64, [1], [("context_progress_size", [1])]),
            encoder_input_lengths=t("encoder_input_lengths", i32, [-1], per_seq),
            # a shape carrier: the runtime gives it the longest key count of the batch as its length
            encoder_max_input_length=t("encoder_max_input_length", i32, [-1],
                                       [("encoder_max_input_length", [[1, (enc + 1) // 2, enc]])]))
        blocks = [[math.ceil(n / block) for n in _range(max_seq_len, low=0)]]
        cross_blocks = [[math.ceil(n / block) for n in enc_len]]

        def offsets(name, pools, max_blocks, cache):  # cache: "kv" or "cross_kv", whose pool counts may differ
            return t(name, i32, [pools, -1, 2, -1], [(f"{cache}_pools", [pools]), ("batch_size_beam_width", [bb]),
                                                     ("kv", [2]), (f"{cache}_max_blocks_per_seq", max_blocks)])

        def pool_pointers(name, pools, cache):
            return t(name, i64, [pools, 2], [(f"{cache}_pools", [pools]), ("num_pools", [2])])

        def pool_mapping(name):  # (pool, index within the pool) for every attention layer
            return t(name, i32, [layers, 2], [("pools_mapping", [layers]), ("layer_cache_pool_locator", [2])])

        kv_cache_params = KeyValueCacheParams(
            past_key_value=[None] * layers,
            host_past_key_value_lengths=t("host_past_key_value_lengths", i32, [-1], per_seq),
            host_max_attention_window_sizes=t("host_max_attention_window_sizes", i32, [layers],
                                              [("num_layers", [layers])]),
            host_sink_token_length=t("host_sink_token_length", i32, [1], [("scalar", [1])]),
            cache_indirection=t("cache_indirection", i32, [-1, -1, -1],
                                [("batch_size_cache", [_range(max_batch_size, low=1)]),
                                 ("beam_width", [_range(max_beam_width, low=1)]),
                                 ("max_seq_len", [_range(max_seq_len, low=0)])]),
            kv_cache_block_offsets=offsets("kv_cache_block_offsets", plan.kv_cache_pools, blocks, "kv"),
            host_kv_cache_block_offsets=offsets("host_kv_cache_block_offsets", plan.kv_cache_pools, blocks, "kv"),
            host_kv_cache_pool_pointers=pool_pointers("host_kv_cache_pool_pointers", plan.kv_cache_pools, "kv"),
            host_kv_cache_pool_mapping=pool_mapping("host_kv_cache_pool_mapping"),
            cross_kv_cache_block_offsets=offsets("cross_kv_cache_block_offsets", plan.cross_kv_cache_pools,
                                                 cross_blocks, "cross_kv"),
            host_cross_kv_cache_block_offsets=offsets("host_cross_kv_cache_block_offsets", plan.cross_kv_cache_pools,
                                                      cross_blocks, "cross_kv"),
            host_cross_kv_cache_pool_pointers=pool_pointers("host_cross_kv_cache_pool_pointers",
                                                            plan.cross_kv_cache_pools, "cross_kv"),
            host_cross_kv_cache_pool_mapping=pool_mapping("host_cross_kv_cache_pool_mapping"))
        # the dense mask [tokens, keys] (True: the token reads that key) and its bit-packed form, which the
        # runtime builds for context requests: rows padded to 128 over the batch, columns to 256, 32 bits a word.
        # Passed to the layers as the request sent it: the context kernel reads the packed bits (set: attend),
        # the generation kernel one dense value per row (1: attend) — unlike mllama, no in-graph rewrite
        # (docs/engine.md, "The mask, as the kernels read it")
        packed_rows = max_batch_size * math.ceil(max_input_len / 128) * 128
        packed_cols = math.ceil(enc / 256) * 256 // 32
        attention_mask_params = AttentionMaskParams(
            None, None,
            # its own dimension names, as mllama's (the same ranges as input_ids' and the encoder output's)
            t("cross_attention_mask", trt.bool, [-1, -1], [("mask_num_tokens", [tokens]),
                                                           ("mask_encoder_len", [enc_len])]),
            t("cross_attention_packed_mask", i32, [-1, -1],
              [("cross_packed_mask_dim0", [[1, (packed_rows + 1) // 2, packed_rows]]),
               ("cross_packed_mask_dim1", [[0, (packed_cols + 1) // 2, packed_cols]])]))
        inputs = {
            "input_ids": input_ids,
            "encoder_output": t("encoder_output", dtype, [-1, hidden],
                                [("encoder_num_tokens", [enc_tokens]), ("hidden_size", [hidden])]),
            "use_cache": True,
            "attention_mask_params": attention_mask_params,
            "last_token_ids": t("last_token_ids", i32, [-1], [("batch_size_last_token_ids", [bb])]),
            "kv_cache_params": kv_cache_params,
            "attention_params": attention_params,
            "cross_kv_cache_gen": t("cross_kv_cache_gen", trt.bool, [1], [("boolean", [1])]),
        }
        if getattr(self.config, "skip_cross_attn_blocks", False):
            inputs["skip_cross_attn_blocks"] = t("skip_cross_attn_blocks", trt.bool, [1], [("boolean", [1])])
        if prompt_embedding_table_size > 0:  # NVLM-H: the thumbnails' rows
            inputs["prompt_embedding_table"] = t(
                "prompt_embedding_table", dtype, [-1, hidden],
                [("prompt_embedding_table_size", [_range(prompt_embedding_table_size, low=1)]),
                 ("hidden_size", [hidden])])
            inputs["prompt_tasks"] = t("tasks", i32, [-1], [("num_tokens", [tokens])])
            inputs["prompt_vocab_size"] = t("prompt_vocab_size", i32, [1], [("size", [1])])
        return inputs


class NVLMHForCausalLM(NVLMXForCausalLM):
    """NVLM-H: the same decoder; its thumbnails reach it through the prompt table (--max_multimodal_len)."""


def _range(n: int, *, low: int) -> list[int]:
    """A TensorRT optimization-profile range [min, opt, max] for a dimension of at most n."""
    return [low, max(low, (n + 1) // 2), n]


def _command_line_int(flag: str) -> int:
    """An integer flag of the trtllm-build command this process runs (`--flag N` or `--flag=N`)."""
    argv = sys.argv
    for k, a in enumerate(argv):
        if a == flag and k + 1 < len(argv):
            return int(argv[k + 1])
        if a.startswith(flag + "="):
            return int(a.split("=", 1)[1])
    raise ValueError(f"NVLM-X/H engines are sized by trtllm-build {flag} N (the image keys of one request), "
                     "which this command does not give; engines/build_engines.sh passes it")


for _cls in (NVLMXForCausalLM, NVLMHForCausalLM):
    MODEL_MAP[_cls.__name__] = _cls
