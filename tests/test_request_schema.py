"""The request schema (runtime/core/request_schema.py): its rules, and that it is the one place a decoding
parameter is described — the entry model, the LLM step, the executor, nvlm-client and the OpenAI front all
take their parameters from it."""

import argparse
import json
import math
import shutil
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from runtime.core import request_schema as schema
from runtime.core.errors import InputError
from runtime.decoding import from_trtllm
from tests.conftest import ROOT


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=40, top_p=0.9), dict(top_p=1.0, top_k=0),
                                dict(min_tokens=8), dict(repetition_penalty=1.1), dict(length_penalty=-3.0)])
def test_valid_settings_pass(kw):
    schema.validate(kw, max_tokens=8)
    c = schema.controls(kw, 8)
    assert all(getattr(c, k) == v for k, v in kw.items())


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=-0.1), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=-0.01), "top_p"),
    (dict(top_p=1.01), "top_p"), (dict(top_p=math.nan), "top_p"), (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=9), r"min_tokens must be in 0…max_tokens \(8\)"), (dict(beam_width=0), "beam_width must be 1"),
    (dict(beam_width=4), "beam_width must be 1"), (dict(presence_penalty=math.nan), "presence_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty must be a finite number"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=-1.5), "repetition_penalty must be a finite number > 0"),
    (dict(length_penalty=math.inf), "length_penalty"),
])
def test_invalid_settings_are_refused_by_name(kw, message):
    with pytest.raises(InputError, match=message):
        schema.validate(kw, max_tokens=8)


def _values():
    """A value for every parameter, each different from its default."""
    # (binary fractions: they cross float32 tensors exactly)
    return {"temperature": 0.5, "top_k": 7, "top_p": 0.75, "seed": 3, "min_tokens": 2, "beam_width": 1, "end_id": 11,
            "repetition_penalty": 1.25, "presence_penalty": 0.375, "frequency_penalty": 0.125, "length_penalty": 0.625,
            "stop_words": ("cat",), "bad_words": ("dog", "the"), "return_log_probs": True}


def test_every_parameter_survives_the_trip_client_to_executor():
    """client tensors → the entry's parsing → the LLM step's tensors → the LLM step's parsing → Controls: every
    value arrives, under its own name (a dropped or swapped parameter fails)."""
    values = _values()
    assert set(values) == set(schema.BY_NAME)
    sent = schema.client_tensors(values)
    got = schema.from_entry(lambda name: sent[name][1] if name in sent else None)
    assert got == values
    words = {"stop_words": np.array([[5, 6, 0], [1, 2, -1]], np.int32), "bad_words": np.array([[9], [1]], np.int32)}
    llm = dict(schema.to_llm_step(got, words))
    back = schema.from_llm_step(lambda name: llm.get(name), from_trtllm)
    c = schema.controls(back, 8)
    for name, v in values.items():
        if schema.BY_NAME[name].kind != "words":
            assert getattr(c, name) == v, name
    assert c.stop_words == ((5,), (6,)) and c.bad_words == ((9,),)


def test_defaults_are_sent_where_the_backend_needs_them_and_nothing_else():
    sends = dict(schema.to_llm_step({"end_id": 2}, {}))
    assert set(sends) == {"temperature", "runtime_top_k", "runtime_top_p", "seed", "min_tokens", "end_id"}
    assert sends["runtime_top_k"].dtype == np.int32 and sends["seed"].dtype == np.uint64


def test_the_four_places_accept_the_same_parameters():
    """The entry model's inputs, nvlm-client's flags, the OpenAI front's fields and the executor's controls."""
    from triton_repo.specs import entry_inputs

    names = set(schema.BY_NAME)
    entry = {t.name: t.dtype for t in entry_inputs()}
    assert {n: entry.get(n) for n in names} == {p.name: p.dtype for p in schema.PARAMS}
    ap = argparse.ArgumentParser()
    schema.add_flags(ap)
    assert set(vars(ap.parse_args([]))) == names
    assert {f.name for f in fields(schema.Controls)} == names
    body = {p.openai_name: (["x"] if p.kind == "words" else True if p.kind == "bool" else 1) for p in schema.PARAMS}
    assert set(schema.from_openai(body, lambda m, f: ValueError(m))) == names
    # and the LLM step takes each one under NVIDIA's name, which the contract declares
    from triton_repo.contract import load_contract

    declared = {e.name: e.dtype for e in load_contract().inputs}
    assert {p.llm_step: declared.get(p.llm_step) for p in schema.PARAMS} == {p.llm_step: p.llm_dtype for p in schema.PARAMS}


def test_the_entry_models_sends_are_what_the_contract_declares(tmp_path):
    """check.py's view of what the entry sends is the serving code's own: every tensor `entry_decoding` builds
    for a request with every parameter set is declared by the contract's tensorrt_llm, in that dtype."""
    from runtime.core.families import NVLM_D
    from triton_repo.serving_core import entry_decoding
    from triton_repo.specs import llm_step_sends

    values = _values()
    sent = schema.client_tensors(values)
    d = entry_decoding(lambda n: sent[n][1] if n in sent else None, 8, lambda w: [len(w), 1], end_id=2)
    declared = llm_step_sends("BF16", NVLM_D)
    want = {"FP32": np.float32, "INT32": np.int32, "UINT64": np.uint64, "BOOL": np.bool_}
    for name, arr in d.sends:
        assert name in declared, name
        assert arr.dtype == want[declared[name]], name


SCRATCH = '''
import argparse, json, sys
from dataclasses import fields
from runtime.core import request_schema as schema
from runtime.core.families import NVLM_D
from triton_repo.specs import entry_inputs, llm_step_sends, model_specs
from triton_repo.serving_core import entry_decoding
from triton_repo.openai_api import ChatRequest
ap = argparse.ArgumentParser(); schema.add_flags(ap)
sent = schema.client_tensors({"top_p_min": 0.25})
d = entry_decoding(lambda n: sent[n][1] if n in sent else None, 8, lambda w: [1], end_id=2)
llm = [s for s in model_specs("reference", family=NVLM_D, llm_hidden=64, max_batch_size=2) if s.name == "tensorrt_llm"][0]
req = ChatRequest({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p_min": 0.25}, "m", None, 8)
parsed = schema.from_llm_step(lambda n: dict(d.sends).get(n), lambda a, n: ())
print(json.dumps({
    "entry": [t.name for t in entry_inputs()], "flag": vars(ap.parse_args(["--top-p-min", "0.5"])).get("top_p_min"),
    "controls": [f.name for f in fields(schema.Controls)], "sends": [n for n, _ in d.sends],
    "declared_sends": sorted(llm_step_sends("BF16", NVLM_D)), "llm_config": [t.name for t in llm.inputs],
    "openai": req.params.get("top_p_min"), "llm_step_parsed": schema.controls(parsed, 8).top_p_min}))
'''


def test_a_parameter_added_to_the_schema_appears_everywhere(tmp_path):
    """In a scratch copy, one new row (NVIDIA's runtime_top_p_min as `top_p_min`) in PARAMS, and nothing else
    edited: the entry model declares and forwards it, the LLM step's config declares it and parses it into the
    executor's Controls, nvlm-client has its flag and the OpenAI front its field."""
    for pkg in ("runtime", "triton_repo", "plugins", "builder"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "runtime" / "core" / "request_schema.py"
    text = path.read_text()
    anchor = "    Param(\"return_log_probs\""
    row = ('    Param("top_p_min", "float", "FP32", 0.0, "runtime_top_p_min", "FP32", "in [0, 1]",\n'
           '          lambda v, _: 0 <= v <= 1, help="the decaying top-p\'s floor"),\n')
    assert anchor in text
    path.write_text(text.replace(anchor, row + anchor, 1))
    out = subprocess.run([sys.executable, "-c", SCRATCH], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert "top_p_min" in got["entry"]
    assert got["flag"] == 0.5
    assert "top_p_min" in got["controls"]
    assert "runtime_top_p_min" in got["sends"] and "runtime_top_p_min" in got["declared_sends"]
    assert "runtime_top_p_min" in got["llm_config"]
    assert got["openai"] == 0.25 and got["llm_step_parsed"] == 0.25
    # and the real tree has no such parameter: the scratch copy is what changed
    assert "top_p_min" not in schema.BY_NAME
