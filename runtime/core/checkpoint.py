"""Strict, lazy access to HF safetensors checkpoints (sharded with an index, or single-file).

Headers are parsed here (8-byte little-endian length + JSON) rather than trusted to the
reader, so that a truncated or corrupt shard is reported with its file name and what is
wrong before any tensor is read. Opening costs only the headers: a 150 GB checkpoint costs
nothing until a tensor is read.

Tensors are read with positional reads of exactly their bytes (offsets from the validated
header) into a fresh buffer, not through a memory map: every page of a mapped shard that has
been touched stays in the process's resident set while the map is open, so streaming a whole
checkpoint through `safe_open` ends with the whole checkpoint resident (measured: 2.9 GB RSS for
a 2.5 GB checkpoint). With reads, a converted tensor's memory is freed as soon as it is written.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import NVLMConfig
from .errors import CheckpointError, PickleCheckpointError, ShapeMismatchError
from .families import family_for, load_config
from .weight_map import Plan, plan, vision_padding_from_weights

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors' own cap on the JSON header, beyond which a length field is garbage.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype tag → (torch dtype name, bytes per element)
DTYPES = {
    "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I8": ("int8", 1), "U8": ("uint8", 1), "I16": ("int16", 2), "I32": ("int32", 4), "I64": ("int64", 8),
    "BOOL": ("bool", 1),
}
FLOAT_WEIGHT_DTYPES = {"bfloat16", "float16", "float32"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str  # file name inside the checkpoint directory
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute byte offset of the data in the shard file


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header against its size."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path.name}: file is {size} bytes, too short to be safetensors (truncated download?)")
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise CheckpointError(
                f"{path.name}: header length field says {header_len} bytes but the file has {size - 8} after it — "
                "the file is truncated or not safetensors; re-download it"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name}: header is not valid JSON ({e}); the file is corrupt, re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: header is not a JSON object; the file is corrupt")
    header.pop("__metadata__", None)

    data_len = size - 8 - header_len
    infos, spans = {}, []
    for name, entry in header.items():
        try:
            tag, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: header entry for {name!r} is malformed: {entry!r}") from None
        if tag not in DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has unsupported dtype {tag!r}")
        dtype, width = DTYPES[tag]
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * width or begin < 0:
            raise CheckpointError(
                f"{path.name}: tensor {name!r} spans bytes [{begin}, {end}) but shape {list(shape)} × {tag} "
                f"needs {count * width} bytes; the header is corrupt"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path.name}: truncated — tensor {name!r} ends at byte {end} of the data section but the file "
                f"holds only {data_len} data bytes ({size} bytes in all); re-download this shard"
            )
        infos[name] = TensorInfo(name, path.name, dtype, shape, end - begin, 8 + header_len + begin)
        spans.append((begin, end))
    spans.sort()
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise CheckpointError(f"{path.name}: tensor data overlaps or leaves a gap at byte {covered}; corrupt header")
        covered = end
    if covered != data_len:
        raise CheckpointError(
            f"{path.name}: {data_len - covered} trailing bytes after the last tensor; the file is corrupt or was "
            "written by an incompatible tool"
        )
    return infos


def read_fully(fh, buf) -> int:
    """Fill `buf` from `fh`, looping: one read returns at most 2,147,479,552 bytes on Linux (a 2.49 GB
    embedding of NVLM-D-72B takes two), and any read may return fewer than asked. Returns the bytes read:
    fewer than len(buf) only at end of file (a real truncation)."""
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def refuse_pickle(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleCheckpointError(
            f"{directory}: only pickle weight files found ({', '.join(pickles[:5])}). Pickle checkpoints can run "
            "arbitrary code when loaded, so nvlm-trt refuses them. Convert once, in an environment you trust: "
            "`model = AutoModel.from_pretrained(DIR, trust_remote_code=True, torch_dtype='auto'); "
            "model.save_pretrained(OUT, safe_serialization=True)` — then copy the tokenizer files and point "
            "nvlm-build at OUT."
        )


class Checkpoint:
    """An NVLM checkpoint directory: config, tokenizer files and lazily read tensors."""

    def __init__(self, directory: Path, config: NVLMConfig, tensors: dict[str, TensorInfo]):
        self.directory = directory
        self.config = config
        self.tensors = tensors

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path, *, validate: bool = True) -> "Checkpoint":
        directory = Path(path)
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is not a directory; pass the checkpoint folder holding config.json")
        config = load_config(directory)  # config errors first: they name the key to fix
        tensors = cls._scan(directory)
        config = vision_padding_from_weights(config, {n: t.shape for n, t in tensors.items()})
        ckpt = cls(directory, config, tensors)
        if validate:
            ckpt.validate()
        return ckpt

    @staticmethod
    def _scan(directory: Path) -> dict[str, TensorInfo]:
        index_path = directory / INDEX_FILE
        shard_files = sorted(p.name for p in directory.glob("*.safetensors"))
        if index_path.is_file():
            return _scan_indexed(directory, index_path, shard_files)
        if (directory / SINGLE_FILE).is_file():
            return read_safetensors_header(directory / SINGLE_FILE)
        if len(shard_files) > 1:
            raise CheckpointError(
                f"{directory}: {len(shard_files)} safetensors shards but no {INDEX_FILE}; the index is required "
                "to know which shards belong to the checkpoint"
            )
        if len(shard_files) == 1:
            return read_safetensors_header(directory / shard_files[0])
        refuse_pickle(directory)
        raise CheckpointError(f"{directory}: no safetensors weights ({INDEX_FILE} or {SINGLE_FILE}) found")

    # ------------------------------------------------------------------ checks

    def validate(self) -> Plan:
        """Weight map completeness, then shapes and dtypes against the config."""
        result = plan(self.tensors, self.config, family_for(self.config).components)
        for name, shape in result.expected_shapes().items():
            info = self.tensors[name]
            if info.shape != shape:
                raise ShapeMismatchError(
                    f"{info.shard}: tensor {name!r} has shape {list(info.shape)} but config.json implies "
                    f"{list(shape)}; the config does not describe these weights"
                )
            if info.dtype not in FLOAT_WEIGHT_DTYPES:
                raise ShapeMismatchError(
                    f"{info.shard}: tensor {name!r} has dtype {info.dtype}; an unquantized NVLM checkpoint holds "
                    f"{sorted(FLOAT_WEIGHT_DTYPES)} weights"
                )
        return result

    # ------------------------------------------------------------------ access

    @property
    def shards(self) -> list[str]:
        return sorted({t.shard for t in self.tensors.values()})

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def get(self, name: str):
        """One tensor as a torch tensor (its own memory), read with a positional read."""
        import torch

        if name not in self.tensors:
            raise CheckpointError(f"{self.directory}: no tensor named {name!r}")
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        self._read_spans(name, [(info.offset, info.nbytes)], buf)
        if not info.nbytes:
            return torch.empty(info.shape, dtype=getattr(torch, info.dtype))
        return torch.frombuffer(buf, dtype=getattr(torch, info.dtype)).reshape(info.shape)

    def _read_spans(self, name: str, spans: list[tuple[int, int]], buf: bytearray) -> None:
        """Fill `buf` with the (offset, length) byte spans of `name`'s shard, in order (reads looped: a short
        read that is not the file's end is retried; a real one is a truncation error)."""
        info = self.tensors[name]
        view, at = memoryview(buf), 0
        with open(self.directory / info.shard, "rb", buffering=0) as fh:
            for offset, length in spans:
                fh.seek(offset)
                got = read_fully(fh, view[at:at + length])
                if got != length:
                    raise CheckpointError(f"{info.shard}: tensor {name!r} is cut short ({got} of {length} bytes); "
                                          "the file changed or is truncated")
                at += length

    def get_rows(self, name: str, rows: range | list[int]):
        """Rows of a tensor along its first dimension [len(rows), ...], read row by row (a range: in one read):
        a chunk of lm_head or the embedding rows of a prompt's ids, without reading the whole 2.49 GB tensor."""
        import torch

        if name not in self.tensors:
            raise CheckpointError(f"{self.directory}: no tensor named {name!r}")
        info = self.tensors[name]
        row_bytes = info.nbytes // info.shape[0]
        spans = [(rows.start, len(rows))] if isinstance(rows, range) else [(int(r), 1) for r in rows]
        for first, n in spans:
            if not 0 <= first <= first + n <= info.shape[0]:
                raise CheckpointError(f"rows {first}…{first + n} are outside {name!r} ({info.shape[0]} rows)")
        count = sum(n for _, n in spans)
        buf = bytearray(row_bytes * count)
        self._read_spans(name, [(info.offset + first * row_bytes, n * row_bytes) for first, n in spans], buf)
        if not buf:
            return torch.empty((count, *info.shape[1:]), dtype=getattr(torch, info.dtype))
        return torch.frombuffer(buf, dtype=getattr(torch, info.dtype)).reshape(count, *info.shape[1:])

    def iter_tensors(self, names=None) -> Iterator[tuple[str, "object"]]:
        """Tensors in on-disk order (shard by shard), so reads stream through each file once."""
        wanted = self.tensors if names is None else {n: self.tensors[n] for n in names}
        for name in sorted(wanted, key=lambda n: (wanted[n].shard, n)):
            yield name, self.get(name)

    def tokenizer_dir(self) -> Path:
        return self.directory


def scan_tensors(path: str | Path) -> dict[str, TensorInfo] | None:
    """The tensors' headers of a checkpoint directory, or None before its weights are downloaded."""
    path = Path(path)
    return Checkpoint._scan(path) if path.is_dir() and any(path.glob("*.safetensors")) else None


def plan_config(path: str | Path, tensors: dict[str, TensorInfo] | None = None) -> NVLMConfig:
    """The config that plans should use: config.json, with what the weights say when they are present
    (the vision attention's padding heads); config.json alone before the weights are downloaded. `tensors`:
    the headers when the caller has scanned them already."""
    cfg = load_config(path)
    tensors = scan_tensors(path) if tensors is None else tensors
    if tensors is not None:
        cfg = vision_padding_from_weights(cfg, {n: t.shape for n, t in tensors.items()})
    return cfg


def _scan_indexed(directory: Path, index_path: Path, shard_files: list[str]) -> dict[str, TensorInfo]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index_path.name}: not a valid index (needs a JSON object 'weight_map')") from None

    listed = sorted(set(weight_map.values()))
    absent = [s for s in listed if not (directory / s).is_file()]
    if absent:
        raise CheckpointError(f"{index_path.name} lists shards that are not in {directory}: {', '.join(absent)}")

    tensors: dict[str, TensorInfo] = {}
    seen_in: dict[str, str] = {}
    problems = []
    for shard in listed:
        for name, info in read_safetensors_header(directory / shard).items():
            if name in seen_in:
                problems.append(f"tensor {name!r} is stored twice ({seen_in[name]} and {shard})")
                continue
            seen_in[name] = shard
            if name not in weight_map:
                problems.append(f"{shard} holds tensor {name!r} that {index_path.name} does not list")
            elif weight_map[name] != shard:
                problems.append(f"{index_path.name} puts {name!r} in {weight_map[name]} but it is in {shard}")
            tensors[name] = info
    for name, shard in weight_map.items():
        if name not in seen_in:
            problems.append(f"{index_path.name} lists {name!r} in {shard} but that shard does not contain it")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; … ({len(problems) - 10} more)" if len(problems) > 10 else "")
        raise CheckpointError(f"{directory}: index and shards disagree — {shown}")
    unlisted = sorted(set(shard_files) - set(listed))
    if unlisted:
        log.warning("ignoring safetensors files not named by the index: %s", ", ".join(unlisted))
    return tensors
