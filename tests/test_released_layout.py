"""A checkpoint this project did not write loads, inspects and runs end to end."""

import json
import subprocess
import sys

from builder.cli import main
from tests.conftest import ROOT


def test_writer_runs_as_a_script(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tests/released_layout_writer.py"), str(tmp_path / "c")],
                         capture_output=True, text=True, check=True)
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file(), out.stderr


def test_released_layout_inspects(released_ckpt, capsys):
    assert main(["inspect", str(released_ckpt), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["weights"]["shards"]) == 3
    assert r["weights"]["components"]["vision"]["dtypes"].keys() == {"float32"}
    assert r["weights"]["components"]["llm"]["dtypes"].keys() == {"bfloat16"}


def test_released_layout_runs_through_reference(released_ckpt, capsys):
    assert main(["reference", str(released_ckpt), "--prompt", "<image>\nWhat is it?", "--synthetic-tiles", "3",
                 "--max-new-tokens", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["image_tokens"] == 3 * 256 and len(r["tokens"]) == 4


def test_demo_checkpoint_cli_is_deterministic(tmp_path, capsys):
    assert main(["demo-checkpoint", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main(["demo-checkpoint", str(tmp_path / "b"), "--seed", "3"]) == 0
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    assert main(["demo-checkpoint", str(tmp_path / "a")]) == 2
    assert "already exists" in capsys.readouterr().err
