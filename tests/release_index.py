"""NVLM-D-72B's tensors as released: names (the release's model.safetensors.index.json), shapes and stored
dtypes, written out by hand here from the release's modeling code — no project code.

Shapes: modeling_intern_vit.py (InternViT-6B, 25 heads + 7 padding heads of 128: `num_dummy_heads = 7`),
modeling_nvlm_d.py (`mlp1`: LayerNorm(12800), Linear(12800, 29568, no bias), GELU, Linear(29568, 8192, no
bias)) and transformers' Qwen2ForCausalLM at the llm_config's sizes. Stored dtypes: the index records only
names, so they are inferred from the byte sizes: the release's total_size, 176,901,927,168 bytes, is met
exactly by one assignment — F32 for the LLM's q/k/v weights and biases and the vision qkv, proj.weight,
q_norm and k_norm, bf16 for everything else — and every shard's size (its Git LFS pointer) exceeds the
bytes of the tensors the index puts in it by a safetensors header of under 200 KB.

    python tests/release_index.py INDEX_JSON SHARD_SIZES_TXT OUT_JSON   # writes the fixture once
"""

import json
import re
import sys

C, VM, A = 3200, 12800, (25 + 7) * 128  # vision hidden, MLP, attention width with the padding heads
H, I, V, KV = 8192, 29568, 152064, 8 * 128  # LLM hidden, MLP, vocabulary, k/v width

F32, BF16 = "F32", "BF16"
RULES = [  # (regex over the released name, shape, stored dtype)
    (r"vision_model\.embeddings\.class_embedding", (1, 1, C), BF16),
    (r"vision_model\.embeddings\.patch_embedding\.weight", (C, 3, 14, 14), BF16),
    (r"vision_model\.embeddings\.patch_embedding\.bias", (C,), BF16),
    (r"vision_model\.embeddings\.position_embedding", (1, 1025, C), BF16),
    (r"vision_model\.encoder\.layers\.\d+\.attn\.qkv\.weight", (3 * A, C), F32),
    (r"vision_model\.encoder\.layers\.\d+\.attn\.[qk]_norm\.weight", (A,), F32),
    (r"vision_model\.encoder\.layers\.\d+\.attn\.proj\.weight", (C, A), F32),
    (r"vision_model\.encoder\.layers\.\d+\.attn\.proj\.bias", (C,), BF16),
    (r"vision_model\.encoder\.layers\.\d+\.mlp\.fc1\.weight", (VM, C), BF16),
    (r"vision_model\.encoder\.layers\.\d+\.mlp\.fc1\.bias", (VM,), BF16),
    (r"vision_model\.encoder\.layers\.\d+\.mlp\.fc2\.weight", (C, VM), BF16),
    (r"vision_model\.encoder\.layers\.\d+\.mlp\.fc2\.bias", (C,), BF16),
    (r"vision_model\.encoder\.layers\.\d+\.(norm1|norm2)\.weight", (C,), BF16),
    (r"vision_model\.encoder\.layers\.\d+\.(ls1|ls2)", (C,), BF16),
    (r"mlp1\.0\.(weight|bias)", (4 * C,), BF16),
    (r"mlp1\.1\.weight", (I, 4 * C), BF16),
    (r"mlp1\.3\.weight", (H, I), BF16),
    (r"language_model\.model\.embed_tokens\.weight", (V, H), BF16),
    (r"language_model\.lm_head\.weight", (V, H), BF16),
    (r"language_model\.model\.norm\.weight", (H,), BF16),
    (r"language_model\.model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight", (H,), BF16),
    (r"language_model\.model\.layers\.\d+\.self_attn\.q_proj\.weight", (H, H), F32),
    (r"language_model\.model\.layers\.\d+\.self_attn\.q_proj\.bias", (H,), F32),
    (r"language_model\.model\.layers\.\d+\.self_attn\.[kv]_proj\.weight", (KV, H), F32),
    (r"language_model\.model\.layers\.\d+\.self_attn\.[kv]_proj\.bias", (KV,), F32),
    (r"language_model\.model\.layers\.\d+\.self_attn\.o_proj\.weight", (H, H), BF16),
    (r"language_model\.model\.layers\.\d+\.mlp\.(gate_proj|up_proj)\.weight", (I, H), BF16),
    (r"language_model\.model\.layers\.\d+\.mlp\.down_proj\.weight", (H, I), BF16),
]
WIDTH = {F32: 4, BF16: 2}
MAX_HEADER = 200_000


def describe(name):
    for pattern, shape, dtype in RULES:
        if re.fullmatch(pattern, name):
            return list(shape), dtype
    raise KeyError(f"no rule for {name}")


def nbytes(shape, dtype):
    n = WIDTH[dtype]
    for d in shape:
        n *= d
    return n


def main(index_path, sizes_path, out_path):
    index = json.load(open(index_path))
    sizes = dict(line.split() for line in open(sizes_path) if line.strip())
    tensors = {}
    for name, shard in index["weight_map"].items():
        shape, dtype = describe(name)
        tensors[name] = {"shard": shard, "shape": shape, "dtype": dtype}
    total = sum(nbytes(t["shape"], t["dtype"]) for t in tensors.values())
    assert total == index["metadata"]["total_size"], (total, index["metadata"]["total_size"])
    for shard, size in sizes.items():
        data = sum(nbytes(t["shape"], t["dtype"]) for t in tensors.values() if t["shard"] == shard)
        assert 0 < int(size) - data < MAX_HEADER, (shard, size, data)
    out = {"source": "nvidia/NVLM-D-72B model.safetensors.index.json (public copy: GitHub chu-siang/NCHC_hackthon, "
                     "torch_ref_model/, commit 6a62b43); shapes and dtypes: tests/release_index.py",
           "total_size": index["metadata"]["total_size"], "shard_sizes": {k: int(v) for k, v in sizes.items()},
           "tensors": tensors}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=0, sort_keys=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
