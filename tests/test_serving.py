"""Served for real: the reference target's repository on the bundled CPU tritonserver, over gRPC.

One server for the module (port range chosen per process to avoid clashes); every bad request is
followed by a valid one; after shutdown no shared-memory segment or process is left.
"""

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from builder.engine_build import DeploymentOptions, build_deployment
from clients.triton_client import ClientError, NVLMClient
from runtime.core.llm_formats import LLMBuildOptions, get_format
from tests.conftest import ROOT
from tests.conftest import descendants as _descendants
from tests.conftest import server_ports as _ports

IMAGE = ROOT / "assets" / "demo_scene.png"


@pytest.fixture(scope="module")
def build(serve_build):
    return serve_build


@pytest.fixture(scope="module")
def server(build):
    from triton_repo.server import TritonServer, _shm_segments

    base = _ports(0)
    # hang_timeout=0, no keeper probe: a probe is a request through the entry model, and one that lands while
    # 16 clients fill its 8 + 8 places is refused as busy (the heal tests start servers with the probe on)
    srv = TritonServer(build / "triton_repo", grpc_port=base, http_port=base + 1, metrics_port=base + 2,
                       hang_timeout=0).start()
    assert _shm_segments((srv.shm_prefix,))  # its segments are visible, so the check below can fail
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None
    assert _shm_segments((srv.shm_prefix,)) == set()


@pytest.fixture(scope="module")
def client(server):
    c = NVLMClient(server.grpc_url)
    c.check()
    return c


@pytest.fixture(scope="module")
def local(build):
    """The same request computed in-process: preprocessing, vision ONNX, reference executor."""
    from runtime.local_pipeline import LocalPipeline

    pipeline = LocalPipeline(build, max_images=4)
    return lambda prompt, images, n: pipeline.generate(prompt, [Path(i).read_bytes() for i in images], n)


@pytest.mark.parametrize("prompt, images", [
    ("Write one sentence about the sea.", []),
    ("What shapes are in this picture?", [IMAGE]),
    ("Compare <image> and <image>.", [IMAGE, IMAGE]),
])
def test_greedy_answers_equal_reference_executor(client, local, prompt, images):
    ans = client.generate(prompt, images, max_tokens=8)
    assert ans.tokens == local(prompt, images, 8)
    streamed = client.generate(prompt, images, max_tokens=8, stream=True)
    assert streamed.tokens == ans.tokens and "".join(streamed.chunks) == ans.text
    # a response per token while the server keeps up (several tokens in one when it falls behind: the LLM
    # step's sender and the entry model pass on everything that is ready), plus one when the text ends in a
    # split character released at the end
    assert 1 <= len(streamed.chunks) <= len(ans.tokens) + 1


def test_the_llm_step_keeps_its_priority_and_the_rest_of_the_server_runs_below_it(server, client):
    """Reference target: the LLM step is a Python stub whose one batcher thread computes every token, so the
    keeper runs tritonserver and every other stub LLM_STEP_NICE nice levels lower (every thread); the LLM
    step's stub keeps the keeper's own priority. Without a Python LLM step (the trt target), or with 0,
    nothing changes."""
    from triton_repo.keeper import LLM_STEP, LLM_STEP_NICE, prioritize_llm_step, stub_model

    def nices(pid):
        got = set()
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                got.add(os.getpriority(os.PRIO_PROCESS, int(t.name)))
            except ProcessLookupError:  # a thread that ended after the listing (one per request in the LLM step)
                pass
        return got

    base = os.getpriority(os.PRIO_PROCESS, server.proc.pid)
    procs = {pid: stub_model(pid) or Path(os.readlink(f"/proc/{pid}/exe")).name
             for pid in _descendants(server.proc.pid)}
    assert sorted(procs.values()) == sorted(["tritonserver", LLM_STEP, "nvlm", "preprocessing", "postprocessing",
                                             "vision_encoder"])
    lowered = min(19, base + LLM_STEP_NICE)
    deadline = time.time() + 10  # the keeper applies it once it sees the server ready
    while time.time() < deadline and any(nices(p) != {lowered} for p, m in procs.items() if m != LLM_STEP):
        time.sleep(0.2)
    for pid, model in procs.items():
        assert nices(pid) == ({base} if model == LLM_STEP else {lowered}), model
    client.generate("Write one sentence about the sea.", [], max_tokens=4)  # threads started since: the same
    for pid, model in procs.items():
        assert nices(pid) == ({base} if model == LLM_STEP else {lowered}), model
    assert prioritize_llm_step(os.getpid()) is None  # no stub below this process: nothing to do
    assert prioritize_llm_step(next(p for p, m in procs.items() if m == "tritonserver"), 0) is None


def test_answers_depend_on_the_image_and_reach_the_right_client(trained_serve_build):
    """The trained default, served, answers tile-task questions about eight different images from eight
    concurrent clients: each gets its own image's answer — a dropped image, a swapped tile or a mixed-up
    request would change it — and the answers are what the task says."""
    from demo_model.task import heldout
    from runtime.local_pipeline import LocalPipeline
    from triton_repo.server import TritonServer

    pipeline = LocalPipeline(trained_serve_build, max_images=4)
    base = _ports(1)

    samples = [s for s in heldout(40, seed=31) if s.qtype in ("colour", "count", "which_tile")][:8]
    files = []
    for k, s in enumerate(samples):
        f = Path(os.environ.get("TMPDIR", "/tmp")) / f"nvlm-serving-task-{os.getpid()}-{k}.png"
        s.scene.image.save(f)
        files.append(f)
    assert len({s.answer for s in samples}) >= 4  # answers differ: a mix-up is visible
    want = [pipeline.generate("<image>\n" + s.question, [f.read_bytes()], 4) for s, f in zip(samples, files)]
    got, errors = [None] * len(samples), []
    srv = TritonServer(trained_serve_build / "triton_repo", grpc_port=base, http_port=base + 1,
                       metrics_port=base + 2).start()

    def ask(k):
        try:
            got[k] = NVLMClient(srv.grpc_url).generate("<image>\n" + samples[k].question, [files[k]], max_tokens=4,
                                                           stream=True)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(samples))]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    srv.stop()
    [f.unlink() for f in files]
    assert not errors
    assert [g.tokens for g in got] == want
    right = sum(g.text.strip() == s.answer for g, s in zip(got, samples))
    assert right >= 7, [(g.text, s.answer) for g, s in zip(got, samples)]


def test_streamed_text_equals_the_full_answer(client, build):
    """Sampled answers of the demo model are random byte-level ids that split multi-byte characters
    across tokens in most long answers; the streamed deltas must still join to exactly the
    non-streamed text (runtime.tokenizer.StreamDecoder). Same seed, same tokens."""
    from runtime.tokenizer import NVLMTokenizer

    tok = NVLMTokenizer.from_dir(build / "tokenizer")
    naive_wrong = 0
    for k in range(12):
        prompt = f"Tell me story number {k} in detail."
        # the demo's LM head is decisive: a high temperature is needed to leave its greedy chain
        kw = dict(max_tokens=128, temperature=5.0, top_k=0, seed=1000 + k)
        ans = client.generate(prompt, **kw)
        streamed = client.generate(prompt, stream=True, **kw)
        assert streamed.tokens == ans.tokens
        assert "".join(streamed.chunks) == ans.text, prompt
        naive = [tok.decode(ans.tokens[:n]) for n in range(len(ans.tokens) + 1)]
        naive_wrong += "".join(b[len(a):] for a, b in zip(naive, naive[1:])) != ans.text
    assert naive_wrong, "no answer split a character: this test would not catch a naive streamer"


def test_sixteen_concurrent_streaming_clients(server, local):
    expected = {p: local(p, [], 6) for p in ("Hello there.", "Describe a cat.")}
    failures, results = [], []

    def worker(k):
        try:
            c = NVLMClient(server.grpc_url)
            for i in range(3):
                prompt = ("Hello there.", "Describe a cat.")[(k + i) % 2]
                ans = c.generate(prompt, max_tokens=6, stream=True)
                results.append(ans.tokens == expected[prompt])
        except Exception as e:  # noqa: BLE001
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    [t.start() for t in threads]
    [t.join(timeout=600) for t in threads]
    # the failures themselves in the message: a flake here has to be diagnosable from the CI log
    assert not failures and len(results) == 48 and all(results), (failures[:3], len(results), results.count(False))
    assert NVLMClient(server.grpc_url).client.is_server_ready()


def _raw(client, inputs):
    """Send hand-built tensors to the entry model; returns the error message or None."""
    import queue

    g = client._g
    q: queue.Queue = queue.Queue()
    client.client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        tensors = []
        for name, dtype, arr in inputs:
            t = g.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            tensors.append(t)
        client.client.async_stream_infer("nvlm", tensors)
        _, e = q.get(timeout=120)
        return None if e is None else str(e)
    finally:
        client.client.stop_stream()


def _huge_png():
    """A 10000×9000 image (90 M pixels, above Pillow's 89.5 M limit) that compresses to a few hundred KB."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (10000, 9000)).save(buf, format="PNG")
    return buf.getvalue()


TEXT = ("text_input", "BYTES", np.array([b"<image> hi"], dtype=object))
MAXT = ("max_tokens", "INT32", np.array([4], np.int32))


def _img(data):
    return ("image_bytes", "BYTES", np.array(data, dtype=object))


@pytest.mark.parametrize("inputs, message", [
    ([MAXT], "text_input"),
    ([("text_input", "INT32", np.array([1], np.int32)), MAXT], "data type|datatype|TYPE_STRING|BYTES"),
    ([TEXT, MAXT, _img([b"not an image"])], "not a format Pillow can decode"),
    ([("text_input", "BYTES", np.array([b"a", b"b"], dtype=object)), MAXT], "shape|dims|unexpected"),
    ([TEXT, MAXT, _img([_huge_png()])], "above the limit"),
    ([TEXT, MAXT, _img([IMAGE.read_bytes()] * 5)], "at most"),
    ([("text_input", "BYTES", np.array([b"no placeholder but two images"], dtype=object)), MAXT,
      _img([IMAGE.read_bytes()] * 2)], None),  # placeholders are prepended, as NVLM-D's chat() does
    ([("text_input", "BYTES", np.array([b"<image> <image> <image>"], dtype=object)), MAXT,
      _img([IMAGE.read_bytes()])], "placeholder"),
    ([("text_input", "BYTES", np.array([b"hi"], dtype=object)), ("max_tokens", "INT32", np.array([0], np.int32))],
     "max_tokens must be"),
    ([("text_input", "BYTES", np.array([b"hi"], dtype=object)), ("max_tokens", "INT32", np.array([100000], np.int32))],
     "max_tokens must be"),
    ([("text_input", "BYTES", np.array([b"hi " * 5000], dtype=object)), MAXT], "maximum input length"),
    ([("text_input", "BYTES", np.array([b"hi"], dtype=object)), MAXT, ("beam_width", "INT32", np.array([2], np.int32))],
     "beam_width"),
    # sampling inputs: refused by name before they reach the executor
    ([TEXT[:2] + (np.array([b"hi"], dtype=object),), MAXT, ("temperature", "FP32", np.array([np.nan], np.float32)),
      ("top_k", "INT32", np.array([0], np.int32))], "temperature must be a finite number"),
    ([TEXT[:2] + (np.array([b"hi"], dtype=object),), MAXT, ("temperature", "FP32", np.array([-1], np.float32))],
     "temperature must be"),
    ([TEXT[:2] + (np.array([b"hi"], dtype=object),), MAXT, ("top_k", "INT32", np.array([-3], np.int32))],
     "top_k must be ≥ 0"),
    ([TEXT[:2] + (np.array([b"hi"], dtype=object),), MAXT, ("top_p", "FP32", np.array([1.5], np.float32))],
     "top_p must be in [0, 1]"),
    ([TEXT[:2] + (np.array([b"hi"], dtype=object),), MAXT, ("min_tokens", "INT32", np.array([-1], np.int32))],
     "min_tokens must be in"),
    ([TEXT[:2] + (np.array([b"hi"], dtype=object),), MAXT, ("beam_width", "INT32", np.array([0], np.int32))],
     "beam_width must be 1"),
    ([TEXT[:2] + (np.array([b"hi"], dtype=object),), MAXT,
      ("repetition_penalty", "FP32", np.array([np.nan], np.float32))], "repetition_penalty must be a finite number"),
    ([TEXT[:2] + (np.array([b"hi"], dtype=object),), MAXT,
      ("repetition_penalty", "FP32", np.array([0.0], np.float32))], "repetition_penalty must be a finite number > 0"),
])
def test_bad_requests_then_a_valid_one(client, inputs, message):
    err = _raw(client, inputs)
    if message is None:
        assert err is None
    else:
        assert err is not None and any(m in err for m in message.split("|")), err
    assert len(client.generate("Still there?", max_tokens=2).tokens) == 2


@pytest.fixture(scope="module")
def local_run(build):
    from runtime.local_pipeline import LocalPipeline

    pipeline = LocalPipeline(build, max_images=4)
    return lambda prompt, images, n, **kw: pipeline.run(prompt, [Path(i).read_bytes() for i in images], n, **kw)


def _single_token_word(tok, tokens, start=2):
    """(index, text) of the first token from `start` on whose text, tokenized alone, is that token."""
    for i, t in enumerate(tokens[start:], start=start):
        word = tok.decode([t])
        if word.strip() and tok.encode(word) == [t] and tokens.count(t) == 1:
            return i, word
    raise AssertionError(f"no usable stop word in {tokens}")


@pytest.mark.parametrize("images", [[], [IMAGE]])
def test_decoding_controls_over_grpc_match_the_executor(client, local_run, build, images):
    """Stop words, bad words, penalties and log-probs, served: the same tokens (and log-probs) as the
    executor computes in-process with the same controls, and different from the plain answer."""
    from runtime.tokenizer import NVLMTokenizer

    tok = NVLMTokenizer.from_dir(build / "tokenizer")
    prompt, n = "Write one sentence about the sea.", 10
    plain = client.generate(prompt, images, max_tokens=n)
    assert plain.tokens == local_run(prompt, images, n).tokens
    # stop word: the answer ends right before it, and it is not returned (streamed or not)
    k, word = _single_token_word(tok, plain.tokens)
    for stream in (False, True):
        ans = client.generate(prompt, images, max_tokens=n, stream=stream, stop_words=(word,))
        assert ans.tokens == plain.tokens[:k] and ans.text == tok.decode(plain.tokens[:k]), (stream, word)
    # bad word: never produced; the executor with the same ban gives the same tokens
    k, bad = _single_token_word(tok, plain.tokens, start=0)
    ans = client.generate(prompt, images, max_tokens=n, bad_words=(bad,))
    want = local_run(prompt, images, n, bad_words=((plain.tokens[k],),)).tokens
    assert ans.tokens == want and plain.tokens[k] not in ans.tokens and ans.tokens[:k] == plain.tokens[:k]
    # penalties: a strongly negative presence penalty leaves only the prompt's tokens; each matches
    for kw in ({"presence_penalty": -1e4}, {"frequency_penalty": 30.0, "repetition_penalty": 5.0}):
        ans = client.generate(prompt, images, max_tokens=n, **kw)
        assert ans.tokens == local_run(prompt, images, n, **kw).tokens, kw
    assert client.generate(prompt, images, max_tokens=n, presence_penalty=-1e4).tokens != plain.tokens
    # log-probs: the executor's, per token, streamed or not, and their sum
    want = local_run(prompt, images, n, return_log_probs=True)
    for stream in (False, True):
        ans = client.generate(prompt, images, max_tokens=n, stream=stream, return_log_probs=True)
        assert ans.tokens == want.tokens
        assert ans.log_probs == pytest.approx(want.log_probs, abs=1e-4) and all(lp <= 0 for lp in ans.log_probs)
        assert ans.cum_log_prob == pytest.approx(want.cum_log_prob, abs=1e-3)
    assert plain.log_probs is None


def test_exclude_input_in_output_false_returns_the_prompt_first(client):

    plain = client.generate("Write one sentence about the sea.", max_tokens=6)
    for stream in (False, True):
        ans = client.generate("Write one sentence about the sea.", max_tokens=6, stream=stream,
                              exclude_input=False)
        assert "Write one sentence about the sea." in ans.text and ans.text.endswith(plain.text)
        assert ans.tokens[-6:] == plain.tokens and len(ans.tokens) > 6


def test_unknown_model_and_unreachable_server(server):
    c = NVLMClient(server.grpc_url, model="nope")
    with pytest.raises(ClientError, match="nope"):
        c.check()
    with pytest.raises(ClientError, match="cannot reach"):
        NVLMClient("127.0.0.1:1").check()


def test_optional_benchmark_inputs_are_accepted(client):
    extra = {"exclude_input_in_output": ("BOOL", np.array([True])), "min_tokens": ("INT32", np.array([3], np.int32)),
             "return_log_probs": ("BOOL", np.array([False])), "repetition_penalty": ("FP32", np.array([1.0], np.float32))}
    ans = client.generate("Hello there.", max_tokens=4, extra=extra)
    assert len(ans.tokens) >= 3


def test_http_generate_and_generate_stream(server, client):
    import json

    import requests

    url = f"http://{server.host}:{server.http_port}/v2/models/nvlm"
    r = requests.post(f"{url}/generate", json={"text_input": "Hello there.", "max_tokens": 4}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output_ids"] == client.generate("Hello there.", max_tokens=4).tokens
    r = requests.post(f"{url}/generate_stream", json={"text_input": "Hello there.", "max_tokens": 4, "stream": True},
                      timeout=120)
    events = [json.loads(line[len("data: "):]) for line in r.text.splitlines() if line.startswith("data: ")]
    # an event carries every token that was ready (one, a scalar in Triton's JSON, or several, a list)
    streamed = [t for e in events for t in (e["output_ids"] if isinstance(e["output_ids"], list) else [e["output_ids"]])]
    assert streamed == body["output_ids"]
    assert "".join(e["text_output"] for e in events) == body["text_output"]


def test_http_generate_takes_base64_images(server, client):
    """Triton's HTTP generate endpoints take BYTES inputs as UTF-8 JSON strings, so raw image bytes
    cannot be sent there: `image_bytes` also takes base64, bare or as a data URL. The image counts:
    the prompt grows by its tiles' tokens, and the answer equals the gRPC one with the raw bytes."""
    import base64

    import requests

    url = f"http://{server.host}:{server.http_port}/v2/models/nvlm/generate"
    prompt, count = "Describe <image>.", {"return_num_input_tokens": ("BOOL", np.array([True]))}
    raw = client.generate(prompt, [IMAGE], max_tokens=4, extra=count)
    text_only = client.generate("Describe .", max_tokens=4, extra=count)
    assert raw.counts["num_input_tokens"] >= text_only.counts["num_input_tokens"] + 256
    b64 = base64.b64encode(IMAGE.read_bytes()).decode()
    for value in (b64, f"data:image/png;base64,{b64}", base64.encodebytes(IMAGE.read_bytes()).decode()):
        r = requests.post(url, json={"text_input": prompt, "image_bytes": value, "max_tokens": 4,
                                     "return_num_input_tokens": True}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["output_ids"] == raw.tokens and body["num_input_tokens"] == raw.counts["num_input_tokens"]
    r = requests.post(url, json={"text_input": prompt, "image_bytes": "bm90IGFuIGltYWdl", "max_tokens": 4}, timeout=120)
    assert r.status_code == 400 and "not a format Pillow can decode" in r.text


def test_client_cli(server, capsys):
    import json

    from clients.triton_client import main

    port = server.grpc_url
    assert main(["--url", port, "--prompt", "What is this?", "--image", str(IMAGE), "--max-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 3 and out["time_to_first_token"] > 0
    assert main(["--url", port, "--prompt", "x", "--image", "/nonexistent.png"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--url", "127.0.0.1:1", "--prompt", "x"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_nvlm_serve_cli_starts_and_stops_cleanly(build):
    import signal
    import subprocess
    import time

    from triton_repo.keeper import shm_prefix
    from triton_repo.server import _shm_segments

    base = _ports(1)
    proc = subprocess.Popen([str(ROOT / ".venv/bin/nvlm-serve"), str(build), "--grpc-port", str(base),
                             "--http-port", str(base + 1), "--metrics-port", str(base + 2)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("serving"), line
    server_pid = int(next(p.name for p in Path("/proc").iterdir() if p.name.isdigit() and int(
        (p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid and b"tritonserver" in (p / "cmdline").read_bytes()))
    children = _descendants(server_pid)
    assert children  # the server's backend stubs are visible, so the check below can fail
    own = (shm_prefix(server_pid),)  # server_pid is the keeper, nvlm-serve's child
    assert _shm_segments(own)
    assert len(NVLMClient(f"127.0.0.1:{base}").generate("Hi", max_tokens=2).tokens) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0 and "stopped" in proc.stdout.read()
    deadline = time.time() + 10  # an exited stub may wait a moment for its reaper: poll, not a fixed sleep
    while time.time() < deadline and (_shm_segments(own) or any(_alive(pid) for pid in children)):
        time.sleep(0.1)
    assert _shm_segments(own) == set()
    assert {pid for pid in children if _alive(pid)} == set()  # no stub outlives the server


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.mark.faults
def test_sigkill_of_nvlm_serve_leaves_nothing_behind(build):
    """A supervisor that SIGKILLs nvlm-serve (a CI timeout, the OOM killer) must not leak a server: the
    keeper (triton_repo/keeper.py) gets SIGTERM from the kernel and stops tritonserver and its stubs,
    removes their shared memory and the temporary folder, within seconds."""
    import signal
    import subprocess
    import tempfile

    from triton_repo.keeper import shm_prefix
    from triton_repo.server import _shm_segments

    tmp = Path(tempfile.gettempdir())
    dirs_before = set(tmp.glob("nvlm-serve-*"))
    base = _ports(2)
    proc = subprocess.Popen([str(ROOT / ".venv/bin/nvlm-serve"), str(build), "--grpc-port", str(base),
                             "--http-port", str(base + 1), "--metrics-port", str(base + 2)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("serving")
    assert len(NVLMClient(f"127.0.0.1:{base}").generate("Hi", max_tokens=2).tokens) == 2
    below = _descendants(proc.pid)  # keeper, tritonserver, backend stubs
    keeper = next(pid for pid in below if _ppid(pid) == proc.pid)  # nvlm-serve's child
    own = (shm_prefix(keeper),)
    assert len(below) >= 3 and _shm_segments(own) and set(tmp.glob("nvlm-serve-*")) - dirs_before
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 45
    while time.time() < deadline and (any(_alive(p) for p in below) or _shm_segments(own)
                                      or set(tmp.glob("nvlm-serve-*")) - dirs_before):
        time.sleep(0.2)
    assert [p for p in below if _alive(p)] == []
    assert _shm_segments(own) == set()
    assert set(tmp.glob("nvlm-serve-*")) - dirs_before == set()


@pytest.mark.faults
def test_a_build_directory_can_be_moved(demo_ckpt, tmp_path):
    """The docs tell users to copy a build to a GPU host: the repository finds its build by a path
    relative to itself. Copy a finished build, delete the original, serve the copy."""
    import shutil

    from runtime.core.limits import EngineLimits
    from runtime.local_pipeline import LocalPipeline
    from triton_repo.server import TritonServer

    original, moved = tmp_path / "original", tmp_path / "elsewhere" / "moved"
    build_deployment(demo_ckpt, original, DeploymentOptions(LLMBuildOptions(get_format("bf16")), target="reference",
                                                         vision_dtype="fp32", calib_size=4,
                                                         limits=EngineLimits(max_images_per_request=2)))
    assert str(original) not in "".join(p.read_text() for p in (original / "triton_repo").rglob("config.pbtxt"))
    shutil.copytree(original, moved, symlinks=True)
    shutil.rmtree(original)
    base = _ports(2)
    with TritonServer(moved / "triton_repo", grpc_port=base, http_port=base + 1, metrics_port=base + 2) as srv:
        ans = NVLMClient(srv.grpc_url).generate("Describe <image>.", [IMAGE], max_tokens=6)
    assert ans.tokens == LocalPipeline(moved).generate("Describe <image>.", [IMAGE.read_bytes()], 6)


def test_int4_build_with_an_odd_vocabulary_serves(tmp_path):
    """int4_awq on a vocabulary of 523 (odd, not a multiple of 64 — modelopt pads the export to 576 —
    nor of TP 2): it builds, its fidelity report passes, and the served answer equals the in-process one."""
    import json

    from runtime.core.demo_checkpoint import write_demo_checkpoint
    from runtime.local_pipeline import LocalPipeline
    from triton_repo.server import TritonServer

    ckpt = write_demo_checkpoint(tmp_path / "ckpt", vocab_size=523, seed=3)
    out = tmp_path / "build"
    build_deployment(ckpt, out, DeploymentOptions(LLMBuildOptions(get_format("int4_awq")), target="reference",
                                               vision_dtype="fp32", calib_size=4))
    assert json.loads((out / "llm" / "config.json").read_text())["vocab_size"] == 523
    assert json.loads((out / "llm" / "reports" / "fidelity.json").read_text())["passed"]
    base = _ports(2)
    with TritonServer(out / "triton_repo", grpc_port=base, http_port=base + 1, metrics_port=base + 2) as srv:
        ans = NVLMClient(srv.grpc_url).generate("Describe <image>.", [IMAGE], max_tokens=8)
    assert ans.tokens == LocalPipeline(out).generate("Describe <image>.", [IMAGE.read_bytes()], 8)
    assert all(t < 523 for t in ans.tokens)


def _ready(base: int) -> bool:
    """What a load balancer polls: GET /v2/health/ready, 200 or not."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _heals(srv, base: int, down_within: float) -> None:
    """Readiness goes down within `down_within` s, comes back by itself, and the next request is answered."""
    deadline, went_down = time.time() + down_within, False
    while time.time() < deadline and not went_down:
        went_down = not _ready(base)
        time.sleep(0.1)
    assert went_down, "readiness stayed true with a broken server"
    deadline = time.time() + 180
    while time.time() < deadline and not _ready(base):
        time.sleep(0.5)
    assert _ready(base), "the server did not come back"
    assert len(NVLMClient(srv.grpc_url).generate("Still there?", max_tokens=3).tokens) == 3


def _server_pid(srv) -> int:
    return next(p for p in _descendants(srv.proc.pid) if _ppid(p) == srv.proc.pid)


def _stub(server_pid: int, model: str) -> int:
    return next(p for p in _descendants(server_pid) if f"/{model}/1/model.py".encode() in Path(f"/proc/{p}/cmdline").read_bytes())


@pytest.mark.faults
def test_a_dead_stub_turns_readiness_off_and_the_server_heals(build):
    """kill -9 the tensorrt_llm stub: before, every later request failed ("Stub process … is not healthy")
    while readiness stayed 200. Now the keeper restarts the server: readiness goes down, comes back by
    itself, and the next request is answered."""
    import signal

    from triton_repo.server import TritonServer

    base = _ports(2)
    with TritonServer(build / "triton_repo", grpc_port=base, http_port=base + 1, metrics_port=base + 2) as srv:
        assert _ready(base)
        os.kill(_stub(_server_pid(srv), "tensorrt_llm"), signal.SIGKILL)
        _heals(srv, base, 30)


@pytest.mark.faults
@pytest.mark.parametrize("frozen", ["nvlm stub", "tritonserver"])
def test_a_frozen_server_heals(build, frozen):
    """SIGSTOP freezes a process without killing it: the entry model's stub (Triton then answers every request
    "Stub process … is not healthy" while readiness stays 200 and nothing restarts it), or tritonserver itself
    (no answer at all — what the bundled Python backend's intermittent deadlock looks like from outside). The
    keeper's probe request notices either (no answer: here after 8 s instead of the default 60) and restarts
    the server. A frozen stub gets 120 s instead: Triton's "not healthy" answer is what is tested there, and
    on a loaded machine it can come after 8 s, when the no-answer verdict would win the race."""
    import signal

    from triton_repo.server import TritonServer

    base = _ports(2)
    with TritonServer(build / "triton_repo", grpc_port=base, http_port=base + 1, metrics_port=base + 2,
                      hang_timeout=8 if frozen == "tritonserver" else 120, probe_interval=2) as srv:
        assert len(NVLMClient(srv.grpc_url).generate("Hello?", max_tokens=2).tokens) == 2
        server_pid = _server_pid(srv)
        os.kill(server_pid if frozen == "tritonserver" else _stub(server_pid, "nvlm"), signal.SIGSTOP)
        _heals(srv, base, 60)
        why = "not healthy" if frozen == "nvlm stub" else "no response to a probe request in 8 s"
        assert why in srv.log_file.read_text()


@pytest.mark.faults
def test_cancelled_streams_free_the_llm_step(server, client):
    """Cancel 10 streaming requests after their first tokens (stop_stream(cancel_requests=True), what a
    client that goes away does): the entry model stops its LLM-step request (`stop` by request id) and the
    executor ends it before its next decode step. Before, each ran on to max_tokens holding the LLM step.
    Told by the LLM step's own log line per stopped request (how many tokens it had made), not by timing the
    next request: a wall-clock bound flakes on a loaded machine."""
    import queue

    import tritonclient.grpc as grpcclient

    long_tokens = 400
    log_before = server.log_file.read_text().count("cancelled after")

    def cancel_one(k, out):
        c = grpcclient.InferenceServerClient(server.grpc_url)
        got: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: got.put((result, error)))
        inputs = client._inputs(f"Story {k}.", (), long_tokens, True,
                                {"seed": ("UINT64", np.array([k], np.uint64)),
                                 "min_tokens": ("INT32", np.array([long_tokens], np.int32))})
        c.async_stream_infer("nvlm", inputs)
        first = [got.get(timeout=300) for _ in range(2)]
        out.append(all(e is None for _, e in first))
        c.stop_stream(cancel_requests=True)

    done: list = []
    threads = [threading.Thread(target=cancel_one, args=(k, done)) for k in range(10)]
    [t.start() for t in threads]
    [t.join(timeout=600) for t in threads]
    assert done == [True] * 10, "every cancelled stream got its first tokens"
    deadline = time.time() + 60
    while time.time() < deadline and server.log_file.read_text().count("cancelled after") - log_before < 10:
        time.sleep(0.2)
    lines = [ln for ln in server.log_file.read_text().splitlines() if "cancelled after" in ln][log_before:]
    assert len(lines) == 10, lines  # every cancelled stream's LLM-step request was stopped ...
    assert all(int(ln.split("cancelled after ")[1].split()[0]) < long_tokens for ln in lines), lines  # ... early
    assert len(client.generate("Hello there.", max_tokens=4).tokens) == 4


@pytest.mark.faults
def test_internal_models_refuse_over_limit_inputs(server, build):
    """Clients can reach vision_encoder, preprocessing and tensorrt_llm directly; each checks the build's
    limits (EngineLimits.check_request) before it computes. 40 tiles to the vision encoder: refused, and
    its stub's private memory does not grow (before, it ran them: 2.1 GB kept afterwards; the 96 MB of
    pixels themselves sit in the backend's shared-memory pool either way)."""
    import tritonclient.grpc as grpcclient

    from runtime.core.build_dir import read_limits

    limits = read_limits(build)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    keeper = next(p for p in _descendants(server.proc.pid) if _ppid(p) == server.proc.pid)
    vision = next(p for p in _descendants(keeper) if b"vision_encoder" in Path(f"/proc/{p}/cmdline").read_bytes())

    def rss_mb(pid):  # private memory: the input itself arrives in the Python backend's shared-memory pool
        line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("RssAnon"))
        return int(line.split()[1]) / 1024

    tiles = 40
    assert tiles > limits.max_tiles_per_request
    x = grpcclient.InferInput("pixel_values", [tiles, 3, 448, 448], "FP32")
    x.set_data_from_numpy(np.random.default_rng().standard_normal((tiles, 3, 448, 448), np.float32))
    before = rss_mb(vision)
    with pytest.raises(Exception, match=f"40 tiles is above this build's limit of {limits.max_tiles_per_request} "
                                        "tiles per request"):
        g.infer("vision_encoder", [x])
    assert rss_mb(vision) - before < 48, "the vision stub grew by about the refused input's size"

    ids = grpcclient.InferInput("input_ids", [1, limits.max_input_len + 1], "INT32")
    ids.set_data_from_numpy(np.ones((1, limits.max_input_len + 1), np.int32))
    lens = grpcclient.InferInput("input_lengths", [1, 1], "INT32")
    lens.set_data_from_numpy(np.array([[limits.max_input_len + 1]], np.int32))
    out = grpcclient.InferInput("request_output_len", [1, 1], "INT32")
    out.set_data_from_numpy(np.array([[4]], np.int32))
    errors: list = []
    g.start_stream(callback=lambda result, error: errors.append(error))
    g.async_stream_infer("tensorrt_llm", [ids, lens, out])
    deadline = time.time() + 60
    while not errors and time.time() < deadline:
        time.sleep(0.05)
    g.stop_stream()
    assert errors and "above the maximum input length" in str(errors[0])

    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"<image>" * 9], object))
    img = grpcclient.InferInput("image_bytes", [limits.max_images_per_request + 1], "BYTES")
    img.set_data_from_numpy(np.array([IMAGE.read_bytes()] * (limits.max_images_per_request + 1), object))
    with pytest.raises(Exception, match="images"):
        g.infer("preprocessing", [text, img])
    assert len(NVLMClient(server.grpc_url).generate("Still there?", max_tokens=2).tokens) == 2


# --------------------------------------------------------------------------- nvlm-bench against the server

def validate_report(result: dict) -> None:
    """bench.json against its published JSON Schema (clients/bench.schema.json, docs/bench.md)."""
    import json

    import jsonschema

    schema = json.loads((ROOT / "clients" / "bench.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(result)


def test_bench_short_sweep_json_and_csv(server, build, tmp_path, capsys):
    import csv
    import json

    from clients.bench import SCHEMA, main

    rc = main(["run", "--url", server.grpc_url, "--concurrency", "1,2", "--request-rate", "4", "--requests", "4",
               "--warmup", "1", "--max-tokens", "4", "--workload", "tiles:1,3", "--build", str(build),
               "--out", str(tmp_path), "--plot", "--json"])
    assert rc == 0
    for png in ("latency_vs_concurrency.png", "ttft_distribution.png", "stage_breakdown.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "bench.json").read_text())
    validate_report(result)
    assert result["schema"] == SCHEMA and result["complete"] and result["build_manifest_sha256"]
    assert result["incomplete_reason"] is None
    assert result["roofline"] is None  # the CPU reference target: no GPU bound unless --gpu names one
    assert [(r["mode"], r["level"]) for r in result["runs"]] == [("concurrency", 1), ("concurrency", 2),
                                                                 ("request_rate", 4.0)]
    for run in result["runs"]:
        s = run["summary"]
        assert s["succeeded"] == s["requests"] == 4 and s["failed"] == 0
        for k in ("ttft_ms", "tpot_ms", "e2e_ms"):
            assert s[k]["p50"] <= s[k]["p99"]
        # inter-token latencies need two text chunks in a response stream: none if every request's 4 tokens
        # came in one run (the server fell behind), which the schema allows as null
        assert s["itl_ms"] is None or s["itl_ms"]["p50"] <= s["itl_ms"]["p99"]
        assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
        assert {"preprocessing", "vision_encoder", "tensorrt_llm", "nvlm"} <= set(run["server"])
        assert set(run["ttft_by_workload_item"]) == set(run["tpot_by_workload_item"]) == {"1 tiles", "3 tiles"}
        assert run["vs_roofline"] is None
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert len(rows) == 3 and rows[0]["mode"] == "concurrency"
    assert {r["build_manifest_sha256"] for r in rows} == {result["build_manifest_sha256"]}
    assert {(r["workload"], r["seed"], r["date"]) for r in rows} == {("tiles:1,3", "0", result["date"])}
    assert str(os.cpu_count()) in rows[0]["machine"]


def test_bench_schema_rejects_malformed_reports():
    """The schema is strict enough to fail: a missing key, an unknown key, a wrong type, a bad mode."""
    import copy

    import jsonschema

    stats = {"mean": 1.0, "p50": 1.0, "p90": 1.0, "p99": 1.0, "n": 1}
    good = {"schema": "nvlm-trt/bench/v1", "complete": True, "incomplete_reason": None,
            "date": "2026-11-27T08:00:00+0000", "machine": {"platform": "x", "cpus": 2, "python": "3.11"},
            "endpoint": {"url": "h:1", "model": "nvlm"}, "build_manifest_sha256": None,
            "workload": {"spec": "text", "items": ["text"]}, "seed": 0, "max_tokens": 4, "warmup": 0, "roofline": None,
            "runs": [{"mode": "concurrency", "level": 1, "summary": {
                "requests": 1, "succeeded": 1, "failed": 0, "errors": [], "ttft_ms": stats, "itl_ms": stats,
                "tpot_ms": stats, "e2e_ms": stats, "output_tokens_per_s": 1.0, "requests_per_s": 1.0, "seconds": 1.0},
                "ttft_by_workload_item": {"text": stats}, "tpot_by_workload_item": {"text": stats},
                "vs_roofline": None, "server": {}, "ttft_samples_ms": [1.0]}]}
    validate_report(good)
    for mutate in (lambda r: r.pop("seed"), lambda r: r.update(extra=1), lambda r: r.update(complete="yes"),
                   lambda r: r["runs"][0].update(mode="burst"), lambda r: r["runs"][0]["summary"]["ttft_ms"].pop("p99")):
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            validate_report(bad)


def test_bench_reports_measured_over_roofline_bound(server, build, demo_ckpt, tmp_path):
    """With a GPU named, each workload item gets its roofline bound (the build's format, TP, tiles and
    prompt length) and measured/bound. On this CPU server the ratios are huge; the plumbing is what is
    checked here — the bounds themselves against hand arithmetic in tests/test_roofline.py."""
    import json

    from clients.bench import main
    from clients.roofline import GPUS, roofline
    from runtime.core.families import load_config

    assert main(["run", "--url", server.grpc_url, "--concurrency", "1", "--requests", "4", "--warmup", "0",
                 "--max-tokens", "4", "--workload", "tiles:1,3", "--build", str(build), "--gpu", "h100-sxm",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    validate_report(result)
    plan = result["roofline"]
    assert (plan["gpu"], plan["fmt"], plan["tp"], plan["served_target"]) == ("H100 SXM", "bf16", 1, "reference")
    assert {label: b["tiles"] for label, b in plan["items"].items()} == {"1 tiles": 1, "3 tiles": 3}
    cfg = load_config(demo_ckpt)
    run = result["runs"][0]
    for label, b in plan["items"].items():
        text_tokens = b["prompt_tokens"] - 256 * b["tiles"]
        assert 20 < text_tokens < 60  # chat template, prompt, tile tags: tens of tokens
        r = roofline(cfg, "bf16", 1, tiles=b["tiles"], text_tokens=text_tokens, output_tokens=4,
                     gpu=GPUS["h100-sxm"], kv_fp8=False)
        assert b["ttft_bound_ms"] == pytest.approx(r.ttft_ms) and b["tpot_bound_ms"] == pytest.approx(r.tpot_ms)
        ratio = run["vs_roofline"][label]
        assert ratio["ttft_p50_over_bound"] == pytest.approx(run["ttft_by_workload_item"][label]["p50"] / r.ttft_ms)
        assert ratio["tpot_mean_over_bound"] == pytest.approx(run["tpot_by_workload_item"][label]["mean"] / r.tpot_ms)
        assert ratio["ttft_p50_over_bound"] > 1 and ratio["tpot_mean_over_bound"] > 1  # a bound is a bound


def _pgid(proc_dir: Path) -> int | None:
    """Process group of a live process (None for zombies and processes already gone)."""
    try:
        fields = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def test_bench_server_dying_mid_run_saves_partial_results(build, tmp_path):
    """Kill the server after a few measured requests: the sweep stops, bench.json is written with
    complete=false and the reason, failed requests are counted, and the exit status is 1."""
    import json

    import tritonclient.grpc as grpcclient

    from clients.bench import main
    from triton_repo.server import TritonServer

    base = _ports(2)
    # hang_timeout=0: the keeper's probe requests reach the LLM step too and would count below
    srv = TritonServer(build / "triton_repo", grpc_port=base, http_port=base + 1, metrics_port=base + 2,
                       hang_timeout=0).start()

    def kill_after_some_requests():
        stats = grpcclient.InferenceServerClient(srv.grpc_url)
        while srv.proc.poll() is None:
            # the LLM step, decoupled, counts a request when it admits it: at concurrency 1 its fifth means the
            # warm-up and three measured requests have ended (text requests are prepared in the entry model: the
            # preprocessing model never sees them)
            done = stats.get_inference_statistics("tensorrt_llm", as_json=True)["model_stats"][0]["inference_stats"]
            if int(done.get("success", {}).get("count", 0)) >= 5:
                srv.proc.kill()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_some_requests)
    killer.start()
    try:
        rc = main(["run", "--url", srv.grpc_url, "--concurrency", "1,2", "--requests", "500", "--warmup", "1",
                   "--max-tokens", "8", "--out", str(tmp_path)])
    finally:
        killer.join()
        srv.stop()
    deadline = time.time() + 5
    while True:  # SIGKILLed stubs need a moment to go; zombies awaiting their reaper are gone already
        group = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == srv.proc.pid]
        if not group or time.time() > deadline:
            break
        time.sleep(0.1)
    assert group == []  # stop() also ends the backend stubs the killed server left behind
    assert rc == 1
    result = json.loads((tmp_path / "bench.json").read_text())
    validate_report(result)
    assert result["complete"] is False and "server" in result["incomplete_reason"]
    assert len(result["runs"]) == 1  # the sweep did not go on to concurrency 2
    s = result["runs"][0]["summary"]
    assert s["succeeded"] >= 3 and s["failed"] >= 1 and s["succeeded"] + s["failed"] == s["requests"] < 500
    assert (tmp_path / "bench.csv").read_text().count("\n") == 2


@pytest.mark.parametrize("args, message", [
    (["--url", "127.0.0.1:1"], "cannot reach"),
    (["--model", "nope"], "nope"),
    (["--requests", "0"], "--requests"),
    (["--request-rate", "-1"], "rates > 0"),
    (["--workload", "tiles:2"], "tile counts"),
    (["--workload", "jsonl:/nonexistent.jsonl"], "not found"),
    (["--gpu", "h100-sxm"], "needs --build"),
    (["--max-tokens", "4", "--min-tokens", "8"], "--min-tokens between"),
    (["--build", "/nonexistent-build"], "no manifest.json"),
])
def test_bench_bad_input_fails_before_the_run(server, args, message, capsys):
    from clients.bench import main

    full = ["run", "--url", server.grpc_url, "--requests", "1", "--warmup", "0"]
    for k in range(0, len(args), 2):  # later flags override the defaults above
        if args[k] in full:
            full[full.index(args[k]) + 1] = args[k + 1]
        else:
            full += args[k:k + 2]
    assert main(full) == 2
    assert message in capsys.readouterr().err


def test_bench_jsonl_workload_errors(tmp_path):
    from clients.workloads import BenchError, load_workload

    f = tmp_path / "w.jsonl"
    f.write_text('{"text_input": "hi"}\nbroken\n{"text_input": "x", "image": "missing.png"}\n')
    with pytest.raises(BenchError) as e:
        load_workload(f"jsonl:{f}", 0)
    assert "lines 2" in str(e.value) and "missing.png" in str(e.value)
    img = tmp_path / "a.png"
    img.write_bytes(IMAGE.read_bytes())
    f.write_text('{"text_input": "hi"}\n\n{"text_input": "one", "image": "a.png"}\n'
                 f'{{"text_input": "two", "image": ["a.png", "{img}"]}}\n')
    items = load_workload(f"jsonl:{f}", 0)
    assert [(i.prompt, len(i.images), i.label) for i in items] == [("hi", 0, "line 1"), ("one", 1, "line 3"),
                                                                   ("two", 2, "line 4")]
    assert items[2].images[1] == IMAGE.read_bytes()


@pytest.mark.parametrize("road", ["grpc", "http"])
def test_llm_link_drops_an_abandoned_stream(server, build, road):
    """The entry model's link to the LLM step (triton_repo/llm_link.py), over either road (these text requests
    take HTTP when the link knows the server's HTTP address, llm_http.py): a request abandoned after its
    first response must not leave its later responses on the thread's stream for the next request. Two
    prompts with different answers: request A (32 tokens, streamed) is dropped after one token, then B runs
    on the same thread and must get exactly the tokens B gets on a fresh link — A's leftovers would differ
    (sampled with different seeds: the random-weight default answers every greedy prompt alike)."""
    from runtime.tokenizer import NVLMTokenizer
    from triton_repo.llm_link import LLMLink

    tok = NVLMTokenizer.from_dir(build / "tokenizer")

    def inputs(prompt, n, seed):
        ids = np.asarray(tok.encode(prompt), np.int32)
        return [("input_ids", ids[None]), ("input_lengths", np.asarray([[ids.size]], np.int32)),
                ("request_output_len", np.asarray([[n]], np.int32)), ("streaming", np.asarray([[True]])),
                ("end_id", np.asarray([[tok.im_end_id]], np.int32)), ("temperature", np.asarray([[1.0]], np.float32)),
                ("runtime_top_k", np.asarray([[50]], np.int32)), ("seed", np.asarray([[seed]], np.uint64))]

    def tokens(responses):
        got = [r.as_numpy("output_ids") for r in responses]
        return [t for a in got if a is not None for t in a.reshape(-1).tolist()]

    http = f"127.0.0.1:{server.http_port}" if road == "http" else ""

    fresh = LLMLink(url=server.grpc_url, http=http)
    want_b = tokens(fresh.generate(inputs("Count to ten.", 8, 2), ["output_ids"], "b0"))
    want_a = tokens(fresh.generate(inputs("Write one sentence about the sea.", 32, 1), ["output_ids"], "a0"))
    fresh.close()
    assert len(want_a) > 8 and want_a[1:9] != want_b  # A's leftovers would be told from B's answer

    link = LLMLink(url=server.grpc_url, http=http)
    a = link.generate(inputs("Write one sentence about the sea.", 32, 1), ["output_ids"], "a1")
    first = next(a)
    got = first.as_numpy("output_ids").reshape(-1).tolist()  # one token, or a run if the LLM step fell behind
    assert got and got == want_a[:len(got)]
    a.close()  # abandoned: its stream is dropped
    assert tokens(link.generate(inputs("Count to ten.", 8, 2), ["output_ids"], "b1")) == want_b
    # a finished request keeps its stream for the next one, which is answered in full
    assert tokens(link.generate(inputs("Count to ten.", 8, 2), ["output_ids"], "b2")) == want_b
    link.close()


def test_llm_link_sends_bf16_exactly():
    """BF16 tensors (prompt tables, encoder features) reach the wire bit for bit: random values that
    float16 or a rounding path would change."""
    import torch

    from triton_repo.llm_link import infer_input

    x = (torch.randn(3, 5) * 1e3).to(torch.bfloat16)
    t = infer_input("prompt_embedding_table", x)
    assert t.datatype() == "BF16" and t.shape() == [3, 5]
    assert t._get_content() == x.view(torch.int16).numpy().tobytes()


def test_the_servers_env_points_the_llm_link_at_its_own_ports(tmp_path):
    """nvlm-serve tells the entry model where its own gRPC and HTTP ports are (a wildcard bind is reached on
    loopback)."""
    import shutil

    from triton_repo.llm_http import HTTP_URL_ENV
    from triton_repo.llm_link import URL_ENV
    from triton_repo.server import TritonServer

    for host, want in (("0.0.0.0", "127.0.0.1"), ("10.1.2.3", "10.1.2.3")):
        srv = TritonServer(tmp_path, host=host, grpc_port=9101, http_port=9100)
        try:
            assert srv.env()[URL_ENV] == f"{want}:9101" and srv.env()[HTTP_URL_ENV] == f"{want}:9100"
        finally:
            shutil.rmtree(srv.workdir)


def test_llm_link_names_the_address_it_cannot_reach():
    """A server whose entry model looks for the LLM step at the wrong address says which address and how to
    set it, and the next request fails the same way (a new stream, not a broken one)."""
    from triton_repo.llm_link import URL_ENV, LLMLink

    link = LLMLink(url="127.0.0.1:1")
    for _ in range(2):
        with pytest.raises(ValueError, match=rf"cannot reach the LLM step at 127\.0\.0\.1:1.*{URL_ENV}"):
            list(link.generate([("input_ids", np.zeros((1, 3), np.int32))], ["output_ids"], "r"))
    link.close()
