"""Roofline bounds for NVLM-D-72B, checked against arithmetic written out here from the released
dimensions (docs/released_layout.md)."""

import json

import pytest

from clients.roofline import roofline
from runtime.core.families import from_hf

# NVLM-D-72B, written out; the vision attention runs 25 + 7 padding heads of 128 (width A = 4096)
C, L_V, I_V, N, A = 3200, 45, 12800, 1025, (25 + 7) * 128
MLP1 = 2 * 12800 + 12800 * 29568 + 29568 * 8192
VISION_PER_TILE = L_V * (2 * N * (4 * C * A + 2 * C * I_V) + 4 * N * N * A) + 2 * 256 * MLP1
H, LAYERS, I, V, KV_DIM = 8192, 80, 29568, 152064, 1024
LINEAR = LAYERS * (2 * H * H + 2 * KV_DIM * H + 3 * I * H)
OTHER = LAYERS * (H + 2 * KV_DIM + 2 * H) + H


def prefill(prompt):
    return 2 * prompt * LINEAR + LAYERS * 4 * (prompt * prompt / 2) * H + 2 * H * V


@pytest.fixture(scope="module")
def cfg(config_72b):
    return from_hf(config_72b)


def test_vision_flops_match_design_figure(cfg):
    r = roofline(cfg, "fp8", 2, tiles=7)
    assert r.vision_tflop * 1e12 == pytest.approx(7 * VISION_PER_TILE)
    # 85.8 TFLOP for 7 tiles counting 25 heads; the 7 padding heads the release computes add 10%
    assert r.vision_tflop == pytest.approx(94.4, abs=0.1)


def test_fp8_tp2(cfg):
    r = roofline(cfg, "fp8", 2, tiles=7, text_tokens=64, output_tokens=128)
    prompt = 64 + 7 * 256
    assert r.prompt_tokens == prompt
    ttft = 7 * VISION_PER_TILE / 990e12 + prefill(prompt) / (1979e12 * 2)
    assert r.ttft_ms == pytest.approx(ttft * 1e3, rel=1e-9)
    weights = (LINEAR * 1 + 2 * (V * H + OTHER)) / 2
    kv = (prompt + 64) * 2 * LAYERS * 4 * 128 * 1  # fp8 KV, 4 KV heads per GPU
    assert r.tpot_ms == pytest.approx((weights + kv) / 3.35e12 * 1e3, rel=1e-9)
    assert r.tpot_ms == pytest.approx(10.9, abs=0.1)  # docs/upstream.md: ≈ 11 ms/token for FP8 over TP2


def test_int4_awq_tp1(cfg):
    r = roofline(cfg, "int4_awq", 1, tiles=7, text_tokens=64, output_tokens=128)
    prompt = 64 + 1792
    ttft = 7 * VISION_PER_TILE / 990e12 + prefill(prompt) / 990e12  # W4A16 computes at the bf16 rate
    assert r.ttft_ms == pytest.approx(ttft * 1e3, rel=1e-9)
    weights = LINEAR * (0.5 + 2 / 128) + 2 * (V * H + OTHER)
    kv = (prompt + 64) * 2 * LAYERS * 8 * 128 * 2  # bf16 KV, 8 KV heads
    assert r.tpot_ms == pytest.approx((weights + kv) / 3.35e12 * 1e3, rel=1e-9)


def test_roofline_cli(tmp_path, config_72b, capsys):
    from clients.bench import main

    (tmp_path / "config.json").write_text(json.dumps(config_72b))
    assert main(["roofline", str(tmp_path), "--quant", "fp8", "--tp", "2", "--tiles", "7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"] == "H100 SXM" and out["tpot_ms"] == pytest.approx(10.9, abs=0.1)


def test_the_decode_bound_at_a_batch_reads_the_weights_once_per_step(cfg):
    """nvlm-bench roofline --batch N: a decode step reads the weights once and each request's KV cache; the bound
    is N tokens per step. NVLM-D-72B, fp8, TP2 on H100 SXM (the figures issue 32's docs quote)."""
    from clients.roofline import GPUS, decode_bound

    gpu = GPUS["h100-sxm"]
    r = roofline(cfg, "fp8", 2, gpu=gpu)
    one, big = decode_bound(r, cfg, 1, gpu), decode_bound(r, cfg, 64, gpu)
    step = (r.weight_gb_per_gpu + 64 * r.kv_gb_per_gpu) * 1e9 / (gpu.hbm_tbps * 1e12)
    assert big["step_ms"] == pytest.approx(step * 1e3) and big["tokens_per_s"] == pytest.approx(64 / step)
    assert one["tokens_per_s"] == pytest.approx(1e3 / r.tpot_ms, rel=1e-6)  # batch 1: the TPOT bound
    assert big["bound"] == "memory" and 4000 < big["tokens_per_s"] < 5000


def _build_of(tmp_path, config_72b, quant, tp, batch):
    """A build directory as `nvlm-build triton-repo --entry-instances auto` reads it: the manifest's options,
    limits and source checkpoint (its config.json)."""
    from runtime.core.limits import EngineLimits

    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "config.json").write_text(json.dumps(config_72b))
    b = tmp_path / f"build-{quant}-{tp}-{batch}"
    b.mkdir()
    limits = EngineLimits(max_batch_size=batch, max_tiles_per_image=7, tokens_per_tile=256,
                          inline_tokens_per_image=7 * 256).record()
    (b / "manifest.json").write_text(json.dumps({
        "source": {"path": str(src)}, "limits": limits,
        "options": {"quant": quant, "tp": tp, "kv_cache_dtype": "fp8" if quant == "fp8" else "auto",
                    "vision_quant": None}}))
    return b


def test_auto_entry_instances_carry_twice_the_decode_bound(tmp_path, config_72b):
    """--entry-instances auto: enough entry processes that, at the measured CPU per streamed token, they carry twice
    the roofline decode bound of the build (model, format, TP, max batch size); capped by half the host's cores."""
    from math import ceil

    from clients.roofline import GPUS, decode_bound
    from triton_repo.generate import ENTRY_HEADROOM, ENTRY_US_PER_TOKEN, auto_entry_instances

    gpu = GPUS["h100-sxm"]
    counts = {}
    for quant, tp, batch in (("fp8", 2, 8), ("fp8", 2, 64), ("fp8", 2, 256), ("int4_awq", 1, 64)):
        cfg = from_hf(config_72b)
        bound = decode_bound(roofline(cfg, quant, tp, gpu=gpu, kv_fp8=quant == "fp8"), cfg, batch, gpu)["tokens_per_s"]
        want = ceil(ENTRY_HEADROOM * bound * ENTRY_US_PER_TOKEN / 1e6)
        n, why = auto_entry_instances(_build_of(tmp_path, config_72b, quant, tp, batch), cores=64)
        assert n == want and f"batch {batch}" in why and f"needs {want}" in why
        counts[quant, batch] = n
        assert n * 1e6 / ENTRY_US_PER_TOKEN >= ENTRY_HEADROOM * bound  # what the processes carry
    assert counts["fp8", 256] > counts["fp8", 8]  # a bigger batch decodes faster: more processes
    (tmp_path / "small").mkdir()
    n, why = auto_entry_instances(_build_of(tmp_path / "small", config_72b, "fp8", 2, 256), cores=2)
    assert n == 1 and "capped at 1 by 2 cores" in why
