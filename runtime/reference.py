"""Reference NVLM models in PyTorch: the ground truth every later stage is checked against.

`NVLMReference` is the base and NVLM-D's model as it is (a family names its class in
runtime/core/families.py; `reference_model` resolves it). A family that differs overrides the hooks, the
way vLLM's nvlm_d.py overrides only `_init_mlp1`/`_init_vision_model` of its InternVL base:
`init_vision`, `init_projector`, `init_decoder` build the components, `embed` says how image
features enter the decoder (NVLM-D: they replace the `<|vision_pad|>` embeddings).


InternViT → drop CLS → pixel shuffle → `mlp1` gives [tiles, tokens_per_tile, llm_hidden]
image embeddings, which replace the `<|vision_pad|>` token embeddings of the prompt in
order; the language model is transformers' own `Qwen2ForCausalLM`, not a rewrite.
"""

from __future__ import annotations

import importlib
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runtime.core.checkpoint import Checkpoint
from runtime.core.config import NVLMConfig, ProjectorConfig
from runtime.core.errors import CheckpointError, InputError
from runtime.core.families import DECODER_ROLES, LLM, PROJECTOR, VISION, family_for

from .internvit import InternViT

log = logging.getLogger(__name__)


class Projector(nn.Module):
    """`mlp1`: LayerNorm → Linear → GELU → Linear, names as in the weight map."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.input_size, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.input_size, cfg.hidden_size, bias=False)
        self.fc2 = nn.Linear(cfg.hidden_size, cfg.output_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def pixel_shuffle(x: torch.Tensor, ratio: float, version: str) -> torch.Tensor:
    """Space-to-depth of InternVL/NVLM: [T, W, H, C] → [T, H·r, W·r, C/r²] (v1) or its transpose (v2).

    The released code names the grid axes (W, H) although the tokens arrive row-major; the
    arithmetic below is theirs, axis for axis, so that v1's transposed layout is reproduced.
    """
    t, w, h, c = x.shape
    x = x.reshape(t, w, int(h * ratio), int(c / ratio))  # [T, W, H·r, C/r]
    x = x.permute(0, 2, 1, 3)  # [T, H·r, W, C/r]
    x = x.reshape(t, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))  # [T, H·r, W·r, C/r²]
    if version == "v2":
        x = x.permute(0, 2, 1, 3)  # [T, W·r, H·r, C/r²]: v2 swaps the grid axes back
    return x.contiguous()


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids, the stop token included when it was produced
    finished: bool  # stopped on the end token rather than the length limit


class NVLMReference(nn.Module):
    def __init__(self, cfg: NVLMConfig, skip: frozenset[str] = frozenset()):
        """`skip`: component roles built on the meta device (no memory, no weights): the vision export of
        NVLM-D-72B needs the 6 B vision tower and projector, not the 73 B decoder."""
        super().__init__()
        self.cfg = cfg
        self._skip = frozenset(skip)
        self.vision = self.build_part(VISION, self.init_vision)
        self.projector = self.build_part(PROJECTOR, self.init_projector)
        self.llm = self.build_part(LLM, self.init_decoder)

    def build_part(self, role: str, init):
        """`init(cfg)`, on the meta device when the role is skipped."""
        with torch.device("meta") if role in self._skip else nullcontext():
            return init(self.cfg)

    # ------------------------------------------------------------------ hooks

    def init_vision(self, cfg: NVLMConfig) -> nn.Module:
        return InternViT(cfg.vision)

    def init_projector(self, cfg: NVLMConfig) -> nn.Module:
        return Projector(cfg.projector)

    def init_decoder(self, cfg: NVLMConfig) -> nn.Module:
        from transformers import Qwen2ForCausalLM

        # eager attention: deterministic and identical to a plain Qwen2ForCausalLM built the same way
        return Qwen2ForCausalLM._from_config(cfg.llm.to_transformers(), attn_implementation="eager")

    def component_modules(self) -> dict[str, nn.Module]:
        """The module each weight-map component (by role) loads into."""
        return {VISION: self.vision, PROJECTOR: self.projector, LLM: self.llm}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_checkpoint(cls, path: str | Path | Checkpoint, dtype: torch.dtype = torch.float32,
                        decoder_stored_as: torch.dtype | None = None,
                        components: tuple[str, ...] | None = None) -> "NVLMReference":
        """`decoder_stored_as`: round the decoder's weights through this dtype first — the weights a build in
        that dtype holds. NVLM-D-72B stores its q/k/v in F32; a bf16 engine holds them rounded, and a
        comparison of the engine with the reference is only exact against the rounded ones. `components`:
        load only these roles (e.g. VISION_ROLES); the others stay on the meta device, unusable."""
        ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
        plan = ckpt.validate()
        roles = set(plan.rows)
        keep = roles if components is None else set(components)
        skip = frozenset(roles - keep) | (frozenset(DECODER_ROLES) if LLM not in keep else frozenset())
        model = cls(ckpt.config, skip=skip)
        modules = model.component_modules()
        decoder = set(DECODER_ROLES)
        for component, rows in plan.rows.items():
            if component in skip:
                continue
            through = decoder_stored_as if component in decoder else None
            state = {target: (ckpt.get(source).to(through) if through is not None else ckpt.get(source)).to(dtype)
                     for source, target, _ in rows}
            module = modules[component]
            missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
            if ckpt.config.llm.tie_word_embeddings and component == LLM:
                missing = [m for m in missing if m != "lm_head.weight"]
            if missing or unexpected:
                raise CheckpointError(f"{component}: could not place {unexpected} / missing {missing}")
        if ckpt.config.llm.tie_word_embeddings:
            model.llm.tie_weights()
        return model.eval()

    # ------------------------------------------------------------------ forward pieces

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.embeddings.patch_embedding.weight.dtype  # loaded in every use, vision-only included

    @property
    def device(self) -> torch.device:
        return self.vision.embeddings.patch_embedding.weight.device

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[T, 3, S, S] normalized tiles → [T, tokens_per_tile, llm_hidden]."""
        v, p = self.cfg.vision, self.cfg.preprocess
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (v.num_channels, p.image_size, p.image_size):
            raise InputError(
                f"pixel_values must be [tiles, {v.num_channels}, {p.image_size}, {p.image_size}], "
                f"got {list(pixel_values.shape)}"
            )
        return self.encode_tiles(pixel_values.to(self.dtype))

    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision pipeline itself (no checks, no grad mode): what the ONNX export traces."""
        return self.project(self.vision(pixel_values, self.cfg.select_layer))  # [T, 1+P, C] → [T, tokens, hidden]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The selected vision layer's hidden states [T, 1+P, C] → image embeddings [T, tokens_per_tile,
        llm_hidden]: drop CLS, pixel shuffle, the projector (the vision export's last part traces this alone)."""
        v, p = self.cfg.vision, self.cfg.preprocess
        hidden = hidden[:, 1:, :]  # [T, P, C]: the CLS token is dropped
        side = v.patches_per_side
        grid = hidden.reshape(hidden.shape[0], side, side, -1)  # [T, side, side, C]
        shuffled = pixel_shuffle(grid, p.downsample_ratio, p.ps_version)  # [T, side·r, side·r, C/r²]
        tokens = shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1])  # [T, tokens_per_tile, C/r²]
        return self.projector(tokens)  # [T, tokens_per_tile, llm_hidden]

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None, image_token_id: int) -> torch.Tensor:
        """Token embeddings with image rows scattered into the `image_token_id` positions, in order.

        input_ids: [B, L]; image_embeds: [num_image_tokens, hidden] (all images of the batch, in order).
        """
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, L, hidden]
        mask = input_ids == image_token_id  # [B, L]
        count = int(mask.sum())
        have = 0 if image_embeds is None else image_embeds.shape[0]
        if count != have:
            raise InputError(f"the prompt has {count} image token positions but {have} image embeddings were given")
        if count:
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.to(embeds.dtype))
        return embeds

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
               image_token_id: int, attention_mask: torch.Tensor | None = None, cross=None) -> torch.Tensor:
        """[B, L] ids (+ tiles) → [B, L, vocab] logits. `cross`: the prompt's cross-attention inputs, which
        only the cross-attention families take (runtime/cross_reference.py)."""
        _no_cross(cross)
        image_embeds = None
        if pixel_values is not None and pixel_values.shape[0]:
            image_embeds = self.encode_images(pixel_values).flatten(0, 1)  # [T·tokens, hidden]
        embeds = self.embed(input_ids, image_embeds, image_token_id)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def generate(self, input_ids: list[int] | torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                 image_token_id: int, max_new_tokens: int, eos_token_id: int | None, cross=None) -> GenerationResult:
        """Greedy decoding of one sequence with transformers' KV cache."""
        from transformers import DynamicCache

        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(self.device)  # [1, L]
        embeds, step_context = self.prefill_inputs(ids, pixel_values, image_token_id, cross)
        with step_context(None):
            out = self.llm(inputs_embeds=embeds, past_key_values=DynamicCache(), use_cache=True)
        tokens: list[int] = []
        for step in range(max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                return GenerationResult(tokens, True)
            if step + 1 < max_new_tokens:  # no forward pass for a token that will not be sampled
                with step_context(step):
                    out = self.llm(input_ids=torch.tensor([[nxt]], device=self.device),
                                   past_key_values=out.past_key_values, use_cache=True)
        return GenerationResult(tokens, False)

    def teacher_forced(self, ids: torch.Tensor, tiles: torch.Tensor | None, image_token_id: int, cross=None, *,
                       generated: int = 0):
        """One decoder pass over a prompt followed by `generated` known tokens (training: the answer, teacher
        forced), from the encoded tiles [T, tokens, hidden] with their graph kept: the input embeddings [1, L,
        hidden] and the context the pass runs in (a family with cross-attention sets the keys each row reads)."""
        _no_cross(cross)
        return self.embed(ids, None if tiles is None else tiles.flatten(0, 1), image_token_id), nullcontext()

    def engine_image_inputs(self, tiles: torch.Tensor | None, cross=None):
        """A prompt's images as TensorRT-LLM takes them, from the encoded tiles [T, tokens, hidden]: the
        prompt-embedding table [rows, hidden] (rows at the fake ids) and the encoder features [keys, hidden]
        that cross-attention reads (None where the family has none). NVLM-D: every tile in the table."""
        _no_cross(cross)
        return (None if tiles is None else tiles.flatten(0, 1)), None

    def prefill_inputs(self, ids: torch.Tensor, pixel_values: torch.Tensor | None, image_token_id: int, cross):
        """The prompt's input embeddings [1, L, hidden], and a context manager factory wrapping each decoder pass
        (`step`: None for the prompt, else the decoding step) — what a family with more per-pass inputs than
        the embeddings (cross-attention keys) overrides."""
        _no_cross(cross)
        image_embeds = None
        if pixel_values is not None and pixel_values.shape[0]:
            image_embeds = self.encode_images(pixel_values).flatten(0, 1)
        return self.embed(ids, image_embeds, image_token_id), lambda step: nullcontext()


def _no_cross(cross) -> None:
    if cross is not None:
        raise InputError("this model family has no cross-attention layers, but cross-attention inputs were given")


def reference_class(cfg: NVLMConfig) -> type[NVLMReference]:
    """The reference model class of a config's family (runtime/core/families.py names it)."""
    module, _, name = family_for(cfg).reference.partition(":")
    return getattr(importlib.import_module(module), name)


def reference_model(path: str | Path | Checkpoint, dtype: torch.dtype = torch.float32,
                    decoder_stored_as: torch.dtype | None = None,
                    components: tuple[str, ...] | None = None) -> NVLMReference:
    """The reference model of a checkpoint's family, loaded (`decoder_stored_as`, `components`: see
    from_checkpoint)."""
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    return reference_class(ckpt.config).from_checkpoint(ckpt, dtype, decoder_stored_as, components)


# what the vision encoder export reads: the vision tower and the projector, never the decoder
VISION_ROLES = (VISION, PROJECTOR)
