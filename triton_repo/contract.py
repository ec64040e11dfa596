"""NVIDIA's `tensorrtllm` backend contract (1.2 line), read from contracts/tensorrtllm_backend_1.2.json.

The JSON file is the one place where the backend's model I/O, required parameters and error messages
are written down, each entry citing the NVIDIA source file and commit it was read from. Everything
that must agree with the real backend reads it from here:

- the `trt` target's `tensorrt_llm` config (all of NVIDIA's inputs and outputs, templated dtypes
  resolved against the engine dtype) and the client-facing `nvlm` inputs (the `ensemble` template's names);
- the `contract` target's stand-ins (triton_repo/serving.py), which refuse what the backend refuses,
  with its messages;
- `check_repository`, run on every generated repository and by the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from builder.errors import NVLMError

CONTRACT_FILE = Path(__file__).parent / "contracts" / "tensorrtllm_backend_1.2.json"

# TensorRT-LLM checkpoint `dtype` → Triton dtype of tensors that must equal the engine's (prompt table)
ENGINE_DTYPES = {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}
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

    def input(self, name: str) -> IOEntry:
        for e in self.inputs:
            if e.name == name:
                return e
        raise KeyError(f"{name!r} is not an input of NVIDIA's tensorrt_llm model")

    def cite(self, source: str) -> str:
        s = self.sources[source]
        return f"NVIDIA/TensorRT-LLM {s['path']}@{s['commit'][:12]}"


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


def engine_dtype(llm_config: dict) -> str:
    """Triton dtype of the engine's activations, from the TensorRT-LLM checkpoint's `dtype`."""
    try:
        return ENGINE_DTYPES[llm_config["dtype"]]
    except KeyError:
        raise ContractError(f"llm/config.json dtype {llm_config.get('dtype')!r} has no Triton prompt-table dtype "
                            f"(known: {', '.join(ENGINE_DTYPES)})") from None


def resolve(entry: IOEntry, engine: str) -> str:
    """The concrete dtype of a contract entry for an engine whose activations are `engine`."""
    if entry.dtype in (TABLE_DTYPE_TEMPLATE, ENCODER_DTYPE_TEMPLATE):
        return engine
    if entry.dtype == LOGITS_DTYPE_TEMPLATE:
        return "FP32"
    return entry.dtype


# --------------------------------------------------------------------------- repository check


def _declared(cfg) -> dict[str, str]:
    from .specs import dtype_name

    return {i.name: dtype_name(i.data_type) for i in cfg.input}


def check_repository(repo: str | Path, *, engine: str, sends: dict[str, str], vision_sends: str | None = None) -> list[str]:
    """Violations of the backend contract in a rendered repository (empty: it meets it).

    `engine`: the engine's Triton dtype; `sends`: name → dtype of every tensor the entry model sends
    `tensorrt_llm`; `vision_sends`: the dtype of the pixel values it sends `vision_encoder`.
    Applies to every target: the reference target's Python model must accept what the entry sends too,
    the NVIDIA-specific rules apply where `tensorrt_llm` carries NVIDIA's parameters (trt, contract).
    """
    from .specs import parse

    repo = Path(repo)
    c = load_contract()
    problems: list[str] = []
    llm = parse((repo / "tensorrt_llm" / "config.pbtxt").read_text())
    declared = _declared(llm)
    for name, dtype in sends.items():
        if name not in declared:
            problems.append(f"tensorrt_llm does not declare input {name!r}, which the entry model sends")
        elif declared[name] != dtype:
            problems.append(f"tensorrt_llm declares {name!r} as {declared[name]}, the entry model sends {dtype}")
    if declared.get("prompt_embedding_table", engine) != engine:
        problems.append(f"prompt_embedding_table is {declared['prompt_embedding_table']} but the engine is {engine}: "
                        + c.message("table_dtype"))
    params = {k: v.string_value for k, v in llm.parameters.items()}
    nvidia = llm.backend == "tensorrtllm" or "gpt_model_type" in params
    if nvidia:
        for key in c.required_parameters:
            if key not in params:
                problems.append(c.message("missing_parameter", name=key)
                                + f" ({c.cite('instance_state')})")
        if params.get("gpt_model_type", c.model_type_values[-1]) not in c.model_type_values:
            problems.append(c.message("bad_model_type"))
        want = {e.name: resolve(e, engine) for e in c.inputs}
        if declared != want:
            extra, missing = set(declared) - set(want), set(want) - set(declared)
            wrong = {n for n in set(want) & set(declared) if want[n] != declared[n]}
            problems.append(f"tensorrt_llm inputs differ from NVIDIA's ({c.cite('config')}): unknown {sorted(extra)}, "
                            f"missing {sorted(missing)}, other dtype {sorted(wrong)}")
        reuse = params.get("enable_kv_cache_reuse", c.defaults["enable_kv_cache_reuse"]).lower() in ("true", "1")
        if reuse and "prompt_embedding_table" in sends and sends.get("prompt_table_extra_ids") != "UINT64":
            problems.append("KV-cache block reuse is on but images are not keyed: send prompt_table_extra_ids "
                            "(UINT64, one per input token) or set enable_kv_cache_reuse false")
    if vision_sends is not None and (repo / "vision_encoder" / "config.pbtxt").is_file():
        vis = parse((repo / "vision_encoder" / "config.pbtxt").read_text())
        got = _declared(vis).get("pixel_values")
        if got != vision_sends:
            problems.append(f"vision_encoder declares pixel_values as {got}, the entry model sends {vision_sends}")
    return problems
