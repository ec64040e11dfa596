"""`nvlm-build demo-train`: train the embedded default from scratch on the tile task, on CPU.

The recipe (issue 17): the NVLM-D embedded default's architecture and real geometry (448 tiles, patch 14,
pixel shuffle to 256 tokens per tile, the released prompt with 1-D tile tags) trained end to end — vision
tower, projector and decoder — on freshly generated images of `runtime.tile_task`, with the loss on the
answer tokens only. Standard initialisation (not the random default's "decisive" head). A curriculum: the
first part of the run sees one-tile images only (shape and colour of one cell, cheap), the rest every
canvas (tile indexing, counting). AdamW with warm-up and cosine decay; each optimizer step accumulates
`batch` samples (their sequence lengths differ, so they run one at a time).

Deterministic for a given seed and thread count: the data stream is a numpy Generator of the seed, the
initialisation torch's generator of the seed, and every op runs on the CPU with a fixed thread count.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from runtime.chat_format import stop_id
from runtime.core.build_dir import sha256_file
from runtime.core.demo_checkpoint import VARIANTS, demo_parts, trained_dims, with_padding_heads, write_demo_checkpoint
from runtime.core.errors import CheckpointError
from runtime.core.families import PromptLayout, family_for
from runtime.core.progress import bar
from runtime.preprocess import preprocess_image_fast
from runtime.prompt import Message, build_prompt
from runtime.reference import NVLMReference, reference_class, reference_model
from runtime.tile_task import CANVASES, COLOURS, QUESTION_TYPES, SHAPES, accuracy, heldout, sample
from runtime.tokenizer import NVLMTokenizer

log = logging.getLogger(__name__)

POOLINGS = ("mean_max", "mean")  # how the training-only tile probe may pool a tile's tokens (Recipe.probe_pooling)


@dataclass(frozen=True)
class Phase:
    """A stretch of the curriculum: `samples` questions on one-tile images only (`canvas` "one") or on
    every canvas ("all"), question types drawn with weights `mix` (colour, shape, which_tile, count)."""

    samples: int
    canvas: str  # "one" | "all"
    mix: tuple[float, ...]

    def __post_init__(self):
        if self.samples < 1 or self.canvas not in ("one", "all") or len(self.mix) != len(QUESTION_TYPES) \
                or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"a phase is SAMPLES:one|all:W,W,W,W (weights of {', '.join(QUESTION_TYPES)}), "
                             f"got {self}")

    @classmethod
    def parse(cls, text: str) -> tuple["Phase", ...]:
        """"1200:one:1,2,1,1;2000:one:1,8,1,1;3000:all:1,2,1,1" → phases."""
        out = []
        for part in text.split(";"):
            try:
                n, canvas, mix = part.split(":")
                out.append(cls(int(n), canvas, tuple(float(w) for w in mix.split(","))))
            except ValueError as e:
                raise ValueError(f"phase {part!r}: {e}") from None
        return tuple(out)


@dataclass(frozen=True)
class Recipe:
    samples: int = 6000  # training questions, each on a fresh image
    batch: int = 8  # samples per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    single_tile_fraction: float = 0.35  # the first part of the run: 448×448 images only
    # before everything else: this many one-tile samples with shape questions only (circle vs square needs a
    # phase of its own; docs/demo_model.md)
    shape_first: int = 0
    seed: int = 0
    threads: int = 2
    tile_tags: bool = True  # False: the ablation without NVLM's 1-D tile tags
    # how often each question type is asked (colour, shape, which_tile, count): shape is the hard one
    question_mix: tuple[float, ...] = (1.0, 2.0, 1.0, 1.0)
    # initialise the vision tower's (learned) position embedding with 2-D sin-cos values (as MAE does) rather
    # than noise: shape needs to know which patch is above which from the first step
    sincos_positions: bool = True
    # weight of an auxiliary loss during training only: a linear probe on each regular tile's pooled image
    # tokens predicts its cell's shape and colour (the probe is discarded; the shipped model is plain NVLM-D)
    aux_weight: float = 1.0
    # weight of a second training-only loss on the decoder's first layer (`DecoderProbe`): each image token
    # predicts which tile it belongs to, and the prompt's last token the tile K a colour/shape question names.
    # The answers to those questions are a two-hop lookup (K → the tokens after `<tile_K>` → their colour) that
    # a two-layer decoder can only do with its first layer doing the first hop; without a hint the runs
    # plateaued there (docs/demo_model.md). 0: off (the runs before it)
    decoder_probe: float = 0.0
    # weight of a training-only hint on the second hop: the first head of the decoder's second layer, at the
    # position that predicts the tile-dependent answer token, is pushed (−log of its attention mass) onto the
    # image tokens of the tile the answer is about (the tile a colour/shape question names; for which_tile, the
    # tile of that colour). The shipped model is unchanged; the hint only shapes where the gradient goes. 0: off
    attention_hint: float = 0.0
    # how many of the second layer's heads (from the first) the attention hint pushes, its loss the mean over
    # them. 1: the first head only (runs D–H, U1: the hinted head looked at tile K while the answer stayed near
    # chance — the other heads, which read the colour, kept spreading over every tile)
    attention_hint_heads: int = 1
    # the same for which_tile questions (0: attention_hint_heads). On every head (U4) which_tile was learned
    # (held out 100%) and shape was not (49%); on one head (U1, V1) the other way round (64% / 89%)
    which_tile_hint_heads: int = 0
    # weight of a training-only hint on the first hop's query side: a head of the decoder's first layer
    # (`KEY_HINT_HEAD`), where the tile-dependent answer token is predicted, is pushed (−log-softmax of its score)
    # onto the question word the second hop searches with (`question_key`: the tile number " K" of "... in tile
    # K?", the colour of "Which tile has the red shape?"). Without it the prompt's last token read only image
    # tokens in the first layer (1,280 image keys drown one text key): K never reached it (a linear probe read it
    # at chance, 25%, in run F) and the second layer could not select tile K. 0: off
    key_hint: float = 0.0
    # the question types the key hint covers (run U1 ran before it covered which_tile: colour and shape only)
    key_hint_types: tuple[str, ...] = ("colour", "shape", "which_tile")
    # weight of a training-only probe of the question's type at the prompt's last token after the decoder's first
    # layer: colour questions also contain "shape" ("What colour is the shape in tile K?"), and the mixed runs
    # answered one-tile colour questions at about chance long after shape questions were learned. 0: off
    question_probe: float = 0.0
    # how the tile probe pools a tile's image tokens: "mean_max" (mean ‖ max, the runs before 2026-12-01) or
    # "mean". The decoder reads a tile through attention, a weighted mean: with "mean_max" the probe can be
    # satisfied by features only a max exposes (the probe knew shape almost perfectly while the answers to
    # shape questions stayed near chance); "mean" asks the tower for what attention can read
    probe_pooling: str = "mean_max"
    # an explicit curriculum; when given it replaces shape_first / single_tile_fraction / question_mix and
    # its samples add up to `samples`
    phases: tuple[Phase, ...] = ()
    # start from these weights (a `demo-train` output, released names) instead of the standard initialisation:
    # a second stage that continues a run (fresh optimizer state and probe; use another seed for fresh data)
    init: str = ""
    # train the decoder only: the vision tower and the projector keep their (`init`) weights and run without
    # gradients — a second stage for a tower that already sees (one tile's colour and shape are a property of the
    # tile alone, and the regular tiles of every canvas are cells of the same kind); 0.40 s instead of 0.72 s per
    # sample on every canvas (1 thread, every aid on). The tile probe has nothing to train then and is off
    freeze_vision: bool = False
    # the family trained: "d" (NVLM-D, the shipped default), "x" or "h" (NVLM-X / NVLM-H with the same dimensions
    # and a gated cross-attention layer after each decoder layer: the paper's architecture comparison in
    # miniature). Their tiles are read through cross-attention: the decoder probe's tile head (which classifies
    # inline image tokens) is off for them; the attention hint targets NVLM-X's tile tags (the tokens that read
    # the tile's keys) and has no target in NVLM-H
    variant: str = "d"

    @property
    def steps(self) -> int:
        return math.ceil(self.samples / self.batch)

    def __post_init__(self):
        if self.shape_first > self.samples:
            raise ValueError(f"shape_first {self.shape_first} exceeds samples {self.samples}")
        if self.probe_pooling not in POOLINGS:
            raise ValueError(f"probe_pooling is one of {POOLINGS}, got {self.probe_pooling!r}")
        if self.attention_hint_heads < 1 or self.which_tile_hint_heads < 0:
            raise ValueError(f"attention_hint_heads is at least 1 and which_tile_hint_heads at least 0, got "
                             f"{self.attention_hint_heads}, {self.which_tile_hint_heads}")
        if not set(self.key_hint_types) <= {"colour", "shape", "which_tile"}:
            raise ValueError(f"key_hint_types are among colour, shape, which_tile; got {self.key_hint_types}")
        if self.question_probe and not self.decoder_probe:
            raise ValueError("question_probe is a head of the decoder probe: give decoder_probe > 0 too")
        if self.freeze_vision and not self.init:
            raise ValueError("freeze_vision keeps a trained vision tower: give init (a demo-train output) too")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant is one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.variant == "h" and self.attention_hint:
            raise ValueError("the attention hint pushes self-attention onto the tokens that stand for a tile; "
                             "NVLM-H's regular tiles have none in the decoder (cross-attention reads them): use "
                             "attention_hint 0 with variant 'h'")
        if self.phases and sum(p.samples for p in self.phases) != self.samples:
            raise ValueError(f"the phases' samples add up to {sum(p.samples for p in self.phases)}, "
                             f"not samples {self.samples}")

    def schedule(self) -> tuple[Phase, ...]:
        """The curriculum as phases (the explicit one, or the one shape_first / single_tile_fraction give)."""
        if self.phases:
            return self.phases
        shape_only = tuple(1.0 if t == "shape" else 0.0 for t in QUESTION_TYPES)
        one = int(self.single_tile_fraction * self.samples)
        rest = self.samples - self.shape_first - one
        parts = [(self.shape_first, "one", shape_only), (one, "one", self.question_mix),
                 (rest, "all", self.question_mix)]
        return tuple(Phase(n, c, m) for n, c, m in parts if n > 0)


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """[1 + side², dim] fixed 2-D sine-cosine position codes (MAE's): half the channels encode the row, half
    the column, at geometrically spaced frequencies; the CLS position gets zeros."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                indexing="ij")
    parts = [f(p.reshape(-1, 1) * freq) for p in (rows, cols) for f in (torch.sin, torch.cos)]
    grid = torch.cat(parts, dim=1)  # [side², 4·quarter]
    return torch.cat([torch.zeros(1, dim), torch.nn.functional.pad(grid, (0, dim - grid.shape[1]))])


def init_model(cfg, seed: int, sincos_positions: bool = True) -> NVLMReference:
    """Standard initialisation of the config's family: transformers' for the decoder (normal 0.02), small normals
    for the vision embeddings (or 2-D sin-cos position codes), InternViT's layer scale 0.1, torch's defaults
    elsewhere (NVLM-X/H's cross-attention gates at 0, as Flamingo's and mllama's: the untrained blocks add
    nothing)."""
    torch.manual_seed(seed)
    model = reference_class(cfg)(cfg).float()
    with torch.no_grad():
        emb = model.vision.embeddings
        emb.class_embedding.normal_(0, 0.02)
        emb.position_embedding.normal_(0, 0.02)
        if sincos_positions:
            emb.position_embedding.copy_(sincos_2d(cfg.vision.patches_per_side, cfg.vision.hidden_size)[None])
        for layer in model.vision.encoder.layers:
            layer.ls1.fill_(0.1)
            layer.ls2.fill_(0.1)
    return model


def lr_at(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def encode_sample(s, tok, cfg, layout):
    """(pixel values [T, 3, S, S], prompt ids, answer ids ending with <|im_end|>, the prompt's cross-attention
    inputs or None)."""
    pre = preprocess_image_fast(s.scene.image, config=cfg.preprocess)
    prompt = build_prompt(tok, [Message("user", "<image>\n" + s.question)], [pre.num_tiles],
                          tokens_per_tile=cfg.preprocess.tokens_per_tile, layout=layout)
    return (torch.from_numpy(pre.pixel_values), list(prompt.input_ids), tok.encode(s.answer) + [stop_id(tok)],
            prompt.cross)


def untagged(layout: PromptLayout) -> PromptLayout:
    """The ablation's prompt: the same image tokens without NVLM's 1-D tile tags (`<Image>` + tokens + `</Image>`)."""
    return replace(layout, in_text=lambda tag: False)


class TileProbe(torch.nn.Module):
    """Training-only: (mean ‖ max)-pooled image tokens of a tile → its cell's shape and colour."""

    def __init__(self, hidden: int, pooling: str = "mean_max"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"probe pooling is one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.head = torch.nn.Linear((2 if pooling == "mean_max" else 1) * hidden, len(SHAPES) + len(COLOURS))

    def pool(self, tiles: torch.Tensor) -> torch.Tensor:
        """[n, 256, hidden] → [n, hidden] (mean) or [n, 2·hidden] (mean ‖ max)."""
        if self.pooling == "mean":
            return tiles.mean(1)
        return torch.cat([tiles.mean(1), tiles.amax(1)], dim=-1)

    def forward(self, tiles: torch.Tensor, cells) -> torch.Tensor:
        """tiles [T, 256, hidden] (regular tiles first, in cell order) → mean cross-entropy over the cells."""
        n = len(cells)
        logits = self.head(self.pool(tiles[:n]))
        shape = torch.tensor([SHAPES.index(s) for s, _ in cells])
        colour = torch.tensor([list(COLOURS).index(c) for _, c in cells])
        ce = torch.nn.functional.cross_entropy
        return ce(logits[:, :len(SHAPES)], shape) + ce(logits[:, len(SHAPES):], colour)


class DecoderProbe(torch.nn.Module):
    """Training-only: the decoder's first-layer output → (per image token) its tile: 1..4 or the thumbnail;
    (at the prompt's last token, for questions about tile K) K."""

    THUMBNAIL = 4  # class of the thumbnail's tokens; regular tiles are 0..3

    def __init__(self, hidden: int):
        super().__init__()
        self.tile = torch.nn.Linear(hidden, self.THUMBNAIL + 1)
        self.asked = torch.nn.Linear(hidden, self.THUMBNAIL)
        self.question = torch.nn.Linear(hidden, len(QUESTION_TYPES))

    @classmethod
    def targets(cls, image_tokens: int, regular: int, tokens_per_tile: int) -> torch.Tensor:
        """Each image token's class: its tile's 0-based index among the regular tiles, or THUMBNAIL."""
        tile = torch.arange(image_tokens) // tokens_per_tile
        return torch.where(tile < regular, tile, torch.tensor(cls.THUMBNAIL))

    def forward(self, first: torch.Tensor, image_pos: torch.Tensor | None, regular: int, tokens_per_tile: int,
                asked_tile: int | None) -> torch.Tensor:
        """first [S, hidden] (sequence without the answer's teacher-forced tokens: its last row is the prompt's
        last token); image_pos [T·256] the image tokens' positions in order (None: the tiles are not in the
        sequence — NVLM-X/H — and only K is probed), regular the count of cell tiles."""
        ce = torch.nn.functional.cross_entropy
        loss = torch.zeros(())
        if image_pos is not None:
            loss = ce(self.tile(first[image_pos]), self.targets(len(image_pos), regular, tokens_per_tile))
        if asked_tile is not None:
            loss = loss + ce(self.asked(first[-1:]), torch.tensor([asked_tile]))
        return loss


def asked_tile(s) -> int | None:
    """The 0-based tile a colour or shape question names (None for the other types)."""
    if s.qtype not in ("colour", "shape"):
        return None
    return int(s.question.rsplit(" ", 1)[1].rstrip("?")) - 1


def looked_up(s) -> tuple[int, int] | None:
    """(index of the answer token that depends on one tile, that tile 0-based) of a question, or None (count):
    colour/shape → the first answer token and the tile named; which_tile → " K" of "tile K" and K."""
    if s.qtype == "which_tile":
        return 1, int(s.answer.split()[1]) - 1
    k = asked_tile(s)
    return None if k is None else (0, k)


def attention_mass_loss(attn: torch.Tensor, row: int, cols: torch.Tensor) -> torch.Tensor:
    """−log of the attention mass row `row` of `attn` [S, S] puts on the positions `cols`."""
    return -torch.log(attn[row, cols].sum() + 1e-6)


def tile_positions(tile: int, ids: list[int], pad_id: int, cross, tokens_per_tile: int) -> torch.Tensor | None:
    """The positions in the decoder sequence that stand for `tile` (0-based), which the attention hint targets:
    NVLM-D (cross None) its inline image tokens; NVLM-X its tag's tokens, the ones that read its keys (found by
    their key range); None when every token reads the tile (a one-tile image's only key tile)."""
    if cross is None:
        image_pos = (torch.tensor(ids) == pad_id).nonzero().flatten()
        return image_pos[tile * tokens_per_tile:(tile + 1) * tokens_per_tile]
    span = next((kt.start, kt.start + len(kt.tag_ids) + tokens_per_tile) for kt in cross.key_tiles if kt.tile == tile)
    if span == cross.decode_range:
        return None
    cols = [i for i, r in enumerate(cross.key_ranges) if tuple(r) == span]
    if not cols:
        raise ValueError(f"no token of the prompt reads tile {tile + 1}'s keys alone (its tag is not in the text)")
    return torch.tensor(cols)


KEY_HINT_HEAD = 3  # a head of the second KV group: the first group's heads carry each image token's tile tag


def attention_log_probs(model: NVLMReference, layer: int, hidden: torch.Tensor, row: int, head: int) -> torch.Tensor:
    """log-softmax [row + 1] of query `row`'s scores over keys 0..row in `head` of decoder layer `layer`, recomputed
    from that layer's input `hidden` [S, hidden] as transformers' Qwen2 attention computes them (RMSNorm,
    projections with bias, rotary, GQA). The attention probabilities the decoder returns underflow where a hint
    is most needed (the first layer put 1e-27 of the last token's mass on the tile number in run G: −log of it
    has no gradient left); the log-softmax of the scores keeps it."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    block = model.llm.model.layers[layer]
    attn = block.self_attn
    x = block.input_layernorm(hidden[:row + 1])[None]  # [1, R, hidden]
    cos, sin = model.llm.model.rotary_emb(x, torch.arange(row + 1)[None])
    q = attn.q_proj(x[:, row:]).view(1, 1, -1, attn.head_dim).transpose(1, 2)  # [1, heads, 1, d]
    k = attn.k_proj(x).view(1, row + 1, -1, attn.head_dim).transpose(1, 2)  # [1, kv_heads, R, d]
    q, _ = apply_rotary_pos_emb(q, q, cos[:, row:], sin[:, row:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    kv = head // (q.shape[1] // k.shape[1])
    return torch.log_softmax((q[0, head, 0] @ k[0, kv].T) * attn.scaling, dim=-1)


def question_key(s, ids: list[int], tok) -> tuple[int, int] | None:
    """(index of the answer token whose prediction needs it, its position in `ids`) of the question word that
    the lookup's second hop searches with, or None (count): colour/shape → the tile number " K" and the first
    answer token; which_tile → the colour word and " K" of "tile K" (predicted at the position of "tile")."""
    lookup = looked_up(s)
    if lookup is None:
        return None
    word = f" {lookup[1] + 1}" if s.qtype in ("colour", "shape") else f" {s.question.split()[-2]}"
    token = tok.encode(word)
    if len(token) != 1:
        raise ValueError(f"{word!r} is {len(token)} tokens in this tokenizer, not one")
    return lookup[0], len(ids) - 1 - ids[::-1].index(token[0])  # its last occurrence: the question follows the image


@dataclass
class Aids:
    """The training-only losses of a recipe: the tile probe, the decoder probe (with its question head) and the
    attention hint, with their weights. None of it ships: the saved model is plain NVLM-D."""

    recipe: Recipe
    tok: NVLMTokenizer  # the key hint finds the question word it points at by its token
    tile: TileProbe | None = None
    decoder: DecoderProbe | None = None
    last: dict = field(default_factory=dict)  # the last sample's losses by aid, unweighted (for the log)

    @classmethod
    def of(cls, recipe: Recipe, hidden: int, tok: NVLMTokenizer) -> "Aids":
        tile_probe = recipe.aux_weight and not recipe.freeze_vision
        return cls(recipe, tok, TileProbe(hidden, recipe.probe_pooling) if tile_probe else None,
                   DecoderProbe(hidden) if recipe.decoder_probe else None)

    def key_hinted(self, s) -> bool:
        return bool(self.recipe.key_hint) and s.qtype in self.recipe.key_hint_types

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in (self.tile, self.decoder) if m is not None for p in m.parameters()]

    def loss(self, s, tiles: torch.Tensor, ids: list[int], pad_id: int, out, model: NVLMReference,
             cross=None) -> torch.Tensor:
        """Their weighted sum for sample `s`, given the image tiles' features [T, 256, hidden] and the decoder's
        output `out` (hidden states and attentions as `wants` asked for) of `model` (the key hint recomputes a
        first-layer attention row from it); `cross`: the prompt's cross-attention inputs (NVLM-X/H)."""
        r, parts = self.recipe, {}  # name → (weight, unweighted loss)
        if self.tile is not None:
            parts["tile_probe"] = (r.aux_weight, self.tile(tiles, s.scene.cells))
        image_pos = (torch.tensor(ids) == pad_id).nonzero().flatten()
        if self.decoder is not None:
            first = out.hidden_states[1][0, :len(ids)]  # after decoder layer 1, prompt positions only
            parts["decoder_probe"] = (r.decoder_probe, self.decoder(first, image_pos if r.variant == "d" else None,
                                                                    len(s.scene.cells),
                                                                    tiles.shape[1], asked_tile(s)))
            if r.question_probe:
                parts["question_probe"] = (r.question_probe, torch.nn.functional.cross_entropy(
                    self.decoder.question(first[-1:]), torch.tensor([QUESTION_TYPES.index(s.qtype)])))
        if self.key_hinted(s):
            offset, position = question_key(s, ids, self.tok)
            logp = attention_log_probs(model, 0, out.hidden_states[0][0], len(ids) - 1 + offset, KEY_HINT_HEAD)
            parts["key_hint"] = (r.key_hint, -logp[position])
        lookup = looked_up(s)
        cols = None
        if r.attention_hint and lookup is not None:
            cols = tile_positions(lookup[1], ids, pad_id, cross, tiles.shape[1])
        if r.attention_hint and cols is not None:
            offset = lookup[0]
            attn = out.attentions[1][0]  # second layer: [heads, S, S]
            heads = r.which_tile_hint_heads if s.qtype == "which_tile" and r.which_tile_hint_heads \
                else r.attention_hint_heads
            if heads > attn.shape[0]:
                raise ValueError(f"attention hint on {heads} heads: the decoder has {attn.shape[0]}")
            parts["attention_hint"] = (r.attention_hint, torch.stack([
                attention_mass_loss(attn[h], len(ids) - 1 + offset, cols) for h in range(heads)]).mean())
        self.last = {name: loss.item() for name, (_, loss) in parts.items()}
        return sum((w * loss for w, loss in parts.values()), torch.zeros(()))

    def wants(self, s) -> dict:
        """The decoder outputs these losses read, for `model.llm.model(...)`."""
        return {"output_hidden_states": self.decoder is not None or self.key_hinted(s),
                "output_attentions": bool(self.recipe.attention_hint) and looked_up(s) is not None}


def sample_loss(model: NVLMReference, s, pv: torch.Tensor, ids: list[int], answer: list[int], pad_id: int,
                aids: Aids | None = None, cross=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(mean cross-entropy of the answer tokens given the prompt (teacher forcing), the training aids' weighted
    loss or 0, whether every answer token is the argmax). `cross`: the prompt's cross-attention inputs (NVLM-X/H)."""
    seq = torch.tensor([ids + answer[:-1]])
    with torch.set_grad_enabled(any(p.requires_grad for p in model.vision.parameters())):
        tiles = model.encode_tiles(pv)  # [T, 256, hidden]
    embeds, reading = model.teacher_forced(seq, tiles, pad_id, cross, generated=len(answer) - 1)
    with reading:
        out = model.llm.model(inputs_embeds=embeds, **(aids.wants(s) if aids else {}))
    logits = model.llm.lm_head(out.last_hidden_state[0, -len(answer):])  # [A, vocab]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(answer))
    # teacher-forced exact match of the whole answer: a running accuracy for the loss log (the loss is a mean over
    # the answer's tokens, most of which are decided by its first, so it understates how often the answer is wrong)
    exact = bool((logits.argmax(-1) == torch.tensor(answer)).all())
    return loss, (aids.loss(s, tiles, ids, pad_id, out, model, cross) if aids else torch.zeros(())), exact


def train(recipe: Recipe, log_file: Path | None = None) -> tuple[NVLMReference, list[dict]]:
    """Train from scratch; returns the model and the per-step log (also appended to `log_file` as JSONL)."""
    torch.set_num_threads(recipe.threads)
    _, cfg, raw_tok = demo_parts(trained_dims(recipe.variant))
    tok = NVLMTokenizer(raw_tok, Path("<demo tokenizer>"))
    layout = family_for(cfg).prompt_layout if recipe.tile_tags else untagged(family_for(cfg).prompt_layout)
    model = init_model(cfg, recipe.seed, recipe.sincos_positions)
    if recipe.init:
        load_released(model, Path(recipe.init))
    model.train()
    if recipe.freeze_vision:
        for module in (model.vision, model.projector):
            module.requires_grad_(False)
    aids = Aids.of(recipe, cfg.llm.hidden_size, tok)
    params = [p for p in model.parameters() if p.requires_grad] + aids.parameters()
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    rng = np.random.default_rng([recipe.seed, 2024])
    # the phase of each sample, in order
    plan = [p for p in recipe.schedule() for _ in range(p.samples)]
    history, done, t0 = [], 0, time.perf_counter()
    out = open(log_file, "a") if log_file else None
    try:
        with bar(recipe.steps, "training the embedded default", unit="step") as progress:
            for step in range(recipe.steps):
                for group in opt.param_groups:
                    group["lr"] = lr_at(recipe, step)
                opt.zero_grad(set_to_none=True)
                losses, auxes, by_type, hits, by_aid = [], [], {}, {}, {}
                for _ in range(min(recipe.batch, recipe.samples - done)):
                    phase = plan[done]
                    canvas = CANVASES[0] if phase.canvas == "one" else None
                    if sum(w > 0 for w in phase.mix) == 1:  # one question type: no draw (as the runs before phases)
                        qtype = QUESTION_TYPES[next(i for i, w in enumerate(phase.mix) if w > 0)]
                    else:
                        mix = np.array(phase.mix) / sum(phase.mix)
                        qtype = QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=mix))]
                    s = sample(rng, qtype, canvas=canvas)
                    pv, ids, answer, cross = encode_sample(s, tok, cfg, layout)
                    loss, aux, exact = sample_loss(model, s, pv, ids, answer, tok.image_pad_id, aids, cross)
                    ((loss + aux) / recipe.batch).backward()
                    losses.append(loss.item())
                    auxes.append(aux.item())
                    for name, value in aids.last.items():
                        by_aid.setdefault(name, []).append(value)
                    by_type.setdefault(qtype, []).append(loss.item())
                    hits.setdefault(qtype, []).append(exact)
                    done += 1
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                row = {"step": step + 1, "samples": done, "loss": sum(losses) / len(losses),
                       "loss_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
                       "exact_by_type": {t: sum(v) / len(v) for t, v in sorted(hits.items())},
                       "probes": sum(auxes) / len(auxes),
                       # each aid's unweighted loss, mean over the samples it applies to
                       "aids": {name: sum(v) / len(v) for name, v in sorted(by_aid.items())},
                       "lr": lr_at(recipe, step), "seconds": round(time.perf_counter() - t0, 2)}
                history.append(row)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                progress(1)
                if (step + 1) % 25 == 0 or step + 1 == recipe.steps:
                    log.info("step %d/%d: %d samples, loss %.4f, %.0f s", step + 1, recipe.steps, done, row["loss"],
                             row["seconds"])
    finally:
        if out:
            out.close()
    return model.eval(), history


def released_tensors(model: NVLMReference, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's weights under the released checkpoint's names (the family's weight map, read backwards)."""
    cfg = model.cfg
    modules = model.component_modules()
    out = {}
    for comp in family_for(cfg).components:
        state = modules[comp.name].state_dict()
        for source, target, shape in comp.expand(cfg):
            t = state[target]
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{target}: {tuple(t.shape)} is not the weight map's {shape}")
            out[source] = t.detach().to(dtype).contiguous()
    return out


def load_released(model: NVLMReference, path: Path) -> None:
    """Load weights saved by `released_tensors` (the family's weight map, forwards) into `model`, in its dtype."""
    from safetensors.torch import load_file

    # weights trained before the released layout's vision padding heads get zero padding heads (same function)
    tensors = with_padding_heads(load_file(str(path)), model.cfg.vision)
    modules = model.component_modules()
    for comp in family_for(model.cfg).components:
        module = modules[comp.name]
        wanted = {target: tensors.pop(source) for source, target, _ in comp.expand(model.cfg) if source in tensors}
        params = {name for name, _ in module.named_parameters()}  # tied weights appear once here
        missing = params - set(wanted)
        if missing:
            raise CheckpointError(f"{path}: no weights for {comp.name} {sorted(missing)[:3]} — not a demo-train output "
                             f"of these dimensions")
        module.load_state_dict({k: v.to(torch.float32) for k, v in wanted.items()}, strict=False)
    if tensors:
        raise CheckpointError(f"{path}: tensors the embedded default does not have: {sorted(tensors)[:3]}…")


@torch.no_grad()
def predict(model: NVLMReference, tok, samples, layout: PromptLayout | None = None, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers of the reference model to task samples (the prompt exactly as training and serving build it)."""
    layout = layout or family_for(model.cfg).prompt_layout
    answers = []
    for s in samples:
        pv, ids, _, cross = encode_sample(s, tok, model.cfg, layout)
        r = model.generate(ids, pv.to(model.dtype), image_token_id=tok.image_pad_id, max_new_tokens=max_new_tokens,
                           eos_token_id=stop_id(tok), cross=cross)
        answers.append(tok.decode(r.tokens))
    return answers


def train_and_save(out: Path, recipe: Recipe, *, command: str, eval_n: int = 400, eval_seed: int = 1,
                   log_file: Path | None = None) -> dict:
    """Train, write the bf16 weights (released names) to `out` atomically and a card beside it
    (`out` with .json: recipe, command, seed, checksum, held-out accuracy of the saved bf16 weights)."""
    from safetensors.torch import save_file

    out = Path(out)
    t0 = time.perf_counter()
    model, history = train(recipe, log_file)
    seconds = time.perf_counter() - t0
    tensors = released_tensors(model)
    tmp = out.with_name(f".{out.name}.partial")
    save_file(tensors, str(tmp), metadata={"format": "pt", "recipe": json.dumps(asdict(recipe))})
    tmp.replace(out)
    accuracy = None
    if eval_n:  # through a checkpoint written exactly as `demo-checkpoint --weights FILE` writes it
        with tempfile.TemporaryDirectory() as tmpdir:
            ckpt = write_demo_checkpoint(Path(tmpdir) / "ckpt", variant=recipe.variant, weights=out)
            accuracy = evaluate_checkpoint(ckpt, eval_n, eval_seed, tile_tags=recipe.tile_tags)
    card = {"weights": out.name, "sha256": sha256_file(out), "command": command, "recipe": asdict(recipe),
            "init": _init_card(recipe.init),
            "train_seconds": round(seconds, 1), "final_loss": history[-1]["loss"],
            "eval": {"questions": eval_n, "seed": eval_seed, "accuracy": accuracy}}
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _init_card(init: str) -> dict | None:
    """What a continued run started from: the weights' checksum and, when present, their own card's command
    and init (so the card of the last stage holds every command of the chain)."""
    if not init:
        return None
    path = Path(init)
    card = path.with_suffix(".json")
    prior = json.loads(card.read_text()) if card.exists() else {}
    return {"weights": path.name, "sha256": sha256_file(path), "command": prior.get("command"),
            "train_seconds": prior.get("train_seconds"), "init": prior.get("init")}


def evaluate_checkpoint(path: Path, n: int, seed: int, *, tile_tags: bool = True, chat_format: str = "release") -> dict:
    """Task accuracy of a checkpoint's reference model on n held-out questions (all four types, seeded)."""
    model, tok = reference_model(path), NVLMTokenizer.from_dir(path, chat_format=chat_format)
    layout = family_for(model.cfg).prompt_layout
    samples = heldout(n, seed)
    return accuracy(samples, predict(model, tok, samples, layout if tile_tags else untagged(layout)))
