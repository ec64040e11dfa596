"""`check_repository`: a rendered Triton repository against the backend contract (triton_repo/contract.py).

Run on every repository `generate_repo` writes, of every target, and by the tests.
"""

from __future__ import annotations

from pathlib import Path

from .contract import load_contract, resolve
from .specs import dtype_name, parse


def _declared(cfg) -> dict[str, str]:
    return {i.name: dtype_name(i.data_type) for i in cfg.input}


def cross_fraction_problem(params: dict[str, str], *, cross: bool) -> str | None:
    """What the backend refuses at load about `cross_kv_cache_fraction`, the cross KV cache's share of the KV
    memory: required exactly when the engine has cross-attention (contract `cross_attention`)."""
    c = load_contract()
    fraction = params.get("cross_kv_cache_fraction", "").strip()
    if cross and not fraction:
        return (f"{c.message('cross_fraction_missing')} ({c.cite('cross_kv_cache')}): set the tensorrt_llm "
                "parameter cross_kv_cache_fraction")
    if not cross and fraction:
        return (f"{c.message('cross_fraction_unused')} ({c.cite('cross_kv_cache')}): remove the tensorrt_llm "
                "parameter cross_kv_cache_fraction")
    if cross:
        try:
            ok = 0.0 < float(fraction) < 1.0
        except ValueError:
            ok = False
        if not ok:
            return f"cross_kv_cache_fraction {fraction!r} must be a number between 0 and 1 (exclusive)"
    return None


def check_repository(repo: str | Path, *, engine: str, sends: dict[str, str], vision_sends: str | None = None) -> list[str]:
    """Violations of the backend contract in a rendered repository (empty: it meets it).

    `engine`: the engine's Triton dtype; `sends`: name → dtype of every tensor the entry model sends
    `tensorrt_llm`; `vision_sends`: the dtype of the pixel values it sends `vision_encoder`.
    Applies to every target: the reference target's Python model must accept what the entry sends too,
    the NVIDIA-specific rules apply where `tensorrt_llm` carries NVIDIA's parameters (trt, contract).
    """

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
        cross = "encoder_input_features" in sends
        fraction = cross_fraction_problem(params, cross=cross)
        problems += [fraction] if fraction else []
        if cross and reuse:
            problems.append("KV-cache block reuse is on for an engine with cross-attention: a block is found by its "
                            "tokens, not by the image features mixed into it; set enable_kv_cache_reuse false "
                            f"(as {c.cite('mllama_recipe')} does)")
    if vision_sends is not None and (repo / "vision_encoder" / "config.pbtxt").is_file():
        vis = parse((repo / "vision_encoder" / "config.pbtxt").read_text())
        got = _declared(vis).get("pixel_values")
        if got != vision_sends:
            problems.append(f"vision_encoder declares pixel_values as {got}, the entry model sends {vision_sends}")
    return problems
