"""Checkpoint I/O: every refusal names the file or tensor at fault."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.core.checkpoint import Checkpoint, read_safetensors_header
from runtime.core.errors import CheckpointError, PickleCheckpointError, ShapeMismatchError, WeightMapError

INDEX = "model.safetensors.index.json"


def _index(d):
    return json.loads((d / INDEX).read_text())


def _rewrite_shard(d, shard, fn):
    tensors = load_file(str(d / shard))
    fn(tensors)
    save_file(tensors, str(d / shard))
    return tensors


def test_demo_checkpoint_opens_lazily(demo_ckpt):
    ckpt = Checkpoint.open(demo_ckpt)
    assert len(ckpt.shards) >= 2
    name = "language_model.model.embed_tokens.weight"
    t = ckpt.get(name)
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == ckpt.tensors[name].shape
    assert ckpt.total_bytes == _index(demo_ckpt)["metadata"]["total_size"]


def test_truncated_shard_names_file(demo_copy):
    shard = sorted(demo_copy.glob("*.safetensors"))[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated"):
        Checkpoint.open(demo_copy)


def test_corrupt_header_names_file(demo_copy):
    shard = sorted(demo_copy.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"#garbage")
    with pytest.raises(CheckpointError, match=rf"{shard.name}: header is not valid JSON"):
        Checkpoint.open(demo_copy)


def test_tiny_file_is_refused(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="x.safetensors: file is 3 bytes"):
        read_safetensors_header(tmp_path / "x.safetensors")


def test_missing_tensor_is_named(demo_copy):
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    shard = _index(demo_copy)["weight_map"][name]
    _rewrite_shard(demo_copy, shard, lambda t: t.pop(name))
    idx = _index(demo_copy)
    del idx["weight_map"][name]
    (demo_copy / INDEX).write_text(json.dumps(idx))
    with pytest.raises(WeightMapError, match=rf"missing tensors \(1\): {name}"):
        Checkpoint.open(demo_copy)


def test_extra_tensor_is_named(demo_copy):
    shard = sorted(demo_copy.glob("*.safetensors"))[0].name
    _rewrite_shard(demo_copy, shard, lambda t: t.update({"vision_model.extra_head.weight": torch.zeros(2)}))
    idx = _index(demo_copy)
    idx["weight_map"]["vision_model.extra_head.weight"] = shard
    (demo_copy / INDEX).write_text(json.dumps(idx))
    with pytest.raises(WeightMapError, match=r"unexpected tensors \(1\): vision_model.extra_head.weight"):
        Checkpoint.open(demo_copy)


def test_dropped_rotary_buffer_is_accepted(demo_copy):
    shard = sorted(demo_copy.glob("*.safetensors"))[-1].name
    name = "language_model.model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite_shard(demo_copy, shard, lambda t: t.update({name: torch.ones(4)}))
    idx = _index(demo_copy)
    idx["weight_map"][name] = shard
    (demo_copy / INDEX).write_text(json.dumps(idx))
    plan = Checkpoint.open(demo_copy).validate()
    assert plan.dropped == [name]


def test_tensor_not_listed_in_index(demo_copy):
    shard = sorted(demo_copy.glob("*.safetensors"))[0].name
    _rewrite_shard(demo_copy, shard, lambda t: t.update({"stowaway": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=rf"{shard} holds tensor 'stowaway'"):
        Checkpoint.open(demo_copy)


def test_index_lists_tensor_the_shard_lacks(demo_copy):
    idx = _index(demo_copy)
    shard = sorted(set(idx["weight_map"].values()))[0]
    idx["weight_map"]["ghost.weight"] = shard
    (demo_copy / INDEX).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=rf"lists 'ghost.weight' in {shard}"):
        Checkpoint.open(demo_copy)


def test_duplicated_tensor_is_named(demo_copy):
    shards = sorted(demo_copy.glob("*.safetensors"))
    second = load_file(str(shards[1]))
    dup_name = next(iter(second))
    _rewrite_shard(demo_copy, shards[0].name, lambda t: t.update({dup_name: second[dup_name]}))
    with pytest.raises(CheckpointError, match=rf"tensor '{dup_name}' is stored twice"):
        Checkpoint.open(demo_copy)


def test_missing_shard_is_named(demo_copy):
    shard = sorted(demo_copy.glob("*.safetensors"))[0]
    os.remove(shard)
    with pytest.raises(CheckpointError, match=rf"lists shards that are not in .*{shard.name}"):
        Checkpoint.open(demo_copy)


def test_shape_mismatch_against_config_names_tensor(demo_copy):
    cfg = json.loads((demo_copy / "config.json").read_text())
    cfg["vision_config"]["intermediate_size"] = 128  # weights say 256
    cfg_path = demo_copy / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match=r"vision_model.encoder.layers.0.mlp.fc1.(weight|bias)' has shape"):
        Checkpoint.open(demo_copy)


def test_vocab_vs_embedding_rows(demo_copy):
    cfg = json.loads((demo_copy / "config.json").read_text())
    cfg["llm_config"]["vocab_size"] += 128
    (demo_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match=r"(embed_tokens|lm_head).weight' has shape \[640, 256\] but config"):
        Checkpoint.open(demo_copy)


def test_non_float_weight_dtype_is_refused(demo_copy):
    name = "mlp1.0.bias"
    shard = _index(demo_copy)["weight_map"][name]
    _rewrite_shard(demo_copy, shard, lambda t: t.update({name: t[name].to(torch.int32)}))
    with pytest.raises(ShapeMismatchError, match=rf"'{name}' has dtype int32"):
        Checkpoint.open(demo_copy)


def test_pickle_checkpoint_is_refused_with_instructions(tmp_path, demo_ckpt):
    (tmp_path / "config.json").write_text((demo_ckpt / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(PickleCheckpointError) as e:
        Checkpoint.open(tmp_path)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "arbitrary code" in msg and "safe_serialization=True" in msg


def test_shards_without_index_are_refused(demo_copy):
    os.remove(demo_copy / INDEX)
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        Checkpoint.open(demo_copy)


def test_single_file_checkpoint(demo_ckpt, tmp_path):
    ckpt = Checkpoint.open(demo_ckpt)
    tensors = {n: t for n, t in ckpt.iter_tensors()}
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / f).write_text((demo_ckpt / f).read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    single = Checkpoint.open(tmp_path)
    assert single.shards == ["model.safetensors"] and set(single.tensors) == set(ckpt.tensors)


class _ShortReads:
    """A file whose readinto returns at most `cap` bytes per call (as Linux does above 2,147,479,552 bytes),
    and nothing past `end` (a real truncation)."""

    def __init__(self, path, cap, end=None):
        self.f, self.cap, self.end = open(path, "rb", buffering=0), cap, end

    def seek(self, pos):
        return self.f.seek(pos)

    def readinto(self, buf):
        want = min(len(buf), self.cap)
        if self.end is not None:
            want = max(0, min(want, self.end - self.f.tell()))
        return self.f.readinto(memoryview(buf)[:want])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_short_reads_are_continued_and_a_real_truncation_still_fails(demo_ckpt, monkeypatch):
    """One read returns at most 2 GiB − 4 KiB on Linux: NVLM-D-72B's 2.49 GB embed_tokens and lm_head take two.
    A reader that returns a few bytes per call must give every tensor bit for bit; one that stops early must
    still be reported as cut short."""
    import builtins

    import runtime.core.checkpoint as ckmod

    ckpt = Checkpoint.open(demo_ckpt)
    name = "language_model.model.embed_tokens.weight"
    want = ckpt.get(name).clone()
    real_open = builtins.open
    info = ckpt.tensors[name]
    monkeypatch.setattr(ckmod, "open", lambda p, *a, **k: _ShortReads(p, cap=4093), raising=False)
    assert torch.equal(ckpt.get(name), want)
    end = info.offset + info.nbytes // 2
    monkeypatch.setattr(ckmod, "open", lambda p, *a, **k: _ShortReads(p, cap=1 << 20, end=end), raising=False)
    with pytest.raises(CheckpointError, match=r"cut short \(\d+ of \d+ bytes\)"):
        ckpt.get(name)
    monkeypatch.setattr(ckmod, "open", real_open, raising=False)
