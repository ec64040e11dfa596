"""Regenerate assets/demo_scene.png, the bundled image of the demo (shapes and a word on a gradient)."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

W, H = 1280, 720


def main(out=Path(__file__).resolve().parent.parent / "assets" / "demo_scene.png"):
    y, x = np.mgrid[0:H, 0:W]
    bg = np.stack([200 + 40 * x / W, 210 + 30 * y / H, np.full_like(x, 235.0)], axis=-1).astype(np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    d.rectangle((120, 180, 420, 480), fill=(210, 40, 40))
    d.ellipse((520, 160, 840, 480), fill=(40, 80, 200))
    d.polygon([(1000, 170), (1180, 500), (880, 500)], fill=(40, 160, 70))
    d.text((560, 580), "NVLM", fill=(20, 20, 20))
    img.save(out, optimize=True)
    return out


if __name__ == "__main__":
    print(main())
