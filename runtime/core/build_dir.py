"""The build-directory contract: what `nvlm-build engine` writes and everything else reads back.

    OUT/manifest.json      schema, source hashes, options, resolved engine limits, tools, stages, status
    OUT/preprocess.json    the checkpoint's tiling and prompt parameters (+ serving extras)
    OUT/llm/config.json    the TensorRT-LLM checkpoint's config (its `dtype` is the engine's)

One writer and one reader of each file, side by side; the engine build (builder/engine_build.py)
writes, serving, the in-process pipeline, the roofline and the benchmark read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from .config import IMAGE_END, IMAGE_PAD, IMAGE_START, THUMBNAIL_TAG, PreprocessConfig
from .errors import NVLMError
from .families import ModelFamily, family_for_trtllm
from .limits import EngineLimits

SCHEMA = "nvlm-trt/build/v1"
# TensorRT-LLM checkpoint `dtype` → Triton dtype of tensors that must equal the engine's (the prompt table)
ENGINE_DTYPES = {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}


class BuildDirError(NVLMError):
    """A build directory is missing a file or holds one nvlm-trt cannot read."""


def sha256_file(path: Path, chunk: int = 1 << 22, advance=None) -> str:
    """`advance(n)`: called with each block's size (a progress bar in bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
            if advance:
                advance(len(block))
    return h.hexdigest()


def tree_checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_preprocess(directory: Path, pre: PreprocessConfig, limits: EngineLimits, chat_format: str = "release") -> Path:
    """preprocess.json: the checkpoint's tiling and prompt parameters, plus what serving needs (the chat format
    every served prompt is rendered in)."""
    data = {**asdict(pre), "max_tiles_per_image": pre.max_tiles_per_image, "chat_format": chat_format,
            "max_images_per_request": limits.max_images_per_request,
            "image_start": IMAGE_START, "image_end": IMAGE_END, "image_pad": IMAGE_PAD,
            "thumbnail_tag": THUMBNAIL_TAG, "pillow_below": "12.2"}
    path = Path(directory) / "preprocess.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_manifest(build: Path) -> dict | None:
    """manifest.json of a build (None when `build` has none). The one reader of what build_deployment writes."""
    path = Path(build) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_limits(build: Path) -> EngineLimits:
    """The build's engine limits, as the engine build resolved and recorded them. Builds made before
    limits were recorded: from the options and preprocess.json."""
    manifest = read_manifest(build) or {}
    if "limits" in manifest:
        return EngineLimits.from_record(manifest["limits"])
    o = manifest.get("options", {})
    d = EngineLimits()
    return EngineLimits(max_batch_size=o.get("max_batch_size", d.max_batch_size),
                        max_tiles_per_image=o.get("max_tiles"),
                        max_images_per_request=o.get("max_images", d.max_images_per_request),
                        max_input_text_len=o.get("max_input_text_len", d.max_input_text_len),
                        max_output_len=o.get("max_output_len", d.max_output_len)).resolve(read_preprocess(build)[0])


def read_preprocess(build: Path):
    """preprocess.json of a build → (typed PreprocessConfig, the raw dict with the serving extras).
    The one reader of what `_preprocess` writes."""
    raw = json.loads((Path(build) / "preprocess.json").read_text())
    fields = PreprocessConfig.__dataclass_fields__
    cfg = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})
    return cfg, raw


def read_chat_format(build: Path) -> str:
    """The chat format a build renders prompts in (builds before it was recorded: the release's)."""
    return read_preprocess(build)[1].get("chat_format", "release")


def read_family(build: Path) -> ModelFamily:
    """The model family of a build, from its TensorRT-LLM checkpoint's `architecture`."""
    cfg = json.loads((Path(build) / "llm" / "config.json").read_text())
    return family_for_trtllm(cfg.get("architecture"))


def engine_dtype(llm_config: dict) -> str:
    """Triton dtype of the engine's activations, from the TensorRT-LLM checkpoint's `dtype`."""
    try:
        return ENGINE_DTYPES[llm_config["dtype"]]
    except KeyError:
        raise BuildDirError(f"llm/config.json dtype {llm_config.get('dtype')!r} has no Triton prompt-table dtype "
                            f"(known: {', '.join(ENGINE_DTYPES)})") from None
