"""A request's decoding parameters, described once.

Each `Param` row says everything the project needs about one parameter: its name at the entry model (the
name of NVIDIA's `ensemble` template, which `nvlm-client`, the OpenAI front and the reference executor use
too), its Triton dtype there, its default, the rule a value must pass, the `tensorrtllm` backend's name and
dtype for it (TensorRT-LLM's `triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt`),
when the entry model forwards it, and its OpenAI field. Everything else is derived from `PARAMS`:

- the entry model's inputs (`triton_repo/specs.entry_inputs`) and the tensors it sends the LLM step
  (`llm_step_inputs`, `to_llm_step`), which `triton_repo/check.py` checks against NVIDIA's contract;
- the LLM step's parsing (`from_llm_step`) into the executor's per-request `Controls`;
- `nvlm-client`'s flags (`add_flags`, `from_flags`) and its request tensors (`client_tensors`);
- the OpenAI front's fields (`from_openai`).

Adding a parameter is one row here (tests/test_request_schema.py adds one in a scratch copy and finds it in
every place above). What a parameter does to the logits is runtime/decoding.py's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .errors import InputError

# value kinds: a Python type per kind, and the numpy dtype of each Triton dtype used here
KINDS = {"float": float, "int": int, "bool": bool, "words": tuple}
NUMPY = {"FP32": np.float32, "INT32": np.int32, "UINT64": np.uint64, "BOOL": bool}


@dataclass(frozen=True)
class Param:
    name: str  # entry input, nvlm-client's --flag, OpenAI field (unless `openai` says otherwise), Controls field
    kind: str  # KINDS: "words" is a list of strings at the entry, token sequences after it
    dtype: str  # the entry input's Triton dtype (words: BYTES)
    default: Any  # what an absent value means (None: decided later — end_id: the tokenizer's stop id)
    llm_step: str  # the `tensorrtllm` backend's input name
    llm_dtype: str  # its dtype there (words: INT32 [2, L], TensorRT-LLM's word-list layout)
    rule: str = ""  # what a valid value is, for the error message ("" : anything finite)
    ok: Callable[[Any, int], bool] | None = None  # (value, max_tokens) → valid
    send: str = "if_set"  # "always": the entry forwards its value or the default; "if_set": only when sent
    help: str = ""
    openai: str = ""  # the OpenAI (or vLLM extension) field, when it has another name
    openai_range: tuple[float | None, float | None] | None = None  # the OpenAI API's own, stricter bounds
    flag_repeat: str = ""  # words: nvlm-client's repeatable flag (one word each)

    @property
    def openai_name(self) -> str:
        return self.openai or self.name

    @property
    def flag(self) -> str:
        return "--" + (self.flag_repeat or self.name).replace("_", "-")


def _finite(v, _):
    return math.isfinite(v)


PARAMS: tuple[Param, ...] = (
    Param("temperature", "float", "FP32", 0.0, "temperature", "FP32", "a finite number ≥ 0 (0 = greedy)",
          lambda v, _: math.isfinite(v) and v >= 0, "always", "logits are divided by it; 0: greedy",
          openai_range=(0, 2)),
    Param("top_k", "int", "INT32", 1, "runtime_top_k", "INT32", "≥ 0 (0 = no top-k cut)",
          lambda v, _: v >= 0, "always", "sample among the k likeliest tokens (1: greedy, 0: no cut)"),
    Param("top_p", "float", "FP32", 0.0, "runtime_top_p", "FP32", "in [0, 1] (0 = no nucleus cut)",
          lambda v, _: math.isfinite(v) and 0 <= v <= 1, "always", "nucleus sampling mass (0: no cut)"),
    Param("seed", "int", "UINT64", 0, "seed", "UINT64", "≥ 0", lambda v, _: v >= 0, "always",
          "the request's random seed"),
    Param("min_tokens", "int", "INT32", 0, "min_tokens", "INT32", "in 0…max_tokens",
          lambda v, n: 0 <= v <= n, "always", "the end id is banned until this many tokens were generated"),
    Param("beam_width", "int", "INT32", 1, "beam_width", "INT32", "1 (engines are built with max_beam_width 1)",
          lambda v, _: v == 1, help="beams (only 1: the engines are built without beam search)"),
    Param("end_id", "int", "INT32", None, "end_id", "INT32", "≥ 0", lambda v, _: v >= 0, "always",
          "the token that ends generation (default: the chat format's stop token)"),
    Param("repetition_penalty", "float", "FP32", 1.0, "repetition_penalty", "FP32", "a finite number > 0 (1 = off)",
          lambda v, _: math.isfinite(v) and v > 0, help="seen tokens' logits divided (or multiplied) by it",
          openai_range=(0.01, 100)),
    Param("presence_penalty", "float", "FP32", 0.0, "presence_penalty", "FP32", "a finite number", _finite,
          help="subtracted from every seen token's logit", openai_range=(-2, 2)),
    Param("frequency_penalty", "float", "FP32", 0.0, "frequency_penalty", "FP32", "a finite number", _finite,
          help="subtracted once per occurrence of a seen token", openai_range=(-2, 2)),
    Param("length_penalty", "float", "FP32", 0.0, "len_penalty", "FP32", "a finite number", _finite,
          help="beam search's length penalty (no effect at beam width 1)"),
    Param("stop_words", "words", "BYTES", (), "stop_words_list", "INT32", help="generation ends at the first; "
          "it is not returned", openai="stop", flag_repeat="stop"),
    Param("bad_words", "words", "BYTES", (), "bad_words_list", "INT32", help="words never produced",
          flag_repeat="bad_word"),
    Param("return_log_probs", "bool", "BOOL", False, "return_log_probs", "BOOL",
          help="return each token's log-probability", openai="logprobs", flag_repeat="log_probs"),
)
BY_NAME = {p.name: p for p in PARAMS}
BY_LLM_STEP = {p.llm_step: p for p in PARAMS}


# The executor's per-request controls: one field per parameter, under the same name, with its default.
Controls = make_dataclass(
    "Controls", [(p.name, KINDS[p.kind], field(default=p.default)) for p in PARAMS], frozen=True,
    namespace={"__doc__": "A request's decoding controls (runtime/core/request_schema.PARAMS: names, defaults); "
                          "runtime/decoding.py applies them as TensorRT-LLM's sampling layers do.",
               "penalised": property(lambda c: c.repetition_penalty != 1.0 or c.presence_penalty != 0.0
                                     or c.frequency_penalty != 0.0)})


def validate(values: Mapping[str, Any], max_tokens: int) -> None:
    """Refuse the first value that breaks its parameter's rule, by name (InputError)."""
    for name, v in values.items():
        p = BY_NAME[name]
        if v is None or p.kind in ("words", "bool") or p.ok is None:
            continue
        if not p.ok(v, max_tokens):
            rule = p.rule.replace("max_tokens", f"max_tokens ({max_tokens})")
            raise InputError(f"{name} must be {rule}, got {v}")


def controls(values: Mapping[str, Any], max_tokens: int) -> "Controls":
    """Checked values (absent or None: the default) → the executor's Controls."""
    validate(values, max_tokens)
    return Controls(**{k: v for k, v in values.items() if v is not None})


# --------------------------------------------------------------------------- Triton tensors

def _scalar(get, name: str, cast):
    v = get(name)
    if v is None or np.size(v) == 0:
        return None
    return cast(np.asarray(v).reshape(-1)[0])


def _texts(v) -> tuple[str, ...]:
    if v is None:
        return ()
    return tuple(w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in np.asarray(v).reshape(-1))


def from_entry(get: Callable[[str], Any]) -> dict[str, Any]:
    """The entry model's inputs (`get(name)` → array or None) → name → value for every parameter that was
    sent (words as strings)."""
    out = {}
    for p in PARAMS:
        v = _texts(get(p.name)) if p.kind == "words" else _scalar(get, p.name, KINDS[p.kind])
        if v is not None and v != ():
            out[p.name] = v
    return out


def to_llm_step(values: Mapping[str, Any], words: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Checked values → the tensors the entry model sends the LLM step (NVIDIA's names and dtypes, no batch
    dimension): every "always" parameter (its value or default), every "if_set" one that was sent. `words`:
    name → the [2, L] word-list tensor of each words parameter that has words."""
    out = []
    for p in PARAMS:
        if p.kind == "words":
            if p.name in words:
                out.append((p.llm_step, words[p.name]))
            continue
        v = values.get(p.name)
        if v is None and p.send == "always":
            v = p.default
        if v is None or (p.kind == "bool" and p.send == "if_set" and not v):
            continue
        out.append((p.llm_step, np.asarray([v], NUMPY[p.llm_dtype])))
    return out


def from_llm_step(get: Callable[[str], Any], parse_words: Callable[[Any, str], tuple]) -> dict[str, Any]:
    """The LLM step's inputs (NVIDIA's names) → name → value for every parameter sent (words as token
    sequences, via `parse_words(array, input name)`)."""
    out = {}
    for p in PARAMS:
        if p.kind == "words":
            w = parse_words(get(p.llm_step), p.llm_step)
            if w:
                out[p.name] = w
            continue
        v = _scalar(get, p.llm_step, KINDS[p.kind])
        if v is not None:
            out[p.name] = v
    return out


def llm_step_inputs() -> tuple[str, ...]:
    """Every LLM-step input a parameter can become (what the entry may send)."""
    return tuple(p.llm_step for p in PARAMS)


def client_tensors(values: Mapping[str, Any]) -> dict[str, tuple[str, np.ndarray]]:
    """Set values (None and empty word lists are left out: the server's default) → name → (Triton dtype,
    array), the entry model's inputs as a client sends them."""
    out = {}
    for name, v in values.items():
        p = BY_NAME[name]
        if v is None or (p.kind == "words" and not v):
            continue
        if p.kind == "words":
            out[name] = ("BYTES", np.array([w.encode() for w in v], dtype=object))
        else:
            out[name] = (p.dtype, np.array([v], NUMPY[p.dtype]))
    return out


# --------------------------------------------------------------------------- command line and OpenAI

def add_flags(parser) -> None:
    """One nvlm-client flag per parameter (absent: not sent, the server's default)."""
    for p in PARAMS:
        if p.kind == "words":
            parser.add_argument(p.flag, dest=p.name, action="append", default=[], help=p.help + " (repeatable)")
        elif p.kind == "bool":
            parser.add_argument(p.flag, dest=p.name, action="store_true", default=None, help=p.help)
        else:
            parser.add_argument(p.flag, dest=p.name, type=KINDS[p.kind],
                                help=p.help if p.default is None else f"{p.help} (default {p.default})")


def from_flags(args) -> dict[str, Any]:
    return {p.name: (tuple(getattr(args, p.name)) if p.kind == "words" else getattr(args, p.name)) for p in PARAMS}


def from_openai(body: Mapping[str, Any], bad: Callable[[str, str], Exception]) -> dict[str, Any]:
    """An OpenAI request body → name → value of the parameters it sets (`bad(message, field)` makes the
    error to raise). Numbers are checked against the OpenAI API's bounds where it has its own."""
    out = {}
    for p in PARAMS:
        key = p.openai_name
        v = body.get(key)
        if v is None:
            continue
        if p.kind == "words":
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                raise bad(f"{key} must be a string or a list of non-empty strings", key)
            out[p.name] = tuple(v)
        elif p.kind == "bool":
            out[p.name] = bool(v)
        else:
            kind = KINDS[p.kind]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
                raise bad(f"{key} must be a{'n integer' if kind is int else ' number'}", key)
            lo, hi = p.openai_range or (None, None)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise bad(f"{key} must be in [{lo}, {hi}], got {v}", key)
            out[p.name] = kind(v)
    return out
