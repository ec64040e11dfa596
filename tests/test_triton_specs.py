"""Triton model configs: rendered from typed specs, parsed back as Triton's ModelConfig protobuf, for
every target."""

from dataclasses import replace

import pytest

from runtime.core.families import NVLM_D
from triton_repo.specs import RenderError, Tensor, model_specs, parse, render


@pytest.mark.parametrize("target", ["trt", "reference", "contract"])
def test_every_config_renders_and_parses(target):
    specs = model_specs(target, family=NVLM_D, llm_hidden=8192, max_batch_size=8, engine_dir="/models/engines/llm")
    assert [s.name for s in specs] == ["preprocessing", "vision_encoder", "tensorrt_llm", "postprocessing", "nvlm"]
    for spec in specs:
        cfg = parse(render(spec))
        assert cfg.name == spec.name
        assert [i.name for i in cfg.input] == [t.name for t in spec.inputs]
        assert [o.name for o in cfg.output] == [t.name for t in spec.outputs]


def test_trt_target_uses_engines():
    specs = {s.name: parse(render(s)) for s in model_specs("trt", family=NVLM_D, llm_hidden=8192, max_batch_size=8,
                                                            engine_dir="/models/engines/llm")}
    assert specs["vision_encoder"].platform == "tensorrt_plan"
    llm = specs["tensorrt_llm"]
    assert llm.backend == "tensorrtllm" and llm.model_transaction_policy.decoupled
    assert llm.parameters["gpt_model_type"].string_value == "inflight_fused_batching"
    assert llm.parameters["gpt_model_path"].string_value == "/models/engines/llm"


def test_reference_target_speaks_the_same_tensors():
    """The reference target declares the subset of NVIDIA's tensors it honours, each exactly as the
    trt target declares it; the contract target declares all of them, as the trt target does."""
    trt = {s.name: s for s in model_specs("trt", family=NVLM_D, llm_hidden=256, max_batch_size=4, engine_dir="e")}
    ref = {s.name: s for s in model_specs("reference", family=NVLM_D, llm_hidden=256, max_batch_size=4)}
    con = {s.name: s for s in model_specs("contract", family=NVLM_D, llm_hidden=256, max_batch_size=4, engine_dir="e")}
    assert set(ref["tensorrt_llm"].inputs) <= set(trt["tensorrt_llm"].inputs)
    assert set(ref["tensorrt_llm"].outputs) <= set(trt["tensorrt_llm"].outputs)
    assert {t.name for t in ref["tensorrt_llm"].inputs} >= set(NVLM_D.llm_step_inputs)
    assert con["tensorrt_llm"].inputs == trt["tensorrt_llm"].inputs
    assert con["tensorrt_llm"].outputs == trt["tensorrt_llm"].outputs
    assert con["tensorrt_llm"].parameters == trt["tensorrt_llm"].parameters
    assert con["vision_encoder"].inputs == trt["vision_encoder"].inputs
    assert con["nvlm"] == trt["nvlm"] and con["preprocessing"] == trt["preprocessing"]
    assert ref["tensorrt_llm"].backend == "python" and ref["vision_encoder"].backend == "python"
    assert con["tensorrt_llm"].backend == "python" and con["vision_encoder"].backend == "python"


def test_unfilled_value_is_refused():
    with pytest.raises(RenderError, match=r"gpt_model_path"):
        render(next(s for s in model_specs("trt", family=NVLM_D, llm_hidden=8, max_batch_size=1) if s.name == "tensorrt_llm"))
    spec = model_specs("reference", family=NVLM_D, llm_hidden=8, max_batch_size=1)[0]
    with pytest.raises(RenderError, match="unknown dtypes for x"):
        render(replace(spec, inputs=(Tensor("x", "FLOAT128", (1,)),)))


def test_entry_point_accepts_benchmark_tool_inputs():
    entry = next(s for s in model_specs("reference", family=NVLM_D, llm_hidden=8, max_batch_size=1) if s.name == "nvlm")
    names = {t.name for t in entry.inputs}
    assert {"text_input", "max_tokens", "stream", "exclude_input_in_output", "min_tokens", "seed", "bad_words",
            "stop_words", "beam_width", "return_log_probs", "image_bytes", "prompt_table_extra_id",
            "return_num_input_tokens", "return_num_output_tokens"} <= names
    assert not {"random_seed", "min_length"} & names  # the 1.1-era names NVIDIA's 1.2 templates dropped
    dtypes = {t.name: t.dtype for t in entry.inputs}
    assert dtypes["seed"] == "UINT64" and dtypes["prompt_table_extra_id"] == "UINT64"
    assert {"num_input_tokens", "num_output_tokens", "text_output"} <= {t.name for t in entry.outputs}
    assert entry.decoupled


@pytest.mark.parametrize("target", ["trt", "reference", "contract"])
@pytest.mark.parametrize("max_batch, max_queue", [(8, None), (64, None), (8, 3)])
def test_entry_admits_the_batch_and_a_queue_beyond_it(target, max_batch, max_queue):
    """The rendered entry model carries the engine's max batch size as its in-flight bound and the build's queue
    bound (default 8 × the batch, so that a closed-loop client at 4× the batch queues), in one instance (its
    workers are threads); its admission lets exactly that many run and wait before it refuses with "server busy"."""
    from runtime.core.limits import EngineLimits
    from triton_repo.serving_core import Admission, ServerBusy

    bound = EngineLimits(max_batch_size=max_batch, max_queue=max_queue).queue_bound
    assert bound == (8 * max_batch if max_queue is None else max_queue) and bound != max_batch
    specs = {s.name: parse(render(s)) for s in model_specs(target, family=NVLM_D, llm_hidden=64,
                                                            max_batch_size=max_batch, engine_dir="/e/llm",
                                                            max_queue=max_queue)}
    entry, llm = specs["nvlm"], specs["tensorrt_llm"]
    assert int(entry.parameters["max_in_flight"].string_value) == llm.max_batch_size == max_batch
    assert int(entry.parameters["max_queue"].string_value) == bound
    assert sum(g.count for g in entry.instance_group) == 1 and entry.model_transaction_policy.decoupled
    adm = Admission(max_batch, bound)
    for _ in range(max_batch + bound):
        adm.enter()
    with pytest.raises(ServerBusy, match=f"server busy: {max_batch} requests in flight .* and {bound} waiting"):
        adm.enter()
    adm.leave()
    adm.enter()  # a finished request frees its place
    assert adm.count == max_batch + bound


def test_the_keepers_probe_is_recognised_by_its_parameter():
    import json
    from types import SimpleNamespace

    from triton_repo.keeper import Probe
    from triton_repo.serving_core import is_probe

    body = json.loads(Probe.BODY)
    assert is_probe(SimpleNamespace(parameters=lambda: json.dumps(body["parameters"])))
    assert not is_probe(SimpleNamespace(parameters=lambda: "{}"))
    assert not is_probe(SimpleNamespace(parameters=lambda: json.dumps({"nvlm_probe": False})))


def test_the_cancellation_check_is_asked_at_most_every_period(monkeypatch):
    """`request.is_cancelled()` is a round trip to tritonserver: asked per token it cost one per token. The
    throttle asks once per period, the first time a period after it was made (not before the first token), keeps
    the last answer in between, and a yes stays yes."""
    import triton_repo.serving_core as serving

    now = [100.0]
    monkeypatch.setattr(serving.time, "monotonic", lambda: now[0])
    answers, asked = iter([False, False, True, False]), []

    def is_cancelled():
        asked.append(now[0])
        return next(answers)

    gone = serving.AtMostEvery(is_cancelled, period=0.01)
    assert [gone() for _ in range(50)] == [False] * 50 and asked == []  # not on the way to the first token
    now[0] += 0.011
    assert [gone() for _ in range(50)] == [False] * 50 and asked == [100.011]
    now[0] += 0.011
    assert not gone() and len(asked) == 2
    now[0] += 0.011
    assert gone() and len(asked) == 3  # the client went away: seen within one period
    now[0] += 1.0
    assert gone() and len(asked) == 3  # and stays gone without asking again


def test_the_llm_step_outbox_sends_in_order_from_one_thread_and_survives_a_failed_send():
    """Every response of the LLM step leaves through one sending thread, in the order the decode loop and
    the request threads queued them; a send that fails (its client gone) does not stop the others."""
    import threading

    from triton_repo.serving_core import Outbox as _Outbox

    box, sent, threads = _Outbox(), [], set()

    def send(k):
        threads.add(threading.get_ident())
        if k == 3:
            raise RuntimeError("the client went away")
        sent.append(k)

    for k in range(8):
        box.put(lambda k=k: send(k))
    box.close()
    assert sent == [0, 1, 2, 4, 5, 6, 7]
    assert threads == {box.thread.ident} and box.thread.ident != threading.get_ident()
    assert not box.thread.is_alive()


def test_streamed_responses_carry_only_the_requested_outputs():
    """The Python models build each streamed response with only the outputs its request asked for, so the
    bundled backend never prunes one inside `send` (off the GIL: it corrupted the LLM step's heap)."""
    from types import SimpleNamespace

    from triton_repo.pb import response as _response

    class T:
        def __init__(self, n):
            self.n = n

        def name(self):
            return self.n

    pb = SimpleNamespace(InferenceResponse=lambda output_tensors: [t.name() for t in output_tensors])
    both = [T("output_ids"), T("sequence_length")]
    assert _response(pb, {"output_ids"}, both) == ["output_ids"]
    assert _response(pb, set(), both) == ["output_ids", "sequence_length"]  # nothing named: all of them


def test_the_single_bytes_shortcut_serializes_as_the_python_backend_does():
    """pb.shortcut_single_bytes: the bundled Python backend's own serialize_byte_tensor, with the shortcut installed,
    gives the original's bytes for fresh random inputs — one-element arrays of bytes of any length (the shortcut),
    of str, several elements, np.bytes_ arrays (the original's path) — and is installed once."""
    import importlib.util
    import random
    from pathlib import Path

    import numpy as np
    import pytriton

    from triton_repo.pb import shortcut_single_bytes

    path = Path(pytriton.__file__).parent / "tritonserver" / "backends" / "python" / "triton_python_backend_utils.py"
    spec = importlib.util.spec_from_file_location("pb_utils_under_test", path)
    pb_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb_utils)
    original = pb_utils.serialize_byte_tensor
    shortcut_single_bytes(pb_utils)
    shortcut_single_bytes(pb_utils)  # a second model instance in the same process: installed once
    assert pb_utils.serialize_byte_tensor is not original
    assert pb_utils.serialize_byte_tensor.__closure__[0].cell_contents is original  # wraps the original, not itself
    rng = random.Random(7)
    cases = []
    for _ in range(200):
        blob = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 300, 70000])))
        cases += [np.asarray([blob], object), np.asarray([[blob]], object),
                  np.asarray([blob.decode("latin-1")], object),
                  np.asarray([blob, blob[::-1]], object), np.asarray([blob or b"x"], np.bytes_)]
    for tensor in cases:
        assert pb_utils.serialize_byte_tensor(tensor) == original(tensor)
    assert pb_utils.serialize_byte_tensor(np.asarray([b"ab"], object)) == b"\x02\x00\x00\x00ab"
