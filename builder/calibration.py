"""Multimodal calibration data: real NVLM prompts with image embeddings at the `<|vision_pad|>` positions.

NVLM's decoder sees image tokens in production, and their activations differ in range from text
tokens, so quantization scales are calibrated on what the engine will see: ChatML prompts with
tile tags, tiled by the reference preprocessing, encoded by the reference vision tower, and fed to
the LLM as `inputs_embeds`.

Sources:
- built-in (default): seeded synthetic scenes of varied sizes (so every tile count appears) with
  varied questions, plus a few text-only prompts;
- `--calib-data DIR`: every image in the folder, each with a default question;
- `--calib-data FILE.jsonl`: lines `{"prompt": "...", "image": "path"}` (image optional, relative
  paths resolve against the file's folder; `<image>` marks where it goes, else it is prepended).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from runtime.core.errors import NVLMError
from runtime.core.families import family_for
from runtime.core.jsonl import parse_jsonl
from runtime.preprocess import preprocess_images
from runtime.prompt import build_prompt, with_image_placeholders
from runtime.scenes import SCENE_SIZES, synthetic_scene

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_QUESTION = "<image>\nDescribe this image in detail."
MIN_SAMPLES = 4
QUESTIONS = [
    "<image>\nDescribe this image in detail.",
    "What objects are in <image>? List them with their colors.",
    "<image>\nRead any text in the picture and explain the layout.",
    "<image>\nHow many shapes are there, and where are they?",
    "Compare the left and right halves of this image: <image>",
]
TEXT_PROMPTS = [
    "Explain how a transformer language model generates text, step by step.",
    "Write a short poem about the ocean at night.",
    "What is 17 times 23? Show your work.",
]


class CalibrationDataError(NVLMError):
    """The calibration data is unreadable, incomplete or too small."""


@dataclass(frozen=True)
class CalibSample:
    prompt: str
    image: object | None  # PIL image, path, or None for text-only


def builtin_samples(count: int, seed: int = 0) -> list[CalibSample]:
    samples = []
    for k in range(count):
        if k % 4 == 3:
            samples.append(CalibSample(TEXT_PROMPTS[k % len(TEXT_PROMPTS)], None))
        else:
            w, h = SCENE_SIZES[k % len(SCENE_SIZES)]
            samples.append(CalibSample(QUESTIONS[k % len(QUESTIONS)], synthetic_scene(w, h, seed * 1000 + k)))
    return samples


def load_calib_data(path: str | Path) -> list[CalibSample]:
    path = Path(path)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise CalibrationDataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder")
        return [CalibSample(DEFAULT_QUESTION, p) for p in images]
    if not path.is_file():
        raise CalibrationDataError(f"--calib-data {path} does not exist")
    rows, problems = parse_jsonl(path, _calib_row, 'JSON objects with a non-empty "prompt"')
    if problems:
        raise CalibrationDataError(f"{path}: " + "; ".join(problems))
    return [sample for _, sample in rows]


def _calib_row(row: dict, image_path) -> CalibSample:
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise TypeError
    image = row.get("image")
    if image is None:
        return CalibSample(prompt, None)
    return CalibSample(with_image_placeholders(prompt, 1), image_path(image))


def select(samples: list[CalibSample], size: int) -> list[CalibSample]:
    if len(samples) < MIN_SAMPLES:
        raise CalibrationDataError(
            f"only {len(samples)} calibration samples; at least {MIN_SAMPLES} are needed for stable scales "
            f"(128–512 is typical for real models)")
    return samples[:size]


@dataclass(frozen=True)
class CalibInput:
    """One calibration prompt as the decoder takes it: its input embeddings [1, L, hidden] (image embeddings
    scattered in) and the context its pass runs in — NVLM-X/H: the image keys/values and key ranges that
    the cross-attention blocks read (runtime/cross_reference.py), so that the self-attention layers are
    calibrated on the activations the images give them; NVLM-D: nothing."""

    embeds: object
    context: Callable[[], ContextManager]

    def run(self, decoder):
        with self.context():
            return decoder(inputs_embeds=self.embeds)


def sample_prompts(samples: list[CalibSample], model, tokenizer, *, text_only: bool = False):
    """Each sample as a prompt: (runtime.prompt.Prompt, pixel values [T, 3, S, S] or None), preprocessed as in
    serving. `text_only=True` drops the images (and their placeholders)."""
    import torch

    pcfg, layout = model.cfg.preprocess, family_for(model.cfg).prompt_layout
    for s in samples:
        image = None if text_only else s.image
        prompt = s.prompt if image is not None else s.prompt.replace("<image>", "").strip()
        tiles, pixel_values = [], None
        if image is not None:
            (pre,) = preprocess_images([image], pcfg, max_images=1)
            tiles, pixel_values = [pre.num_tiles], torch.from_numpy(pre.pixel_values)
        yield build_prompt(tokenizer, prompt, tiles, tokens_per_tile=pcfg.tokens_per_tile, layout=layout), pixel_values


def embed_samples(samples: list[CalibSample], model, tokenizer, *, text_only: bool = False) -> Iterator[CalibInput]:
    """Yield each sample as the decoder takes it (`CalibInput`). `text_only=True` drops the images (and their
    placeholders): the text-only baseline."""
    import torch

    for p, pixel_values in sample_prompts(samples, model, tokenizer, text_only=text_only):
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            emb, step = model.prefill_inputs(ids, pixel_values, tokenizer.image_pad_id, p.cross)
        yield CalibInput(emb, partial(step, None))
