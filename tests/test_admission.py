"""Admission at the entry model against a real tritonserver, with the null engine (the contract target's LLM step
running no model, models/llm_step.NullLLMModel): a closed-loop client at 4× the max batch size — perf_analyzer's
pattern, one kept stream per slot — queues and completes; beyond the bound the answer is "server busy", and the
keeper's probe is still answered then (it takes no user's place)."""

import threading
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
