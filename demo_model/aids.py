"""Training-only aids of the demo recipe: probes and attention hints that shape where the gradient goes while the
shipped model stays plain NVLM (docs/demo_model.md says which runs asked for each). None of them is saved."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from demo_model.recipe import POOLINGS, Phase, Recipe  # noqa: F401 — POOLINGS, Phase: re-exported
from demo_model.task import COLOURS, QUESTION_TYPES, SHAPES
from runtime.reference import NVLMReference
from runtime.tokenizer import NVLMTokenizer


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


