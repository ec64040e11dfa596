"""NVLM dynamic high-resolution tiling, reproduced exactly (docs/upstream.md, NVLM's dynamic high-resolution tiling).

    image ─convert("RGB")─▶ choose grid (cols, rows) ─resize to (S·cols, S·rows), Pillow BICUBIC─▶
    crop row-major ─(+ thumbnail: whole image resized to S×S, only when > 1 tile)─▶
    x/255, ImageNet mean/std ─▶ pixel_values [T, 3, S, S] float32

EXIF orientation is deliberately NOT applied: NVLM's reference pipeline does not call
`ImageOps.exif_transpose`, so a rotated phone photo is tiled as stored. Matching training
matters more than matching the photo viewer.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from runtime.core.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from runtime.core.errors import EnvironmentMismatchError, InputError

from .prompt import tile_tags

ImageInput = Union["PIL.Image.Image", bytes, bytearray, str, Path]  # noqa: F821


@dataclass(frozen=True)
class Preprocessed:
    pixel_values: np.ndarray  # [T, 3, S, S] float32
    grid: tuple[int, int]  # (cols, rows) of the main tiles
    tile_tags: list[str]  # prompt tags, one per tile, in order

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


# --------------------------------------------------------------------------- grid choice


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) with min ≤ cols·rows ≤ max, in the reference's order.

    The reference builds a Python set and sorts it by cols·rows with a stable sort, so among
    equal products the set's iteration order decides. We build the same set the same way
    (same insertion sequence) so that CPython iterates it identically.
    """
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, image_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """Closest aspect ratio; on an exact tie the later (larger) grid wins only if the image's
    area exceeds half of that grid's pixel area."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


# --------------------------------------------------------------------------- decoding

_PILLOW_CHECKED = False


def check_pillow() -> None:
    """Refuse Pillow ≥ 12.2: 12.2 runs the vertical resize pass first for images over 100× taller
    than wide (python-pillow/Pillow#9524), and 13 whenever the height shrinks much more than the
    width (#9549); either way some images get different tile pixels from the horizontal-first order
    NVLM was trained with (and that plugins/pillow_resample.py and the GPU kernels reproduce)."""
    global _PILLOW_CHECKED
    if _PILLOW_CHECKED:
        return
    import PIL

    version = tuple(int(x) for x in PIL.__version__.split(".")[:2])
    if version >= (12, 2):
        raise EnvironmentMismatchError(
            f"Pillow {PIL.__version__} is installed; NVLM's tiling needs Pillow < 12.2 (12.2 and 13 changed the "
            "order of the resize passes for some image shapes, and thereby the tile pixels). Install `pillow<12.2`."
        )
    _PILLOW_CHECKED = True



_DATA_URL = re.compile(rb"^data:image/[\w.+-]+;base64,")


def image_bytes(blob: bytes) -> bytes:
    """The encoded image in an `image_bytes` element: the file's bytes as they are (gRPC), or the same
    bytes as base64 text, bare or as a data URL `data:image/png;base64,…` — the only way to send an
    image through Triton's HTTP `generate` endpoints, which take BYTES inputs as UTF-8 JSON strings.
    Base64 text is told apart from a file by being valid base64 throughout (line breaks allowed): image
    files hold bytes outside the base64 alphabet."""
    m = _DATA_URL.match(blob)
    if m:
        try:
            return base64.b64decode(b"".join(blob[m.end():].split()), validate=True)
        except binascii.Error:
            raise InputError("image data URL: the text after ';base64,' is not valid base64") from None
    try:
        return base64.b64decode(b"".join(blob.split()), validate=True)
    except (binascii.Error, ValueError):
        return blob  # the file's own bytes (or neither: Pillow then says it cannot decode them)


def load_image(image: ImageInput, max_pixels: int | None = None, *, copy_rgb: bool = True):
    """Decode and convert to RGB with Pillow, with typed errors for bad input.

    `copy_rgb=False` returns an image that is already RGB as is (`convert` would only copy it).
    """
    from PIL import Image, UnidentifiedImageError

    check_pillow()
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            if isinstance(image, (bytes, bytearray)):
                if not image:
                    raise InputError("image bytes are empty")
                img = Image.open(io.BytesIO(image_bytes(bytes(image))))
            else:
                img = Image.open(Path(image))
        except FileNotFoundError:
            raise InputError(f"image file {image} not found") from None
        except UnidentifiedImageError:
            raise InputError("image bytes are not a format Pillow can decode (PNG, JPEG, WebP, …)") from None
        except Image.DecompressionBombError as e:
            raise InputError(f"image is too large: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InputError(f"image has zero size ({w}×{h})")
    if limit is not None and w * h > limit:
        raise InputError(f"image is {w}×{h} = {w * h:,} pixels, above the limit of {limit:,}; downscale it first")
    try:
        img.load()  # decode now, so truncated data fails here with a typed error
        if img.mode == "RGB" and not copy_rgb:
            return img
        return img.convert("RGB")  # alpha dropped, not composited; P / LA / CMYK / I;16 via Pillow's own conversion
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"image data is corrupt or truncated: {e}") from None


# --------------------------------------------------------------------------- tiling


def tile_images(img, cfg: PreprocessConfig) -> tuple[list, tuple[int, int]]:
    """Pillow tiles (S×S RGB) in prompt order, and the chosen grid."""
    s = cfg.image_size
    w, h = img.size
    cols, rows = choose_grid(w, h, s, cfg.min_tiles, cfg.max_tiles)
    resized = img.resize((s * cols, s * rows))  # Pillow's default filter: BICUBIC for RGB
    tiles = [resized.crop(((k % cols) * s, (k // cols) * s, (k % cols + 1) * s, (k // cols + 1) * s))
             for k in range(cols * rows)]
    if cfg.use_thumbnail and len(tiles) != 1:
        tiles.append(img.resize((s, s)))
    return tiles, (cols, rows)


def normalize_tiles(tiles_u8: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """[T, S, S, 3] uint8 → [T, 3, S, S] float32, as torchvision's ToTensor + Normalize compute it."""
    x = tiles_u8.astype(np.float32) / np.float32(255.0)  # [T, S, S, 3]
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # [T, 3, S, S]


def default_config(image_size: int = 448, max_tiles: int = 6, use_thumbnail: bool = True,
                   min_tiles: int = 1) -> PreprocessConfig:
    return PreprocessConfig(image_size=image_size, min_tiles=min_tiles, max_tiles=max_tiles,
                            use_thumbnail=use_thumbnail, dynamic_image_size=True, downsample_ratio=0.5,
                            ps_version="v2", tokens_per_tile=256, template="chatml")


def preprocess_image(image: ImageInput, *, image_size: int = 448, max_tiles: int = 6, use_thumbnail: bool = True,
                     config: PreprocessConfig | None = None, max_pixels: int | None = None) -> Preprocessed:
    """Reference NVLM preprocessing of one image. `config` (the checkpoint's typed
    PreprocessConfig) overrides the keyword defaults."""
    cfg = config or default_config(image_size, max_tiles, use_thumbnail)
    tiles, grid = tile_images(load_image(image, max_pixels), cfg)
    u8 = np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])  # [T, S, S, 3]
    return Preprocessed(normalize_tiles(u8, cfg.mean, cfg.std), grid, tile_tags(len(tiles)))



# --------------------------------------------------------------------------- fast path
# Fast CPU preprocessing with output identical to `runtime.preprocess.preprocess_image`.
#
# Same Pillow resizes (so the uint8 tiles are Pillow's by construction), with the work around
# them restructured:
# - the grid resize and the thumbnail resize run concurrently (Pillow releases the GIL while
#   resampling);
# - tiles are read as views of the resized array instead of `crop` copies, and each tile
#   channel is normalized straight into the output `[T, 3, S, S]` buffer with the reference's
#   float32 operations in the reference's order (x/255, −mean, /std), one cache-sized plane
#   at a time instead of four passes over the whole batch plus a transpose;
# - an image that is already RGB is not copied by `convert("RGB")` (the copy is the identity).
#
# Bit-identity with the reference is asserted by the tests over hundreds of random sizes.

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                   thread_name_prefix="nvlm-preprocess")
    return _POOL


def _normalize_into(src: np.ndarray, out: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    """src [S, S, 3] uint8 view → out [3, S, S] float32, exactly as normalize_tiles computes it."""
    for c in range(3):
        plane = out[c]
        np.divide(src[..., c], np.float32(255.0), out=plane, dtype=np.float32)
        np.subtract(plane, mean[c], out=plane)
        np.divide(plane, std[c], out=plane)


def preprocess_image_fast(image: ImageInput, *, image_size: int = 448, max_tiles: int = 6,
                          use_thumbnail: bool = True, config: PreprocessConfig | None = None,
                          max_pixels: int | None = None) -> Preprocessed:
    cfg = config or default_config(image_size, max_tiles, use_thumbnail)
    img = load_image(image, max_pixels, copy_rgb=False)
    s = cfg.image_size
    w, h = img.size
    cols, rows = choose_grid(w, h, s, cfg.min_tiles, cfg.max_tiles)
    pool = _pool()
    grid_job = pool.submit(img.resize, (s * cols, s * rows))
    thumb_job = pool.submit(img.resize, (s, s)) if cfg.use_thumbnail and cols * rows != 1 else None
    num_tiles = cols * rows + (thumb_job is not None)
    out = np.empty((num_tiles, 3, s, s), np.float32)  # [T, 3, S, S]
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)

    jobs = []
    if thumb_job is not None:
        thumb = np.asarray(thumb_job.result())  # [S, S, 3]
        jobs.append(pool.submit(_normalize_into, thumb, out[num_tiles - 1], mean, std))
    grid = np.asarray(grid_job.result())  # [S·rows, S·cols, 3]
    for k in range(cols * rows):
        r, c = divmod(k, cols)  # row-major tile order
        tile = grid[r * s:(r + 1) * s, c * s:(c + 1) * s]  # view, no copy
        jobs.append(pool.submit(_normalize_into, tile, out[k], mean, std))
    for j in jobs:
        j.result()
    return Preprocessed(out, (cols, rows), tile_tags(num_tiles))


# --------------------------------------------------------------------------- requests


def check_image_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise InputError(f"{count} images given; at most {max_images} per request are allowed")


def preprocess_images(images: Sequence[ImageInput], cfg: PreprocessConfig, *, max_images: int,
                      max_pixels: int | None = None, fast: bool = True) -> list[Preprocessed]:
    """Several images of one request, each tiled on its own (the fast path by default; identical output)."""
    check_image_count(len(images), max_images)
    run = preprocess_image_fast if fast else preprocess_image
    return [run(img, config=cfg, max_pixels=max_pixels) for img in images]


def preprocess_files(paths: Sequence[str | Path], cfg: PreprocessConfig, *, max_images: int):
    """Image files → (torch pixel_values [ΣT, 3, S, S], tiles per image)."""
    import torch

    done = preprocess_images(paths, cfg, max_images=max_images)
    return torch.from_numpy(np.concatenate([d.pixel_values for d in done])), [d.num_tiles for d in done]
