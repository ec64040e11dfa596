"""The deployment kit in every build directory (`OUT/deploy/`): what a GPU host needs to serve the build.

    deploy/Dockerfile     NGC Triton + TensorRT-LLM 1.2 image with nvlm-trt installed (the Python models
                          import triton_repo.serving, runtime, builder — the stock image has none of them)
    deploy/nvlm-trt/      the nvlm-trt source this build was made with (the Dockerfile's context)
    deploy/launch.sh      inside that image: build the engines if missing, write the trt repository for
                          this host's paths, start tritonserver (TP×PP > 1: MPI leader mode)

Multi-GPU: leader mode (`mpirun -n 1 tritonserver … : -n 1 tritonserver --model-control-mode=explicit
--load-model=tensorrt_llm …`), as NVIDIA's triton_backend/scripts/launch_triton_server.py does for
`--world_size N`. Chosen over orchestrator mode (TRTLLM_ORCHESTRATOR=1 + executor_worker_path) because
it is NVIDIA's default for one model spread over N GPUs, needs no MPI_Comm_spawn (which the
orchestrator uses and which cannot span nodes), and keeps one engine instance; orchestrator mode is
for several engine instances per server. Rank 0 serves every model; the other ranks load only
`tensorrt_llm`. The vision engine is pinned to GPU 0 (its config's instance group).

None of this has run: no GPU, no NGC container here. The commands are tested as text
(tests/test_deploy.py); docs/serving.md walks through them.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

# NGC Triton image whose bundled TensorRT-LLM is the 1.2 line (the last with trtllm-build): 26.05 ships
# TensorRT-LLM 1.2.1 (triton-inference-server/server#8805); NVIDIA's compatibility matrix, as read,
# ends at 25.12 (TensorRT-LLM 1.1.0). launch.sh checks the bundled version at run time.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:26.05-trtllm-python-py3"
TRITONSERVER = "/opt/tritonserver/bin/tritonserver"
PACKAGES = ("builder", "runtime", "plugins", "triton_repo", "clients", "demo_model")
# What the Python models import beyond the NGC image (which has torch, numpy, transformers, tokenizers,
# safetensors). Pillow: NVLM's tiling needs < 12.2 (runtime/preprocess.py:check_pillow); the image's own
# Pillow may be newer. tritonclient: the entry model streams to the LLM step over gRPC (triton_repo/llm_link.py).
CONTAINER_PIP = ("pillow>=9.1,<12.2", "safetensors>=0.4", "tokenizers>=0.19", "tritonclient[grpc]>=2.48")


def tritonserver_command(world_size: int, repo: str, *, grpc_port: str = "${GRPC_PORT}",
                         http_port: str = "${HTTP_PORT}", metrics_port: str = "${METRICS_PORT}") -> list[str]:
    """tritonserver for one build: one process, or MPI leader mode with one rank per GPU."""
    if world_size < 1:
        raise ValueError(f"world size must be ≥ 1, got {world_size}")

    def rank(i: int) -> list[str]:
        cmd = [TRITONSERVER, f"--model-repository={repo}", f"--grpc-port={grpc_port}", f"--http-port={http_port}",
               f"--metrics-port={metrics_port}", "--disable-auto-complete-config",
               f"--backend-config=python,shm-region-prefix-name=prefix{i}_"]
        if i:  # workers: only the engine; rank 0 serves every model and takes the requests
            cmd += ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
        return cmd

    if world_size == 1:
        return rank(0)
    cmd = ["mpirun", "--allow-run-as-root"]
    for i in range(world_size):
        cmd += ["-n", "1"] + rank(i) + ([":"] if i < world_size - 1 else [])
    return cmd


def _sh(cmd: list[str]) -> str:
    """Shell words; a word with a $VAR reference is double-quoted so that the shell expands it."""
    return " ".join(f'"{c}"' if "$" in c else shlex.quote(c) for c in cmd)


def dockerfile() -> str:
    return f"""# nvlm-trt serving image: NGC Triton with the TensorRT-LLM 1.2 backend, plus nvlm-trt for the Python
# models. Build on the GPU host (needs its registry and PyPI):
#   docker build -t nvlm-trt-serve BUILD/deploy
ARG TRITON_IMAGE={TRITON_IMAGE}
FROM ${{TRITON_IMAGE}}
COPY nvlm-trt /opt/nvlm-trt
RUN python3 -m pip install --no-cache-dir {' '.join(shlex.quote(p) for p in CONTAINER_PIP)} \\
 && python3 -m pip install --no-cache-dir --no-deps /opt/nvlm-trt \\
 && python3 -c "import triton_repo.serving, runtime.preprocess, runtime.core.gpu_host"
"""


def launch_script(world_size: int) -> str:
    cmd = _sh(tritonserver_command(world_size, "$BUILD/triton_repo"))
    return f"""#!/usr/bin/env bash
# Serve this build on a GPU host, inside the image of deploy/Dockerfile:
#   docker run --gpus all --rm --net host --shm-size 4g --ulimit memlock=-1 \\
#     -v "$PWD/BUILD":/build nvlm-trt-serve /build/deploy/launch.sh /build
# Builds the engines if they are missing (engines/build_engines.sh), writes the trt repository for the
# paths of this host, then starts tritonserver ({'one process' if world_size == 1 else f'MPI leader mode, {world_size} ranks'}).
set -euo pipefail
BUILD=$(cd "${{1:-$(dirname "$0")/..}}" && pwd)
GRPC_PORT=${{GRPC_PORT:-8001}} HTTP_PORT=${{HTTP_PORT:-8000}} METRICS_PORT=${{METRICS_PORT:-8002}}
# the entry model reaches the LLM step through this server's gRPC and HTTP ports (triton_repo/llm_link.py)
export NVLM_TRITON_GRPC_URL=127.0.0.1:$GRPC_PORT NVLM_TRITON_HTTP_URL=127.0.0.1:$HTTP_PORT
WORLD={world_size}
python3 - <<'PY'
import importlib.util, sys
spec = importlib.util.find_spec("tensorrt_llm")
if spec is None:
    sys.exit("launch.sh: this image has no TensorRT-LLM; build deploy/Dockerfile and run inside it")
from importlib.metadata import version
v = version("tensorrt_llm")
if not v.startswith("1.2"):
    print(f"launch.sh: warning: TensorRT-LLM {{v}}; this build targets the 1.2 line", file=sys.stderr)
PY
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -lt "$WORLD" ]; then
  echo "launch.sh: this build needs $WORLD GPUs (TP x PP), $gpus visible" >&2; exit 2
fi
if [ ! -f "$BUILD/engines/llm/config.json" ] || [ ! -f "$BUILD/engines/vision_encoder.engine" ]; then
  "$BUILD/engines/build_engines.sh"
fi
python3 -m builder.cli triton-repo "$BUILD" -o "$BUILD/triton_repo" --target trt --entry-instances auto --force
exec {cmd}
"""


def write_kit(out: Path, world_size: int) -> dict:
    """Write deploy/ into `out` (the stage's folder)."""
    src = Path(__file__).resolve().parent.parent
    pkg = out / "nvlm-trt"
    for name in PACKAGES:
        shutil.copytree(src / name, pkg / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if (src / "pyproject.toml").is_file():
        shutil.copy2(src / "pyproject.toml", pkg / "pyproject.toml")
        shutil.copy2(src / "README.md", pkg / "README.md")
    else:  # installed from a wheel: a minimal project that installs the same packages
        (pkg / "pyproject.toml").write_text('[project]\nname = "nvlm-trt"\nversion = "0.1.0"\n'
                                            '[tool.setuptools.packages.find]\n'
                                            f'include = {[p + "*" for p in PACKAGES]!r}\n'.replace("'", '"'))
    (out / "Dockerfile").write_text(dockerfile())
    (out / "launch.sh").write_text(launch_script(world_size))
    (out / "launch.sh").chmod(0o755)
    return {"image": TRITON_IMAGE, "world_size": world_size, "files": ["Dockerfile", "launch.sh", "nvlm-trt/"]}
