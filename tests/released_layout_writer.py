"""A minimal, independent writer of an NVLM-D checkpoint in the released layout.

It deliberately shares no code with `builder/` (names, shapes and config keys are spelled out
here by hand), so that loading its output proves nvlm-trt reads checkpoints it did not write.
Like the release (NVLM-D-72B's modeling_intern_vit.py and the byte sizes of its shards), the vision
attention has padding heads (`padding_heads`, 7 by default; their weights are random, not zero, so a
loader that drops them computes something else) and the stored dtypes are mixed: F32 for the LLM's q/k/v
weights and biases and the vision qkv, proj.weight, q_norm and k_norm; bf16 for the rest. It differs from
the embedded default where the format allows: three shards, `select_layer` -2, `ps_version` "v1", one KV
head, and a tokenizer with no BPE merges. `padding_heads=0` writes the layout without padding heads.

    python tests/released_layout_writer.py OUT_DIR [--seed N] [--padding-heads N]
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file

V_HIDDEN, V_LAYERS, V_HEADS, V_MLP = 48, 3, 3, 96
V_HEAD_DIM = V_HIDDEN // V_HEADS
L_HIDDEN, L_LAYERS, L_HEADS, L_KV, L_MLP = 128, 3, 2, 1, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"]


def tokenizer_json():
    # Byte-level alphabet as in GPT-2 / Qwen2: printable bytes map to themselves, the rest to U+0100+.
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab = {c: i for i, c in enumerate(chars)}
    added = [{"id": 256 + k, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for k, t in enumerate(SPECIALS)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def config(vocab):
    return {
        "architectures": ["NVLM_D"],
        "auto_map": {"AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
                     "AutoModel": "modeling_nvlm_d.NVLM_D_Model"},
        "model_type": "NVLM_D", "downsample_ratio": 0.5, "force_image_size": 448, "dynamic_image_size": True,
        "max_dynamic_patch": 4, "min_dynamic_patch": 1, "ps_version": "v1", "select_layer": -2,
        "template": "chatml", "torch_dtype": "bfloat16", "use_thumbnail": True,
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "hidden_size": V_HIDDEN, "num_hidden_layers": V_LAYERS, "num_attention_heads": V_HEADS,
                          "intermediate_size": V_MLP, "image_size": 448, "patch_size": 14, "num_channels": 3,
                          "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "qk_normalization": True,
                          "qkv_bias": False, "hidden_act": "gelu", "torch_dtype": "bfloat16"},
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "llama",
                       "hidden_size": L_HIDDEN, "num_hidden_layers": L_LAYERS, "num_attention_heads": L_HEADS,
                       "num_key_value_heads": L_KV, "intermediate_size": L_MLP, "vocab_size": vocab,
                       "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                       "hidden_act": "silu", "tie_word_embeddings": False, "eos_token_id": 258,
                       "bos_token_id": 256, "torch_dtype": "bfloat16"},
    }


def tensors(vocab, seed, padding_heads=7):
    g = torch.Generator().manual_seed(seed)
    attn = (V_HEADS + padding_heads) * V_HEAD_DIM  # q/k/v width with the padding heads
    bf16 = torch.bfloat16

    def r(*shape, std=0.05, dtype=torch.bfloat16):
        return (std * torch.randn(*shape, generator=g)).to(dtype)

    def ones(n, dtype):
        return (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    f32 = torch.float32
    t = {
        "vision_model.embeddings.class_embedding": r(1, 1, V_HIDDEN, dtype=bf16),
        "vision_model.embeddings.patch_embedding.weight": r(V_HIDDEN, 3, 14, 14, std=0.02, dtype=bf16),
        "vision_model.embeddings.patch_embedding.bias": r(V_HIDDEN, dtype=bf16),
        "vision_model.embeddings.position_embedding": r(1, 1025, V_HIDDEN, dtype=bf16),
    }
    for i in range(V_LAYERS):
        p = f"vision_model.encoder.layers.{i}."
        t.update({
            p + "attn.qkv.weight": r(3 * attn, V_HIDDEN, std=0.15, dtype=f32),
            p + "attn.q_norm.weight": ones(attn, f32), p + "attn.k_norm.weight": ones(attn, f32),
            p + "attn.proj.weight": r(V_HIDDEN, attn, std=0.15, dtype=f32), p + "attn.proj.bias": r(V_HIDDEN, dtype=bf16),
            p + "mlp.fc1.weight": r(V_MLP, V_HIDDEN, std=0.15, dtype=bf16), p + "mlp.fc1.bias": r(V_MLP, dtype=bf16),
            p + "mlp.fc2.weight": r(V_HIDDEN, V_MLP, std=0.1, dtype=bf16), p + "mlp.fc2.bias": r(V_HIDDEN, dtype=bf16),
            p + "norm1.weight": ones(V_HIDDEN, bf16), p + "norm2.weight": ones(V_HIDDEN, bf16),
            p + "ls1": ones(V_HIDDEN, bf16), p + "ls2": ones(V_HIDDEN, bf16),
        })
    t.update({
        "mlp1.0.weight": ones(4 * V_HIDDEN, torch.bfloat16), "mlp1.0.bias": r(4 * V_HIDDEN),
        "mlp1.1.weight": r(L_MLP, 4 * V_HIDDEN, std=0.07), "mlp1.3.weight": r(L_HIDDEN, L_MLP, std=0.06),
        "language_model.model.norm.weight": ones(L_HIDDEN, torch.bfloat16),
    })
    # A decisive LM head, like a trained model's: lm_head row u is the embedding of token perm[u], so
    # the residual stream of token t clearly prefers one next token (random heads give flat logits).
    emb = torch.randn(vocab, L_HIDDEN, generator=g)
    perm = torch.randperm(vocab, generator=g)
    t["language_model.model.embed_tokens.weight"] = emb.to(torch.bfloat16)
    t["language_model.lm_head.weight"] = (emb[perm] / L_HIDDEN ** 0.5).to(torch.bfloat16)
    d = L_HIDDEN // L_HEADS
    for i in range(L_LAYERS):
        p = f"language_model.model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": ones(L_HIDDEN, torch.bfloat16),
            p + "post_attention_layernorm.weight": ones(L_HIDDEN, torch.bfloat16),
            p + "self_attn.q_proj.weight": r(L_HEADS * d, L_HIDDEN, std=0.09, dtype=f32),
            p + "self_attn.q_proj.bias": r(L_HEADS * d, dtype=f32),
            p + "self_attn.k_proj.weight": r(L_KV * d, L_HIDDEN, std=0.09, dtype=f32), p + "self_attn.k_proj.bias": r(L_KV * d, dtype=f32),
            p + "self_attn.v_proj.weight": r(L_KV * d, L_HIDDEN, std=0.09, dtype=f32), p + "self_attn.v_proj.bias": r(L_KV * d, dtype=f32),
            p + "self_attn.o_proj.weight": r(L_HIDDEN, L_HEADS * d, std=0.09),
            p + "mlp.gate_proj.weight": r(L_MLP, L_HIDDEN, std=0.09), p + "mlp.up_proj.weight": r(L_MLP, L_HIDDEN, std=0.09),
            p + "mlp.down_proj.weight": r(L_HIDDEN, L_MLP, std=0.06),
        })
    return t


def write(out, seed=1, padding_heads=7):
    os.makedirs(out, exist_ok=True)
    vocab = 384  # 260 tokens, padded like Qwen2's embedding rows
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config(vocab), f, indent=2)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(), f)
    t = tensors(vocab, seed, padding_heads)
    groups = {
        "model-00001-of-00003.safetensors": [n for n in t if n.startswith("vision_model.")],
        "model-00002-of-00003.safetensors": [n for n in t if n.startswith("mlp1.") or ".layers.0." in n
                                             and n.startswith("language_model.")],
    }
    taken = {n for g in groups.values() for n in g}
    groups["model-00003-of-00003.safetensors"] = [n for n in t if n not in taken]
    weight_map = {}
    for fname, names in groups.items():
        save_file({n: t[n].contiguous() for n in names}, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    total = sum(v.numel() * v.element_size() for v in t.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--padding-heads", type=int, default=7)
    a = ap.parse_args()
    print(write(a.out, a.seed, a.padding_heads))
