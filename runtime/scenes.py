"""Synthetic test scenes: deterministic images for calibration, fidelity prompts and benchmark workloads."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# image sizes whose NVLM tiling (448 px, ≤ 6 tiles + thumbnail) gives exactly this many tiles (the benchmark's
# tiles:N workloads; tests/test_preprocess.py checks each against the tiling itself)
TILE_SIZES = {1: (448, 448), 3: (896, 448), 4: (1344, 448), 5: (1000, 1000), 6: (2240, 448), 7: (1344, 896)}
# the calibration and fidelity scenes: (width, height) cycling through tile counts 1, 3, 4, 5, 6, 7 under the
# same rules, in varied aspect ratios
SCENE_SIZES = [(448, 448), (896, 448), (640, 1280), (1000, 1000), (1400, 700), (870, 696), (2000, 340)]


def synthetic_scene(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic scene: a noisy colour gradient, 3–8 filled ellipses and rectangles, a caption."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (x / max(width - 1, 1))[..., None]
    bg = (c0 * (1 - t) + c1 * t + rng.normal(0, 6, (height, width, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 10 + 1, width // 3 + 2)), int(rng.integers(height // 10 + 1, height // 3 + 2))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x0 + w, y0 + h), fill=color)
    d.text((width // 10, height // 2), "NVLM calibration", fill=(0, 0, 0))
    return img
