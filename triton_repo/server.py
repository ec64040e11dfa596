"""`nvlm-serve`: run the bundled CPU `tritonserver` (from the nvidia-pytriton wheel) on a build's repository.

What the raw binary needs here (docs/upstream.md, The bundled CPU Triton server): a backend directory holding the bundled Python
backend plus the stub built for this interpreter's Python version; this venv's `bin` first on PATH
(the stub finds its interpreter as `python3`); LD_LIBRARY_PATH with the wheel's bundled libraries and
the interpreter's libdir; numpy < 2. The server binds loopback unless told otherwise, logs to a file,
and on SIGTERM / Ctrl-C stops cleanly and removes the Python backend's shared-memory segments.
On GPU hosts (target trt) serve the repository with NGC's tritonserver instead (printed command).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from runtime.core.errors import NVLMError

from .keeper import (
    HANG_TIMEOUT_S,
    LLM_STEP_NICE,
    MAX_QUEUE_ENV,
    PROBE_INTERVAL_S,
    READY_PATH,
    STREAM_INTERVAL_ENV,
    STREAM_INTERVAL_MS,
    is_ready,
    shm_prefix,
)
from .llm_http import HTTP_URL_ENV
from .llm_link import URL_ENV
from .openai_api import OpenAIServer

# the Python backend's default shared-memory prefix, and the per-server prefix the keeper gives it
SHM_PREFIXES = ("triton_python_backend_shm", "nvlm_shm_")


class ServerError(NVLMError):
    """The Triton server could not be started or did not become ready."""


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError:
        raise ServerError("nvidia-pytriton is not installed; it bundles the CPU tritonserver (pip install "
                          "nvlm-trt[serve])") from None
    return Path(pytriton.__file__).parent / "tritonserver"


def _shm_segments(prefixes: tuple[str, ...] = SHM_PREFIXES) -> set[str]:
    """Python-backend shared-memory segments on this machine (of one server: pass its keeper's prefix)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith(prefixes)} if shm.is_dir() else set()


def _load_errors(log: str, limit: int = 3000) -> str:
    """The error lines of a server log (a model that failed to load says why there), else its tail."""
    errors = [line for line in log.splitlines() if line.startswith("E") or "failed to load" in line]
    return "\n".join(errors)[-limit:] if errors else log[-limit:]


class TritonServer:
    def __init__(self, repo: str | Path, *, host: str = "127.0.0.1", grpc_port: int = 8001, http_port: int = 8000,
                 metrics_port: int = 8002, log_file: str | Path | None = None,
                 hang_timeout: float = HANG_TIMEOUT_S, probe_interval: float = PROBE_INTERVAL_S,
                 llm_step_nice: int = LLM_STEP_NICE, max_queue: int | None = None,
                 stream_interval_ms: float | None = None):
        self.repo = Path(repo).resolve()
        # the keeper restarts a server that answers no probe request for hang_timeout s (0: no probe)
        self.hang_timeout, self.probe_interval = hang_timeout, probe_interval
        # a Python LLM step (reference, contract) keeps its priority; the server and other stubs go this far below
        self.llm_step_nice = llm_step_nice
        self.max_queue = max_queue  # the entry model's waiting room (None: the build's limit)
        self.stream_interval_ms = stream_interval_ms  # None: STREAM_INTERVAL_MS
        self.host, self.grpc_port, self.http_port, self.metrics_port = host, grpc_port, http_port, metrics_port
        self.workdir = Path(tempfile.mkdtemp(prefix="nvlm-serve-"))
        self.log_file = Path(log_file) if log_file else self.workdir / "tritonserver.log"
        self.proc: subprocess.Popen | None = None
        self._shm_before: set[str] = set()

    def _backend_dir(self) -> Path:
        root = _pytriton_root()
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"the bundled tritonserver has no Python backend stub for Python {ver}")
        backends = self.workdir / "backends"
        shutil.copytree(root / "backends", backends)
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        return backends

    def command(self) -> list[str]:
        binary = _pytriton_root() / "bin" / "tritonserver"
        return [str(binary), "--model-repository", str(self.repo), "--backend-directory", str(self._backend_dir()),
                "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
                "--http-address", self.host, "--http-port", str(self.http_port),
                "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
                "--exit-on-error", "true", "--log-verbose", "0",
                # the generated configs are complete; auto-completion would start a throw-away stub per model
                "--disable-auto-complete-config"]

    def env(self) -> dict:
        env = dict(os.environ)
        libs = Path(_pytriton_root()).parent.parent / "nvidia_pytriton.libs"
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libs), sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")) if p)
        # the entry model streams to the LLM step through this server's own gRPC and HTTP ports (llm_link.py)
        env[URL_ENV] = self.grpc_url
        env[HTTP_URL_ENV] = f"{self._loopback}:{self.http_port}"
        if self.max_queue is not None:
            env[MAX_QUEUE_ENV] = str(self.max_queue)
        if self.stream_interval_ms is not None:
            env[STREAM_INTERVAL_ENV] = str(self.stream_interval_ms)
        return env

    def start(self, timeout: float = 120.0) -> "TritonServer":
        import tritonclient.grpc as grpcclient

        self._shm_before = _shm_segments()
        self.log = open(self.log_file, "w")
        # the keeper (triton_repo/keeper.py) runs tritonserver and stops it when this process dies
        keeper = [sys.executable, "-m", "triton_repo.keeper", "--parent", str(os.getpid()),
                  "--workdir", str(self.workdir), "--hang-timeout", str(self.hang_timeout),
                  "--probe-interval", str(self.probe_interval), "--llm-step-nice", str(self.llm_step_nice), "--"]
        self.proc = subprocess.Popen(keeper + self.command(), env=self.env(), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        client = grpcclient.InferenceServerClient(f"{self.host}:{self.grpc_port}")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode}; log: {self.log_file}\n"
                                  + _load_errors(self.log_file.read_text()))
            try:
                # both endpoints: tritonserver opens gRPC before HTTP, and HTTP readiness is what a load
                # balancer (and the keeper) polls — ready on gRPC alone, a caller could find HTTP not listening yet
                if client.is_server_ready() and is_ready(f"http://{self._loopback}:{self.http_port}{READY_PATH}"):
                    return self
            except Exception:  # noqa: BLE001 — not listening yet
                pass
            time.sleep(0.3)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s; log: {self.log_file}")

    @property
    def shm_prefix(self) -> str:
        """The prefix of this server's shared-memory segments (unique to it: its keeper's PID)."""
        return shm_prefix(self.proc.pid)

    @property
    def _loopback(self) -> str:
        """Where a client on this host reaches the server's endpoints (a wildcard bind: on loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def grpc_url(self) -> str:
        """Where a client on this host reaches the gRPC endpoint."""
        return f"{self._loopback}:{self.grpc_port}"

    def stop(self, timeout: float = 45.0) -> None:
        """SIGTERM to the keeper, which stops the server and removes its shared memory and folder."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc:
            # the keeper, tritonserver and the stubs share one process group: whatever did not stop
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            for seg in Path("/dev/shm").glob(shm_prefix(self.proc.pid) + "*"):
                seg.unlink(missing_ok=True)
        if getattr(self, "log", None):
            self.log.close()
        # the keeper removes the folder on a clean stop; after a crash or kill this does (a log of
        # the caller's choosing, --log-file, lives elsewhere and stays)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nvlm-serve", description="Serve an nvlm-build output with Triton (CPU).")
    ap.add_argument("build", help="build directory (with triton_repo/) or a model repository")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--log-file")
    ap.add_argument("--hang-timeout", type=float, default=HANG_TIMEOUT_S,
                    help=f"restart the server when a probe request (one token, every {PROBE_INTERVAL_S:.0f} s) gets "
                         f"no response for this many seconds (default {HANG_TIMEOUT_S:.0f}; 0: no probe)")
    ap.add_argument("--llm-step-nice", type=int, default=LLM_STEP_NICE,
                    help="reference and contract targets: run tritonserver and every model but the LLM step this many "
                         f"nice levels lower, so the one thread computing every token is not time-sliced against the "
                         f"threads forwarding them (default {LLM_STEP_NICE}; 0: all at the same priority)")
    ap.add_argument("--max-queue", type=int, default=None, metavar="N",
                    help="requests that may wait beyond the max batch size before \"server busy\" (default: the "
                         "build's limit, 8 × its max batch size unless it was built with --max-queue)")
    ap.add_argument("--stream-interval-ms", type=float, default=None, metavar="MS",
                    help="the least time between two streamed responses of a request after its first: tokens made in "
                         f"between leave together (default {STREAM_INTERVAL_MS:g}; 0: one response per token)")
    ap.add_argument("--openai-port", type=int, help="also serve the OpenAI chat-completions API on this port")
    ap.add_argument("--openai-model-name", default="nvlm", help="the model id the OpenAI API serves (default nvlm)")
    ap.add_argument("--openai-image-dir", help="let OpenAI requests name local image files under this directory "
                                               "(off by default: images come inline as data: URLs)")
    args = ap.parse_args(argv)
    build = Path(args.build)
    repo = build / "triton_repo" if (build / "triton_repo" / "nvlm").is_dir() else build
    vision_cfg = repo / "vision_encoder" / "config.pbtxt"
    if vision_cfg.is_file() and "tensorrt_plan" in vision_cfg.read_text():
        # trt target: needs the NGC Triton image with the tensorrtllm backend, not the bundled CPU server
        kit = build.resolve() / "deploy"
        print("this repository targets TensorRT engines; serve it on a GPU host with the build's deployment kit "
              "(docs/serving.md):\n"
              f"  docker build -t nvlm-trt-serve {kit}\n"
              f"  docker run --gpus all --rm --net host --shm-size 4g --ulimit memlock=-1 -v {build.resolve()}:/build "
              "nvlm-trt-serve /build/deploy/launch.sh /build")
        return 0
    if args.openai_port and not _port_free(args.host, args.openai_port):
        print(f"nvlm-serve: error: OpenAI API on port {args.openai_port}: the port is in use; choose another "
              "with --openai-port", file=sys.stderr)
        return 2
    try:
        server = TritonServer(repo, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                              metrics_port=args.metrics_port, log_file=args.log_file,
                              hang_timeout=args.hang_timeout, llm_step_nice=args.llm_step_nice,
                              max_queue=args.max_queue, stream_interval_ms=args.stream_interval_ms).start()
    except NVLMError as e:
        print(f"nvlm-serve: error: {e}", file=sys.stderr)
        return 2
    openai = None
    if args.openai_port:
        try:
            openai = OpenAIServer(server.grpc_url, args.host, args.openai_port, model=args.openai_model_name,
                                  image_dir=args.openai_image_dir, tokenizer_dir=build / "tokenizer").start()
        except Exception as e:  # noqa: BLE001 — a taken port, a missing extra: one line, and Triton stops
            server.stop()
            print(f"nvlm-serve: error: OpenAI API on port {args.openai_port}: {e}", file=sys.stderr)
            return 2
    print(f"serving {repo} on grpc {server.grpc_url}, http {args.host}:{args.http_port}"
          + (f", OpenAI API {openai.url}" if openai else "") + f"; log {server.log_file}", flush=True)
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))
    while not stop["now"] and server.proc.poll() is None:
        time.sleep(0.2)
    if openai:
        openai.stop()
    server.stop()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
