"""Admission at the entry model against a real tritonserver, with the null engine (the contract target's LLM step
running no model, models/llm_step.NullLLMModel): a closed-loop client at 4× the max batch size — perf_analyzer's
pattern, one kept stream per slot — queues and completes; beyond the bound the answer is "server busy", and the
keeper's probe is still answered then (it takes no user's place)."""

import threading
import time
import urllib.request

from clients.loadgen import run_closed_loop
from clients.triton_client import ClientError, NVLMClient
from clients.workloads import load_workload
from runtime.core.build_dir import read_limits
from tests.conftest import server_ports
from triton_repo.generate import generate_repo
from triton_repo.keeper import Probe
from triton_repo.server import TritonServer


def _serve(repo, **kw):
    base = server_ports(8)
    return TritonServer(repo, grpc_port=base, http_port=base + 1, metrics_port=base + 2, hang_timeout=0, **kw)


def test_a_closed_loop_at_four_times_the_batch_queues_and_past_the_bound_is_busy(serve_build, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    generate_repo(serve_build, repo, "contract", null_engine=True)
    batch = read_limits(serve_build).max_batch_size
    items = load_workload("text", 0)
    # each token one 20 ms step of the null engine: requests overlap, so 4× the batch really waits in the queue
    monkeypatch.setenv("NVLM_NULL_STEP_MS", "20")
    with _serve(repo) as srv:
        samples, _ = run_closed_loop(srv.grpc_url, "nvlm", items, 4 * batch, 8 * batch, max_tokens=16, seed=0,
                                     keep_streams=True)
        assert len(samples) == 8 * batch and all(s.ok for s in samples), {s.error for s in samples if not s.ok}
        assert all(s.tokens == 16 for s in samples)
    with _serve(repo, max_queue=0) as srv:  # nvlm-serve --max-queue 0: the batch and nothing beyond
        streaming = [threading.Event() for _ in range(batch)]

        def user(k):  # 400 steps of 20 ms: every place is held for seconds once all have started streaming
            NVLMClient(srv.grpc_url).generate("hi", max_tokens=400, stream=True,
                                               on_text=lambda _: streaming[k].set())

        users = [threading.Thread(target=user, args=(k,)) for k in range(batch)]
        [u.start() for u in users]
        assert all(e.wait(60) for e in streaming)
        try:
            NVLMClient(srv.grpc_url).generate("hi", max_tokens=1)
            refused = None
        except ClientError as e:
            refused = str(e)
        assert refused and "server busy" in refused
        # the keeper's probe, at that moment: answered, not refused
        probe = urllib.request.Request(f"http://{srv.host}:{srv.http_port}/v2/models/nvlm/generate_stream",
                                       data=Probe.BODY, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(probe, timeout=60) as r:
            assert r.status == 200 and "server busy" not in r.read().decode()
        [u.join() for u in users]


def _entry_processes(srv) -> int:
    """Python stubs of the entry model under this server (its instances are processes)."""
    from pathlib import Path

    n = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            n += "triton_python_backend_stub" in cmd and f"{srv.repo}/nvlm/1/model.py" in cmd
    return n


def test_three_entry_instances_answer_alike_and_share_one_bound(serve_build, tmp_path, monkeypatch):
    """The entry model as three processes: the same tokens as one for a mix of requests sent together (the
    reference executor; a dropped image or a mixed-up request differs), one admission bound for the three
    (a shared count), and a cancelled stream is stopped in the LLM step."""
    import pytest
    import tritonclient.grpc as grpcclient

    from tests.test_serving import IMAGE

    jobs = [("Describe a cat.", []), ("What is in <image>?", [IMAGE]), ("Count to three.", []),
            ("What colour is <image>?", [IMAGE]), ("Hello there.", []), ("Name a shape.", [])]

    def answers(srv):
        out = [None] * len(jobs)

        def ask(k):
            a = NVLMClient(srv.grpc_url).generate(jobs[k][0], jobs[k][1], max_tokens=6, stream=k % 2 == 0,
                                                  return_log_probs=True)
            out[k] = (a.tokens, a.log_probs)

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(jobs))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        return out

    three = tmp_path / "three"
    generate_repo(serve_build, three, "reference", entry_instances=3)
    with _serve(serve_build / "triton_repo") as srv:
        one_answers = answers(srv)
    with _serve(three) as srv:
        assert _entry_processes(srv) == 3
        three_answers = answers(srv)
    # the random default's tokens hardly depend on the prompt; its log-probs do, so they tell requests apart
    assert len({tuple(lps) for _, lps in one_answers}) == len(jobs)
    for (tokens, lps), (tokens3, lps3) in zip(one_answers, three_answers):
        assert tokens3 == tokens and lps3 == pytest.approx(lps, abs=1e-4)

    null3 = tmp_path / "null3"
    generate_repo(serve_build, null3, "contract", null_engine=True, entry_instances=3)
    monkeypatch.setenv("NVLM_NULL_STEP_MS", "20")
    batch = read_limits(serve_build).max_batch_size
    with _serve(null3, max_queue=0) as srv:
        assert _entry_processes(srv) == 3
        streaming = [threading.Event() for _ in range(batch)]

        def user(k):
            NVLMClient(srv.grpc_url).generate("hi", max_tokens=400, stream=True, on_text=lambda _: streaming[k].set())

        users = [threading.Thread(target=user, args=(k,)) for k in range(batch)]
        [u.start() for u in users]
        assert all(e.wait(60) for e in streaming)
        try:  # the batch is in flight over three processes: one more is refused by the shared bound
            NVLMClient(srv.grpc_url).generate("hi", max_tokens=1)
            refused = None
        except ClientError as e:
            refused = str(e)
        assert refused and "server busy" in refused
        [u.join() for u in users]
        # a stream cancelled after its first tokens: the LLM step stops it early (its own log line says so)
        before = srv.log_file.read_text().count("cancelled after")
        c, got = grpcclient.InferenceServerClient(srv.grpc_url), []
        c.start_stream(callback=lambda result, error: got.append((result, error)))
        c.async_stream_infer("nvlm", NVLMClient(srv.grpc_url)._inputs("hi", (), 1000, True, {}))
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(got) >= 2 and all(e is None for _, e in got[:2]), got[:2]  # streaming when cancelled
        c.stop_stream(cancel_requests=True)
        while srv.log_file.read_text().count("cancelled after") == before and time.monotonic() < deadline + 60:
            time.sleep(0.2)
        line = [ln for ln in srv.log_file.read_text().splitlines() if "cancelled after" in ln][before]
        assert int(line.split("cancelled after ")[1].split()[0]) < 1000
