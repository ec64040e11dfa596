"""Typed specs of the Triton model configs, rendered to `config.pbtxt` through Triton's own protobuf.

A spec is plain data; `render(spec)` refuses any unfilled field (None) — naming it — and builds a
`ModelConfig` message from `tritonclient.grpc.model_config_pb2`, so every rendered config parses
as Triton's schema by construction, and `parse(text)` reads one back for tests and tools.

First part of the serving issue: the model set and its tensors for both targets. The Python models
behind the `reference` target and the repository writer come with the rest of that issue.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

from builder.errors import NVLMError

# our dtype names → Triton's DataType enum (Triton calls variable-length bytes TYPE_STRING)
DTYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
          "FP16": "TYPE_FP16", "BF16": "TYPE_BF16", "FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}


class RenderError(NVLMError):
    """A model config spec has unfilled or invalid fields."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class ModelSpec:
    name: str
    backend: str | None  # "python", "tensorrtllm"
    platform: str | None  # "tensorrt_plan", "ensemble"
    max_batch_size: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    decoupled: bool = False
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    parameters: dict = field(default_factory=dict)
    dynamic_batching: bool = False


def _unfilled(obj, path: str) -> list[str]:
    missing = []
    if is_dataclass(obj):
        for f in fields(obj):
            v = getattr(obj, f.name)
            if v is None and f.name not in ("backend", "platform"):
                missing.append(f"{path}.{f.name}")
            else:
                missing += _unfilled(v, f"{path}.{f.name}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            missing += _unfilled(v, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if v is None:
                missing.append(f"{path}[{k!r}]")
    return missing


def render(spec: ModelSpec) -> str:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    missing = _unfilled(spec, spec.name)
    if (spec.backend is None) == (spec.platform is None):
        missing.append(f"{spec.name}: exactly one of backend / platform")
    bad = [t.name for t in spec.inputs + spec.outputs if t.dtype not in DTYPES]
    if missing or bad:
        raise RenderError(f"model config {spec.name!r} cannot be rendered: unfilled {', '.join(missing) or '-'}; "
                          f"unknown dtypes for {', '.join(bad) or '-'}")
    cfg = pb.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    if spec.backend:
        cfg.backend = spec.backend
    if spec.platform:
        cfg.platform = spec.platform
    for t in spec.inputs:
        cfg.input.add(name=t.name, data_type=getattr(pb, DTYPES[t.dtype]), dims=list(t.dims), optional=t.optional)
    for t in spec.outputs:
        cfg.output.add(name=t.name, data_type=getattr(pb, DTYPES[t.dtype]), dims=list(t.dims))
    cfg.model_transaction_policy.decoupled = spec.decoupled
    cfg.instance_group.add(count=spec.instance_count, kind=getattr(pb.ModelInstanceGroup, spec.instance_kind))
    if spec.dynamic_batching:
        cfg.dynamic_batching.SetInParent()
    for k, v in spec.parameters.items():
        cfg.parameters[k].string_value = str(v)
    return text_format.MessageToString(cfg)


def parse(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    return text_format.Parse(text, pb.ModelConfig())


# --------------------------------------------------------------------------- the NVLM model set

# tensorrt_llm model I/O: the `tensorrtllm` backend's contract (DESIGN.md §3); the reference target's
# Python model speaks the same tensors.
TRTLLM_INPUTS = (
    Tensor("input_ids", "INT32", (-1,)),
    Tensor("input_lengths", "INT32", (1,)),
    Tensor("request_output_len", "INT32", (1,)),
    Tensor("end_id", "INT32", (1,), optional=True),
    Tensor("pad_id", "INT32", (1,), optional=True),
    Tensor("streaming", "BOOL", (1,), optional=True),
    Tensor("prompt_embedding_table", "FP16", (-1, -1), optional=True),
    Tensor("prompt_vocab_size", "INT32", (1,), optional=True),
    Tensor("runtime_top_k", "INT32", (1,), optional=True),
    Tensor("runtime_top_p", "FP32", (1,), optional=True),
    Tensor("temperature", "FP32", (1,), optional=True),
    Tensor("random_seed", "INT64", (1,), optional=True),
    Tensor("min_length", "INT32", (1,), optional=True),
    Tensor("beam_width", "INT32", (1,), optional=True),
)
TRTLLM_OUTPUTS = (Tensor("output_ids", "INT32", (-1, -1)), Tensor("sequence_length", "INT32", (-1,)))

# Client-facing entry point: tensorrtllm_backend's names, plus images as encoded bytes.
ENTRY_INPUTS = (
    Tensor("text_input", "BYTES", (1,)),
    Tensor("image_bytes", "BYTES", (-1,), optional=True),
    Tensor("max_tokens", "INT32", (1,)),
    Tensor("stream", "BOOL", (1,), optional=True),
    Tensor("temperature", "FP32", (1,), optional=True),
    Tensor("top_k", "INT32", (1,), optional=True),
    Tensor("top_p", "FP32", (1,), optional=True),
    Tensor("random_seed", "INT64", (1,), optional=True),
    Tensor("end_id", "INT32", (1,), optional=True),
    Tensor("pad_id", "INT32", (1,), optional=True),
    Tensor("min_length", "INT32", (1,), optional=True),
    Tensor("beam_width", "INT32", (1,), optional=True),
    Tensor("exclude_input_in_output", "BOOL", (1,), optional=True),
    Tensor("return_log_probs", "BOOL", (1,), optional=True),
    Tensor("bad_words", "BYTES", (-1,), optional=True),
    Tensor("stop_words", "BYTES", (-1,), optional=True),
    Tensor("repetition_penalty", "FP32", (1,), optional=True),
    Tensor("presence_penalty", "FP32", (1,), optional=True),
    Tensor("frequency_penalty", "FP32", (1,), optional=True),
    Tensor("length_penalty", "FP32", (1,), optional=True),
)
# text_output per tensorrtllm_backend; output_ids too, so clients and tests can check tokens exactly.
ENTRY_OUTPUTS = (Tensor("text_output", "BYTES", (-1,)), Tensor("output_ids", "INT32", (-1,)))


def model_specs(target: str, *, llm_hidden: int, max_batch_size: int, engine_dir: str | None = None,
                build_dir: str = "", kv_cache_free_gpu_mem_fraction: float = 0.9,
                image_size: int = 448, tokens_per_tile: int = 256) -> list[ModelSpec]:
    """Model configs of the repository for `target` ("trt" on GPU hosts, "reference" on CPU).
    Python models find the build (tokenizer, preprocess.json, vision ONNX, llm checkpoint) through
    their `build_dir` parameter."""
    if target not in ("trt", "reference"):
        raise RenderError(f"target {target!r}: choose trt or reference")
    s = image_size
    py = {"build_dir": build_dir}
    vision = ModelSpec(
        "vision_encoder", backend="python" if target == "reference" else None,
        platform="tensorrt_plan" if target == "trt" else None, max_batch_size=0,
        inputs=(Tensor("pixel_values", "FP16" if target == "trt" else "FP32", (-1, 3, s, s)),),
        outputs=(Tensor("image_embeds", "FP16" if target == "trt" else "FP32", (-1, tokens_per_tile, llm_hidden)),),
        instance_kind="KIND_GPU" if target == "trt" else "KIND_CPU", parameters={} if target == "trt" else py)
    llm_params = ({"gpt_model_type": "inflight_fused_batching", "gpt_model_path": engine_dir,
                   "batch_scheduler_policy": "guaranteed_no_evict",
                   "kv_cache_free_gpu_mem_fraction": kv_cache_free_gpu_mem_fraction,
                   "exclude_input_in_output": "true"}
                  if target == "trt" else {"executor": "reference (runtime/trtllm_executor.py)", **py})
    llm = ModelSpec(
        "tensorrt_llm", backend="tensorrtllm" if target == "trt" else "python", platform=None,
        max_batch_size=max_batch_size, inputs=TRTLLM_INPUTS, outputs=TRTLLM_OUTPUTS, decoupled=True,
        parameters=llm_params, dynamic_batching=target == "trt")
    pre = ModelSpec(
        "preprocessing", backend="python", platform=None, max_batch_size=0,
        inputs=(Tensor("text_input", "BYTES", (1,)), Tensor("image_bytes", "BYTES", (-1,), optional=True)),
        outputs=(Tensor("input_ids", "INT32", (-1,)), Tensor("pixel_values", "FP32", (-1, 3, s, s)),
                 Tensor("image_token_count", "INT32", (1,))), parameters=py)
    post = ModelSpec(
        "postprocessing", backend="python", platform=None, max_batch_size=0,
        inputs=(Tensor("output_ids", "INT32", (-1,)),), outputs=(Tensor("text_output", "BYTES", (-1,)),),
        parameters=py)
    # Entry point: BLS rather than an ensemble — images are optional per request (an ensemble would
    # run the vision step even with none), and streaming needs a decoupled model that forwards each
    # tensorrt_llm response as it arrives.
    entry = ModelSpec("nvlm", backend="python", platform=None, max_batch_size=0, inputs=ENTRY_INPUTS,
                      outputs=ENTRY_OUTPUTS, decoupled=True, instance_count=4, parameters=py)
    return [pre, vision, llm, post, entry]
