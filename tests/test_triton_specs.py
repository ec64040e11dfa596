"""Triton model configs (first part of the serving issue): rendered from typed specs, parsed back
as Triton's ModelConfig protobuf, for both targets."""

from dataclasses import replace

import pytest

from triton_repo.specs import RenderError, Tensor, model_specs, parse, render


@pytest.mark.parametrize("target", ["trt", "reference"])
def test_every_config_renders_and_parses(target):
    specs = model_specs(target, llm_hidden=8192, max_batch_size=8, engine_dir="/models/engines/llm")
    assert [s.name for s in specs] == ["preprocessing", "vision_encoder", "tensorrt_llm", "postprocessing", "nvlm"]
    for spec in specs:
        cfg = parse(render(spec))
        assert cfg.name == spec.name
        assert [i.name for i in cfg.input] == [t.name for t in spec.inputs]
        assert [o.name for o in cfg.output] == [t.name for t in spec.outputs]


def test_trt_target_uses_engines():
    specs = {s.name: parse(render(s)) for s in model_specs("trt", llm_hidden=8192, max_batch_size=8,
                                                            engine_dir="/models/engines/llm")}
    assert specs["vision_encoder"].platform == "tensorrt_plan"
    llm = specs["tensorrt_llm"]
    assert llm.backend == "tensorrtllm" and llm.model_transaction_policy.decoupled
    assert llm.parameters["gpt_model_type"].string_value == "inflight_fused_batching"
    assert llm.parameters["gpt_model_path"].string_value == "/models/engines/llm"


def test_reference_target_speaks_the_same_tensors():
    trt = {s.name: s for s in model_specs("trt", llm_hidden=256, max_batch_size=4, engine_dir="e")}
    ref = {s.name: s for s in model_specs("reference", llm_hidden=256, max_batch_size=4)}
    assert trt["tensorrt_llm"].inputs == ref["tensorrt_llm"].inputs
    assert trt["tensorrt_llm"].outputs == ref["tensorrt_llm"].outputs
    assert ref["tensorrt_llm"].backend == "python" and ref["vision_encoder"].backend == "python"


def test_unfilled_value_is_refused():
    with pytest.raises(RenderError, match=r"gpt_model_path"):
        render(next(s for s in model_specs("trt", llm_hidden=8, max_batch_size=1) if s.name == "tensorrt_llm"))
    spec = model_specs("reference", llm_hidden=8, max_batch_size=1)[0]
    with pytest.raises(RenderError, match="unknown dtypes for x"):
        render(replace(spec, inputs=(Tensor("x", "FLOAT128", (1,)),)))


def test_entry_point_accepts_benchmark_tool_inputs():
    entry = next(s for s in model_specs("reference", llm_hidden=8, max_batch_size=1) if s.name == "nvlm")
    names = {t.name for t in entry.inputs}
    assert {"text_input", "max_tokens", "stream", "exclude_input_in_output", "min_length", "bad_words",
            "stop_words", "beam_width", "return_log_probs", "image_bytes"} <= names
    assert entry.decoupled
