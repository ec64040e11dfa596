"""Soak: the entry model driven the way perf_analyzer drives it — one gRPC stream kept open per
concurrency slot and the next request sent on it as soon as the last one ended — text and image
requests mixed, every answer checked against the in-process pipeline, and no backend stub may die
(a dead stub would be restarted by the keeper, so the stubs' PIDs before and after are compared).

CI runs NVLM_SOAK_REQUESTS (default 2,000); docs/serving.md records a longer run of the same command.
"""

import os
import time
from pathlib import Path

import pytest

from clients.loadgen import run_closed_loop, summarize
from clients.triton_client import NVLMClient
from clients.workloads import load_workload
from tests.conftest import descendants, server_ports

REQUESTS = int(os.environ.get("NVLM_SOAK_REQUESTS", "2000"))
MAX_TOKENS = 4


def _stubs(root: int) -> dict[int, str]:
    """{pid: model name} of every Python backend stub below `root` (its argv: stub, REPO/MODEL/1/model.py, …)."""
    out = {}
    for pid in descendants(root):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"triton_python_backend_stub"):
            out[pid] = Path(argv[1].decode()).parts[-3]
    return out


@pytest.mark.soak
def test_persistent_streams_soak(serve_build):
    from runtime.local_pipeline import LocalPipeline
    from triton_repo.server import TritonServer

    items = load_workload("mixed:1", seed=0)
    assert {i.label for i in items} == {"text", "1 tiles"}
    pipeline = LocalPipeline(serve_build, max_images=4)
    expected = [pipeline.generate(i.prompt, [open(p, "rb").read() if isinstance(p, (str, os.PathLike)) else p
                                             for p in i.images], MAX_TOKENS) for i in items]
    base = server_ports(5)
    with TritonServer(serve_build / "triton_repo", grpc_port=base, http_port=base + 1,
                      metrics_port=base + 2) as srv:
        before = _stubs(srv.proc.pid)
        assert {"nvlm", "tensorrt_llm", "preprocessing", "vision_encoder"} <= set(before.values()), before
        t0 = time.perf_counter()
        samples, wall = run_closed_loop(srv.grpc_url, "nvlm", items, 4, REQUESTS, MAX_TOKENS, seed=0,
                                        keep_streams=True)
        after = _stubs(srv.proc.pid)
        assert NVLMClient(srv.grpc_url).client.is_server_ready()
    report = summarize(samples, wall)
    print(f"soak: {REQUESTS} requests on 4 kept-open streams in {time.perf_counter() - t0:.0f} s, "
          f"{report['failed']} failed")
    assert report["requests"] == REQUESTS and report["failed"] == 0, report["errors"]
    assert after == before, "a backend stub died (or was restarted) during the soak"
    wrong = [(s.index, s.token_ids) for s in samples if s.token_ids != expected[s.index % len(items)]]
    assert not wrong, f"{len(wrong)} answers differ from the in-process pipeline, e.g. {wrong[:3]}"
