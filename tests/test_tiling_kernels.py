"""Triton tiling kernels under TRITON_INTERPRET=1 against the CPU reference, plus sm_90 AOT compilation.

Kernels are S-agnostic, so most sizes run with small tiles (S = 28 / 56); the interpreter's cost
grows with the input's pixel count (12 multiply-adds per input pixel when downscaling), so random
sizes here stay within 1200 px a side — the CPU fast path covers 1…4000. The real 448-pixel
geometry is covered by the tie and area-rule sizes and one 12-megapixel photo size.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from plugins.tiling import normalization_table, normalize_tiles, tile_image
from runtime.preprocess import default_config, preprocess_image, tile_images
from tests.conftest import ROOT
from tests.test_preprocess import random_sizes

assert os.environ.get("TRITON_INTERPRET") == "1"


def _check(a: np.ndarray, cfg, seed):
    img = Image.fromarray(a)
    ref = preprocess_image(img, config=cfg)
    out, grid = tile_image(torch.from_numpy(a), cfg, "fp32")
    ctx = (seed, a.shape, cfg.image_size)
    assert grid == ref.grid, ctx
    assert np.abs(out.numpy() - ref.pixel_values).max() <= 1e-6, ctx  # in fact bit-identical:
    assert np.array_equal(out.numpy(), ref.pixel_values), ctx
    u8, _ = tile_image(torch.from_numpy(a), cfg, "uint8")
    tiles, _ = tile_images(img, cfg)
    assert np.array_equal(u8.numpy(), np.stack([np.asarray(t) for t in tiles])), ctx  # Pillow's own pixels
    return ref


@pytest.mark.parametrize("image_size", [28, 56])
def test_kernels_match_reference_on_random_sizes(image_size):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    cfg = replace(default_config(), image_size=image_size)
    sizes = [(w, h) for w, h in random_sizes(rng, 200) if max(w, h) <= 1200][:12]
    for w, h in sizes + [(1, 1), (20, 1), (1, 20)]:
        _check(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), cfg, seed)


@pytest.mark.parametrize("size", [(634, 634), (870, 696), (564, 705), (300, 500), (4000, 3000)])
def test_kernels_match_reference_at_448(size):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    w, h = size
    _check(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), default_config(), seed)


def test_half_precision_outputs():
    rng = np.random.default_rng()
    cfg = replace(default_config(), image_size=56)
    a = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    ref = torch.from_numpy(preprocess_image(Image.fromarray(a), config=cfg).pixel_values)
    fp16, _ = tile_image(torch.from_numpy(a), cfg, "fp16")
    assert torch.equal(fp16, ref.to(torch.float16))  # round-to-nearest-even, as on the GPU
    bf16, _ = tile_image(torch.from_numpy(a), cfg, "bf16")
    # The interpreter converts fp32 → bf16 by truncation (its bf16 support is incomplete); the GPU
    # rounds to nearest even (scripts/gpu_check.py asserts that). Either way within one bf16 ulp.
    truncated = (ref.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(bf16, ref.to(torch.bfloat16)) or torch.equal(bf16, truncated)


def test_normalize_kernel_matches_reference():
    rng = np.random.default_rng()
    cfg = default_config()
    tiles = rng.integers(0, 256, (3, 448, 448, 3), dtype=np.uint8)
    out = normalize_tiles(torch.from_numpy(tiles), cfg, "fp32")
    from runtime.preprocess import normalize_tiles as reference

    assert torch.equal(out, torch.from_numpy(reference(tiles)))


def test_normalization_table_is_the_reference_arithmetic():
    from runtime.preprocess import normalize_tiles as reference

    every_byte = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)
    ref = reference(every_byte)  # [1, 3, 16, 16]
    table = normalization_table()
    for c in range(3):
        assert np.array_equal(ref[0, c].reshape(-1), table[c])


def test_bad_tensor_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        tile_image(torch.zeros(10, 10, 3), default_config())


def test_aot_compiles_for_sm90_in_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "plugins.aot", "--arch", "90", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert set(summary) >= {"hpass", "vpass_tiles_fp16", "vpass_tiles_u8", "normalize_tiles_fp16",
                            "gated_xattn_prefill_bf16", "gated_xattn_decode_fp16"}
    for key, k in summary.items():
        assert k["target"].startswith("sm_90"), key
        assert k["shared"] <= 227 * 1024, key  # H100 limit per block
        ptx = (tmp_path / f"{key}.ptx").read_text()
        assert f".entry {k['name']}(" in ptx or f".entry {k['name']}" in ptx


def test_gpu_check_script_self_test(tmp_path):
    """scripts/gpu_check.py's correctness path runs on CPU (interpreter), so it cannot rot unseen."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--self-test", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(result["images"][0]["checks"].values())
    assert "| 90x60 | 7 | all pass |" in (tmp_path / "gpu_check.md").read_text()
    rt = result["runtime"]  # the reference-runtime part: bf16 vs fp32 parity and the timing code, on the CPU
    assert rt["checks"] == {"bf16_logits_within_0.05": True} and 0 < rt["bf16_max_rel_logit_err"] <= 0.05
    assert {"prefill_cpu_fp32_ms", "prefill_cpu_bf16_ms", "decode_per_token_cpu_bf16_ms",
            "vision_2_tiles_cpu_bf16_ms"} <= set(rt["timing"])
    assert "## Reference runtime" in (tmp_path / "gpu_check.md").read_text()
    assert result["xattn"]["checks"] and all(result["xattn"]["checks"].values())  # the cross-attention kernel
    assert "## Gated cross-attention kernel" in (tmp_path / "gpu_check.md").read_text()


def test_trt_plugin_module_imports_without_tensorrt():
    import importlib.util

    from plugins import trt_plugin

    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(trt_plugin.TensorRTUnavailableError, match="tensorrt.plugin"):
            trt_plugin.register()
        with pytest.raises(trt_plugin.TensorRTUnavailableError, match="nvlm::gated_xattn"):
            trt_plugin.register_gated_xattn()
    assert trt_plugin.PLUGIN_ID == "nvlm::normalize_tiles"


def test_preprocessing_model_gpu_branch_equals_cpu_branch(monkeypatch):
    """The Triton preprocessing model's GPU path (Triton kernels) gives the CPU path's pixels; run here
    under the interpreter with `.cuda()` as a no-op."""
    import io

    from PIL import Image

    from triton_repo.models.preprocessing import Preparer
    from triton_repo.serving import PreprocessingModel

    model = PreprocessingModel.__new__(PreprocessingModel)
    model.prep = Preparer.__new__(Preparer)
    model.prep.cfg, model.prep.max_images = default_config(), 2
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng().integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(buf, format="PNG")
    model.gpu = False
    cpu = model._tile([buf.getvalue()])
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    model.gpu = True
    gpu = model._tile([buf.getvalue()])
    assert gpu[0].grid == cpu[0].grid and gpu[0].tile_tags == cpu[0].tile_tags
    assert np.array_equal(gpu[0].pixel_values, cpu[0].pixel_values)
