"""NVLM-X and NVLM-H served for real: their builds' repositories on the bundled tritonserver, over gRPC, on the
reference target and on the contract target (the stand-in that declares NVIDIA's `tensorrtllm` I/O, here its
encoder-decoder inputs: `encoder_input_features`, `encoder_output_lengths`, `cross_attention_mask`).

The embedded defaults' greedy answers hardly depend on the image (their conditioned head decides the next
token from the last one), so every comparison includes the answer's log-probabilities, which do: two
different images give different log-probs, and the served ones equal the in-process pipeline's for the
right image (a dropped, swapped or mixed-up image fails)."""

import io
import threading

import pytest

from builder.engine_build import EngineBuildOptions, build_engine
from runtime.client import ClientError, Decoding, NVLMClient
from runtime.core.demo_checkpoint import write_demo_checkpoint
from runtime.core.engines import EngineLimits
from runtime.core.llm_formats import BuildOptions, get_format
from runtime.local_pipeline import LocalPipeline
from runtime.scenes import synthetic_scene
from tests.conftest import server_ports
from triton_repo.generate import generate_repo
from triton_repo.server import TritonServer

LOG_PROBS = Decoding(log_probs=True)


def _png(w, h, seed) -> bytes:
    b = io.BytesIO()
    synthetic_scene(w, h, seed).save(b, format="PNG")
    return b.getvalue()


IMAGES = [_png(896, 448, 3), _png(448, 448, 4), _png(1400, 700, 5)]  # 3, 1 and 7 tiles


@pytest.fixture(scope="module", params=["x", "h"])
def family(request, tmp_path_factory):
    """A family's reference-target build, served on both targets (slots 3 and 4: test_contract's, free once
    that module's servers are down), and its in-process pipeline."""
    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    ckpt = write_demo_checkpoint(root / "ckpt", variant=request.param)
    build = root / "build"
    build_engine(ckpt, build, EngineBuildOptions(BuildOptions(get_format("bf16")), target="reference",
                                                 vision_dtype="fp32", calib_size=4,
                                                 limits=EngineLimits(max_images_per_request=4)))
    contract_repo = root / "contract_repo"
    generate_repo(build, contract_repo, "contract")
    servers = []
    for repo, slot in ((build / "triton_repo", 3), (contract_repo, 4)):
        base = server_ports(slot)
        servers.append(TritonServer(repo, grpc_port=base, http_port=base + 1, metrics_port=base + 2).start())
    try:
        clients = [NVLMClient(s.grpc_url) for s in servers]
        for c in clients:
            c.check()
        yield request.param, clients, LocalPipeline(build, max_images=4)
    finally:
        for s in servers:
            s.stop()


def _same(answer, result):
    assert answer.tokens == result.tokens
    assert answer.log_probs == pytest.approx(result.log_probs, abs=1e-4)


@pytest.mark.parametrize("prompt, images", [
    ("Write one sentence about the sea.", []),
    ("What shapes are in this picture?", [IMAGES[0]]),
    ("Compare <image> and <image>.", [IMAGES[0], IMAGES[1]]),
])
@pytest.mark.parametrize("stream", [False, True])
def test_served_answers_equal_the_reference_executor(family, prompt, images, stream):
    """Both targets, one- and two-image prompts and text only, streaming and not: the in-process pipeline's
    tokens and log-probs (encoder features, key ranges and, for NVLM-H, thumbnail rows as it builds them)."""
    _, clients, local = family
    want = local.run(prompt, images, 6, return_log_probs=True)
    for client in clients:
        _same(client.generate(prompt, images, max_tokens=6, stream=stream, decoding=LOG_PROBS), want)


def test_the_answer_depends_on_the_image(family):
    """The same question about two images: different log-probs, each equal to its own image's locally."""
    _, (client, _), local = family
    got = [client.generate("What shapes are in this picture?", [img], max_tokens=4, decoding=LOG_PROBS)
           for img in IMAGES[:2]]
    want = [local.run("What shapes are in this picture?", [img], 4, return_log_probs=True) for img in IMAGES[:2]]
    for g, w in zip(got, want):
        _same(g, w)
    assert got[0].log_probs != pytest.approx(got[1].log_probs, abs=1e-3)


def test_a_bad_image_is_refused_and_the_next_request_served(family):
    _, clients, local = family
    for client in clients:
        with pytest.raises(ClientError, match="image"):
            client.generate("What is this?", [b"not an image"], max_tokens=4)
        _same(client.generate("What is this?", [IMAGES[1]], max_tokens=4, decoding=LOG_PROBS),
              local.run("What is this?", [IMAGES[1]], 4, return_log_probs=True))


def test_eight_concurrent_streaming_clients(family):
    """Eight clients at once, streaming, each with its own image (1, 3 and 7 tiles) or none: no error, and each
    gets its own request's answer."""
    _, (client_ref, _), local = family
    jobs = [(f"Question {k}: what is in <image>?", [IMAGES[k % 3]]) if k % 4 else (f"Question {k}: say hello.", [])
            for k in range(8)]
    results, errors = [None] * 8, []

    def one(k):
        try:
            c = NVLMClient(client_ref.url)
            results[k] = c.generate(*jobs[k], max_tokens=6, stream=True, decoding=LOG_PROBS)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for k, (prompt, images) in enumerate(jobs):
        _same(results[k], local.run(prompt, images, 6, return_log_probs=True))


def test_contract_stand_in_refuses_a_mask_of_the_wrong_shape(family):
    """The contract target's `tensorrt_llm` takes NVIDIA's encoder inputs; called directly with a mask that
    does not match the prompt, it refuses (and serves the next request)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    _, (_, contract), local = family
    c = grpcclient.InferenceServerClient(contract.url)
    hidden = local.executor.hidden_size

    def inp(name, arr, dtype):
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    ids = np.asarray([[1, 2, 3]], np.int32)
    feats = np.zeros((1, 5, hidden), np.float32)
    done, got = threading.Event(), []
    c.start_stream(callback=lambda result, error: (got.append(error), done.set()))
    try:
        c.async_stream_infer("tensorrt_llm", [
            inp("input_ids", ids, "INT32"), inp("input_lengths", np.asarray([[3]], np.int32), "INT32"),
            inp("request_output_len", np.asarray([[2]], np.int32), "INT32"),
            inp("encoder_output_lengths", np.asarray([[5]], np.int32), "INT32"),
            inp("cross_attention_mask", np.ones((1, 2, 5), bool), "BOOL")]
            + [_bf16_input(grpcclient, "encoder_input_features", feats)])
        assert done.wait(60)
    finally:
        c.stop_stream()
    assert got and got[0] is not None and "cross_attention_mask is [2, 5], expected [3, 5]" in str(got[0])
    prompt, images = "What is this?", [IMAGES[1]]
    _same(contract.generate(prompt, images, max_tokens=4, decoding=LOG_PROBS),
          local.run(prompt, images, 4, return_log_probs=True))


def _bf16_input(grpcclient, name, arr):
    """A BF16 input (tritonclient ≥ r26.06 takes ml_dtypes' bfloat16 arrays)."""
    import ml_dtypes

    t = grpcclient.InferInput(name, list(arr.shape), "BF16")
    t.set_data_from_numpy(arr.astype(ml_dtypes.bfloat16))
    return t


def test_the_engine_stage_says_why_no_llm_engine_can_be_built(family):
    """No TensorRT-LLM model definition exists for NVLM-X/H yet: the build records the stage as pending with
    that reason, and its GPU-host script stops at the LLM engine with it (exit 2), not at a failing trtllm-build."""
    import json
    import subprocess

    variant, _, local = family
    build = local.llm_dir.parent
    details = json.loads((build / "manifest.json").read_text())["stages"]["engines"]["details"]
    arch = {"x": "NVLMXForCausalLM", "h": "NVLMHForCausalLM"}[variant]
    assert details["status"] == "pending" and f"no TensorRT-LLM model definition for {arch}" in details["reason"]
    script = (build / "engines" / "build_engines.sh").read_text()
    assert "trtllm-build" not in script
    run = subprocess.run(["bash", str(build / "engines" / "build_engines.sh")], capture_output=True, text=True)
    assert run.returncode == 2 and arch in run.stderr
