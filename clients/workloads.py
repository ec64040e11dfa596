"""Benchmark workloads: what `nvlm-bench run` sends (text prompts, images of a given tile count, JSONL files)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from runtime.core.errors import NVLMError
from runtime.core.jsonl import parse_jsonl
from runtime.scenes import TILE_SIZES, synthetic_scene

PROMPTS = ["Describe this image in detail.", "What objects are in the picture?", "Summarize what you see.",
           "Explain the layout of this scene."]


TEXT_PROMPTS = ["Explain how a transformer generates text.", "Write a haiku about GPUs.",
                "What is the capital of France and why?", "List three uses of image tiling."]


class BenchError(NVLMError):
    """The benchmark cannot run as asked."""


@dataclass
class Item:
    prompt: str
    images: list  # encoded bytes
    label: str


def _png(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    synthetic_scene(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def load_workload(spec: str, seed: int) -> list[Item]:
    kind, _, arg = spec.partition(":")
    if kind == "text":
        return [Item(p, [], "text") for p in TEXT_PROMPTS]
    if kind == "tiles":
        counts = [int(x) for x in arg.split(",") if x]
        bad = [c for c in counts if c not in TILE_SIZES]
        if bad or not counts:
            raise BenchError(f"--workload tiles:… takes tile counts from {sorted(TILE_SIZES)}, got {arg!r}")
        return [Item(PROMPTS[k % len(PROMPTS)], [_png(*TILE_SIZES[c], seed + k)], f"{c} tiles")
                for k, c in enumerate(counts)]
    if kind == "images":
        items = []
        for k, size in enumerate(x for x in arg.split(",") if x):
            try:
                w, h = (int(v) for v in size.lower().split("x"))
            except ValueError:
                raise BenchError(f"--workload images: expects WxH sizes, got {size!r}") from None
            items.append(Item(PROMPTS[k % len(PROMPTS)], [_png(w, h, seed + k)], f"{w}x{h}"))
        return items
    if kind == "jsonl":
        return _jsonl(Path(arg))
    if kind == "mixed":  # the text prompts, then one image per tile count: text and image requests interleave
        return load_workload("text", seed) + load_workload(f"tiles:{arg}", seed)
    raise BenchError(f"--workload {spec!r}: use text, tiles:1,3,7, images:WxH,…, mixed:1,3 or jsonl:PATH")


def _jsonl(path: Path) -> list[Item]:
    if not path.is_file():
        raise BenchError(f"workload file {path} not found")
    rows, problems = parse_jsonl(path, _bench_row, 'JSON objects with a "text_input" string')
    if problems:
        raise BenchError(f"{path}: " + "; ".join(problems))
    if not rows:
        raise BenchError(f"{path} holds no requests")
    return [Item(text, [p.read_bytes() for p in images], f"line {n}") for n, (text, images) in rows]


def _bench_row(row: dict, image_path) -> tuple[str, list[Path]]:
    """genai-perf's input format: {"text_input": …, "image": path or [paths]}."""
    text = row["text_input"]
    if not isinstance(text, str):
        raise TypeError
    images = row.get("image") or []
    return text, [image_path(i) for i in ([images] if isinstance(images, str) else images)]
