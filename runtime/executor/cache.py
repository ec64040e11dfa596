"""The reference executor's per-request state beside the weights: the KV cache (FP8-rounded when the build's
KV cache is FP8) and, for NVLM-X/H, the image keys/values each cross-attention block reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CrossKV:
    """One request's image keys and values for every cross-attention layer, [KV, keys, D] each: computed
    once from its encoder features and read by every step of the request."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    # the key range of every generated token: the prompt's last row, as the backend reuses the last row of a
    # request's cross_attention_mask for its generation steps (TransformerBuffers::copyCrossAttentionMasks);
    # all the keys for an NVLM prompt, whose last token follows every image
    decode: tuple[int, int] = (0, 0)

    @property
    def num_keys(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


@dataclass
class KVCache:
    """One sequence's cache: per layer a buffer [kv_heads, capacity, D] (fp8 when quantized) filled up to that
    layer's length. Capacity grows by doubling, so a decode step writes one row instead of copying the
    whole cache (what a torch.cat per step cost)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    cross: CrossKV | None = None  # NVLM-X/H: the request's image keys/values (None: no image keys)

    @property
    def length(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def layer_length(self, li: int) -> int:
        return self.lengths[li] if li < len(self.lengths) else 0

    def append(self, li: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add layer li's new keys and values [KV, T, D]."""
        t_len = k.shape[1]
        if li == len(self.keys):
            self.keys.append(k.new_empty(k.shape[0], t_len + 64, k.shape[2]))
            self.values.append(v.new_empty(v.shape[0], t_len + 64, v.shape[2]))
            self.lengths.append(0)
        n = self.lengths[li]
        if n + t_len > self.keys[li].shape[1]:
            cap = max(2 * self.keys[li].shape[1], n + t_len)
            for buffers in (self.keys, self.values):
                grown = buffers[li].new_empty(buffers[li].shape[0], cap, buffers[li].shape[2])
                grown[:, :n] = buffers[li][:, :n]
                buffers[li] = grown
        self.keys[li][:, n:n + t_len] = k
        self.values[li][:, n:n + t_len] = v
        self.lengths[li] = n + t_len

    def layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer li's keys and values so far, [KV, length, D] each (views, no copy)."""
        n = self.lengths[li]
        return self.keys[li][:, :n], self.values[li][:, :n]


