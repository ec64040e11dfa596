"""InternViT, the vision tower of NVLM (InternViT-6B-448px-V1-5 in NVLM-D-72B).

Written from the released architecture (docs/released_layout.md): pre-norm transformer with RMSNorm,
q/k RMS normalization over the whole embedding (not per head), no qkv bias, layer-scale
vectors `ls1`/`ls2`, exact GELU MLP, a learned CLS token and absolute position embeddings. The
released attention runs padding heads beside the real ones (7 beside 25 in NVLM-D-72B): qkv, the q/k
norms and proj are sized for all of them, and the q/k RMS variance is taken over the first
`hidden_size` channels only, the real heads'.
Module names equal the released checkpoint's names under `vision_model.` so the weight map
is a plain prefix rename. The tests check this module against transformers'
`InternVLVisionModel` (an independent implementation) with renamed weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.core.config import VisionConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, var_width: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # The variance comes from the first var_width channels (all of them by default): the released q/k
        # norms take it over the real heads only and apply it to the padding heads too.
        self.var_width = dim if var_width is None else var_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and cast back before the scale, as InternViT does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf[..., :self.var_width].pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _norm(cfg: VisionConfig) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_positions, c))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [T, 3, S, S]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [T, C, S/p, S/p]
        patches = patches.flatten(2).transpose(1, 2)  # [T, P, C], row-major over the patch grid
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)  # [T, 1, C]
        return torch.cat([cls, patches], dim=1) + self.position_embedding  # [T, 1+P, C]


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c, a = cfg.hidden_size, cfg.attn_dim  # a = (heads + padding heads) × head_dim
        self.num_heads, self.head_dim = cfg.attn_heads, cfg.head_dim
        self.qkv = nn.Linear(c, 3 * a, bias=cfg.qkv_bias)
        self.proj = nn.Linear(a, c)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(a, cfg.norm_eps, var_width=c)
            self.k_norm = RMSNorm(a, cfg.norm_eps, var_width=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, n, _ = x.shape  # [T, N, C]
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 × [T, N, A]; the fused weight is laid out [q; k; v]
        if self.qk_normalization:
            # InternViT normalizes q and k over all heads at once, before the head split.
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.view(t, n, self.num_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))  # [T, H, N, D]
        out = F.scaled_dot_product_attention(q, k, v)  # [T, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(t, n, self.num_heads * self.head_dim))  # [T, N, C]


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))


class InternViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Hidden states after `select_layer` ([T, 1+P, C]), indexed like HF `hidden_states`:
        0 is the embeddings, k the output of layer k, -1 the last layer."""
        depth = select_layer if select_layer > 0 else self.cfg.num_layers + 1 + select_layer
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:depth]:
            x = layer(x)
        return x
