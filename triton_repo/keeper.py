"""The server's keeper: ties tritonserver's life to nvlm-serve's (`python -m triton_repo.keeper`).

nvlm-serve starts this small process and it starts tritonserver, in the keeper's own process group
(the backend stubs join it). The keeper:
- asks the kernel for SIGTERM when nvlm-serve dies (prctl PR_SET_PDEATHSIG), so that a SIGKILL of
  nvlm-serve — a CI job's timeout, the OOM killer — still stops the server within seconds instead of
  leaving it serving on with the ports, the shared memory and its folder;
- on SIGTERM / SIGINT stops tritonserver (SIGTERM, then SIGKILL of the whole group after a grace
  period: no stub outlives it), removes the Python backend's shared-memory segments of this server
  (they carry a prefix unique to it, `--backend-config=python,shm-region-prefix-name=…`) and the
  server's temporary folder, and exits with tritonserver's status;
- when tritonserver exits on its own, cleans up the same way but keeps the log (it says why);
- when a backend stub dies, restarts tritonserver (Triton would keep reporting ready while every
  request to that model fails): readiness is down during the restart, requests in flight fail with
  an error, and the server comes back on its own — at most MAX_RESTARTS times in RESTART_WINDOW_S;
- once the server is ready, where a Python stub serves the LLM step (`tensorrt_llm` on the reference and
  contract targets), runs tritonserver and every other stub LLM_STEP_NICE nice levels below it
  (`prioritize_llm_step`): the stand-in's one batcher thread computes every token of every request, and
  time-sliced as one thread among the dozens that forward tokens (gRPC, the entry model's workers) it sat
  idle half the time at concurrency 8 while the rest of the pipeline waited for its tokens
  (docs/PERFORMANCE.md). Raising niceness needs no privilege; on the trt target the LLM step lives in
  tritonserver (the C++ backend) and nothing is changed;
- when the server stops answering — a probe request (one token of text through the entry model, every
  PROBE_INTERVAL_S) gets no response at all within HANG_TIMEOUT_S — restarts it the same way: the bundled
  Python backend can deadlock a stub under streaming load (docs/serving.md, "An intermittent hang"), with
  every process alive and ready, which no other check sees. Any response, an error included, is an answer.

PR_SET_PDEATHSIG fires when the thread that started the keeper exits: start servers from a thread
that lives as long as they should (nvlm-serve and the tests use the main thread).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PR_SET_PDEATHSIG = 1
SHM_DIR = Path("/dev/shm")
MAX_RESTARTS, RESTART_WINDOW_S = 5, 600  # beyond this the keeper gives up and exits (nvlm-serve with it)
# A probe answers in well under a second on an idle CPU server and within seconds under load (the entry model
# admits it or refuses it as busy at once); a minute without any response is a server that no longer works.
PROBE_INTERVAL_S, HANG_TIMEOUT_S = 10.0, 60.0
PROBE_MODEL = "nvlm"
LLM_STEP = "tensorrt_llm"
LLM_STEP_NICE = 10  # weight 110 against the LLM step's 1024 under CFS: it runs whenever it has work
READY_PATH = "/v2/health/ready"  # tritonserver's HTTP readiness: what the keeper and a load balancer poll


def shm_prefix(keeper_pid: int) -> str:
    """The Python backend's shared-memory prefix of the server this keeper runs."""
    return f"nvlm_shm_{keeper_pid}_"


def _set_pdeathsig(sig: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def _die_with_parent(parent: int) -> None:
    _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _cleanup(workdir: Path, keep_log: bool) -> None:
    for seg in SHM_DIR.glob(shm_prefix(os.getpid()) + "*"):
        seg.unlink(missing_ok=True)
    if keep_log:
        shutil.rmtree(workdir / "backends", ignore_errors=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m triton_repo.keeper")
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--grace", type=float, default=30.0)
    ap.add_argument("--hang-timeout", type=float, default=HANG_TIMEOUT_S,
                    help="restart the server when a probe request gets no response for this long (0: no probe)")
    ap.add_argument("--probe-interval", type=float, default=PROBE_INTERVAL_S)
    ap.add_argument("--llm-step-nice", type=int, default=LLM_STEP_NICE,
                    help="run tritonserver and the other stubs this many nice levels below a Python LLM step (0: off)")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    stop = {"signal": None}

    def on_signal(sig, _frame):
        stop["signal"] = sig

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    _die_with_parent(args.parent)
    cmd = cmd + [f"--backend-config=python,shm-region-prefix-name={shm_prefix(os.getpid())}"]
    # the stubs' own shared files (the entry instances' admission count) carry the same prefix: cleaned alike
    os.environ[SHARED_PREFIX_ENV] = shm_prefix(os.getpid())
    restarts: list[float] = []
    while True:
        # if the keeper itself is killed (SIGKILL leaves it no time to stop anything), the server goes too
        server = subprocess.Popen(cmd, preexec_fn=lambda: _set_pdeathsig(signal.SIGKILL))
        probe = Probe(_base_url(cmd), args.probe_interval, args.hang_timeout) if args.hang_timeout > 0 else None
        failure = _watch(server, stop, _ready_url(cmd), probe, args.llm_step_nice)
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(args.grace)
            except subprocess.TimeoutExpired:
                pass
        _kill_group_but_me()  # the stubs share this group: none outlives the server, whatever its state
        server.wait()
        _wait_group_gone()
        restarts = [t for t in restarts if time.time() - t < RESTART_WINDOW_S]
        if failure is None or stop["signal"] is not None:
            break
        if len(restarts) >= MAX_RESTARTS:
            print(f"keeper: {failure}; {MAX_RESTARTS} restarts in {RESTART_WINDOW_S} s already, "
                  "giving up", flush=True)
            break
        restarts.append(time.time())
        print(f"keeper: {failure}; tritonserver is not ready while it restarts "
              f"(restart {len(restarts)} in the last {RESTART_WINDOW_S} s)", flush=True)
        for seg in SHM_DIR.glob(shm_prefix(os.getpid()) + "*"):  # the dead server's segments
            seg.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    own_exit = stop["signal"] is None and server.returncode != 0
    _cleanup(args.workdir, keep_log=own_exit)
    return server.returncode if server.returncode >= 0 else 128 - server.returncode


def descendants(root: int) -> set[int]:
    """PIDs of every process below `root`, from /proc/*/stat."""
    parents = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parents[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _stubs(server_pid: int) -> set[int]:
    """Live backend stubs of the server (its children running triton_python_backend_stub)."""
    out = set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == server_pid and fields[0] != "Z" and b"triton_python_backend_stub" in (
                    p / "cmdline").read_bytes():
                out.add(int(p.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def stub_model(pid: int) -> str | None:
    """The model a Python-backend stub serves (its model.py's model directory), None for another process."""
    try:
        args = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    model = next((a for a in args if a.endswith("model.py")), None)
    return Path(model).parent.parent.name if model else None


def _renice(pid: int, by: int) -> None:
    """Every thread of `pid` `by` nice levels lower in priority than the process had (niceness is per thread
    on Linux; threads started later inherit their creator's). Twice: a thread started during the first pass
    by a thread not yet reniced would keep the old value."""
    try:
        target = min(19, os.getpriority(os.PRIO_PROCESS, pid) + by)
    except OSError:
        return
    for _ in range(2):
        for task in (Path("/proc") / str(pid) / "task").glob("*"):
            try:
                if os.getpriority(os.PRIO_PROCESS, int(task.name)) < target:
                    os.setpriority(os.PRIO_PROCESS, int(task.name), target)
            except (OSError, ValueError):
                pass  # a thread that ended meanwhile


def prioritize_llm_step(server_pid: int, by: int = LLM_STEP_NICE, stub_pids: set[int] | None = None) -> str | None:
    """Where a stub serves the LLM step, renice tritonserver and the other stubs `by` levels below it; what
    was done (for the log), or None (no such stub: the trt target; or `by` is 0). `stub_pids`: the server's
    stubs when the caller has just listed them."""
    if by <= 0:
        return None
    stubs = {pid: stub_model(pid) for pid in (_stubs(server_pid) if stub_pids is None else stub_pids)}
    if LLM_STEP not in stubs.values():
        return None
    others = [pid for pid, model in stubs.items() if model != LLM_STEP]
    for pid in [server_pid, *others]:
        _renice(pid, by)
    return (f"keeper: tritonserver and the stubs of {', '.join(sorted(m for m in stubs.values() if m != LLM_STEP))} "
            f"run {by} nice levels below the LLM step's stub")


def _base_url(cmd: list[str]) -> str:
    """tritonserver's HTTP address, from its command line."""
    def value(flag, default):
        return cmd[cmd.index(flag) + 1] if flag in cmd[:-1] else default

    return f"http://{value('--http-address', '127.0.0.1')}:{value('--http-port', '8000')}"


def _ready_url(cmd: list[str]) -> str:
    """tritonserver's HTTP readiness endpoint."""
    return _base_url(cmd) + READY_PATH


# the keeper's health probe marks its requests with this request parameter: the entry model admits them beside
# the users' requests, never in a user's place (triton_repo/serving_core.is_probe)
PROBE_PARAMETER = "nvlm_probe"
# nvlm-serve --max-queue: the entry model's waiting room, overriding the build's limit (an environment variable of
# the server it starts, which its Python stubs inherit)
MAX_QUEUE_ENV = "NVLM_MAX_QUEUE"
# nvlm-serve --stream-interval-ms: the least time between two streamed responses of a request after its first, in
# the entry model and the Python LLM step (tokens made in between leave together; docs/serving.md)
STREAM_INTERVAL_ENV = "NVLM_STREAM_INTERVAL_MS"
STREAM_INTERVAL_MS = 40.0
# the prefix of the shared-memory files of the server's stubs (the keeper removes them with the server's own)
SHARED_PREFIX_ENV = "NVLM_SHM_PREFIX"


class Probe:
    """One small request at a time through the entry model (HTTP `generate_stream`: one token of text), every
    `interval` seconds once the server is ready. `failure()`: the request in flight has had no response for
    `timeout` seconds, or Triton answered that a stub is not healthy (a frozen or vanished stub, which it
    neither restarts nor reports through readiness). Each request runs on its own thread, so one that never
    returns blocks only that thread."""

    # marked as the keeper's (a request parameter): the entry model admits it beside the users' requests
    BODY = json.dumps({"text_input": "ping", "max_tokens": 1, "parameters": {PROBE_PARAMETER: True}}).encode()

    def __init__(self, base_url: str, interval: float, timeout: float):
        self.url = f"{base_url}/v2/models/{PROBE_MODEL}/generate_stream"
        self.interval, self.timeout = interval, timeout
        self.started: float | None = None  # the request in flight since (None: none)
        self.last = 0.0
        self.unhealthy: str | None = None  # Triton's own answer that a stub no longer works

    def failure(self) -> str | None:
        """Why the server no longer works (None: it answers)."""
        now = time.monotonic()
        if self.unhealthy:
            return self.unhealthy
        if self.started is None and now - self.last >= self.interval:
            self.started = now
            threading.Thread(target=self._one, daemon=True).start()
        if self.started is not None and now - self.started > self.timeout:
            return f"no response to a probe request in {self.timeout:.0f} s (a hung server or backend stub)"
        return None

    def _one(self) -> None:
        req = urllib.request.Request(self.url, data=self.BODY, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout + 5) as r:
                text = r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:  # refused as busy, a bad request: an answer, unless it says unhealthy
            text = e.read().decode("utf-8", "replace")
        except OSError:  # no answer at all: failure() sees the time pass
            text = ""
        if "is not healthy" in text:
            # Triton found a stub frozen or gone but keeps it (and readiness) as it is: every request fails
            self.unhealthy = "a probe request was refused: " + text.strip().replace("\n", " ")[:200]
        self.started, self.last = None, time.monotonic()


def is_ready(url: str) -> bool:
    """GET a readiness URL (tritonserver's /v2/health/ready): 200 or not, within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _watch(server: subprocess.Popen, stop: dict, ready_url: str, probe: Probe | None = None,
           llm_step_nice: int = 0) -> str | None:
    """Wait until the server exits or a signal arrives (None), or a backend stub dies or the server stops
    answering (why, for the log).

    The Python backend does not restart a dead stub, and Triton keeps reporting the model ready
    while every request to it fails (triton-inference-server/server#7862, #8604), so a dead stub
    restarts the whole server: in-flight requests fail, readiness is down until it is back.
    Stubs are watched from the moment the server is ready: while models load, short-lived stubs
    come and go (configuration checks) without anything being wrong."""
    watched: set[int] = set()
    while server.poll() is None and stop["signal"] is None:
        if not watched:
            if is_ready(ready_url):
                watched = _stubs(server.pid)
                done = prioritize_llm_step(server.pid, llm_step_nice, watched)
                if done:
                    print(done, flush=True)
        else:
            gone = watched - _stubs(server.pid)
            if gone:
                return f"backend stub {min(gone)} died"
            failed = None if probe is None else probe.failure()
            if failed:
                return failed
        time.sleep(0.25)
    return None


def _wait_group_gone(timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while _group_members() and time.time() < deadline:  # SIGKILL is delivered asynchronously
        time.sleep(0.05)


def _group_members() -> list[int]:
    """The other live processes of this process group (tritonserver and its backend stubs)."""
    me, group, out = os.getpid(), os.getpgid(0), []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            if os.getpgid(int(p.name)) == group and (p / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(p.name))
        except (ProcessLookupError, PermissionError, OSError, IndexError):
            pass
    return out


def _kill_group_but_me() -> None:
    for pid in _group_members():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main())
