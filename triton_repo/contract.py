"""NVIDIA's `tensorrtllm` backend contract (1.2 line), read from contracts/tensorrtllm_backend_1.2.json.

The JSON file is the one place where the backend's model I/O, required parameters and error messages
are written down, each entry citing the NVIDIA source file and commit it was read from. Everything
that must agree with the real backend reads it from here:

- the `trt` target's `tensorrt_llm` config (all of NVIDIA's inputs and outputs, templated dtypes
  resolved against the engine dtype) and the client-facing `nvlm` inputs (the `ensemble` template's names);
- the `contract` target's stand-ins (triton_repo/models/llm_step.py, vision_encoder.py), which refuse what the backend refuses,
  with its messages;
- `triton_repo.check.check_repository`, run on every generated repository and by the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from runtime.core.errors import NVLMError

CONTRACT_FILE = Path(__file__).parent / "contracts" / "tensorrtllm_backend_1.2.json"

TABLE_DTYPE_TEMPLATE = "${prompt_embedding_table_data_type}"
ENCODER_DTYPE_TEMPLATE = "${encoder_input_features_data_type}"
LOGITS_DTYPE_TEMPLATE = "${logits_datatype}"


class ContractError(NVLMError):
    """A rendered repository does not meet the backend contract."""


@dataclass(frozen=True)
class IOEntry:
    name: str
    dtype: str  # our dtype names (triton_repo/specs.DTYPES) or a ${template}
    dims: tuple[int, ...]
    optional: bool
    reshape: bool
    ragged: bool


@dataclass(frozen=True)
class Contract:
    release: str
    sources: dict
    inputs: tuple[IOEntry, ...]
    outputs: tuple[IOEntry, ...]
    required_parameters: tuple[str, ...]
    model_type_values: tuple[str, ...]
    defaults: dict
    messages: dict
    client_inputs: tuple[IOEntry, ...]
    client_outputs: tuple[IOEntry, ...]

    def message(self, key: str, **kw) -> str:
        return self.messages[key]["text"].format(**kw)

    def cite(self, source: str) -> str:
        s = self.sources[source]
        return f"{s.get('repository', 'NVIDIA/TensorRT-LLM')} {s['path']}@{s['commit'][:12]}"


def _entries(rows, with_flags: bool = True) -> tuple[IOEntry, ...]:
    out = []
    for row in rows:
        name, dtype, dims = row[0], row[1], tuple(row[2])
        flags = set(row[3].split()) if with_flags and len(row) > 3 else set()
        out.append(IOEntry(name, dtype, dims, "optional" in flags, "reshape" in flags, "ragged" in flags))
    return tuple(out)


@lru_cache(maxsize=None)
def load_contract(path: str | Path = CONTRACT_FILE) -> Contract:
    raw = json.loads(Path(path).read_text())
    params = raw["parameters"]
    return Contract(
        release=raw["release"], sources=raw["sources"], inputs=_entries(raw["inputs"]),
        outputs=_entries(raw["outputs"], with_flags=False),
        required_parameters=tuple(params["required"]["keys"]),
        model_type_values=tuple(params["gpt_model_type_values"]),
        defaults={k: v for k, v in params["defaults"].items() if k != "source"},
        messages=raw["messages"],
        client_inputs=_entries(raw["client_facing"]["inputs"]),
        client_outputs=_entries(raw["client_facing"]["outputs"], with_flags=False))


def resolve(entry: IOEntry, engine: str) -> str:
    """The concrete dtype of a contract entry for an engine whose activations are `engine`."""
    if entry.dtype in (TABLE_DTYPE_TEMPLATE, ENCODER_DTYPE_TEMPLATE):
        return engine
    if entry.dtype == LOGITS_DTYPE_TEMPLATE:
        return "FP32"
    return entry.dtype
