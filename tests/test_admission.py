"""Admission at the entry model against a real tritonserver, with the null engine (the contract target's LLM step
running no model, models/llm_step.NullLLMModel): a closed-loop client at 4× the max batch size — perf_analyzer's
pattern, one kept stream per slot — queues and completes; beyond the bound the answer is "server busy"."""

from clients.loadgen import run_closed_loop
from clients.workloads import load_workload
from runtime.core.build_dir import read_limits
from tests.conftest import server_ports
from triton_repo.generate import generate_repo
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
        samples, _ = run_closed_loop(srv.grpc_url, "nvlm", items, 2 * batch, 4 * batch, max_tokens=16, seed=0)
        busy = [s for s in samples if not s.ok]
        assert busy and all("server busy" in s.error for s in busy)
        assert sum(s.ok for s in samples) >= batch  # the batch itself was served
