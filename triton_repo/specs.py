"""Typed specs of the Triton model configs, rendered to `config.pbtxt` through Triton's own protobuf.

A spec is plain data; `render(spec)` refuses any unfilled field (None) — naming it — and builds a
`ModelConfig` message from `tritonclient.grpc.model_config_pb2`, so every rendered config parses
as Triton's schema by construction, and `parse(text)` reads one back for tests and tools.

Three targets share one model set and one entry model:
- `trt` (GPU hosts): `tensorrt_llm` on NVIDIA's `tensorrtllm` backend and `vision_encoder` as a TensorRT
  plan, both declared exactly as triton_repo/contract.py's contract file says;
- `contract` (CPU): the `trt` repository with only those two models replaced by Python stand-ins that
  declare the same I/O and parameters and refuse what the real backend refuses;
- `reference` (CPU): Python models computing with the reference executor, declaring the tensors
  they honour (a subset of NVIDIA's, under NVIDIA's names and dtypes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

from runtime.core import request_schema
from runtime.core.errors import NVLMError
from runtime.core.families import ModelFamily
from runtime.core.limits import EngineLimits

from .contract import load_contract, resolve

# our dtype names → Triton's DataType enum (Triton calls variable-length bytes TYPE_STRING)
DTYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
          "UINT64": "TYPE_UINT64", "FP16": "TYPE_FP16", "BF16": "TYPE_BF16", "FP32": "TYPE_FP32",
          "BYTES": "TYPE_STRING"}


class RenderError(NVLMError):
    """A model config spec has unfilled or invalid fields."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    reshape: bool = False  # `reshape: { shape: [ ] }`: a [1] input of a batching model arrives as a scalar
    ragged: bool = False  # `allow_ragged_batch: true`


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
    gpus: tuple[int, ...] = ()  # instance_group gpus (KIND_GPU); empty: every visible GPU


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
        inp = cfg.input.add(name=t.name, data_type=getattr(pb, DTYPES[t.dtype]), dims=list(t.dims),
                            optional=t.optional, allow_ragged_batch=t.ragged)
        if t.reshape:
            inp.reshape.SetInParent()
    for t in spec.outputs:
        cfg.output.add(name=t.name, data_type=getattr(pb, DTYPES[t.dtype]), dims=list(t.dims))
    cfg.model_transaction_policy.decoupled = spec.decoupled
    cfg.instance_group.add(count=spec.instance_count, kind=getattr(pb.ModelInstanceGroup, spec.instance_kind),
                           gpus=list(spec.gpus))
    if spec.dynamic_batching:
        cfg.dynamic_batching.SetInParent()
    for k, v in spec.parameters.items():
        cfg.parameters[k].string_value = str(v)
    return text_format.MessageToString(cfg)


def dtype_name(enum_value: int) -> str:
    """Our dtype name of a ModelConfig DataType enum value."""
    from tritonclient.grpc import model_config_pb2 as pb

    return {getattr(pb, v): k for k, v in DTYPES.items()}[enum_value]


def parse(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    return text_format.Parse(text, pb.ModelConfig())



# --------------------------------------------------------------------------- the NVLM model set

TARGETS = ("reference", "trt", "contract")

# What the entry model sends `tensorrt_llm` is the family's (ModelFamily.llm_step_inputs: the request schema's
# decoding parameters and the family's image inputs; models/entry.py builds exactly these tensors), under
# NVIDIA's names; their dtypes come from the contract, the prompt table's from the engine. The reference
# target's `tensorrt_llm` declares those plus these (so that a direct caller's pad id is not an unknown input).
REFERENCE_LLM_EXTRA_INPUTS = ("pad_id",)
LLM_STEP_OUTPUTS = ("output_ids", "sequence_length", "cum_log_probs", "output_log_probs")


def _contract_tensors(entries, engine: str, only=None) -> tuple[Tensor, ...]:
    picked = entries if only is None else [e for e in entries if e.name in only]
    return tuple(Tensor(e.name, resolve(e, engine), e.dims, e.optional, e.reshape, e.ragged) for e in picked)


def llm_step_sends(engine: str, family: ModelFamily) -> dict[str, str]:
    """name → dtype of every tensor the entry model sends `tensorrt_llm` of `family` for an engine of
    dtype `engine`."""

    return {t.name: t.dtype for t in _contract_tensors(load_contract().inputs, engine, family.llm_step_inputs)}


def entry_inputs() -> tuple[Tensor, ...]:
    """Client-facing inputs: NVIDIA's `ensemble` template's names and dtypes (the subset nvlm-trt
    implements), plus images as encoded bytes."""

    ours = (Tensor("image_bytes", "BYTES", (-1,), optional=True),
            # a whole conversation as JSON [{"role", "content"}] (the OpenAI API sends one); replaces
            # text_input's single user turn
            Tensor("messages", "BYTES", (1,), optional=True))
    contract = tuple(Tensor(e.name, e.dtype, e.dims, e.optional) for e in load_contract().client_inputs)
    # every decoding parameter of the request schema; those NVIDIA's template has keep its place and dtype
    # (tests/test_request_schema.py checks that the two agree), the others follow it
    known = {t.name for t in contract}
    added = tuple(Tensor(p.name, p.dtype, (-1,) if p.kind == "words" else (1,), optional=True)
                  for p in request_schema.PARAMS if p.name not in known)
    return ours + contract + added


def entry_outputs() -> tuple[Tensor, ...]:
    # output_ids is ours: clients and tests check tokens exactly
    return (Tensor("output_ids", "INT32", (-1,)),) + tuple(
        Tensor(e.name, e.dtype, e.dims) for e in load_contract().client_outputs)


def trtllm_parameters(engine_dir: str | None, kv_cache_free_gpu_mem_fraction: float,
                      cross_kv_cache_fraction: float | None = None) -> dict:
    """Parameters of the `tensorrtllm` model (NVIDIA's template keys). The three guided-decoding keys are
    read without a fallback by the backend: present and empty means off. `cross_kv_cache_fraction`: an engine
    with cross-attention (NVLM-X/H), whose KV memory the backend splits between a self and a cross cache, and
    whose blocks must not be reused (the contract's `cross_attention` rule); None: without."""
    cross = {} if cross_kv_cache_fraction is None else {
        "cross_kv_cache_fraction": cross_kv_cache_fraction, "enable_kv_cache_reuse": "false"}
    return {**_nvidia_parameters(engine_dir, kv_cache_free_gpu_mem_fraction), **cross}


def _nvidia_parameters(engine_dir: str | None, kv_cache_free_gpu_mem_fraction: float) -> dict:
    return {"max_beam_width": 1, "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
            "gpt_model_type": "inflight_fused_batching", "gpt_model_path": engine_dir,
            "batch_scheduler_policy": "guaranteed_no_evict",
            "kv_cache_free_gpu_mem_fraction": kv_cache_free_gpu_mem_fraction,
            "exclude_input_in_output": "true",
            # reuse stays on: the entry keys every image's positions with prompt_table_extra_ids
            "enable_kv_cache_reuse": "true",
            "executor_worker_path": "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker",
            "tokenizer_dir": "", "xgrammar_tokenizer_info_path": "", "guided_decoding_backend": ""}


def model_specs(target: str, *, family: ModelFamily, llm_hidden: int, max_batch_size: int,
                engine_dtype: str = "BF16", vision_dtype: str = "FP16", engine_dir: str | None = None, build_dir: str = "",
                kv_cache_free_gpu_mem_fraction: float = 0.9, cross_kv_cache_fraction: float | None = None,
                image_size: int = 448, tokens_per_tile: int = 256, max_queue: int | None = None,
                entry_instances: int = 1) -> list[ModelSpec]:
    """Model configs of the repository for `target` (TARGETS). `engine_dtype`: the LLM engine's activation
    dtype (the prompt table must match it); `vision_dtype`: the vision engine's I/O dtype. Python models
    find the build (tokenizer, preprocess.json, vision ONNX, llm checkpoint) through `build_dir`."""

    if target not in TARGETS:
        raise RenderError(f"target {target!r}: choose one of {', '.join(TARGETS)}")
    contract = load_contract()
    s = image_size
    py = {"build_dir": build_dir}
    gpu_like = target in ("trt", "contract")  # declares exactly what the GPU backends declare
    vis_dtype = vision_dtype if gpu_like else "FP32"
    vision = ModelSpec(
        "vision_encoder", backend=None if target == "trt" else "python",
        platform="tensorrt_plan" if target == "trt" else None, max_batch_size=0,
        inputs=(Tensor("pixel_values", vis_dtype, (-1, 3, s, s)),),
        outputs=(Tensor("image_embeds", vis_dtype, (-1, tokens_per_tile, llm_hidden)),),
        # one vision instance on the leader's GPU: in TP leader mode rank 0 sees every GPU
        instance_kind="KIND_GPU" if target == "trt" else "KIND_CPU", gpus=(0,) if target == "trt" else (),
        parameters=py if target == "reference" else {})
    if gpu_like:
        llm = ModelSpec(
            "tensorrt_llm", backend="tensorrtllm" if target == "trt" else "python", platform=None,
            max_batch_size=max_batch_size, inputs=_contract_tensors(contract.inputs, engine_dtype),
            outputs=_contract_tensors(contract.outputs, engine_dtype), decoupled=True,
            parameters=trtllm_parameters(engine_dir, kv_cache_free_gpu_mem_fraction, cross_kv_cache_fraction),
            dynamic_batching=True)
    else:
        llm = ModelSpec(
            "tensorrt_llm", backend="python", platform=None, max_batch_size=max_batch_size,
            inputs=_contract_tensors(contract.inputs, engine_dtype,
                                     family.llm_step_inputs + REFERENCE_LLM_EXTRA_INPUTS),
            outputs=_contract_tensors(contract.outputs, engine_dtype, LLM_STEP_OUTPUTS), decoupled=True,
            parameters={"executor": "reference (runtime/executor/)", **py})
    pre = ModelSpec(
        "preprocessing", backend="python", platform=None, max_batch_size=0,
        inputs=(Tensor("text_input", "BYTES", (1,)), Tensor("image_bytes", "BYTES", (-1,), optional=True),
                Tensor("messages", "BYTES", (1,), optional=True),
                Tensor("prompt_table_extra_id", "UINT64", (1,), optional=True)),
        outputs=(Tensor("input_ids", "INT32", (-1,)), Tensor("pixel_values", "FP32", (-1, 3, s, s)),
                 Tensor("image_token_count", "INT32", (1,)), Tensor("prompt_table_extra_ids", "UINT64", (-1,)),
                 # NVLM-X/H (models/preprocessing.cross_tensors): each token's key range, the key tiles and their tag ids,
                 # the tiles whose tokens sit in the sequence
                 Tensor("key_ranges", "INT32", (-1, 2)), Tensor("key_tiles", "INT32", (-1,)),
                 Tensor("key_tag_ids", "INT32", (-1, -1)), Tensor("inline_tiles", "INT32", (-1,))),
        parameters=py)
    post = ModelSpec(
        "postprocessing", backend="python", platform=None, max_batch_size=0,
        inputs=(Tensor("output_ids", "INT32", (-1,)),), outputs=(Tensor("text_output", "BYTES", (-1,)),),
        parameters=py)
    # Entry point: BLS rather than an ensemble — images are optional per request (an ensemble would
    # run the vision step even with none), and streaming needs a decoupled model that forwards each
    # tensorrt_llm response as it arrives. It sends each callee the dtypes that callee declares,
    # which it reads from these parameters.
    if entry_instances < 1:
        raise RenderError(f"entry instances must be ≥ 1, got {entry_instances}")
    entry = ModelSpec("nvlm", backend="python", platform=None, max_batch_size=0, inputs=entry_inputs(),
                      outputs=entry_outputs(), decoupled=True, instance_count=entry_instances,
                      # each instance hands each request to a worker thread (models/entry.EntryModel), so the
                      # instance count does not cap concurrency (the engine's max batch size does); instances are
                      # processes, for the CPU per streamed token: each admits its share of the bounds below
                      parameters={**py, "vision_dtype": vis_dtype, "prompt_table_dtype": engine_dtype,
                                  "max_in_flight": max_batch_size,
                                  "max_queue": EngineLimits(max_batch_size=max_batch_size, max_queue=max_queue).queue_bound})
    return [pre, vision, llm, post, entry]
