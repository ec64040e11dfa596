"""`nvlm-build vision` and `nvlm-build engine`: exports, manifest, safety under SIGKILL, resume, and
the GPU-host settings for NVLM-D-72B."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.engine_build import STATUS_PORTABLE, BuildError, DeploymentOptions, build_deployment
from runtime.core.build_dir import read_limits
from runtime.core.checkpoint import Checkpoint
from runtime.core.errors import OutputExistsError
from runtime.core.families import from_hf
from runtime.core.gpu_host import trtllm_build_args, vision_engine_settings
from runtime.core.limits import EngineLimits
from runtime.core.llm_formats import LLMBuildOptions, get_format, get_vision_format
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def reference(demo_ckpt):
    from runtime.reference import reference_model

    return reference_model(demo_ckpt)


# --------------------------------------------------------------------------- vision export


@pytest.mark.parametrize("dtype, threshold", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_vision_onnx_matches_reference_with_dynamic_tiles(reference, tmp_path, dtype, threshold):
    import onnx
    import onnxruntime as ort

    from builder.vision_export import export_vision

    info = export_vision(reference, tmp_path, dtype=dtype)
    assert info["checks"]["onnx_vs_reference"]["value"] <= threshold
    model = onnx.load(str(tmp_path / "vision_encoder.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sess = ort.InferenceSession(str(tmp_path / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    hidden = reference.cfg.llm.hidden_size
    for tiles in (1, 5):  # fresh random tiles, batch sizes other than the traced one
        x = torch.randn(tiles, 3, 448, 448)
        y = sess.run(None, {"pixel_values": x.to(getattr(torch, {"fp32": "float32", "fp16": "float16"}[dtype])).numpy()})[0]
        assert y.shape == (tiles, 256, hidden)
        ref = reference.encode_images(x).numpy()
        assert np.abs(y.astype(np.float32) - ref).max() / np.abs(ref).max() <= threshold
    assert info["output"]["shape"] == [-1, 256, hidden]


def test_vision_external_data(reference, tmp_path, monkeypatch):
    import onnxruntime as ort

    import builder.vision_export as ve

    monkeypatch.setattr(ve, "EXTERNAL_DATA_BYTES", 0)
    info = ve.export_vision(reference, tmp_path, dtype="fp32")
    assert info["files"] == ["vision_encoder.onnx", "vision_encoder.onnx.data"]
    assert (tmp_path / "vision_encoder.onnx").stat().st_size < 100_000  # weights live in the .data file
    sess = ort.InferenceSession(str(tmp_path / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"pixel_values": np.zeros((2, 3, 448, 448), np.float32)})[0].shape[0] == 2


def test_vision_fp8_is_reported(reference, tmp_path):
    import onnx

    from builder.vision_export import export_vision

    info = export_vision(reference, tmp_path, dtype="fp32", vision_quant="fp8")
    rel = info["checks"]["fp8_vs_fp32_reference"]["value"]
    assert 0 < rel < 0.5  # measured and reported; FP8 is lossy but not broken
    ops = {n.op_type for n in onnx.load(str(tmp_path / "vision_encoder.fp8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_vision_cli(demo_ckpt, tmp_path, capsys):
    from builder.cli import main

    assert main(["vision", str(demo_ckpt), "-o", str(tmp_path / "v"), "--dtype", "fp32"]) == 0
    assert "onnx_vs_reference" in capsys.readouterr().out
    assert main(["vision", str(demo_ckpt), "-o", str(tmp_path / "v"), "--dtype", "fp32"]) == 2  # exists


# --------------------------------------------------------------------------- engine build


def _opts(quant, **kw):
    return DeploymentOptions(LLMBuildOptions(get_format(quant)), calib_size=4, **kw)


@pytest.mark.parametrize("ckpt_name", ["demo_ckpt", "released_ckpt"])
@pytest.mark.parametrize("quant", ["fp8", "int4_awq"])
def test_engine_build_on_cpu(request, tmp_path, ckpt_name, quant):
    ckpt = request.getfixturevalue(ckpt_name)
    out = tmp_path / "build"
    m = build_deployment(ckpt, out, _opts(quant, target="auto"))
    assert m["status"] == STATUS_PORTABLE == "portable artifacts complete; engines pending (no TensorRT)"
    disk = json.loads((out / "manifest.json").read_text())
    assert disk == m and disk["schema"] == "nvlm-trt/build/v1"
    assert set(disk["source"]["files"]) >= {"config.json", "model.safetensors.index.json", "tokenizer.json"}
    assert disk["options"]["quant"] == quant and disk["tools"]["nvlm-trt"]
    rec = disk["limits"]  # resolved against the checkpoint: its max tiles + thumbnail, its tokens per tile
    pre = Checkpoint.open(ckpt).config.preprocess
    tiles = pre.max_tiles_per_image
    assert rec["tokens_per_tile"] == pre.tokens_per_tile == 256 and rec["max_tiles_per_image"] == tiles
    assert rec["max_multimodal_len"] == rec["max_batch_size"] * rec["max_images_per_request"] * tiles * 256
    assert read_limits(out).max_input_len == rec["max_input_len"] == rec["max_input_text_len"] + tiles * 256
    for name, rec in disk["stages"].items():
        assert rec["status"] in ("done", "pending") and rec["checksums"] and rec["seconds"] >= 0, name
    for p in ("tokenizer/tokenizer.json", "preprocess.json", "vision/vision_encoder.onnx", "llm/config.json",
              "llm/rank0.safetensors", "engines/build_engines.sh", "reports/fidelity.json"):
        assert (out / p).is_file(), p
    report = json.loads((out / "reports/fidelity.json").read_text())
    assert report["passed"] and {c["component"] for c in report["checks"]} == {"llm", "vision"}
    assert "trtllm-build --checkpoint_dir llm" in (out / "engines/build_engines.sh").read_text()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_target_trt_without_tensorrt_says_what_to_use(demo_ckpt, tmp_path):
    with pytest.raises(BuildError, match="TensorRT-LLM 1.2"):
        build_deployment(demo_ckpt, tmp_path / "b", _opts("bf16", target="trt"))


def test_existing_output_and_leftover_partial(demo_ckpt, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        build_deployment(demo_ckpt, out, _opts("bf16"))
    out.rmdir()
    (tmp_path / ".b.partial").mkdir()
    with pytest.raises(BuildError, match="--resume"):
        build_deployment(demo_ckpt, out, _opts("bf16"))


def _kill_during_llm_stage(ckpt: Path, out: Path) -> None:
    cmd = [str(ROOT / ".venv/bin/nvlm-build"), "engine", str(ckpt), "-o", str(out), "--quant", "fp8",
           "--calib-size", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out.with_name(f".{out.name}.partial") / "manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if manifest.exists():
            stages = json.loads(manifest.read_text())["stages"]
            if "vision" in stages:  # vision done, llm under way
                time.sleep(1.0)
                break
        if proc.poll() is not None:
            raise AssertionError("the build finished before it could be killed")
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_then_resume_equals_uninterrupted(demo_ckpt, tmp_path):
    out = tmp_path / "killed"
    _kill_during_llm_stage(demo_ckpt, out)
    partial = tmp_path / ".killed.partial"
    assert not out.exists()  # nothing claims to be complete
    left = json.loads((partial / "manifest.json").read_text())
    assert left["status"] == "incomplete" and "llm" not in left["stages"] and "vision" in left["stages"]

    resumed = build_deployment(demo_ckpt, out, _opts("fp8"), resume=True)
    fresh = build_deployment(demo_ckpt, tmp_path / "fresh", _opts("fp8"))
    assert resumed["status"] == fresh["status"] == STATUS_PORTABLE
    assert resumed["stages"]["vision"]["checksums"] == left["stages"]["vision"]["checksums"]  # reused
    # every artifact: no wall time in nvlm_build.json, and the Triton configs find their build by a
    # path relative to the repository, so two builds in different folders are byte-identical
    def comparable(sums):
        return sums

    for name in fresh["stages"]:
        a, b = resumed["stages"][name]["checksums"], fresh["stages"][name]["checksums"]
        assert set(a) == set(b), name
        assert comparable(a) == comparable(b), name


def test_resume_redoes_a_stage_that_no_longer_verifies(demo_ckpt, tmp_path):
    out = tmp_path / "b"
    _kill_during_llm_stage(demo_ckpt, out)
    partial = tmp_path / ".b.partial"
    (partial / "preprocess.json").write_text("{}")  # tampered with after it was recorded
    logs = []
    build_deployment(demo_ckpt, out, _opts("fp8"), resume=True, progress=logs.append)
    assert "[preprocess] running" in logs and "[vision] reused (checksums verified)" in logs
    assert json.loads((out / "preprocess.json").read_text())["tokens_per_tile"] == 256
    with pytest.raises(BuildError, match="other options"):
        _kill_during_llm_stage(demo_ckpt, tmp_path / "c")
        build_deployment(demo_ckpt, tmp_path / "c", _opts("int4_awq"), resume=True)


# --------------------------------------------------------------------------- GPU-host settings (72B)

# Documented expectations (docs/engine.md): NVLM-D-72B, max batch 8, 7 tiles per image, one image per
# request: max_multimodal_len = 8 × 7 × 256 = 14,336; max_input_len = 2,048 text + 1,792 image tokens.
LIMITS = EngineLimits(max_batch_size=8, max_input_text_len=2048, max_output_len=1024)


def _limits(config):
    """LIMITS resolved against a checkpoint's preprocessing (tokens per tile, tiles per image)."""
    return LIMITS.resolve(from_hf(config).preprocess)


def _flags(args):
    return {args[i]: args[i + 1] for i in range(1, len(args) - 1, 2) if args[i].startswith("--")}


def test_trtllm_build_72b_tp2_fp8(config_72b):
    args = trtllm_build_args(Path("llm"), Path("engines/llm"),
                             LLMBuildOptions(get_format("fp8"), tp=2, kv_cache_fp8=True), _limits(config_72b))
    f = _flags(args)
    assert args[0] == "trtllm-build"
    assert f == {
        "--checkpoint_dir": "llm", "--output_dir": "engines/llm", "--gpt_attention_plugin": "auto",
        "--gemm_plugin": "auto", "--kv_cache_type": "paged", "--remove_input_padding": "enable",
        "--context_fmha": "enable", "--max_batch_size": "8", "--max_input_len": "3840", "--max_seq_len": "4864",
        "--max_num_tokens": "30720", "--max_multimodal_len": "14336", "--workers": "2",
        "--use_fp8_context_fmha": "enable"}


def test_trtllm_build_72b_tp1_int4_awq(config_72b):
    f = _flags(trtllm_build_args(Path("llm"), Path("engines/llm"), LLMBuildOptions(get_format("int4_awq")),
                                 _limits(config_72b)))
    assert f["--workers"] == "1" and f["--max_multimodal_len"] == "14336"
    assert "--use_fp8_context_fmha" not in f  # FP8 attention only for FP8 builds with an FP8 KV cache


def test_vision_engine_settings_72b(config_72b):
    cfg = from_hf(config_72b)
    s = vision_engine_settings(cfg, Path("vision"), Path("engines"), "fp16", _limits(config_72b))
    assert s.profile_min == (1, 3, 448, 448) and s.profile_opt == (7, 3, 448, 448) and s.profile_max == (56, 3, 448, 448)
    assert s.precision_flags == ("FP16",) and not s.strongly_typed
    assert s.output_shape == (-1, 256, 8192) and s.onnx == "vision/vision_encoder.onnx"
    fp8 = vision_engine_settings(cfg, Path("vision"), Path("engines"), "fp16", _limits(config_72b),
                                 quant=get_vision_format("fp8"))
    assert fp8.onnx.endswith("vision_encoder.fp8.onnx") and fp8.strongly_typed and "FP8" in fp8.precision_flags


def test_engine_limits_follow_the_checkpoints_tokens_per_tile(config_72b):
    """A checkpoint whose pixel shuffle keeps more tokens per tile (downsample ratio 1.0: 1024, not 256)
    gets trtllm-build limits sized for it; the engine build records them in the manifest."""
    import copy

    raw = copy.deepcopy(config_72b)
    raw["downsample_ratio"] = 1.0
    cfg = from_hf(raw)
    assert cfg.preprocess.tokens_per_tile == 1024
    f = _flags(trtllm_build_args(Path("llm"), Path("engines/llm"), LLMBuildOptions(get_format("fp8"), tp=2),
                                 _limits(raw)))
    assert f["--max_multimodal_len"] == str(8 * 7 * 1024) and f["--max_input_len"] == str(2048 + 7 * 1024)
    assert f["--max_seq_len"] == str(2048 + 7 * 1024 + 1024)
    with pytest.raises(Exception, match="tiles per image must be ≥ 1"):
        EngineLimits(max_tiles_per_image=0).resolve(cfg.preprocess)



def test_request_limits_are_one_check():
    """EngineLimits.check_request is what every served model calls on its input: each limit named in
    its refusal, each value at the limit accepted."""
    from runtime.core.config import PreprocessConfig
    from runtime.core.errors import InputError

    pre = PreprocessConfig(448, 1, 6, True, True, 0.5, "v2", 256, "chatml")
    lim = EngineLimits(max_images_per_request=2, max_input_text_len=100, max_output_len=50).resolve(pre)
    assert lim.max_tiles_per_request == 2 * lim.max_tiles_per_image
    lim.check_request(tiles=lim.max_tiles_per_request, input_len=lim.max_input_len, output_len=50,
                      image_tokens=lim.max_image_tokens_per_request)
    lim.check_request(output_len=1)
    for kw, words in [({"tiles": lim.max_tiles_per_request + 1},
                       f"{lim.max_tiles_per_request + 1} tiles is above this build's limit of "
                       f"{lim.max_tiles_per_request} tiles per request"),
                      ({"input_len": lim.max_input_len + 1}, f"above the maximum input length {lim.max_input_len}"),
                      ({"output_len": 51, "output_name": "max_tokens"}, "max_tokens must be in 1…50, got 51"),
                      ({"output_len": 0}, "the output length must be in 1…50, got 0"),
                      ({"image_tokens": lim.max_image_tokens_per_request + 1}, "image tokens per request")]:
        with pytest.raises(InputError, match=words):
            lim.check_request(**kw)
