import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from triton_repo.keeper import descendants  # noqa: F401 — the tests' name for it

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(ROOT))
# Triton kernels run on CPU through the interpreter in this process; the flag must be set before
# any kernel module is imported. AOT compilation tests unset it in a subprocess.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory) -> Path:
    """The embedded default, generated once per session (read-only: copy before mutating)."""
    from runtime.core.demo_checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "nvlm-d-demo")


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> Path:
    """The trained embedded default (packaged weights, docs/demo_model.md): answers tile-task questions."""
    from runtime.core.demo_checkpoint import TRAINED_WEIGHTS, trained_available, write_demo_checkpoint

    if not trained_available():
        pytest.skip(f"the trained embedded default is not packaged ({TRAINED_WEIGHTS} missing)")
    return write_demo_checkpoint(tmp_path_factory.mktemp("trained") / "nvlm-d-trained", weights="trained")


@pytest.fixture(scope="session")
def released_ckpt(tmp_path_factory) -> Path:
    """A released-layout checkpoint written by the independent script in tests/."""
    from tests.released_layout_writer import write

    return Path(write(str(tmp_path_factory.mktemp("released") / "nvlm-d-other")))


@pytest.fixture
def demo_copy(demo_ckpt, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(demo_ckpt, dst)
    return dst


@pytest.fixture(scope="session")
def serve_build(tmp_path_factory, demo_ckpt) -> Path:
    """The embedded default built for the reference target (bf16, fp32 vision, 4 images per request):
    the build the serving and soak tests serve. Read-only."""
    from builder.engine_build import DeploymentOptions, build_deployment
    from runtime.core.limits import EngineLimits
    from runtime.core.llm_formats import LLMBuildOptions, get_format

    out = tmp_path_factory.mktemp("serve") / "build"
    opts = DeploymentOptions(LLMBuildOptions(get_format("bf16")), target="reference", vision_dtype="fp32", calib_size=4,
                              limits=EngineLimits(max_images_per_request=4))
    build_deployment(demo_ckpt, out, opts)
    return out


@pytest.fixture(scope="session")
def trained_serve_build(tmp_path_factory, trained_ckpt) -> Path:
    """The trained embedded default built like serve_build: its answers depend on the image."""
    from builder.engine_build import DeploymentOptions, build_deployment
    from runtime.core.limits import EngineLimits
    from runtime.core.llm_formats import LLMBuildOptions, get_format

    out = tmp_path_factory.mktemp("serve-trained") / "build"
    opts = DeploymentOptions(LLMBuildOptions(get_format("bf16")), target="reference", vision_dtype="fp32", calib_size=4,
                              limits=EngineLimits(max_images_per_request=4))
    build_deployment(trained_ckpt, out, opts)
    return out


@pytest.fixture(scope="session")
def config_72b() -> dict:
    return json.loads((FIXTURES / "nvlm_d_72b_config.json").read_text())


def server_ports(slot: int) -> int:
    """First of three ports (gRPC, HTTP, metrics) for test server `slot` (0-9) of this test process:
    per-process ranges below the ephemeral ports (32768+), a distinct slot per server so that they
    never collide. test_serving uses slots 0-2, test_contract 3-4, test_soak 5, test_openai_api 6-7,
    test_admission 8."""
    assert 0 <= slot < 10
    return 20000 + (os.getpid() % 400) * 30 + slot * 3


