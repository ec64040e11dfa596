"""The deployment kit every build carries (builder/deploy.py). Nothing here runs on a GPU: the
commands are checked as text, against NVIDIA's launch_triton_server.py (leader mode)."""

import os
import shlex
import subprocess

import pytest

from builder.deploy import TRITON_IMAGE, dockerfile, launch_script, tritonserver_command


def test_single_gpu_is_one_tritonserver():
    cmd = tritonserver_command(1, "/build/triton_repo", grpc_port="8001", http_port="8000", metrics_port="8002")
    assert cmd[0] == "/opt/tritonserver/bin/tritonserver" and "mpirun" not in cmd
    assert "--model-repository=/build/triton_repo" in cmd and "--grpc-port=8001" in cmd
    assert not any(c.startswith("--load-model") for c in cmd)


@pytest.mark.parametrize("world", [2, 4])
def test_tp_uses_mpi_leader_mode(world):
    cmd = tritonserver_command(world, "/build/triton_repo")
    assert cmd[:2] == ["mpirun", "--allow-run-as-root"]
    ranks = " ".join(cmd[2:]).split(" : ")
    assert len(ranks) == world
    for i, rank in enumerate(ranks):
        words = rank.split()
        assert words[:3] == ["-n", "1", "/opt/tritonserver/bin/tritonserver"]
        assert f"--backend-config=python,shm-region-prefix-name=prefix{i}_" in words
        # rank 0 serves every model; the workers load only the engine
        assert ("--load-model=tensorrt_llm" in words) == (i > 0)
        assert ("--model-control-mode=explicit" in words) == (i > 0)


def test_launch_script_is_valid_bash_and_expands_the_build_path(tmp_path):
    script = tmp_path / "launch.sh"
    script.write_text(launch_script(2))
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert '"--model-repository=$BUILD/triton_repo"' in text  # double-quoted: the shell expands it
    assert "WORLD=2" in text and "engines/build_engines.sh" in text and "--target trt --entry-instances auto --force" in text
    # the entry model's link to the LLM step (triton_repo/llm_link.py) gets the port the server listens on
    lines = [ln for ln in text.splitlines() if ln.startswith(("GRPC_PORT=", "export NVLM_TRITON_GRPC_URL="))]
    assert len(lines) == 2
    got = subprocess.run(["bash", "-c", "; ".join(lines) + '; echo "$NVLM_TRITON_GRPC_URL $NVLM_TRITON_HTTP_URL"'],
                         env={"GRPC_PORT": "9101", "HTTP_PORT": "9100", "PATH": os.environ["PATH"]},
                         capture_output=True, text=True)
    assert got.stdout.strip() == "127.0.0.1:9101 127.0.0.1:9100"


def test_dockerfile_installs_nvlm_trt_into_the_ngc_image():
    text = dockerfile()
    assert f"ARG TRITON_IMAGE={TRITON_IMAGE}" in text and "trtllm-python-py3" in TRITON_IMAGE
    assert "pip install --no-cache-dir --no-deps /opt/nvlm-trt" in text
    pip = shlex.split(text.split("RUN ", 1)[1].replace("\\\n", " "))
    assert "pillow>=9.1,<12.2" in pip and "tritonclient[grpc]>=2.48" in pip
    assert "import triton_repo.serving" in text


def test_engine_build_ships_the_kit(tmp_path, demo_ckpt):
    from builder.engine_build import DeploymentOptions, build_deployment
    from runtime.core.llm_formats import LLMBuildOptions, get_format

    out = tmp_path / "b"
    build_deployment(demo_ckpt, out, DeploymentOptions(LLMBuildOptions(get_format("bf16"), tp=2), target="reference",
                                                    vision_dtype="fp32", calib_size=4))
    kit = out / "deploy"
    assert (kit / "Dockerfile").is_file() and (kit / "launch.sh").stat().st_mode & 0o111
    assert "WORLD=2" in (kit / "launch.sh").read_text()
    for pkg in ("builder", "runtime", "plugins", "triton_repo"):
        assert (kit / "nvlm-trt" / pkg / "__init__.py").is_file()
    assert (kit / "nvlm-trt" / "runtime" / "core" / "__init__.py").is_file()
    assert (kit / "nvlm-trt" / "triton_repo" / "contracts" / "tensorrtllm_backend_1.2.json").is_file()
    assert not list(kit.rglob("__pycache__"))
