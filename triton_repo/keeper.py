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
  an error, and the server comes back on its own — at most MAX_RESTARTS times in RESTART_WINDOW_S.

PR_SET_PDEATHSIG fires when the thread that started the keeper exits: start servers from a thread
that lives as long as they should (nvlm-serve and the tests use the main thread).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PR_SET_PDEATHSIG = 1
SHM_DIR = Path("/dev/shm")
MAX_RESTARTS, RESTART_WINDOW_S = 5, 600  # beyond this the keeper gives up and exits (nvlm-serve with it)


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
    restarts: list[float] = []
    while True:
        # if the keeper itself is killed (SIGKILL leaves it no time to stop anything), the server goes too
        server = subprocess.Popen(cmd, preexec_fn=lambda: _set_pdeathsig(signal.SIGKILL))
        dead_stub = _watch(server, stop, _ready_url(cmd))
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
        if dead_stub is None or stop["signal"] is not None:
            break
        if len(restarts) >= MAX_RESTARTS:
            print(f"keeper: backend stub {dead_stub} died; {MAX_RESTARTS} restarts in {RESTART_WINDOW_S} s already, "
                  "giving up", flush=True)
            break
        restarts.append(time.time())
        print(f"keeper: backend stub {dead_stub} died; tritonserver is not ready while it restarts "
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


def _ready_url(cmd: list[str]) -> str | None:
    """tritonserver's HTTP readiness endpoint, from its command line."""
    def value(flag, default):
        return cmd[cmd.index(flag) + 1] if flag in cmd[:-1] else default

    port = value("--http-port", "8000")
    return f"http://{value('--http-address', '127.0.0.1')}:{port}/v2/health/ready"


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _watch(server: subprocess.Popen, stop: dict, ready_url: str) -> int | None:
    """Wait until the server exits or a signal arrives (None), or a backend stub dies (its PID).

    The Python backend does not restart a dead stub, and Triton keeps reporting the model ready
    while every request to it fails (triton-inference-server/server#7862, #8604), so a dead stub
    restarts the whole server: in-flight requests fail, readiness is down until it is back.
    Stubs are watched from the moment the server is ready: while models load, short-lived stubs
    come and go (configuration checks) without anything being wrong."""
    watched: set[int] = set()
    while server.poll() is None and stop["signal"] is None:
        if not watched:
            if _is_ready(ready_url):
                watched = _stubs(server.pid)
        else:
            gone = watched - _stubs(server.pid)
            if gone:
                return min(gone)
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
