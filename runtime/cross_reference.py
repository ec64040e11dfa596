"""Reference NVLM-X and NVLM-H: the cross-attention families, in PyTorch (docs/nvlm_xh_layout.md).

Both reuse the base model's InternViT and transformers' own Qwen2 decoder unchanged; what they add is the
gated cross-attention layer, written once here (`GatedCrossAttention`, transformers' mllama names) and run
after the self-attention layers named by `cross_attention_layers` through forward hooks on those layers, so
the decoder's masking, rotary embedding and KV cache stay transformers'. Per request, each cross-attention
layer's image keys/values are computed once and reused by every decoding step.

- NVLM-X: every tile (thumbnail included) goes through the one-layer projector and becomes keys; only the
  tile tags are text in the decoder.
- NVLM-H: the thumbnail goes through the MLP into the decoder sequence as in NVLM-D; the regular tiles, each
  behind its tag's token embeddings, become keys.

Which query reads which keys is `runtime.prompt.key_ranges` (one contiguous range per token); a token whose
range is empty gets exactly nothing from the block (attention output and MLP both zeroed, mllama's
`full_text_row_masked_out_mask`), so with both gates at 0 the model is the bare Qwen2 decoder.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from runtime.core.config import PROJECTOR_LINEAR, LLMConfig, NVLMConfig, ProjectorConfig
from runtime.core.errors import InputError
from runtime.core.families import XATTN
from runtime.core.llm_formats import kv_round

from .prompt import CrossInputs
from .reference import NVLMReference


class LinearProjector(nn.Module):
    """NVLM-X's `mlp1`: LayerNorm → Linear to the LLM width (the paper's one-layer projector)."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.input_size, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.input_size, cfg.output_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def ranged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """Softmax attention where query i reads keys [lo_i, hi_i) only; rows with an empty range give 0.

    q [heads, L, d], k/v [kv_heads, K, d] (GQA: heads a multiple of kv_heads), ranges [L, 2] → [heads, L, d].
    The dense-mask formulation the Triton kernel (plugins/xattn_kernels.py) is checked against."""
    heads, kv_heads = q.shape[0], k.shape[0]
    k = k.repeat_interleave(heads // kv_heads, dim=0)
    v = v.repeat_interleave(heads // kv_heads, dim=0)
    pos = torch.arange(k.shape[1], device=q.device)
    allowed = (pos[None, :] >= ranges[:, :1]) & (pos[None, :] < ranges[:, 1:])  # [L, K]
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [heads, L, K]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row is NaN → 0
    return (probs @ v.float()).to(q.dtype)


def key_sequence(tiles: torch.Tensor, key_tiles, embed) -> torch.Tensor:
    """A request's cross-attention keys [num_keys, hidden]: per key tile (runtime/prompt.py KeyTile, in order)
    its tag's token embeddings (NVLM-H; `embed(ids)` → [n, hidden]) then its projected tokens. tiles:
    [T, tokens_per_tile, hidden], every tile of the request. The reference and the entry model (which takes
    the tag embeddings from the built checkpoint) both build the keys here."""
    parts = []
    for kt in key_tiles:
        if kt.tag_ids:
            parts.append(embed(list(kt.tag_ids)).to(tiles.dtype))
        parts.append(tiles[kt.tile])
    return torch.cat(parts) if parts else tiles.new_zeros(0, tiles.shape[-1])


class CrossAttention(nn.Module):
    """q/k/v/o projections without biases or q/k norms; no rotary embedding (keys are images, not positions)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def key_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[K, hidden] image states → k, v [kv_heads, K, head_dim]: once per request and layer."""
        k = self.k_proj(states).view(-1, self.kv_heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(states).view(-1, self.kv_heads, self.head_dim).transpose(0, 1)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], ranges: torch.Tensor) -> torch.Tensor:
        """x [L, hidden] → [L, hidden]."""
        q = self.q_proj(x).view(-1, self.heads, self.head_dim).transpose(0, 1)  # [heads, L, d]
        out = ranged_attention(q, kv[0], kv[1], ranges)
        return self.o_proj(out.transpose(0, 1).reshape(x.shape[0], -1))


class GatedCrossAttention(nn.Module):
    """One gated cross-attention layer (Flamingo; transformers' MllamaCrossAttentionDecoderLayer):

        h = h + tanh(α_attn) · XAttn(norm(h), image)
        h = h + tanh(α_mlp) · MLP(norm(h)) · [the row reads at least one key]
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg.to_transformers())
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], ranges: torch.Tensor) -> torch.Tensor:
        """h [L, hidden], ranges [L, 2] → h [L, hidden]."""
        h = h + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(h), kv, ranges)
        reads = (ranges[:, 1] > ranges[:, 0]).to(h.dtype)[:, None]  # [L, 1]
        return h + self.cross_attn_mlp_gate.tanh() * self.mlp(self.post_attention_layernorm(h)) * reads


class CrossAttentionReference(NVLMReference):
    """NVLM-X and NVLM-H (the family's prompt layout and projector kind say which)."""

    def __init__(self, cfg: NVLMConfig, skip: frozenset[str] = frozenset()):
        super().__init__(cfg, skip)
        self.xattn = self.build_part(XATTN, lambda c: nn.ModuleList(GatedCrossAttention(c.llm)
                                                                    for _ in c.cross_attention_layers))
        self._step: tuple[list, torch.Tensor] | None = None  # (per-layer k/v, ranges of the running queries)
        self._kv_scales: list[float] | None = None  # fp8_cross_kv: round the image keys/values as that cache does
        for j, i in enumerate(cfg.cross_attention_layers):
            self.llm.model.layers[i].register_forward_hook(self._after_layer(j))

    def init_projector(self, cfg: NVLMConfig) -> nn.Module:
        return LinearProjector(cfg.projector) if cfg.projector.kind == PROJECTOR_LINEAR else super().init_projector(cfg)

    def component_modules(self) -> dict[str, nn.Module]:
        return {**super().component_modules(), XATTN: self.xattn}

    def _after_layer(self, j: int):
        def hook(module, args, output):
            if self._step is None:
                raise RuntimeError("a cross-attention model ran without its image keys; call logits()/generate()")
            kv, ranges = self._step
            if kv[j][0].shape[1] == 0:  # no image keys: the block adds exactly 0 (mllama's skip_cross_attn_blocks)
                return output
            hidden = output[0] if isinstance(output, tuple) else output  # [1, L, hidden]
            if hidden.shape[0] != 1:
                raise InputError("the cross-attention reference runs one sequence at a time")
            kv_j = kv[j]
            if self._kv_scales is not None:
                kv_j = tuple(kv_round(t, self._kv_scales[j]).to(t.dtype) for t in kv_j)
            new = self.xattn[j](hidden[0], kv_j, ranges)[None]
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    @contextmanager
    def _reading(self, kv: list, ranges):
        self._step = (kv, torch.as_tensor(ranges, dtype=torch.long).reshape(-1, 2))
        try:
            yield
        finally:
            self._step = None

    # ------------------------------------------------------------------ the image side

    def image_states(self, tiles: torch.Tensor | None, cross: CrossInputs) -> torch.Tensor:
        """The request's key sequence [num_keys, hidden]: each key tile's tag embeddings (NVLM-H) then its
        projected tokens. tiles: [T, tokens_per_tile, hidden], the projector's output for every tile."""
        if tiles is None:
            tiles = torch.zeros(0, 1, self.cfg.llm.hidden_size, dtype=self.dtype)
        emb = self.llm.get_input_embeddings()
        states = key_sequence(tiles, cross.key_tiles, lambda ids: emb(torch.tensor(ids, device=tiles.device)))
        if states.shape[0] != cross.num_keys:
            raise InputError(f"{states.shape[0]} image keys built for a prompt laid out for {cross.num_keys}")
        return states

    def engine_image_inputs(self, tiles: torch.Tensor | None, cross: CrossInputs | None = None):
        """The thumbnails' rows of the prompt table (NVLM-H) and the key sequence as encoder features."""
        if cross is None:
            raise InputError(f"{self.cfg.architecture} needs the prompt's cross-attention inputs")
        table = tiles[list(cross.inline_tiles)].flatten(0, 1) if cross.inline_tiles else None
        return table, (self.image_states(tiles, cross) if cross.key_tiles else None)

    def _prepare(self, ids: torch.Tensor, pixel_values: torch.Tensor | None, image_token_id: int,
                 cross: CrossInputs | None, generated: int = 0):
        tiles = None
        if pixel_values is not None and pixel_values.shape[0]:
            tiles = self.encode_images(pixel_values)  # [T, tokens_per_tile, hidden]
        return self._from_tiles(ids, tiles, image_token_id, cross, generated)

    def _from_tiles(self, ids: torch.Tensor, tiles: torch.Tensor | None, image_token_id: int,
                    cross: CrossInputs | None, generated: int = 0):
        """(input embeddings, per-layer image keys/values) of a prompt followed by `generated` tokens."""
        if cross is None:
            raise InputError(f"{self.cfg.architecture} needs the prompt's cross-attention inputs "
                             "(runtime.prompt.build_prompt with the family's layout gives them)")
        if len(cross.key_ranges) + generated != ids.shape[-1]:
            raise InputError(f"{len(cross.key_ranges)} key ranges and {generated} generated tokens for "
                             f"{ids.shape[-1]} tokens")
        needed = max([kt.tile for kt in cross.key_tiles] + list(cross.inline_tiles), default=-1) + 1
        have = 0 if tiles is None else tiles.shape[0]
        if have != needed:
            raise InputError(f"{have} tiles given for a prompt laid out for {needed}")
        inline = tiles[list(cross.inline_tiles)].flatten(0, 1) if cross.inline_tiles else None
        embeds = self.embed(ids, inline, image_token_id)
        states = self.image_states(tiles, cross) if cross.key_tiles else torch.zeros(0, self.cfg.llm.hidden_size,
                                                                                      dtype=embeds.dtype)
        if XATTN in self._skip:  # the blocks are not loaded (builder/layerwise.py computes them a block at a time)
            return embeds, None
        kv = [layer.cross_attn.key_values(states.to(embeds.dtype)) for layer in self.xattn]
        return embeds, kv

    def teacher_forced(self, ids: torch.Tensor, tiles: torch.Tensor | None, image_token_id: int,
                       cross: CrossInputs | None = None, *, generated: int = 0):
        """As the base class's: the prompt's tokens read their key ranges, each generated token every key."""
        embeds, kv = self._from_tiles(ids, tiles, image_token_id, cross, generated)
        return embeds, self._reading(kv, list(cross.key_ranges) + [cross.decode_range] * generated)

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
               image_token_id: int, attention_mask: torch.Tensor | None = None,
               cross: CrossInputs | None = None) -> torch.Tensor:
        """[1, L] ids (+ tiles) → [1, L, vocab] logits."""
        if input_ids.shape[0] != 1:
            raise InputError("the cross-attention reference runs one sequence at a time")
        embeds, kv = self._prepare(input_ids, pixel_values, image_token_id, cross)
        with self._reading(kv, cross.key_ranges):
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits

    def prefill_inputs(self, ids: torch.Tensor, pixel_values: torch.Tensor | None, image_token_id: int, cross):
        """The prompt's embeddings, and each pass reading the image keys/values computed here once: the prompt
        with its tokens' key ranges, every generated token with all keys."""
        embeds, kv = self._prepare(ids, pixel_values, image_token_id, cross)
        return embeds, lambda step: self._reading(kv, cross.key_ranges if step is None else [cross.decode_range])

    @contextmanager
    def fp8_cross_kv(self, scales: list[float]):
        """Passes inside read each block's image keys/values as an FP8 KV cache with `scales` (one per block)
        holds them: the comparison model of an FP8-KV build (builder/fidelity.py)."""
        if len(scales) != len(self.xattn):
            raise InputError(f"{len(scales)} FP8 KV scales for {len(self.xattn)} cross-attention blocks")
        self._kv_scales = list(scales)
        try:
            yield
        finally:
            self._kv_scales = None
