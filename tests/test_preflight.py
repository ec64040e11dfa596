"""The preflight: a host too small for a build is refused at once (exit 2, one line, the remedies, nothing
written); the estimates grow with the model as the stages do; `--no-preflight` overrides."""

import json

import pytest

import builder.preflight as preflight
from builder.cli import main
from runtime.core.build_host import build_host_report, engine_needs, llm_need
from runtime.core.families import from_hf
from runtime.core.llm_formats import FORMATS

GB = 10**9


@pytest.fixture
def small_host(monkeypatch):
    """A simulated host with 1 GB of RAM available (below the interpreter's own share of any build)."""
    monkeypatch.setattr(preflight, "available_ram", lambda: 1 * GB)


def test_a_72b_engine_build_on_a_small_host_is_refused_before_any_work(tmp_path, capsys, small_host):
    """The release's config and its index (no weights needed): the refusal comes from the plan alone."""
    from tests.test_released_layout import _sparse_release

    ckpt = tmp_path / "nvlm-d-72b"
    ckpt.mkdir()
    _sparse_release(ckpt)
    out = tmp_path / "build"
    assert main(["engine", str(ckpt), "-o", str(out), "--quant", "fp8", "--kv-cache-dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "would not finish on this host" in err, err
    # on a 1 GB host the whole model does not fit: the decoder is planned a layer at a time (its estimate, ≈ 15 GB
    # with 32 calibration prompts, is the peak), and the remedies no longer offer what it already does
    assert "RAM at its peak (llm: one decoder layer at a time" in err and "--no-preflight" in err, err
    assert "a host with at least" in err and "--layerwise on runs" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nvlm-d-72b"]  # no build, no .partial


def test_small_host_refuses_the_demo_and_no_preflight_overrides(demo_ckpt, tmp_path, small_host, capsys):
    out = tmp_path / "llm"
    assert main(["llm", str(demo_ckpt), "-o", str(out), "--quant", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "nvlm-build llm would not finish on this host" in err and "--no-fidelity" in err
    assert not out.exists()
    assert main(["llm", str(demo_ckpt), "-o", str(out), "--quant", "bf16", "--no-fidelity", "--no-preflight"]) == 0
    assert (out / "config.json").is_file()


def test_disk_is_checked_too(demo_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preflight, "free_disk", lambda path: 1000)
    assert main(["vision", str(demo_ckpt), "-o", str(tmp_path / "v")]) == 2
    assert "free under" in capsys.readouterr().err


def test_estimates_follow_the_stages(config_72b):
    cfg = from_hf(config_72b)
    emb = 152064 * 8192 * 2  # the largest tensor: embed_tokens / lm_head in bf16
    streamed = llm_need(cfg, FORMATS["bf16"], fidelity=False, largest_tensor=emb)
    checked = llm_need(cfg, FORMATS["bf16"], fidelity=True, largest_tensor=emb)
    quantized = llm_need(cfg, FORMATS["fp8"], fidelity=True, largest_tensor=emb)
    assert streamed.ram < 8 * GB < 300 * GB < checked.ram < quantized.ram  # a tensor at a time vs float32 copies
    needs = engine_needs(cfg, FORMATS["int4_awq"], largest_tensor=emb)
    assert needs.peak_stage.stage == "llm" and needs.gpu == 0
    assert 40 * GB < needs.disk < 70 * GB  # int4 decoder (~41 GB) + fp16 vision ONNX (~13 GB)
    rows = {r["format"]: r for r in build_host_report(cfg)["rows"]}
    assert rows["bf16"]["llm_streamed_peak_ram_bytes"] == streamed.ram
    assert rows["fp8"]["engine_peak_ram_bytes"] == engine_needs(cfg, FORMATS["fp8"], largest_tensor=emb).peak_ram


def test_inspect_prints_build_host_rows(released_ckpt, capsys):
    assert main(["inspect", str(released_ckpt), "--json"]) == 0
    host = json.loads(capsys.readouterr().out)["build_host"]
    assert [r["format"] for r in host["rows"]] == ["bf16", "fp8", "int4_awq"]
    assert host["largest_tensor_bytes"] == 1025 * 48 * 2  # the writer's largest: the vision position embedding
    assert main(["inspect", str(released_ckpt)]) == 0
    assert "build host for `nvlm-build engine`" in capsys.readouterr().out
