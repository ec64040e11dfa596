"""GPU-host adapters: `trtllm-build` for the LLM checkpoint and the TensorRT vision engine, and the GPU memory
the served models need beside the LLM engine (the build's limits are in limits.py).

Thin on purpose: everything here is either a pure function that computes settings (unit-tested
against documented expectations for NVLM-D-72B) or a lazily imported call into TensorRT /
TensorRT-LLM that only runs on GPU hosts. Where those are absent, the build records the stage as
pending and writes the exact commands to finish on a GPU host (engines/build_engines.sh).

TensorRT-LLM's TensorRT-engine builder (`trtllm-build`) is legacy since 1.0 and was removed from
the main line in 2026; releases up to the 1.2 line ship it. Capability is detected at run time
(the builder module's presence), never from a version string.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import NVLMConfig
from .errors import EngineToolError
from .families import ModelFamily
from .gpus import GPUS
from .limits import EngineLimits
from .llm_formats import LLMBuildOptions, VisionFormat

ENGINE_RELEASE = "TensorRT-LLM 1.2 (NGC container nvcr.io/nvidia/tensorrt-llm/release:1.2.x)"


@dataclass(frozen=True)
class Capability:
    tensorrt: bool
    tensorrt_llm: bool
    engine_builder: bool  # trtllm-build / tensorrt_llm.commands.build present
    gpu: bool
    detail: str

    @property
    def can_build(self) -> bool:
        return self.tensorrt and self.engine_builder and self.gpu


def detect() -> Capability:
    trt = importlib.util.find_spec("tensorrt") is not None
    trtllm = importlib.util.find_spec("tensorrt_llm") is not None
    builder = False
    if trtllm:
        try:
            builder = importlib.util.find_spec("tensorrt_llm.commands.build") is not None
        except (ImportError, ValueError):
            builder = False
    builder = builder or shutil.which("trtllm-build") is not None
    gpu = False
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        pass
    if not trt:
        detail = "no TensorRT"
    elif not trtllm:
        detail = "no TensorRT-LLM"
    elif not builder:
        detail = (f"this TensorRT-LLM has no engine builder (removed from the main line in 2026); use {ENGINE_RELEASE}")
    elif not gpu:
        detail = "no CUDA GPU"
    else:
        detail = "TensorRT, TensorRT-LLM engine builder and a GPU present"
    return Capability(trt, trtllm, builder, gpu, detail)


# --------------------------------------------------------------------------- trtllm-build


class ShellWord(str):
    """A command-line word that `finish_script` writes as it is (a shell expansion), not quoted."""


# where build_engines.sh finds the project's model definition on the GPU host (find_spec: without importing it)
MODEL_FILE_VAR = "NVLM_MODEL_FILE"


def model_file(module: str) -> str:
    """The file of a project module, found without importing it (it imports TensorRT-LLM at its top): what
    trtllm-build's --model_cls_file takes."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise EngineToolError(f"{module} is not installed with nvlm-trt; reinstall nvlm-trt (pip install -e .)")
    return spec.origin


def model_file_line(module: str) -> str:
    """The line of build_engines.sh that finds the model definition on the host it runs on."""
    find = f"import importlib.util; print(importlib.util.find_spec({module!r}).origin)"
    return f'{MODEL_FILE_VAR}="$(python3 -c {shlex.quote(find)})"'


def engine_gap(family: ModelFamily, opts: LLMBuildOptions) -> str | None:
    """Why this family's LLM engine cannot be built with these options (None: it can).

    NVLM-X/H engines (builder/trtllm_nvlm.py, runtime/core/xattn_engine.py) are built with PP = 1: TensorRT-LLM's
    runtime does not offset the cross-attention head list by the PP stage's first layer (modelConfig.h), so later
    stages would read the wrong heads."""
    if family.prompt_layout.cross_attention and opts.pp > 1:
        return (f"{family.trtllm_architecture} engines are built with PP = 1 (TensorRT-LLM's runtime does not offset "
                "the cross-attention KV-head list by the pipeline stage, modelConfig.h): use --pp 1 and --tp for the "
                "GPUs; the CPU reference and contract targets serve this build (docs/engine.md)")
    return None


def trtllm_build_args(ckpt_dir: Path, engine_dir: Path, opts: LLMBuildOptions, limits: EngineLimits,
                      engine_model: tuple[str, str] | None = None) -> list[str]:
    """The trtllm-build command line for one LLM checkpoint (TensorRT-LLM ≤ 1.2 flag names). `engine_model`:
    (file, class) of this project's model definition (NVLM-X/H), which trtllm-build loads by path."""
    args = [
        "trtllm-build",
        "--checkpoint_dir", str(ckpt_dir),
        "--output_dir", str(engine_dir),
        "--gpt_attention_plugin", "auto",  # fused attention, paged KV, in-flight batching
        "--gemm_plugin", "auto",  # picks the GEMM plugin for the checkpoint's dtype / quantization
        "--kv_cache_type", "paged",
        "--remove_input_padding", "enable",
        "--context_fmha", "enable",
        "--max_batch_size", str(limits.max_batch_size),
        "--max_input_len", str(limits.max_input_len),
        "--max_seq_len", str(limits.max_seq_len),
        "--max_num_tokens", str(limits.max_batch_size * limits.max_input_len),
    ]
    if limits.max_multimodal_len:  # NVLM-X has no image token in its decoder sequence
        # prompt-embedding table rows for image tokens (alias of --max_prompt_embedding_table_size)
        args += ["--max_multimodal_len", str(limits.max_multimodal_len)]
    if limits.max_encoder_input_len:  # NVLM-X/H: the image keys cross-attention reads, per request
        args += ["--max_encoder_input_len", str(limits.max_encoder_input_len)]
    if engine_model:
        # trtllm-build imports the file as the module `models` in its own process; rank builds in spawned
        # workers could not import it again, so they run one after the other
        args += ["--model_cls_file", engine_model[0], "--model_cls_name", engine_model[1], "--workers", "1"]
    else:
        args += ["--workers", str(opts.world_size)]
    if opts.fmt.fp8_context_fmha and opts.kv_cache_fp8:
        args += ["--use_fp8_context_fmha", "enable"]  # FP8 attention in the context phase (Hopper)
    return args


# --------------------------------------------------------------------------- vision engine


@dataclass(frozen=True)
class VisionEngineSettings:
    onnx: str
    engine: str
    input_name: str
    profile_min: tuple[int, int, int, int]
    profile_opt: tuple[int, int, int, int]
    profile_max: tuple[int, int, int, int]
    precision_flags: tuple[str, ...]  # TensorRT BuilderFlag names
    strongly_typed: bool  # FP8 Q/DQ graphs are built strongly typed
    timing_cache: str
    workspace_bytes: int
    output_shape: tuple[int, int, int]  # [-1, tokens_per_tile, llm_hidden]
    uint8_input_plugin: bool  # nvlm::normalize_tiles in front: clients send uint8 [T, S, S, 3]


def vision_engine_settings(cfg: NVLMConfig, vision_dir: Path, engine_dir: Path, dtype: str,
                           limits: EngineLimits, quant: VisionFormat | None = None,
                           uint8_input: bool = False) -> VisionEngineSettings:
    """TensorRT build settings of the vision engine; `quant`: build from the quantized Q/DQ ONNX
    (strongly typed, so that TensorRT keeps the Q/DQ precisions)."""
    s = cfg.preprocess.image_size
    opt_tiles = min(cfg.preprocess.max_tiles_per_image, limits.max_vision_tiles)  # one full image
    flags = {"fp16": ("FP16",), "bf16": ("BF16",), "fp32": ()}[dtype]
    return VisionEngineSettings(
        onnx=str(vision_dir / (quant.onnx_name() if quant else "vision_encoder.onnx")),
        engine=str(engine_dir / "vision_encoder.engine"),
        input_name="pixel_values",
        profile_min=(1, 3, s, s), profile_opt=(opt_tiles, 3, s, s), profile_max=(limits.max_vision_tiles, 3, s, s),
        precision_flags=flags + (("FP8",) if quant and quant.fp8_compute else ()),
        strongly_typed=quant is not None,
        timing_cache=str(engine_dir / "vision_timing.cache"),
        workspace_bytes=8 << 30,
        output_shape=(-1, cfg.preprocess.tokens_per_tile, cfg.llm.hidden_size),
        uint8_input_plugin=uint8_input,
    )


def build_vision_engine(settings: VisionEngineSettings) -> dict:
    """TensorRT engine from the vision ONNX (GPU hosts). Returns what was built."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineToolError("TensorRT is not installed; run on a GPU host (engines/build_engines.sh)") from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(settings.onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineToolError(f"TensorRT could not parse {settings.onnx}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if not settings.strongly_typed:
        for flag in settings.precision_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
    cache_path = Path(settings.timing_cache)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if settings.uint8_input_plugin:
        # plugins/trt_plugin.insert_normalize_plugin exists, but splicing it in front of the parsed
        # graph has not been run on a GPU yet; refuse rather than build something untested.
        raise EngineToolError("uint8 tile input (nvlm::normalize_tiles) is not enabled in engine builds yet")
    profile = builder.create_optimization_profile()
    profile.set_shape(settings.input_name, settings.profile_min, settings.profile_opt, settings.profile_max)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineToolError("TensorRT failed to build the vision engine (see the log above)")
    Path(settings.engine).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    out = network.get_output(0)
    return {"engine": settings.engine, "output_shape": list(out.shape), "settings": asdict(settings)}


def finish_script(commands: list[list[str]], extra: str = "") -> str:
    lines = ["#!/usr/bin/env bash",
             f"# Finish this build on a GPU host with TensorRT and an engine-capable TensorRT-LLM ({ENGINE_RELEASE}),",
             "# with nvlm-trt installed (the image of deploy/Dockerfile has both): builds the LLM and vision",
             "# engines, then rewrites triton_repo/ as the trt target for this host's paths.",
             "set -euo pipefail", 'cd "$(dirname "$0")/.."', extra]
    lines += [" ".join(c if isinstance(c, ShellWord) else shlex.quote(c) for c in cmd) for cmd in commands]
    return "\n".join(line for line in lines if line is not None) + "\n"


# --------------------------------------------------------------------------- GPU memory beside the LLM

GPU_MEMORY_BYTES = {name: gpu.memory_bytes for name, gpu in GPUS.items()}
# Peak activations of the vision engine per tile: InternViT-6B holds ~1025 tokens × 12800 MLP width in
# 16 bits twice over (fc1 output and its GELU) ≈ 52 MB; 64 MiB leaves room for attention scratch.
VISION_ACTIVATION_BYTES_PER_TILE = 64 * 2**20
# Preprocessing on the GPU: a uint8 resized image plus fp32 tiles; CUDA contexts of the Python models.
PREPROCESS_BYTES_PER_TILE = 8 * 2**20
CONTEXT_BYTES = 2 * 2**30
KV_FRACTION_CAP = 0.9  # the backend's own default


def kv_cache_free_gpu_mem_fraction(*, llm_bytes_per_gpu: int, vision_engine_bytes: int, max_vision_tiles: int,
                                   gpu: str = "h100-sxm") -> float:
    """`kv_cache_free_gpu_mem_fraction` for the `tensorrtllm` model when the vision engine and the CUDA
    preprocessing share GPU 0 with it. The backend applies the fraction to the memory free after the
    LLM engine is loaded, so what the other models need is taken out of that, whatever the load order."""
    total = GPU_MEMORY_BYTES[gpu]
    free_after_llm = total - llm_bytes_per_gpu
    beside = (vision_engine_bytes + max_vision_tiles * (VISION_ACTIVATION_BYTES_PER_TILE + PREPROCESS_BYTES_PER_TILE)
              + CONTEXT_BYTES)
    if free_after_llm <= 0 or beside >= 0.9 * free_after_llm:
        raise EngineToolError(f"a {gpu} GPU ({total / 2**30:.0f} GiB) has no room for a KV cache: the LLM takes "
                              f"{llm_bytes_per_gpu / 2**30:.1f} GiB per GPU and the vision engine, its activations "
                              f"and preprocessing {beside / 2**30:.1f} GiB; use more tensor parallelism, a smaller "
                              "format, or fewer tiles per batch")
    return min(KV_FRACTION_CAP, int(100 * (1 - beside / free_after_llm)) / 100)
