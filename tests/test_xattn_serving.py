"""NVLM-X and NVLM-H served for real: their builds' repositories on the bundled tritonserver, over gRPC, on the
reference target and on the contract target (the stand-in that declares NVIDIA's `tensorrtllm` I/O, here its
encoder-decoder inputs: `encoder_input_features`, `encoder_output_lengths`, `cross_attention_mask`).

The embedded defaults' greedy answers hardly depend on the image (their conditioned head decides the next
token from the last one), so every comparison includes the answer's log-probabilities, which do: two
different images give different log-probs, and the served ones equal the in-process pipeline's for the
right image (a dropped, swapped or mixed-up image fails)."""

import io
import threading
from pathlib import Path

import pytest

from builder.engine_build import DeploymentOptions, build_deployment
from clients.triton_client import ClientError, NVLMClient
from runtime.core.build_dir import engine_dtype, read_family, read_limits
from runtime.core.demo_checkpoint import write_demo_checkpoint
from runtime.core.limits import EngineLimits
from runtime.core.llm_formats import LLMBuildOptions, get_format
from runtime.local_pipeline import LocalPipeline
from runtime.scenes import synthetic_scene
from tests.conftest import server_ports
from triton_repo.generate import generate_repo
from triton_repo.server import TritonServer

LOG_PROBS = {"return_log_probs": True}


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
    build_deployment(ckpt, build, DeploymentOptions(LLMBuildOptions(get_format("bf16")), target="reference",
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
        _same(client.generate(prompt, images, max_tokens=6, stream=stream, **LOG_PROBS), want)


def test_the_answer_depends_on_the_image(family):
    """The same question about two images: different log-probs, each equal to its own image's locally."""
    _, (client, _), local = family
    got = [client.generate("What shapes are in this picture?", [img], max_tokens=4, **LOG_PROBS)
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
        _same(client.generate("What is this?", [IMAGES[1]], max_tokens=4, **LOG_PROBS),
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
            results[k] = c.generate(*jobs[k], max_tokens=6, stream=True, **LOG_PROBS)
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
    _same(contract.generate(prompt, images, max_tokens=4, **LOG_PROBS),
          local.run(prompt, images, 4, return_log_probs=True))


def _bf16_input(grpcclient, name, arr):
    """A BF16 input (tritonclient ≥ r26.06 takes ml_dtypes' bfloat16 arrays)."""
    import ml_dtypes

    t = grpcclient.InferInput(name, list(arr.shape), "BF16")
    t.set_data_from_numpy(arr.astype(ml_dtypes.bfloat16))
    return t


def test_the_engine_script_builds_with_the_projects_model_definition(family):
    """Where TensorRT is missing the engines stage is pending, and its GPU-host script builds the LLM engine with
    this project's model definition: trtllm-build --model_cls_file names the file that the host's nvlm-trt holds
    (found there, here this checkout's), the class is the family's architecture, the rank builds run in one
    process, and the encoder length is the build's. Run here, the script gets as far as trtllm-build."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    from tests.conftest import ROOT

    variant, _, local = family
    build = local.llm_dir.parent
    details = json.loads((build / "manifest.json").read_text())["stages"]["engines"]["details"]
    assert details["status"] == "pending" and "TensorRT" in details["reason"]
    script = (build / "engines" / "build_engines.sh").read_text()
    arch = {"x": "NVLMXForCausalLM", "h": "NVLMHForCausalLM"}[variant]
    line = next(x for x in script.splitlines() if x.startswith("trtllm-build"))
    words = shlex.split(line.replace('"$NVLM_MODEL_FILE"', "MODEL_FILE"))
    flags = {words[i]: words[i + 1] for i in range(1, len(words) - 1) if words[i].startswith("--")}
    limits = read_limits(build)
    assert flags["--model_cls_file"] == "MODEL_FILE" and flags["--model_cls_name"] == arch
    assert flags["--workers"] == "1" and flags["--max_encoder_input_len"] == str(limits.max_encoder_input_len)
    assert ("--max_multimodal_len" in flags) == (variant == "h")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    find = next(x for x in script.splitlines() if x.startswith("NVLM_MODEL_FILE="))
    got = subprocess.run(["bash", "-c", f"cd /; {find}; echo \"$NVLM_MODEL_FILE\""], capture_output=True,
                         text=True, env=env)
    assert Path(got.stdout.strip()) == ROOT / "builder" / "trtllm_nvlm.py", got.stderr
    run = subprocess.run(["bash", str(build / "engines" / "build_engines.sh")], capture_output=True, text=True,
                         env={**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin"})
    assert run.returncode != 0 and "trtllm-build" in run.stderr  # not installed here: the next step is the engine


def test_the_trt_repository_splits_the_kv_memory_and_reuses_no_block(family, tmp_path):
    """An engine with cross-attention needs the backend's cross_kv_cache_fraction (it refuses to load without it)
    and no KV-cache block reuse (a block is found by its tokens, not by the images mixed into it): the generated
    trt repository carries both, the check flags either missing, and the contract stand-in refuses to load
    without the fraction, with the backend's message."""
    import json

    from runtime.core.xattn_engine import cross_kv_cache_fraction, engine_layers
    from triton_repo.check import check_repository
    from triton_repo.serving import StandInLLMModel
    from triton_repo.specs import llm_step_sends, parse

    variant, _, local = family
    build = local.llm_dir.parent
    repo = tmp_path / "trt"
    generate_repo(build, repo, "trt")
    cfg_path = repo / "tensorrt_llm" / "config.pbtxt"
    params = {k: v.string_value for k, v in parse(cfg_path.read_text()).parameters.items()}
    limits = read_limits(build)
    want = cross_kv_cache_fraction(engine_layers(json.loads((build / "llm" / "config.json").read_text())),
                                   max_encoder_input_len=limits.max_encoder_input_len, max_seq_len=limits.max_seq_len)
    assert float(params["cross_kv_cache_fraction"]) == want and params["enable_kv_cache_reuse"] == "false"
    engine = engine_dtype(json.loads((build / "llm" / "config.json").read_text()))
    sends = llm_step_sends(engine, read_family(build))
    assert "skip_cross_attn_blocks" in sends
    assert check_repository(repo, engine=engine, sends=sends) == []
    text = cfg_path.read_text()
    reuse = 'key: "enable_kv_cache_reuse"\n  value {\n    string_value: "%s"'
    assert reuse % "false" in text
    cfg_path.write_text(text.replace(reuse % "false", reuse % "true"))
    assert any("block reuse is on for an engine with cross-attention" in p
               for p in check_repository(repo, engine=engine, sends=sends))
    cfg_path.write_text(text.replace('key: "cross_kv_cache_fraction"', 'key: "cross_kv_fraction"'))
    assert any("Must set crossKvCacheFraction" in p for p in check_repository(repo, engine=engine, sends=sends))
    stand_in = {"gpt_model_type": "inflight_fused_batching", "tokenizer_dir": "", "xgrammar_tokenizer_info_path": "",
                "guided_decoding_backend": "", "gpt_model_path": str(build / "engines" / "llm")}
    args = {"model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in stand_in.items()}})}
    with pytest.raises(RuntimeError, match="Must set crossKvCacheFraction for encoder-decoder model"):
        StandInLLMModel().initialize(args)
