"""NVLM tiling: the reference, hand-computed grids, and the fast CPU path's bit-identity over ≥ 500 sizes."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from plugins.pillow_resample import resample_reference
from runtime.core.errors import EnvironmentMismatchError, InputError
from runtime.preprocess import (
    candidate_grids,
    check_pillow,
    choose_grid,
    default_config,
    load_image,
    preprocess_image,
    preprocess_image_fast,
    preprocess_images,
    tile_images,
)

S = 448


def random_sizes(rng, n):
    """Log-uniform areas from 1 to 4000², log-uniform aspect ratios from 1:20 to 20:1."""
    sizes = []
    while len(sizes) < n:
        aspect = math.exp(rng.uniform(math.log(1 / 20), math.log(20)))
        area = math.exp(rng.uniform(0, math.log(4000 * 4000)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 1 <= w <= 4000 and 1 <= h <= 4000:
            sizes.append((w, h))
    return sizes


# Worked out by hand from the rules (docs/upstream.md), S = 448, max 6 tiles:
# - squares tie (1,1)/(2,2) at diff 0; (2,2) wins iff area > 0.5·448²·4 = 401,408 → 633² stays, 634² moves;
# - aspect 1.25 ties (1,1), (2,2) and (3,2) at diff 0.25; (3,2) needs area > 602,112 (k=4·5 sizes);
# - aspect 0.8 is NOT symmetric: (2,3) at 0.667 is strictly closer (0.133) than the 0.2 ties;
# - extreme ratios clamp to (6,1) / (1,6).
HAND_CASES = [
    ((448, 448), (1, 1)), ((633, 633), (1, 1)), ((634, 634), (2, 2)), ((4000, 4000), (2, 2)),
    ((896, 448), (2, 1)), ((1344, 896), (3, 2)),
    ((705, 564), (1, 1)), ((710, 568), (2, 2)), ((865, 692), (2, 2)), ((870, 696), (3, 2)),
    ((564, 705), (2, 3)), ((696, 870), (2, 3)),
    ((1, 1), (1, 1)), ((20, 1), (6, 1)), ((1, 20), (1, 6)), ((4000, 200), (6, 1)),
]
TIE_SIZES = [size for size, _ in HAND_CASES]


@pytest.mark.parametrize("size, grid", HAND_CASES)
def test_grid_choice_hand_computed(size, grid):
    assert choose_grid(*size, S, 1, 6) == grid


def test_candidate_order_is_the_reference_set_order():
    grids = candidate_grids(1, 6)
    assert len(grids) == len(set(grids)) == 14
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)
    assert grids[0] == (1, 1) and set(grids[-4:]) == {(1, 6), (2, 3), (3, 2), (6, 1)}


def test_tile_count_and_tags():
    r = preprocess_image(Image.new("RGB", (1000, 1000)))
    assert r.grid == (2, 2) and r.pixel_values.shape == (5, 3, S, S) and r.pixel_values.dtype == np.float32
    assert r.tile_tags == ["<tile_1>", "<tile_2>", "<tile_3>", "<tile_4>", "<tile_global_thumbnail>"]
    one = preprocess_image(Image.new("RGB", (448, 448)))
    assert one.num_tiles == 1 and one.tile_tags == ["<tile_global_thumbnail>"]  # no thumbnail for one tile


def test_reference_tiles_are_pillow_resize_and_row_major_crop():
    rng = np.random.default_rng()
    a = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    tiles, grid = tile_images(img, default_config())
    assert grid == (3, 2)
    big = np.asarray(img.resize((3 * S, 2 * S), Image.BICUBIC))
    for k in range(6):
        r, c = divmod(k, 3)
        assert np.array_equal(np.asarray(tiles[k]), big[r * S:(r + 1) * S, c * S:(c + 1) * S])
    assert np.array_equal(np.asarray(tiles[6]), np.asarray(img.resize((S, S), Image.BICUBIC)))


def test_normalization_matches_imagenet_formula():
    rng = np.random.default_rng()
    a = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    pv = preprocess_image(Image.fromarray(a)).pixel_values[0]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((a / 255.0 - mean) / std).transpose(2, 0, 1)
    assert np.abs(pv - expected).max() < 1e-6


def test_pillow_resample_arithmetic_matches_pillow():
    """plugins/pillow_resample.py (the tables the GPU kernels use) equals PIL.Image.resize bit for bit."""
    rng = np.random.default_rng()
    for _ in range(120):
        h, w = map(int, rng.integers(1, 400, 2))
        out_w, out_h = map(int, rng.integers(1, 1400, 2))
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(a).resize((out_w, out_h), Image.BICUBIC))
        assert np.array_equal(resample_reference(a, out_w, out_h), expected), ((w, h), (out_w, out_h))


def test_fast_path_is_bit_identical_over_500_sizes():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    sizes = TIE_SIZES + random_sizes(rng, 500)
    grids = set()
    for w, h in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref, fast = preprocess_image(img), preprocess_image_fast(img)
        assert ref.grid == fast.grid and ref.tile_tags == fast.tile_tags, (seed, w, h)
        assert np.array_equal(ref.pixel_values, fast.pixel_values), (seed, w, h)
        grids.add(ref.grid)
    assert len(grids) >= 10  # the sweep exercised most of the 14 grids


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "L", "I;16", "1"])
def test_unusual_modes_convert_like_the_reference(mode):
    rng = np.random.default_rng()
    base = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(
        rng.integers(0, 65536, (120, 200), dtype=np.uint16))
    assert img.mode == mode
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
    data = buf.getvalue()
    ref = preprocess_image(data)
    expected = preprocess_image(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(ref.pixel_values, expected.pixel_values)
    assert np.array_equal(preprocess_image_fast(data).pixel_values, ref.pixel_values)


def test_alpha_is_dropped_not_composited():
    rgba = Image.new("RGBA", (448, 448), (200, 10, 10, 0))  # fully transparent red
    pv = preprocess_image(rgba).pixel_values
    red = (200 / 255 - 0.485) / 0.229
    assert abs(pv[0, 0, 0, 0] - red) < 1e-6


def test_exif_orientation_is_not_applied():
    img = Image.new("RGB", (600, 300), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW" — the reference ignores it
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert preprocess_image(buf.getvalue()).grid == (2, 1)  # landscape, as stored


def _png(size=(64, 48)):
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"not an image at all", "not a format Pillow can decode"),
    (_png()[:60], "corrupt or truncated"),
])
def test_bad_bytes_are_input_errors(data, message):
    for fn in (preprocess_image, preprocess_image_fast):
        with pytest.raises(InputError, match=message):
            fn(data)


def test_zero_sized_image():
    with pytest.raises(InputError, match="zero size"):
        preprocess_image(Image.new("RGB", (0, 10)))


def test_pixel_limit_is_configurable():
    with pytest.raises(InputError, match="above the limit of 1,000"):
        preprocess_image(_png((50, 40)), max_pixels=1000)
    assert preprocess_image(_png((50, 40)), max_pixels=2000).num_tiles == 1


def test_too_many_images():
    with pytest.raises(InputError, match="3 images given; at most 2"):
        preprocess_images([_png()] * 3, default_config(), max_images=2)


def test_missing_file():
    with pytest.raises(InputError, match="not found"):
        load_image("/nonexistent/cat.png")


@pytest.mark.parametrize("version", ["12.2.0", "12.3.0", "13.0.0"])
def test_pillow_with_reordered_resize_passes_is_refused(monkeypatch, version):
    import PIL

    import runtime.preprocess as pre

    monkeypatch.setattr(pre, "_PILLOW_CHECKED", False)
    monkeypatch.setattr(PIL, "__version__", version)
    with pytest.raises(EnvironmentMismatchError, match="pillow<12.2"):
        check_pillow()


def test_very_tall_image_is_resized_horizontal_first():
    """Pillow 12.2+ would take the vertical pass first here (height > 100 × width, shrinking);
    the installed Pillow and our arithmetic must both do NVLM's horizontal-first order."""
    rng = np.random.default_rng()
    a = rng.integers(0, 256, (347, 2, 3), dtype=np.uint8)
    assert np.array_equal(resample_reference(a, 1012, 73), np.asarray(Image.fromarray(a).resize((1012, 73))))


def test_config_parameters_come_from_the_checkpoint(released_ckpt):
    from runtime.core.families import load_config

    cfg = load_config(released_ckpt).preprocess
    assert cfg.max_tiles == 4
    r = preprocess_image(Image.new("RGB", (4000, 500)), config=cfg)
    assert r.grid == (4, 1) and r.num_tiles == 5


def test_image_bytes_take_base64_and_data_urls():
    """`image_bytes` over HTTP can only be text: base64 (bare, with line breaks, or a data URL) decodes to
    the same image; files in every format Pillow writes pass through unchanged."""
    import base64
    import io

    from PIL import Image

    from runtime.preprocess import image_bytes
    from tests.conftest import ROOT

    png = (ROOT / "assets" / "demo_scene.png").read_bytes()
    b64 = base64.b64encode(png)
    for text in (b64, base64.encodebytes(png), b"data:image/png;base64," + b64):
        assert image_bytes(text) == png
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(buf, format=fmt)
        assert image_bytes(buf.getvalue()) == buf.getvalue(), fmt
    with pytest.raises(InputError, match="not valid base64"):
        image_bytes(b"data:image/png;base64,@@@")


def test_the_tile_size_table_gives_its_tile_counts():
    """runtime/scenes.TILE_SIZES (the benchmark's tiles:N workloads): each size tiles to exactly N tiles."""
    from runtime.preprocess import choose_grid
    from runtime.scenes import TILE_SIZES

    for n, (w, h) in TILE_SIZES.items():
        cols, rows = choose_grid(w, h, 448, 1, 6)
        assert cols * rows + (cols * rows > 1) == n, (n, w, h)
