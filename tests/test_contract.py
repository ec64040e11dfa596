"""The trt target against NVIDIA's `tensorrtllm` backend contract (triton_repo/contracts/…json).

1. Rendered trt repositories (bf16, fp16, fp8 + FP8 KV, int4_awq; TP1 and TP2) meet the contract:
   required parameters present, NVIDIA's inputs exactly, every tensor the entry model sends declared
   with the same dtype, table dtype = engine dtype, KV-cache reuse keyed per image, vision dtype =
   the exported encoder's. The check itself catches each fault the issue found (mutated repositories).
2. The contract target (trt repository, GPU backends replaced by enforcing stand-ins) is served by the
   real tritonserver: the same tokens as the reference target for text, one and two images, streaming
   and not; a wrong table dtype or a missing parameter fails with the real backend's message.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from builder.engine_build import DeploymentOptions, build_deployment
from builder.llm_build import build_llm
from clients.triton_client import ClientError, NVLMClient
from runtime.core.families import NVLM_D
from runtime.core.limits import EngineLimits
from runtime.core.llm_formats import LLMBuildOptions, get_format
from tests.conftest import ROOT, server_ports
from triton_repo.check import check_repository
from triton_repo.contract import load_contract
from triton_repo.generate import generate_repo
from triton_repo.specs import llm_step_sends, parse

IMAGE = ROOT / "assets" / "demo_scene.png"
CASES = [("bf16", 1, False), ("bf16", 2, False), ("fp16", 1, False), ("fp8", 1, True), ("fp8", 2, True),
         ("int4_awq", 1, False), ("int4_awq", 2, False)]


@pytest.fixture(scope="module")
def build(tmp_path_factory, demo_ckpt):
    """bf16 LLM, fp16 vision encoder (the default): the table must be BF16 and the pixels FP16."""
    out = tmp_path_factory.mktemp("contract") / "build"
    opts = DeploymentOptions(LLMBuildOptions(get_format("bf16")), target="reference", vision_dtype="fp16",
                              calib_size=4, limits=EngineLimits(max_images_per_request=4))
    build_deployment(demo_ckpt, out, opts)
    return out


@pytest.fixture(scope="module")
def variant(build, demo_ckpt, tmp_path_factory):
    """A build directory per (format, TP): the engine build's files with another LLM checkpoint."""
    made = {}

    def make(quant, tp, kv_fp8):
        key = (quant, tp, kv_fp8)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{quant}_tp{tp}") / "build"
            shutil.copytree(build, root, ignore=shutil.ignore_patterns("llm", "triton_repo"))
            build_llm(demo_ckpt, root / "llm", LLMBuildOptions(get_format(quant), tp=tp, kv_cache_fp8=kv_fp8),
                      calib_size=4, fidelity=False)
            made[key] = root
        return made[key]

    return make


def _configs(repo: Path) -> dict:
    return {d.name: parse((d / "config.pbtxt").read_text()) for d in repo.iterdir() if (d / "config.pbtxt").is_file()}


@pytest.mark.parametrize("quant, tp, kv_fp8", CASES)
def test_trt_repository_meets_the_backend_contract(variant, tmp_path, quant, tp, kv_fp8):
    import onnx

    root = variant(quant, tp, kv_fp8)
    generate_repo(root, tmp_path / "repo", "trt")  # raises ContractError on any violation
    cfg = _configs(tmp_path / "repo")
    contract = load_contract()
    llm = cfg["tensorrt_llm"]
    engine = {"bfloat16": "BF16", "float16": "FP16"}[json.loads((root / "llm" / "config.json").read_text())["dtype"]]
    assert engine == ("FP16" if quant == "fp16" else "BF16")  # quantized formats keep bf16 activations
    assert llm.backend == "tensorrtllm" and llm.model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert set(contract.required_parameters) <= set(params)
    assert params["tokenizer_dir"] == params["xgrammar_tokenizer_info_path"] == params["guided_decoding_backend"] == ""
    assert params["gpt_model_path"] == str(root / "engines" / "llm")
    assert 0.1 < float(params["kv_cache_free_gpu_mem_fraction"]) < 0.9  # the vision engine's share is kept out
    declared = {i.name: i for i in llm.input}
    assert [i.name for i in llm.input] == [e.name for e in contract.inputs]
    from triton_repo.specs import dtype_name

    assert dtype_name(declared["prompt_embedding_table"].data_type) == engine
    assert dtype_name(declared["seed"].data_type) == "UINT64" and "random_seed" not in declared
    assert "min_tokens" in declared and "min_length" not in declared
    for name, dtype in llm_step_sends(engine, NVLM_D).items():  # everything the entry sends, as declared
        assert dtype_name(declared[name].data_type) == dtype, name
    # KV-cache reuse on, and images keyed: the entry sends prompt_table_extra_ids
    assert params["enable_kv_cache_reuse"] == "true" and "prompt_table_extra_ids" in llm_step_sends(engine, NVLM_D)
    # the vision plan's I/O = the exported encoder's dtype, which the entry is told to send
    vis = cfg["vision_encoder"]
    onnx_in = onnx.load(str(root / "vision" / "vision_encoder.onnx"), load_external_data=False).graph.input[0]
    assert onnx_in.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert dtype_name(vis.input[0].data_type) == "FP16" == cfg["nvlm"].parameters["vision_dtype"].string_value
    assert cfg["nvlm"].parameters["prompt_table_dtype"].string_value == engine
    assert list(vis.instance_group[0].gpus) == [0]
    # client-facing names follow NVIDIA's ensemble template
    entry = {i.name: dtype_name(i.data_type) for i in cfg["nvlm"].input}
    for e in contract.client_inputs:
        assert entry[e.name] == e.dtype, e.name


def _mutate(repo: Path, model: str, old: str, new: str) -> None:
    path = repo / model / "config.pbtxt"
    text = path.read_text()
    assert old in text, (model, old)
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("model, old, new, expect", [
    ("tensorrt_llm", 'key: "tokenizer_dir"', 'key: "tokenizer_path"', "Cannot find parameter with name: tokenizer_dir"),
    ("tensorrt_llm", 'key: "guided_decoding_backend"', 'key: "guided_decoding"',
     "Cannot find parameter with name: guided_decoding_backend"),
    ("tensorrt_llm", 'name: "prompt_embedding_table"\n  data_type: TYPE_BF16',
     'name: "prompt_embedding_table"\n  data_type: TYPE_FP16', "Request embedding table data type doesn't match"),
    ("tensorrt_llm", 'name: "seed"\n  data_type: TYPE_UINT64', 'name: "random_seed"\n  data_type: TYPE_INT64',
     "does not declare input 'seed'"),
    ("tensorrt_llm", 'name: "min_tokens"', 'name: "min_length"', "does not declare input 'min_tokens'"),
    ("tensorrt_llm", 'string_value: "inflight_fused_batching"', 'string_value: "ifb"', "Invalid gpt_model_type"),
    ("vision_encoder", "TYPE_FP16", "TYPE_FP32", "vision_encoder declares pixel_values as FP32"),
])
def test_the_check_catches_each_fault(build, tmp_path, model, old, new, expect):
    repo = tmp_path / "repo"
    generate_repo(build, repo, "trt")
    _mutate(repo, model, old, new)
    problems = check_repository(repo, engine="BF16", sends=llm_step_sends("BF16", NVLM_D), vision_sends="FP16")
    assert any(expect in p for p in problems), problems


def test_reuse_without_image_keys_is_flagged(build, tmp_path):
    repo = tmp_path / "repo"
    generate_repo(build, repo, "trt")
    sends = {k: v for k, v in llm_step_sends("BF16", NVLM_D).items() if k != "prompt_table_extra_ids"}
    assert any("not keyed" in p for p in check_repository(repo, engine="BF16", sends=sends))
    _mutate(repo, "tensorrt_llm", 'key: "enable_kv_cache_reuse"\n  value {\n    string_value: "true"',
            'key: "enable_kv_cache_reuse"\n  value {\n    string_value: "false"')
    assert check_repository(repo, engine="BF16", sends=sends) == []


def test_trt_plan_link_is_relative_inside_the_build(build, tmp_path):
    """engines/build_engines.sh rewrites triton_repo/ after building the plan; the link must survive
    moving the whole build directory."""
    moved = tmp_path / "b"
    shutil.copytree(build, moved, ignore=shutil.ignore_patterns("triton_repo"))
    (moved / "engines" / "vision_encoder.engine").write_bytes(b"plan")
    generate_repo(moved, moved / "triton_repo", "trt")
    link = moved / "triton_repo" / "vision_encoder" / "1" / "model.plan"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute() and link.read_bytes() == b"plan"
    script = (build / "engines" / "build_engines.sh").read_text()
    assert "triton-repo . -o triton_repo --target trt --entry-instances auto --force" in script


# --------------------------------------------------------------------------- served: the contract target


def _serve(repo: Path, slot: int):
    from triton_repo.server import TritonServer

    base = server_ports(slot)
    return TritonServer(repo, grpc_port=base, http_port=base + 1, metrics_port=base + 2)


@pytest.fixture(scope="module")
def servers(build, tmp_path_factory):
    repo = tmp_path_factory.mktemp("contract_repo") / "repo"
    generate_repo(build, repo, "contract")
    with _serve(repo, 3) as contract, _serve(build / "triton_repo", 4) as reference:
        yield NVLMClient(contract.grpc_url), NVLMClient(reference.grpc_url)


@pytest.mark.parametrize("prompt, images", [
    ("Write one sentence about the sea.", []),
    ("What shapes are in this picture?", [IMAGE]),
    ("Compare <image> and <image>.", [IMAGE, IMAGE]),
])
@pytest.mark.parametrize("stream", [False, True])
def test_contract_target_answers_as_the_reference_target(servers, prompt, images, stream):
    contract, reference = servers
    want = reference.generate(prompt, images, max_tokens=8, stream=stream)
    got = contract.generate(prompt, images, max_tokens=8, stream=stream)
    assert got.tokens == want.tokens and got.text == want.text
    # sampled too: seed (UINT64) reaches the executor on both targets
    kw = dict(max_tokens=8, temperature=5.0, top_k=0, seed=2**63 + 7, stream=stream)
    assert contract.generate(prompt, images, **kw).tokens == reference.generate(prompt, images, **kw).tokens


def test_decoding_controls_reach_the_step_under_nvidia_s_names(servers):
    """Stop words, bad words, penalties and log-probs through NVIDIA's `tensorrt_llm` I/O (the stand-in
    declares exactly the backend's inputs, so a wrong name or dtype is refused by Triton)."""

    contract, reference = servers
    plain = reference.generate("Write one sentence about the sea.", max_tokens=8)
    for d in (dict(presence_penalty=-1e4, return_log_probs=True), dict(repetition_penalty=5.0, frequency_penalty=30.0),
              dict(stop_words=("sea",), bad_words=("the",), return_log_probs=True)):
        for stream in (False, True):
            want = reference.generate("Write one sentence about the sea.", max_tokens=8, stream=stream, **d)
            got = contract.generate("Write one sentence about the sea.", max_tokens=8, stream=stream, **d)
            assert got.tokens == want.tokens and got.text == want.text and got.log_probs == want.log_probs, d
    assert contract.generate("Write one sentence about the sea.", max_tokens=8,
                             presence_penalty=-1e4).tokens != plain.tokens


def test_token_counts_and_min_tokens_reach_the_step(servers):
    contract, _ = servers
    extra = {"return_num_input_tokens": ("BOOL", np.array([True])),
             "return_num_output_tokens": ("BOOL", np.array([True]))}
    for stream in (False, True):
        ans = contract.generate("Hello there.", max_tokens=5, stream=stream, extra=extra)
        assert ans.counts["num_output_tokens"] == len(ans.tokens) == 5
        assert ans.counts["num_input_tokens"] > 5


@pytest.mark.parametrize("null_engine", [False, True], ids=["stand-in", "null-engine"])
def test_wrong_table_dtype_fails_with_the_backends_message(build, tmp_path, null_engine):
    """The original fault: an FP16 table declared and sent to a BF16 engine. Triton accepts it (config
    and request agree); the backend refuses it per request, as the stand-in does — and the benchmarks' null
    engine, which checks requests as the stand-in does. Text still works."""
    repo = tmp_path / "repo"
    generate_repo(build, repo, "contract", null_engine=null_engine)
    _mutate(repo, "tensorrt_llm", 'name: "prompt_embedding_table"\n  data_type: TYPE_BF16',
            'name: "prompt_embedding_table"\n  data_type: TYPE_FP16')
    _mutate(repo, "nvlm", 'string_value: "BF16"', 'string_value: "FP16"')
    with _serve(repo, 5) as server:
        client = NVLMClient(server.grpc_url)
        with pytest.raises(ClientError, match="Request embedding table data type doesn't match model weight data type"):
            client.generate("What is this?", [IMAGE], max_tokens=4)
        assert len(client.generate("Hello there.", max_tokens=4).tokens) == 4


@pytest.mark.parametrize("null_engine", [False, True], ids=["stand-in", "null-engine"])
def test_missing_parameter_fails_the_load_with_the_backends_message(build, tmp_path, null_engine):
    """The stand-in, and the null engine like it, refuse at load what the backend refuses at load."""
    from triton_repo.server import ServerError

    repo = tmp_path / "repo"
    generate_repo(build, repo, "contract", null_engine=null_engine)
    _mutate(repo, "tensorrt_llm", 'key: "xgrammar_tokenizer_info_path"', 'key: "xgrammar_info"')
    server = _serve(repo, 5)
    try:
        with pytest.raises(ServerError, match="Cannot find parameter with name: xgrammar_tokenizer_info_path"):
            server.start()
    finally:
        server.stop()  # a failed start keeps its log for the user; the test removes it


@pytest.mark.parametrize("target", ["reference", "contract"])
def test_generated_models_apply_pythonpath_that_the_stub_ignores(build, tmp_path, target):
    """The Python backend's stub embeds an interpreter that ignores PYTHONPATH, so a server started with PYTHONPATH
    pointing at another checkout (benchmarks' --baseline-tree) served the installed tree's models. Every generated
    model.py applies it itself: run in an isolated interpreter (`-I`, which ignores PYTHONPATH as the stub does),
    its preamble puts PYTHONPATH's entries first, so `triton_repo` comes from there."""
    import subprocess
    import sys

    repo = tmp_path / "repo"
    generate_repo(build, repo, target)
    other = tmp_path / "other_checkout"
    (other / "triton_repo").mkdir(parents=True)
    (other / "triton_repo" / "__init__.py").write_text("")
    (other / "triton_repo" / "serving.py").write_text("def __getattr__(name):\n    return type(name, (), {})\n")
    for model in ("nvlm", "tensorrt_llm", "preprocessing"):
        source = (repo / model / "1" / "model.py").read_text()
        probe = source + "\nimport triton_repo\nprint(triton_repo.__file__)\n"
        out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True,
                             env={"PYTHONPATH": str(other), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(other / "triton_repo" / "__init__.py"), model
        alone = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True,
                               env={"PATH": "/usr/bin:/bin"})  # without it: the installed tree, as before
        assert str(other) not in alone.stdout
