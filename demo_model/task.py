"""The embedded default's task: shapes in tiles, questions with exact answers (issue 17's fixed spec).

A canvas of 448×448 cells (448×448, 896×448, 1344×448 or 896×896: NVLM tiling gives 1 tile, 2 + thumbnail,
3 + thumbnail, 4 + thumbnail) on a light noisy background; every cell, row-major like NVLM's tiles, holds one
filled circle, square or triangle (apex up) in one of four colours. Questions are one user turn with the
image first; answers are lowercase words without punctuation:

    What colour is the shape in tile K?   → red
    What shape is in tile K?              → circle
    Which tile has the COLOUR shape?      → tile K      (asked only when that colour is unique)
    How many shapes are there?            → 3

Everything is drawn from a numpy Generator, so a seed fixes the images, questions and answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CELL = 448
CANVASES = ((448, 448), (896, 448), (1344, 448), (896, 896))
BACKGROUND, NOISE = (235, 235, 235), 10
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SIZE_RANGE, JITTER = (200, 300), 40
QUESTION_TYPES = ("colour", "shape", "which_tile", "count")


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    cells: tuple[tuple[str, str], ...]  # (shape, colour) per cell, row-major
    image: Image.Image


@dataclass(frozen=True)
class Sample:
    scene: Scene
    qtype: str
    question: str  # the user's text without the image placeholder
    answer: str


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":  # apex up, base along the bottom of the box
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def random_scene(rng: np.random.Generator, canvas: tuple[int, int] | None = None) -> Scene:
    width, height = canvas or CANVASES[int(rng.integers(len(CANVASES)))]
    noise = rng.integers(-NOISE, NOISE + 1, size=(height, width, 3))
    img = Image.fromarray((np.array(BACKGROUND) + noise).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cells = []
    for row in range(height // CELL):
        for col in range(width // CELL):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
            cx = col * CELL + CELL // 2 + int(rng.integers(-JITTER, JITTER + 1))
            cy = row * CELL + CELL // 2 + int(rng.integers(-JITTER, JITTER + 1))
            draw_shape(draw, shape, (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2), COLOURS[colour])
            cells.append((shape, colour))
    return Scene(width, height, tuple(cells), img)


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of one type about the scene, or None when the type cannot be asked of it."""
    n = len(scene.cells)
    if qtype == "count":
        return "How many shapes are there?", str(n)
    if qtype in ("colour", "shape"):
        k = int(rng.integers(n))
        shape, colour = scene.cells[k]
        if qtype == "colour":
            return f"What colour is the shape in tile {k + 1}?", colour
        return f"What shape is in tile {k + 1}?", shape
    if qtype == "which_tile":
        colours = [c for _, c in scene.cells]
        unique = [c for c in COLOURS if colours.count(c) == 1]
        if not unique:
            return None
        colour = unique[int(rng.integers(len(unique)))]
        return f"Which tile has the {colour} shape?", f"tile {colours.index(colour) + 1}"
    raise ValueError(f"unknown question type {qtype!r}; known: {QUESTION_TYPES}")


def sample(rng: np.random.Generator, qtype: str | None = None, canvas: tuple[int, int] | None = None) -> Sample:
    """One question about a fresh scene (a random type unless given; redrawn until the type can be asked)."""
    qtype = qtype or QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    while True:
        scene = random_scene(rng, canvas)
        qa = ask(scene, qtype, rng)
        if qa is not None:
            return Sample(scene, qtype, *qa)


def heldout(n: int, seed: int) -> list[Sample]:
    """n questions, the four types in turn, from their own seed (never the training stream's)."""
    rng = np.random.default_rng([seed, 17])
    return [sample(rng, QUESTION_TYPES[i % len(QUESTION_TYPES)]) for i in range(n)]


def normalize(text: str) -> str:
    """An answer as compared: lowercase, surrounding whitespace and a final full stop removed."""
    return text.strip().lower().rstrip(".").strip()


def accuracy(samples, predictions) -> dict:
    """Exact-match accuracy per question type and overall: {"colour": 0.97, …, "all": 0.95, "n": {…}}."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    hits: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    for s, p in zip(samples, predictions):
        hits[s.qtype].append(normalize(p) == s.answer)
    out = {t: sum(h) / len(h) for t, h in hits.items() if h}
    out["all"] = sum(sum(h) for h in hits.values()) / max(1, len(samples))
    out["n"] = {t: len(h) for t, h in hits.items()}
    return out
