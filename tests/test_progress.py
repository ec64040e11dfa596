"""Progress bars (runtime/core/progress.py): shown at a terminal, silent when stderr is not one or when
a CLI prints machine-readable output (--json)."""

import io
import sys

import pytest

from runtime.core import progress
from runtime.core.build_dir import sha256_file


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def stderr(monkeypatch):
    def use(stream):
        monkeypatch.setattr(sys, "stderr", stream)
        return stream
    yield use
    progress.silence(False)


def _run():
    return list(progress.track(range(5), "working", unit="step"))


def test_bars_at_a_terminal_only(stderr):
    tty = stderr(_Terminal())
    assert _run() == [0, 1, 2, 3, 4]
    assert "working:" in tty.getvalue() and "/5" in tty.getvalue()  # tqdm redraws at most every 0.1 s
    pipe = stderr(io.StringIO())
    _run()
    assert pipe.getvalue() == ""
    tty = stderr(_Terminal())
    progress.silence()
    _run()
    assert tty.getvalue() == ""


def test_hashing_reports_bytes(tmp_path, stderr):
    f = tmp_path / "shard.safetensors"
    f.write_bytes(b"x" * 10_000)
    seen = []
    sha256_file(f, chunk=4096, advance=seen.append)
    assert seen == [4096, 4096, 1808]


def test_cli_bars_and_json(stderr, demo_ckpt, tmp_path, capsys):
    """A long step draws its bar at a terminal; with `--json` none is drawn and stdout stays JSON."""
    import json

    from builder.cli import main

    tty = stderr(_Terminal())
    assert main(["llm", str(demo_ckpt), "-o", str(tmp_path / "a"), "--quant", "bf16"]) == 0
    assert "converting to bf16" in tty.getvalue() and "fidelity" in tty.getvalue()
    capsys.readouterr()
    tty = stderr(_Terminal())
    assert main(["llm", str(demo_ckpt), "-o", str(tmp_path / "b"), "--quant", "bf16", "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert "converting" not in tty.getvalue() and "fidelity:" not in tty.getvalue()
