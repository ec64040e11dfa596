"""A minimal, independent writer of NVLM-X / NVLM-H checkpoints in the layout docs/nvlm_xh_layout.md defines.

Like released_layout_writer.py (whose NVLM-D vision tower, decoder and tokenizer it starts from), it shares
no code with the package: the cross-attention names, shapes and config keys are spelled out here by hand.
It differs from the embedded defaults where the layout allows: one unsharded `model.safetensors`, three
decoder layers with cross-attention after layers 0 and 2 only, one KV head, gates of both signs.

    python tests/xattn_layout_writer.py OUT_DIR --variant x|h [--seed N]
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from released_layout_writer import L_HEADS, L_HIDDEN, L_KV, L_MLP, V_HIDDEN, config, tensors, tokenizer_json  # noqa: E402

XATTN_AFTER = [0, 2]
GATES = {"cross_attn_attn_gate": [0.9, -0.7], "cross_attn_mlp_gate": [0.6, 1.1]}


def write(out, variant, seed=2):
    os.makedirs(out, exist_ok=True)
    vocab = 384
    cfg = config(vocab)
    arch = {"x": "NVLM_X", "h": "NVLM_H"}[variant]
    cfg.update(architectures=[arch], model_type=arch, cross_attention_layers=XATTN_AFTER)
    cfg["auto_map"] = {"AutoConfig": f"configuration_{arch.lower()}.{arch}_Config"}
    t = tensors(vocab, seed)
    g = torch.Generator().manual_seed(seed + 100)

    def r(*shape, std=0.08):
        return (std * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    if variant == "x":  # the one-layer projector: LayerNorm (mlp1.0) then one Linear (mlp1.1) to the LLM width
        del t["mlp1.3.weight"]
        t["mlp1.1.weight"] = r(L_HIDDEN, 4 * V_HIDDEN, std=0.07)
    d = L_HIDDEN // L_HEADS
    for j in range(len(XATTN_AFTER)):
        p = f"language_model.model.xattn_layers.{j}."
        t.update({
            p + "input_layernorm.weight": (1 + 0.1 * torch.randn(L_HIDDEN, generator=g)).to(torch.bfloat16),
            p + "cross_attn.q_proj.weight": r(L_HEADS * d, L_HIDDEN),
            p + "cross_attn.k_proj.weight": r(L_KV * d, L_HIDDEN),
            p + "cross_attn.v_proj.weight": r(L_KV * d, L_HIDDEN),
            p + "cross_attn.o_proj.weight": r(L_HIDDEN, L_HEADS * d),
            p + "post_attention_layernorm.weight": (1 + 0.1 * torch.randn(L_HIDDEN, generator=g)).to(torch.bfloat16),
            p + "mlp.gate_proj.weight": r(L_MLP, L_HIDDEN),
            p + "mlp.up_proj.weight": r(L_MLP, L_HIDDEN),
            p + "mlp.down_proj.weight": r(L_HIDDEN, L_MLP, std=0.06),
        })
        for gate, values in GATES.items():
            t[p + gate] = torch.tensor([values[j]], dtype=torch.bfloat16)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(), f)
    save_file({n: v.contiguous() for n, v in t.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--variant", choices=["x", "h"], required=True)
    ap.add_argument("--seed", type=int, default=2)
    a = ap.parse_args()
    print(write(a.out, a.variant, a.seed))
