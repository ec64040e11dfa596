"""`nvlm-build inspect`: the 72B figures are hand-computed here, independently of the weight map."""

import json

import pytest

from builder.cli import main
from runtime.core.inspect import GIB, SCHEMA, inspect

# NVLM-D-72B, from the published dimensions (docs/released_layout.md), written out by hand. The attention runs
# 25 + 7 padding heads of 128: qkv [3·4096, 3200], q/k norms [4096], proj [3200, 4096].
C, VL, VM, P, A = 3200, 45, 12800, 14, (25 + 7) * 128
VISION_LAYER = (3 * A * C) + 2 * A + (C * A + C) + (VM * C + VM) + (C * VM + C) + 2 * C + 2 * C
VISION = VL * VISION_LAYER + C + (C * 3 * P * P + C) + 1025 * C
MLP1 = 2 * 12800 + 12800 * 29568 + 29568 * 8192
H, LL, I, V, KV = 8192, 80, 29568, 152064, 1024
LLM_LINEAR = LL * (H * H + KV * H + KV * H + H * H + 3 * I * H)
LLM_OTHER = LL * (H + KV + KV + 2 * H) + H  # q/k/v biases, two norms per layer, final norm
LLM_EMB = V * H
LLM = LLM_LINEAR + LLM_OTHER + 2 * LLM_EMB


@pytest.fixture(scope="module")
def report_72b(tmp_path_factory, config_72b):
    d = tmp_path_factory.mktemp("cfg72b")
    (d / "config.json").write_text(json.dumps(config_72b))
    return inspect(d)


def test_72b_parameter_count(report_72b):
    comps = {c["name"]: c["parameters"] for c in report_72b["components"]}
    assert comps == {"vision": VISION, "projector": MLP1, "llm": LLM}
    assert VISION == 6_052_672_640 and MLP1 == 620_717_056 and LLM == 72_706_203_648
    assert report_72b["total_parameters"] == 79_379_593_344  # 79.4 B, as the model card says
    assert report_72b["weights"] is None  # config-only


def test_72b_memory_plan_hand_computed(report_72b):
    mp = report_72b["memory_plan"]
    assert mp["kv_bytes_per_token"] == {"bf16": 2 * 80 * 8 * 128 * 2, "fp8": 2 * 80 * 8 * 128}  # 320 KiB / 160 KiB
    plans = {(p["weights"], p["tp"]): p for p in mp["plans"]}
    vision_bytes = 2 * (VISION + MLP1)
    sixteen_bit = 2 * (2 * LLM_EMB + LLM_OTHER)

    fp8_tp2 = plans[("fp8", 2)]
    assert fp8_tp2["llm_weight_bytes"] == LLM_LINEAR + sixteen_bit
    assert fp8_tp2["weight_bytes_per_gpu"] == (LLM_LINEAR + sixteen_bit) // 2 + vision_bytes
    assert fp8_tp2["kv_cache_bytes_per_gpu"] == 32768 * 2 * 80 * 4 * 128 * 1
    assert fp8_tp2["total_bytes_per_gpu"] == fp8_tp2["weight_bytes_per_gpu"] + fp8_tp2["kv_cache_bytes_per_gpu"] + 6 * GIB
    assert fp8_tp2["fits"]

    int4_tp1 = plans[("int4_awq", 1)]
    assert int4_tp1["llm_weight_bytes"] == int(LLM_LINEAR * (0.5 + 2 / 128)) + sixteen_bit
    assert int4_tp1["fits"]
    assert not plans[("bf16", 1)]["fits"] and not plans[("fp8", 1)]["fits"] and plans[("bf16", 4)]["fits"]


def test_72b_consistent_with_design_figures(report_72b):
    """The commonly quoted ~145 GB bf16, ~73 GB fp8, ~37 GB int4 for the LLM weights. Ours keep embeddings and
    lm_head in 16 bit (2.5 B params = 5 GB), hence the larger quantized figures."""
    plans = {(p["weights"], p["tp"]): p for p in report_72b["memory_plan"]["plans"]}
    assert plans[("bf16", 1)]["llm_weight_bytes"] == pytest.approx(145e9, rel=0.01)
    assert plans[("fp8", 1)]["llm_weight_bytes"] == pytest.approx(73e9 + 2 * LLM_EMB, rel=0.01)
    assert plans[("int4_awq", 1)]["llm_weight_bytes"] == pytest.approx(37e9 + 1.5 * 2 * LLM_EMB, rel=0.02)


def test_inspect_json_schema_is_stable(demo_ckpt, capsys):
    assert main(["inspect", str(demo_ckpt), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["schema"] == SCHEMA
    assert set(r) == {"schema", "checkpoint", "architecture", "family", "vision_architecture", "llm_architecture",
                      "dimensions", "components", "llm_parameters", "total_parameters", "weights", "memory_plan",
                      "build_host"}
    assert set(r["memory_plan"]) == {"gpu", "gpu_memory_bytes", "kv_budget_tokens", "kv_bytes_per_token",
                                     "cross_kv_bytes_per_key", "conventions", "plans"}
    assert set(r["memory_plan"]["plans"][0]) == {
        "weights", "kv_cache_dtype", "tp", "llm_weight_bytes", "llm_weight_bytes_per_gpu", "vision_weight_bytes",
        "weight_bytes_per_gpu", "kv_cache_bytes_per_gpu", "reserve_bytes", "total_bytes_per_gpu", "fits",
        "max_kv_tokens"}
    w = r["weights"]
    assert len(w["shards"]) >= 2 and set(w["components"]) == {"vision", "projector", "llm"}
    assert w["components"]["llm"]["dtypes"] == {"bfloat16": r["components"][2]["parameters"]}
    assert sum(c["bytes"] for c in w["components"].values()) == w["total_bytes"]


def test_inspect_text_output(demo_ckpt, capsys):
    assert main(["inspect", str(demo_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "NVLM_D" in out and "memory plan" in out and "int4_awq" in out


def test_cli_errors_are_clean(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "config.json not found" in capsys.readouterr().err


@pytest.mark.parametrize("where, key, value", [
    ("llm_config", "num_attention_heads", 0), ("llm_config", "num_key_value_heads", 0),
    ("vision_config", "num_attention_heads", 0), ("vision_config", "patch_size", 0),
    ("llm_config", "hidden_size", -8192), ("llm_config", "num_hidden_layers", 0),
])
def test_zero_or_negative_sizes_are_one_line_errors(tmp_path, capsys, config_72b, where, key, value):
    """Config-only inspect and a build run the same typed checks: a zero head count or patch size
    (ZeroDivisionError before) or a negative size (a negative parameter count and "fits: yes" before)
    is one line naming the key, exit 2."""
    raw = json.loads(json.dumps(config_72b))
    raw[where][key] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for cmd in (["inspect", str(tmp_path)], ["engine", str(tmp_path), "-o", str(tmp_path / "out")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{where}.{key} = {value} must be a positive integer" in err, err


def test_pickle_only_weights_are_named_not_absent(tmp_path, capsys, config_72b):
    (tmp_path / "config.json").write_text(json.dumps(config_72b))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "pickle" in err.lower() and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["demo-checkpoint", "engine", "llm", "vision"])
@pytest.mark.parametrize("out", ["under_a_file", "proc"])
def test_unwritable_outputs_are_one_line_errors(tmp_path, capsys, demo_ckpt, command, out):
    """An output path that cannot be written (under a regular file; in /proc) is one line naming it,
    exit 2, for every command that writes (NotADirectoryError / FileNotFoundError tracebacks before).
    Read-only mounts fail the same way (OSError); they cannot be made here, where tests run as root."""
    from pathlib import Path

    if out == "under_a_file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "out"
    else:
        target = Path("/proc/nvlm-out")
    args = {"demo-checkpoint": [command, str(target)],
            "engine": [command, str(demo_ckpt), "-o", str(target), "--target", "reference"],
            "llm": [command, str(demo_ckpt), "-o", str(target)],
            "vision": [command, str(demo_ckpt), "-o", str(target)]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and str(target.parent) in err, err
