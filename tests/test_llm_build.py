"""`nvlm-build llm`: all five formats (and FP8 KV) on two independent checkpoints, TP/PP equivalence,
the streaming converter against modelopt's export, and every refusal."""

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from builder.cli import main
from builder.llm_build import build_llm
from runtime.core.checkpoint import Checkpoint
from runtime.core.errors import OutputExistsError
from runtime.core.families import from_hf
from runtime.core.llm_formats import FORMATS as FORMAT_REGISTRY
from runtime.core.llm_formats import LLMBuildOptions, UnsupportedCombinationError, format_for_algo, get_format, validate
from runtime.core.request_schema import Controls
from runtime.executor import ReferenceExecutor, Request

FORMATS = [("bf16", False), ("fp16", False), ("fp8", False), ("fp8", True), ("int4_awq", False), ("w4a8_awq", False)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory, demo_ckpt, released_ckpt):
    """Every format on both checkpoints, built once for the module."""
    root = tmp_path_factory.mktemp("llm")
    out = {}
    for label, ckpt in (("demo", demo_ckpt), ("released", released_ckpt)):
        for fmt, kv in FORMATS:
            d = root / f"{label}-{fmt}{'-kv8' if kv else ''}"
            build_llm(ckpt, d, LLMBuildOptions(get_format(fmt), kv_cache_fp8=kv), calib_size=4)
            out[(label, fmt, kv)] = d
    return out


@pytest.mark.parametrize("label", ["demo", "released"])
@pytest.mark.parametrize("fmt, kv", FORMATS)
def test_format_builds_loads_and_passes_fidelity(builds, label, fmt, kv):
    d = builds[(label, fmt, kv)]
    report = json.loads((d / "reports" / "fidelity.json").read_text())
    assert report["passed"], report
    assert {c["name"] for c in report["checks"]} >= (
        {"greedy_tokens_vs_reference", "logits_vs_reference"} if fmt in ("bf16", "fp16")
        else {"logits_vs_modelopt_fake_quant", "top1_vs_modelopt_fake_quant", "quantized_vs_unquantized_logits"})
    cfg = json.loads((d / "config.json").read_text())
    q = cfg["quantization"]
    assert q["quant_algo"] == {"bf16": None, "fp16": None, "fp8": "FP8", "int4_awq": "W4A16_AWQ",
                               "w4a8_awq": "W4A8_AWQ"}[fmt]
    assert q["kv_cache_quant_algo"] == ("FP8" if kv else None)
    if fmt.endswith("awq"):
        assert q["group_size"] == 128 and q["pre_quant_scale"] is True and q["has_zero_point"] is False
    assert "lm_head" in (q.get("exclude_modules") or ["lm_head"])
    ex = ReferenceExecutor.load(d)
    res = ex.generate([Request([1, 2, 3, 4], 3)])[0]
    assert len(res.tokens) == 3
    summary = json.loads((d / "nvlm_build.json").read_text())
    assert summary["format"] == fmt and summary["fidelity_passed"] is True
    if fmt in ("fp8", "int4_awq", "w4a8_awq"):
        assert summary["calibration"]["multimodal"] >= 3  # calibrated on image prompts, not text alone


def test_stored_formats(builds):
    def dtypes(d):
        f = safe_open(str(d / "rank0.safetensors"), "pt")
        return {k: f.get_tensor(k).dtype for k in f.keys()}

    fp8 = dtypes(builds[("demo", "fp8", True)])
    assert fp8["transformer.layers.0.attention.qkv.weight"] == torch.float8_e4m3fn
    assert "transformer.layers.0.attention.kv_cache_scaling_factor" in fp8
    awq = dtypes(builds[("demo", "int4_awq", False)])
    assert awq["transformer.layers.0.mlp.proj.weight"] == torch.int8
    assert "transformer.layers.0.mlp.proj.prequant_scaling_factor" in awq
    assert awq["lm_head.weight"] == torch.bfloat16  # excluded from quantization
    assert "transformer.layers.0.attention.dense.weights_scaling_factor_2" in dtypes(builds[("demo", "w4a8_awq", False)])


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_tp2_and_pp2_execute_to_the_same_tokens_as_tp1(tmp_path, demo_ckpt, fmt):
    from builder.fidelity import prepare_prompts
    from runtime.reference import reference_model
    from runtime.tokenizer import NVLMTokenizer

    runs = prepare_prompts(reference_model(demo_ckpt), NVLMTokenizer.from_dir(demo_ckpt))
    tokens = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        d = tmp_path / f"{fmt}-tp{tp}-pp{pp}"
        build_llm(demo_ckpt, d, LLMBuildOptions(get_format(fmt), tp=tp, pp=pp), calib_size=4)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
        assert len(list(d.glob("rank*.safetensors"))) == tp * pp
        ex = ReferenceExecutor.load(d)
        tokens[(tp, pp)] = [ex.generate([Request(r.trt_ids, 6, r.table)])[0].tokens for r in runs]
    assert tokens[(2, 1)] == tokens[(1, 1)] and tokens[(1, 2)] == tokens[(1, 1)]


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_streaming_conversion_equals_modelopt_export(tmp_path, demo_ckpt, tp, pp):
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    from runtime.reference import reference_model

    ours = tmp_path / "ours"
    build_llm(demo_ckpt, ours, LLMBuildOptions(get_format("bf16"), tp=tp, pp=pp), fidelity=False)
    theirs = tmp_path / "modelopt"
    llm = copy.deepcopy(reference_model(demo_ckpt).llm).to(torch.bfloat16)
    export_tensorrt_llm_checkpoint(llm, decoder_type="qwen", dtype=torch.bfloat16, export_dir=str(theirs),
                                   inference_tensor_parallel=tp, inference_pipeline_parallel=pp)
    for r in range(tp * pp):
        a = safe_open(str(ours / f"rank{r}.safetensors"), "pt")
        b = safe_open(str(theirs / f"rank{r}.safetensors"), "pt")
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k


def test_fp16_streaming_matches_released_layout(tmp_path, released_ckpt):
    d = tmp_path / "fp16"
    build_llm(released_ckpt, d, LLMBuildOptions(get_format("fp16")), fidelity=False)
    f = safe_open(str(d / "rank0.safetensors"), "pt")
    src = Checkpoint.open(released_ckpt)
    w = src.get("language_model.model.layers.2.mlp.down_proj.weight")
    assert torch.equal(f.get_tensor("transformer.layers.2.mlp.proj.weight"), w.to(torch.float16))
    q, k, v = (src.get(f"language_model.model.layers.1.self_attn.{p}_proj.bias") for p in "qkv")
    assert torch.equal(f.get_tensor("transformer.layers.1.attention.qkv.bias"), torch.cat([q, k, v]).half())


# --------------------------------------------------------------------------- refusals


def test_awq_group_size_versus_tp_on_72b(config_72b):
    cfg = from_hf(config_72b)
    with pytest.raises(UnsupportedCombinationError) as e:
        validate(cfg, LLMBuildOptions(get_format("int4_awq"), tp=8))
    msg = str(e.value)
    assert "3696" in msg and "multiple of 128" in msg and "TP1 with group 128" in msg
    with pytest.raises(UnsupportedCombinationError, match="14784"):
        validate(cfg, LLMBuildOptions(get_format("int4_awq"), tp=2))
    validate(cfg, LLMBuildOptions(get_format("int4_awq"), tp=2, awq_group_size=64))  # 14784 = 231 × 64
    validate(cfg, LLMBuildOptions(get_format("fp8"), tp=8))
    with pytest.raises(UnsupportedCombinationError, match="64 or 128|accepts"):
        validate(cfg, LLMBuildOptions(get_format("int4_awq"), awq_group_size=96))


def test_w4a8_awq_group_64_is_refused_up_front(demo_ckpt, tmp_path, capsys):
    """TensorRT-LLM 1.2's groupwise quantized linear layers raise NotImplementedError for W4A8-AWQ with
    group size 64; the checkpoint it would get is refused before any work, naming the allowed size."""
    with pytest.raises(UnsupportedCombinationError, match="accepts 128 for w4a8_awq"):
        validate(from_hf(json.loads((demo_ckpt / "config.json").read_text())),
                 LLMBuildOptions(get_format("w4a8_awq"), awq_group_size=64))
    out = tmp_path / "x"
    assert main(["llm", str(demo_ckpt), "-o", str(out), "--quant", "w4a8_awq", "--awq-group-size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "accepts 128 for w4a8_awq" in err and not out.exists()


def test_format_classes_are_the_one_description():
    """Bytes per parameter, FP8 compute and group sizes come from the format objects (inspect, sizing
    and the roofline read them): each value checked by hand."""
    assert get_format("bf16").linear_bytes_per_param() == get_format("fp16").linear_bytes_per_param() == 2.0
    assert get_format("fp8").linear_bytes_per_param() == 1.0
    assert get_format("int4_awq").linear_bytes_per_param(128) == 0.5 + 2 / 128
    assert get_format("int4_awq").linear_bytes_per_param(64) == 0.5 + 2 / 64
    assert get_format("w4a8_awq").linear_bytes_per_param(128) == 0.5 + 2 / 128
    assert [f for f, v in FORMAT_REGISTRY.items() if v.fp8_compute] == ["fp8", "w4a8_awq"]
    assert format_for_algo("W4A8_AWQ") is get_format("w4a8_awq") and format_for_algo(None) is get_format("bf16")
    with pytest.raises(UnsupportedCombinationError, match="NVFP4"):
        format_for_algo("NVFP4")


@pytest.mark.parametrize("opts, message", [
    (dict(tp=3), "must divide the 64 attention heads"),
    (dict(pp=3), "must divide the 80 layers"),
    (dict(kv_cache_fp8=True), "calibrated KV scales"),
])
def test_invalid_combinations(config_72b, opts, message):
    with pytest.raises(UnsupportedCombinationError, match=message):
        validate(from_hf(config_72b), LLMBuildOptions(get_format("bf16"), **opts))


def test_unknown_quant_lists_formats(demo_ckpt, tmp_path, capsys):
    assert main(["llm", str(demo_ckpt), "-o", str(tmp_path / "x"), "--quant", "int3"]) == 2
    err = capsys.readouterr().err
    assert "unknown --quant 'int3'" in err and "w4a8_awq" in err


def test_existing_output_is_refused_and_kept(demo_ckpt, tmp_path):
    out = tmp_path / "llm"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        build_llm(demo_ckpt, out, LLMBuildOptions(get_format("bf16")))
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_build_leaves_nothing_that_looks_complete(demo_ckpt, tmp_path, monkeypatch):
    import builder.llm_build as lb

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(lb, "write_unquantized", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        build_llm(demo_ckpt, tmp_path / "llm", LLMBuildOptions(get_format("bf16")))
    assert list(tmp_path.iterdir()) == []


def test_calibration_data_errors(demo_ckpt, tmp_path):
    from builder.calibration import CalibrationDataError

    img = tmp_path / "a.png"
    shutil.copy(__import__("tests.conftest", fromlist=["ROOT"]).ROOT / "assets" / "demo_scene.png", img)
    jl = tmp_path / "calib.jsonl"
    jl.write_text('{"prompt": "ok", "image": "a.png"}\nnot json\n{"image": "a.png"}\n'
                  '{"prompt": "x", "image": "missing.png"}\n')
    with pytest.raises(CalibrationDataError) as e:
        build_llm(demo_ckpt, tmp_path / "o", LLMBuildOptions(get_format("fp8")), calib_data=jl)
    assert "lines 2, 3" in str(e.value) and "missing.png" in str(e.value)
    from builder.calibration import load_calib_data

    jl.write_text('{"prompt": "What is it?", "image": "a.png"}\n{"prompt": "Text only."}\n')
    assert [(s.prompt, s.image) for s in load_calib_data(jl)] == [("<image>\nWhat is it?", img), ("Text only.", None)]
    jl.write_text('{"prompt": "Describe <image>.", "image": "a.png"}\n')
    with pytest.raises(CalibrationDataError, match="only 1 calibration samples"):
        build_llm(demo_ckpt, tmp_path / "o", LLMBuildOptions(get_format("fp8")), calib_data=jl)
    with pytest.raises(CalibrationDataError, match="no images"):
        build_llm(demo_ckpt, tmp_path / "o", LLMBuildOptions(get_format("fp8")), calib_data=tmp_path / "empty"
                  if (tmp_path / "empty").mkdir() is None else None)
    assert not (tmp_path / "o").exists()


def test_calibration_from_image_folder(demo_ckpt, tmp_path):
    from runtime.scenes import synthetic_scene

    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(4):
        synthetic_scene(300 + 100 * k, 300, k).save(folder / f"{k}.png")
    summary = build_llm(demo_ckpt, tmp_path / "o", LLMBuildOptions(get_format("int4_awq")), calib_data=folder)
    assert summary["calibration"] == {"source": str(folder), "samples": 4, "multimodal": 4}
    assert summary["fidelity_passed"]


def test_awq_group_size_64(tmp_path, released_ckpt):
    d = tmp_path / "g64"
    summary = build_llm(released_ckpt, d, LLMBuildOptions(get_format("int4_awq"), awq_group_size=64), calib_size=4)
    q = json.loads((d / "config.json").read_text())["quantization"]
    assert q["group_size"] == 64 and summary["fidelity_passed"]
    f = safe_open(str(d / "rank0.safetensors"), "pt")
    assert tuple(f.get_slice("transformer.layers.0.mlp.proj.weights_scaling_factor").get_shape()) == (128, 256 // 64)


@pytest.fixture(scope="module")
def odd_vocab_ckpt(tmp_path_factory):
    """The demo model with a vocabulary of 523 rows: odd, not a multiple of 64 (modelopt pads AWQ exports to
    576) and not a multiple of TP 2 (TensorRT-LLM pads to 524)."""
    from runtime.core.demo_checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("vocab") / "odd", vocab_size=523, seed=3)


@pytest.mark.parametrize("fmt, tp", [("int4_awq", 1), ("int4_awq", 2), ("w4a8_awq", 1), ("bf16", 2)])
def test_vocabulary_padding_end_to_end(tmp_path, odd_vocab_ckpt, fmt, tp):
    """The checkpoint keeps the real vocab_size; the embedding and lm_head have TensorRT-LLM's rows
    (vocab padded with zeros to a multiple of TP — its loader checks the shape exactly); the executor never
    produces a padded id; the fidelity report compares the real rows and passes."""
    from runtime.core.trtllm_layout import vocab_rows

    out = tmp_path / fmt
    build_llm(odd_vocab_ckpt, out, LLMBuildOptions(get_format(fmt), tp=tp), calib_size=4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 523
    rows = vocab_rows(523, tp)
    assert rows == (523 if tp == 1 else 524)
    for name in ("lm_head.weight", "transformer.vocab_embedding.weight"):
        parts = []
        for r in range(tp):
            with safe_open(str(out / f"rank{r}.safetensors"), "pt") as f:
                parts.append(f.get_tensor(name))
        assert [p.shape[0] for p in parts] == [rows // tp] * tp, name
        assert torch.cat(parts)[523:].abs().sum() == 0  # the padding row, when there is one, is zero
    report = json.loads((out / "reports" / "fidelity.json").read_text())
    assert report["passed"], report
    ex = ReferenceExecutor.load(out)
    from runtime.executor import KVCache

    logits = ex.forward([1, 2, 3], None, KVCache())
    assert logits.shape[-1] == 523  # what greedy and sampling choose from: the real ids only
    hot = ex.generate([Request([1, 2, 3], 64, controls=Controls(temperature=50.0, top_k=0, seed=5))])[0].tokens
    assert len(set(hot)) > 20 and all(0 <= t < 523 for t in hot)  # near-uniform sampling never leaves them


def test_a_checkpoint_with_the_wrong_vocabulary_rows_is_refused(tmp_path, odd_vocab_ckpt):
    """What TensorRT-LLM's loader would reject (lm_head rows ≠ vocab_size padded to TP), the executor
    refuses too: e.g. modelopt's 64-padded AWQ export before it is re-padded."""
    from safetensors.torch import load_file, save_file

    from runtime.core.errors import CheckpointError

    out = tmp_path / "b"
    build_llm(odd_vocab_ckpt, out, LLMBuildOptions(get_format("bf16")), fidelity=False)
    t = load_file(str(out / "rank0.safetensors"))
    t["lm_head.weight"] = torch.cat([t["lm_head.weight"], t["lm_head.weight"].new_zeros(576 - 523, 256)])
    save_file(t, str(out / "rank0.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head has 576 rows over TP1; TensorRT-LLM expects vocab_size 523"):
        ReferenceExecutor.load(out)


@pytest.mark.parametrize("fmt, kv", [("fp8", False), ("int4_awq", False)])
def test_builds_of_the_trained_default_keep_its_task_accuracy(tmp_path, trained_ckpt, fmt, kv):
    """The fidelity report of a build of the trained default scores it on held-out tile-task questions."""
    d = tmp_path / "o"
    build_llm(trained_ckpt, d, LLMBuildOptions(get_format(fmt), kv_cache_fp8=kv), calib_size=8)
    report = json.loads((d / "reports" / "fidelity.json").read_text())
    task = {c["name"]: c for c in report["checks"]}["task_accuracy_vs_reference"]
    assert report["passed"] and task["passed"] and task["value"] >= 0.85, task


def test_the_task_check_fails_when_the_images_do_not_arrive(trained_ckpt, tmp_path):
    """A build whose image rows are lost (a zero prompt table) answers near chance: the check catches it."""
    from builder.fidelity import task_check
    from runtime.reference import reference_model
    from runtime.tokenizer import NVLMTokenizer

    d = tmp_path / "bf16"
    build_llm(trained_ckpt, d, LLMBuildOptions(get_format("bf16")), fidelity=False)
    ex = ReferenceExecutor.load(d)
    reference, tok = reference_model(trained_ckpt), NVLMTokenizer.from_dir(trained_ckpt)
    good = task_check(ex, reference, tok, questions=24)
    assert good.passed and good.value >= 0.8
    real = ex.generate
    ex.generate = lambda reqs, **kw: real([Request(r.input_ids, r.max_new_tokens, torch.zeros_like(r.prompt_table), controls=r.controls) for r in reqs], **kw)
    blind = task_check(ex, reference, tok, questions=24)
    assert not blind.passed and blind.value < good.value - 0.2


def test_top1_counts_decidable_positions_and_a_wrong_scale_still_fails():
    """Near-uniform logits (a random model's): a correct build's small error flips near-ties, which the check
    excludes; a wrong scale (every logit off by far more than the margins) fails — few decidable positions
    and flipped argmaxes among them."""
    from builder.fidelity import TOP1_AGREEMENT_MIN, TOP1_DECIDABLE_MIN, _top1, top1_decidable

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    ref = torch.randn(400, 387, generator=g) * 0.3
    ref[:300, 7] += 3.0  # three quarters of the positions have a clear winner, the rest near-uniform
    good = ref + 0.01 * torch.randn(400, 387, generator=g)
    agree, ties = top1_decidable(good, ref)
    assert _top1(good, ref) < 1.0  # some near-ties flipped: the all-positions figure alone would refuse
    assert agree == 1.0 and 0 < ties < 1 - TOP1_DECIDABLE_MIN
    wrong = ref * torch.linspace(0.2, 1.8, 387)  # a per-channel scale gone wrong
    agree, ties = top1_decidable(wrong, ref)
    assert agree < TOP1_AGREEMENT_MIN or ties > 1 - TOP1_DECIDABLE_MIN
