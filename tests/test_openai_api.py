"""The OpenAI-compatible API (`nvlm-serve BUILD --openai-port P`), driven by the official `openai` package
against a real nvlm-serve process: answers equal the gRPC client's for the same request (images included),
them, streaming deltas join to the answer, bad requests get 4xx error objects and the next is served."""

import base64
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clients.triton_client import NVLMClient
from tests.conftest import ROOT
from tests.conftest import server_ports as _ports

IMAGE = ROOT / "assets" / "demo_scene.png"
QUESTION = "What shapes are in this picture?"


def _data_url(blob: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(blob).decode()


def _task_png() -> bytes:
    from demo_model.task import random_scene

    buf = io.BytesIO()
    random_scene(np.random.default_rng(31), (1344, 448)).image.save(buf, "PNG")  # 4 tiles: another prompt
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(serve_build):
    """nvlm-serve with the OpenAI API, started as a user would; stopped by its PID."""
    base, api = _ports(6), _ports(7)
    cmd = [sys.executable, "-m", "triton_repo.server", str(serve_build), "--grpc-port", str(base),
           "--http-port", str(base + 1), "--metrics-port", str(base + 2), "--openai-port", str(api),
           "--openai-image-dir", str(IMAGE.parent), "--hang-timeout", "0"]  # no probe in Triton's counts below
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    line = ""
    t0 = time.monotonic()
    while not line.startswith("serving") and time.monotonic() - t0 < 180:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "nvlm-serve exited"
    assert "OpenAI API" in line, line
    import openai

    yield openai.OpenAI(base_url=f"http://127.0.0.1:{api}/v1", api_key="unused", max_retries=0), \
        NVLMClient(f"127.0.0.1:{base}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def _chat(api, content, **kw):
    return api.chat.completions.create(model="nvlm", messages=[{"role": "user", "content": content}],
                                       max_tokens=kw.pop("max_tokens", 8), temperature=0, **kw)


def _image_question(url):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]


def test_models(served):
    api, _ = served
    assert [m.id for m in api.models.list().data] == ["nvlm"]


def test_chat_with_an_image_equals_the_grpc_answer(served):
    api, grpc = served
    answers = []
    for blob in (IMAGE.read_bytes(), _task_png()):
        got = _chat(api, _image_question(_data_url(blob)))
        want = grpc.generate("<image>\n" + QUESTION, [blob], max_tokens=8)
        assert got.choices[0].message.content == want.text
        assert got.usage.completion_tokens == len(want.tokens) and got.usage.prompt_tokens > 256
        answers.append(want.text)
    # (whether the answer depends on the image is the trained default's test, test_serving.py: the random
    # default's answers do not)
    # the same file by path, under the directory the operator allowed
    by_path = _chat(api, _image_question(f"file://{IMAGE}"))
    assert by_path.choices[0].message.content == answers[0]


def test_streaming_deltas_join_to_the_answer(served):
    api, _ = served
    whole = _chat(api, _image_question(_data_url(IMAGE.read_bytes()))).choices[0].message.content
    chunks = list(_chat(api, _image_question(_data_url(IMAGE.read_bytes())), stream=True,
                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_a_conversation_reaches_the_model_whole(served):
    """System and earlier turns are part of the prompt (more prompt tokens than the last turn alone) and
    the answer equals the gRPC answer to the same conversation."""
    api, grpc = served
    turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi."},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Write about the sea."}]
    got = api.chat.completions.create(model="nvlm", messages=turns, max_tokens=8, temperature=0)
    alone = _chat(api, "Write about the sea.")
    import json

    want = grpc.generate("", max_tokens=8, extra={"messages": ("BYTES", np.array([json.dumps(turns).encode()],
                                                                               dtype=object))})
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens > alone.usage.prompt_tokens + 10


def test_bad_requests_get_error_objects_and_the_next_is_served(served):
    import openai

    api, _ = served
    cases = [
        (_image_question(_data_url(b"not an image")), {}, openai.BadRequestError, "Pillow"),
        (_image_question("http://example.com/cat.png"), {}, openai.BadRequestError, "remote image URLs"),
        (_image_question("file:///etc/hostname"), {}, openai.BadRequestError, "allowed image directory"),
        (_image_question("data:image/png;base64,@@@"), {}, openai.BadRequestError, "base64"),
        ("Hello.", {"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
        ("Hello.", {"presence_penalty": 5.0}, openai.BadRequestError, "presence_penalty"),
    ]
    for content, kw, err, message in cases:
        with pytest.raises(err, match=message) as info:
            _chat(api, content, **kw)
        assert 400 <= info.value.status_code < 500 and info.value.body["message"]
        assert _chat(api, "Still there?", max_tokens=2).choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="Pillow"):  # streamed: refused before the stream starts
        list(_chat(api, _image_question(_data_url(b"junk")), stream=True))
    assert _chat(api, "Still there?", max_tokens=2).usage.completion_tokens == 2


def test_decoding_controls_over_the_openai_api_equal_grpc(served):
    api, grpc = served
    prompt = "Write one sentence about the sea."
    plain = grpc.generate(prompt, max_tokens=10)
    cases = [({"presence_penalty": -2.0}, dict(presence_penalty=-2.0)),
             ({"frequency_penalty": 2.0, "extra_body": {"repetition_penalty": 5.0}},
              dict(frequency_penalty=2.0, repetition_penalty=5.0)),
             ({"extra_body": {"bad_words": [" the"]}}, dict(bad_words=(" the",)))]
    for kw, d in cases:
        got = _chat(api, prompt, max_tokens=10, **kw).choices[0].message.content
        assert got == grpc.generate(prompt, max_tokens=10, **d).text, kw
    # stop: the answer ends before the stop text, which is not returned
    word = next(w for w in plain.text.split()[1:] if w.isalpha())
    got = _chat(api, prompt, max_tokens=10, stop=[word]).choices[0]
    want = grpc.generate(prompt, max_tokens=10, stop_words=(word,)).text
    assert got.message.content == want and word not in want.split() and len(want) < len(plain.text)
    assert got.finish_reason == "stop"
    # logprobs: the chosen tokens' log-probabilities, as gRPC returns them
    got = _chat(api, prompt, max_tokens=6, logprobs=True).choices[0].logprobs.content
    want = grpc.generate(prompt, max_tokens=6, return_log_probs=True)
    assert [c.logprob for c in got] == pytest.approx(want.log_probs, abs=1e-5)
    assert "".join(c.token for c in got) == want.text


def test_bench_drives_the_openai_endpoint(served, tmp_path):
    import json

    from clients.bench import main
    from tests.test_serving import validate_report

    api, grpc = served
    rc = main(["run", "--url", str(api.base_url).rstrip("/"), "--triton-url", grpc.url, "--concurrency", "1,2",
               "--requests", "4", "--warmup", "1", "--max-tokens", "4", "--min-tokens", "4",
               "--workload", "tiles:1", "--out", str(tmp_path), "--json"])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    validate_report(result)
    for run in result["runs"]:
        s = run["summary"]
        assert s["succeeded"] == s["requests"] == 4 and s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
        assert s["output_tokens_per_s"] > 0 and run["server"]["nvlm"]["requests"] == 4  # Triton's own count


def test_openai_port_in_use_is_one_line_and_exit_2(serve_build):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "triton_repo.server", str(serve_build), "--grpc-port", "1",
                            "--http-port", "2", "--metrics-port", "3", "--openai-port", str(port)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ})
    assert r.returncode == 2 and "Traceback" not in r.stderr  # refused before Triton starts (ports 1-3 would fail)
    assert r.stderr.strip().splitlines() == [f"nvlm-serve: error: OpenAI API on port {port}: the port is in use; "
                                             "choose another with --openai-port"]
