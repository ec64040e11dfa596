"""The reference executor: what a TensorRT-LLM engine built from an NVLM checkpoint computes, on CPU in PyTorch,
reading the TensorRT-LLM checkpoint's own tensors in their stored formats (model.py says which numerics).

    layers.py   the checkpoint as the executor reads it: linear layers in their stored format, a decoder layer's
                and a cross-attention block's tensors per rank, and the directory loader
    cache.py    per-request state: the KV cache (FP8-rounded with an FP8 KV cache) and NVLM-X/H's image keys
    model.py    the arithmetic (attention, MLP, gated cross-attention, RoPE), prefill, decode steps, generation

It is not an engine: it serves the CPU Triton targets and the fidelity reports.
"""

from .cache import CrossKV, KVCache
from .layers import RankLayer, XLayer, excluded_format, rank_layer, read_checkpoint, x_layer
from .model import ReferenceExecutor, Request, Result, rms_norm

__all__ = ["CrossKV", "KVCache", "RankLayer", "ReferenceExecutor", "Request", "Result", "XLayer", "excluded_format",
           "rank_layer", "read_checkpoint", "rms_norm", "x_layer"]
