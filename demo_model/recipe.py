"""The demo model's training recipe, `Recipe`, and `nvlm-build demo-train`'s flags, which are derived from it: one
flag per field (`--no-X` for a field that is on by default), its help from the field's metadata, and the command
line a card records (`command_line`: the fields that differ from the defaults). Why each field exists — the runs
that asked for it — is docs/demo_model.md's "The recipe's fields" section."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields

from runtime.core.demo_checkpoint import VARIANTS

from .task import QUESTION_TYPES

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


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(w) for w in text.split(","))


def _show_floats(v) -> str:
    return ",".join(f"{w:g}" for w in v)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def _f(default, help: str, parse=None, show=None, metavar=None):
    """A recipe field: its default and flag help; `parse` / `show` convert a tuple field from / to its flag text."""
    return field(default=default, metadata={"help": help, "parse": parse, "show": show, "metavar": metavar})


@dataclass(frozen=True)
class Recipe:
    samples: int = _f(6000, "training questions, each on a fresh image")
    batch: int = _f(8, "samples per optimizer step")
    lr: float = _f(1e-3, "peak learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_steps: int = _f(20, "linear warm-up steps before the cosine decay")
    single_tile_fraction: float = _f(0.35, "first part of the run on one-tile (448x448) images only")
    shape_first: int = _f(0, "start with N one-tile samples of shape questions only", metavar="N")
    seed: int = _f(0, "data and initialisation seed")
    threads: int = _f(2, "torch threads (results depend on it)")
    tile_tags: bool = _f(True, "prompts with NVLM's 1-D tile tags (--no-tile-tags: the ablation without them)")
    question_mix: tuple[float, ...] = _f((1.0, 2.0, 1.0, 1.0), "weights of the question types "
                                         f"({','.join(QUESTION_TYPES)})", _floats, _show_floats, "W,W,W,W")
    sincos_positions: bool = _f(True, "2-D sin-cos initial position embedding of the vision tower (as MAE)")
    aux_weight: float = _f(1.0, "weight of the training-only tile probe (each tile's shape and colour)", metavar="W")
    decoder_probe: float = _f(0.0, "weight of the training-only probe on the decoder's first layer (each image "
                              "token's tile, the tile a question names; 0: off)", metavar="W")
    attention_hint: float = _f(0.0, "weight of the training-only hint that a head of the decoder's second layer "
                               "attends to the tile an answer is about (0: off)", metavar="W")
    attention_hint_heads: int = _f(1, "how many second-layer heads the attention hint pushes", metavar="N")
    which_tile_hint_heads: int = _f(0, "the same for which_tile questions (0: --attention-hint-heads)", metavar="N")
    key_hint: float = _f(0.0, "training only: push a first-layer head, where the tile-dependent answer token is "
                         "predicted, onto the question word the lookup searches with (0: off)", metavar="W")
    key_hint_types: tuple[str, ...] = _f(("colour", "shape", "which_tile"), "question types the key hint covers",
                                         _words, ",".join, "T,T")
    question_probe: float = _f(0.0, "weight of the training-only probe of the question's type on the decoder's "
                               "first layer (needs --decoder-probe; 0: off)", metavar="W")
    probe_pooling: str = _f("mean_max", f"how the training-only tile probe pools a tile's tokens ({'|'.join(POOLINGS)})")
    phases: tuple[Phase, ...] = _f((), "an explicit curriculum, e.g. '1200:one:1,2,1,1;3000:all:1,2,1,1' (per phase: "
                                   "samples, one-tile or all canvases, question weights); replaces --samples, "
                                   "--single-tile-fraction, --shape-first and --question-mix",
                                   Phase.parse, lambda v: ";".join(f"{p.samples}:{p.canvas}:{_show_floats(p.mix)}"
                                                                   for p in v), "SPEC")
    init: str = _f("", "continue from a demo-train output instead of the standard initialisation (a second stage; "
                   "give it another --seed for fresh data)", metavar="WEIGHTS")
    freeze_vision: bool = _f(False, "train the decoder only, the vision tower and projector as --init has them")
    variant: str = _f("d", f"the family trained: {', '.join(sorted(VARIANTS))} (d: NVLM-D, the shipped default; x, h: "
                      "the architecture comparison, without --attention-hint for h)")

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




def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Recipe field."""
    for f in fields(Recipe):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            if f.default:
                parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=meta["help"])
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
            continue
        shown = meta["show"](f.default) if meta["show"] else f.default
        # a tuple field arrives as text and is parsed in from_flags, so that a malformed value is one clear error
        parser.add_argument(flag, dest=f.name, type=str if meta["parse"] else type(f.default), default=f.default,
                            metavar=meta["metavar"], help=f"{meta['help']} (default {shown if shown != '' else 'none'})")


def from_flags(args: argparse.Namespace) -> Recipe:
    """The recipe the flags give (explicit phases set the number of samples). ValueError: a bad combination."""
    values = {f.name: getattr(args, f.name) for f in fields(Recipe)}
    for f in fields(Recipe):
        if f.metadata["parse"] and isinstance(values[f.name], str):
            try:
                values[f.name] = f.metadata["parse"](values[f.name])
            except ValueError as e:
                raise ValueError(f"--{f.name.replace('_', '-')}: {e}") from None
    if values["phases"]:
        values["samples"] = sum(p.samples for p in values["phases"])
    if not 0 <= values["shape_first"] <= values["samples"]:
        raise ValueError(f"--shape-first {values['shape_first']} must be between 0 and --samples {values['samples']}")
    return Recipe(**values)


def command_line(out: str, recipe: Recipe) -> str:
    """The `nvlm-build demo-train` command that trains `recipe`: the fields that differ from the defaults."""
    words = [f"nvlm-build demo-train {out}"]
    for f in fields(Recipe):
        v = getattr(recipe, f.name)
        if v == f.default or (f.name == "samples" and recipe.phases):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            words.append(flag if v else "--no-" + flag[2:])
        else:
            shown = f.metadata["show"](v) if f.metadata["show"] else v
            words.append(f"{flag} '{shown}'" if f.name == "phases" else f"{flag} {shown}")
    return " ".join(words)
