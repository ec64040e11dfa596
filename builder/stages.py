"""The stages of `nvlm-build engine`: each writes one output of the build directory into a temporary
folder that the driver (builder/engine_build.py) renames into place and records in the manifest.

    tokenizer → preprocess.json → vision/ → llm/ → engines/ → triton_repo/ → deploy/ → reports/

A stage is `Stage(name, output, run(ctx, tmp) -> details, estimate_bytes(ctx))`; `STAGES` is their order.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runtime.core.build_dir import write_preprocess
from runtime.core.checkpoint import Checkpoint
from runtime.core.demo_checkpoint import is_trained_default
from runtime.core.errors import NVLMError
from runtime.core.families import DECODER_ROLES, family_for
from runtime.core.gpu_host import (
    MODEL_FILE_VAR,
    ShellWord,
    build_vision_engine,
    engine_gap,
    finish_script,
    model_file,
    model_file_line,
    trtllm_build_args,
    vision_engine_settings,
)
from runtime.core.inspect import llm_bytes
from runtime.core.limits import EngineLimits
from runtime.core.llm_formats import LLMBuildOptions, VisionFormat, kv_cache_name
from runtime.reference import reference_model
from runtime.tokenizer import NVLMTokenizer
from triton_repo.generate import generate_repo

from .deploy import write_kit
from .llm_build import build_llm
from .vision_export import VisionModels, export_vision

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt")


class BuildError(NVLMError):
    """The engine build cannot start or continue."""


@dataclass(frozen=True)
class DeploymentOptions:
    llm: LLMBuildOptions
    target: str = "auto"  # auto | trt | reference
    vision_dtype: str = "fp16"
    vision_quant: VisionFormat | None = None
    limits: EngineLimits = EngineLimits()
    calib_data: str | None = None
    calib_size: int = 32
    # how the LLM stage runs, not what it makes (the layer-at-a-time path gives the same checkpoint): not in
    # as_dict, so a resumed build may change them
    layerwise: str = "auto"
    device: str = "auto"

    def as_dict(self) -> dict:
        return {"quant": self.llm.fmt.name, "kv_cache_dtype": kv_cache_name(self.llm.kv_cache_fp8),
                "tp": self.llm.tp, "pp": self.llm.pp, "awq_group_size": self.llm.awq_group_size,
                "target": self.target, "vision_dtype": self.vision_dtype,
                "vision_quant": self.vision_quant.name if self.vision_quant else None,
                "max_batch_size": self.limits.max_batch_size, "max_tiles": self.limits.max_tiles_per_image,
                "max_images": self.limits.max_images_per_request,
                "max_input_text_len": self.limits.max_input_text_len, "max_output_len": self.limits.max_output_len,
                "calib_data": self.calib_data, "calib_size": self.calib_size, "chat_format": self.llm.chat_format}


@dataclass
class Context:
    ckpt: Checkpoint
    opts: DeploymentOptions
    root: Path  # the .partial directory
    engines_possible: bool = False
    engines_detail: str = ""

    def vision_models(self) -> VisionModels:
        """What the vision export loads: the vision tower and projector from the checkpoint as each step needs
        them, or, when the export checks task accuracy (the trained embedded default), the whole model."""
        if is_trained_default(self.ckpt.directory):
            return VisionModels(reference=reference_model(self.ckpt))
        return VisionModels(ckpt=self.ckpt)


@dataclass(frozen=True)
class Stage:
    name: str
    output: str | None  # folder or file under the build root this stage owns
    run: Callable[[Context, Path], dict]  # (ctx, stage tmp dir) -> details
    estimate_bytes: Callable[[Context], int] = lambda ctx: 0


def _tokenizer(ctx: Context, tmp: Path) -> dict:
    tok = NVLMTokenizer.from_dir(ctx.ckpt.directory)
    tok.check_vocab(ctx.ckpt.config.llm.vocab_size)
    copied = [f for f in TOKENIZER_FILES if (ctx.ckpt.directory / f).is_file()]
    for f in copied:
        shutil.copy2(ctx.ckpt.directory / f, tmp / f)
    return {"files": copied, "vocab": tok.vocab_size, "image_pad_id": tok.image_pad_id, "im_end_id": tok.im_end_id}


def _preprocess(ctx: Context, tmp: Path) -> dict:
    p = ctx.ckpt.config.preprocess
    write_preprocess(tmp, p, ctx.opts.limits, ctx.opts.llm.chat_format)
    return {"tokens_per_tile": p.tokens_per_tile, "max_tiles_per_image": p.max_tiles_per_image,
            "chat_format": ctx.opts.llm.chat_format}


def _vision(ctx: Context, tmp: Path) -> dict:
    task_tokenizer = (NVLMTokenizer.from_dir(ctx.ckpt.directory, chat_format=ctx.opts.llm.chat_format)
                      if is_trained_default(ctx.ckpt.directory) else None)
    info = export_vision(ctx.vision_models(), tmp, dtype=ctx.opts.vision_dtype, vision_quant=ctx.opts.vision_quant,
                         max_tiles=ctx.opts.limits.max_vision_tiles, task_tokenizer=task_tokenizer)
    return {"dtype": info["dtype"], "files": info["files"], "checks": info["checks"]}


def _llm(ctx: Context, tmp: Path) -> dict:
    target = tmp / "ckpt"
    # a layer-at-a-time quantization keeps its per-layer work beside the stage folder (which a resumed engine
    # build starts afresh), so that `nvlm-build engine --resume` continues it from its last saved layer
    summary = build_llm(ctx.ckpt.directory, target, ctx.opts.llm, calib_data=ctx.opts.calib_data,
                        calib_size=ctx.opts.calib_size, layerwise=ctx.opts.layerwise, device=ctx.opts.device,
                        preflight=False,  # the engine build's own preflight covered this stage
                        resume=None, layer_work=ctx.root / ".llm.layerwise")
    for p in target.iterdir():  # the stage folder is the checkpoint itself
        p.rename(tmp / p.name)
    target.rmdir()
    return {"format": summary["format"], "fidelity_passed": summary["fidelity_passed"]}


def _engines(ctx: Context, tmp: Path) -> dict:
    o = ctx.opts
    family = family_for(ctx.ckpt.config)
    # NVLM-X/H: this project's model definition, found on the host the script runs on
    script_model = (ShellWord(f'"${MODEL_FILE_VAR}"'), family.trtllm_architecture) if family.engine_model else None
    llm_cmd = trtllm_build_args(Path("llm"), Path("engines/llm"), o.llm, o.limits, script_model)
    gap = engine_gap(family, o.llm)
    if gap:  # options the engine cannot take: the script stops here with the reason, not in trtllm-build
        llm_cmd = ["sh", "-c", f"echo {shlex.quote('nvlm-trt: ' + gap)} >&2; exit 2"]
    vis = vision_engine_settings(ctx.ckpt.config, Path("vision"), Path("engines"), o.vision_dtype, o.limits,
                                 quant=o.vision_quant)
    settings = {"trtllm_build": llm_cmd, "vision_engine": vis.__dict__}
    (tmp / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    vision_cmd = [sys.executable if ctx.engines_possible else "python3", "-c",
                  "import json; from runtime.core.gpu_host import VisionEngineSettings as S, build_vision_engine as b; "
                  "d = json.load(open('engines/settings.json'))['vision_engine']; "
                  "print(b(S(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})))"]
    repo_cmd = ["python3", "-m", "builder.cli", "triton-repo", ".", "-o", "triton_repo", "--target", "trt",
                "--entry-instances", "auto", "--force"]
    extra = model_file_line(family.engine_model) if family.engine_model and not gap else ""
    (tmp / "build_engines.sh").write_text(finish_script([llm_cmd, vision_cmd, repo_cmd], extra))
    (tmp / "build_engines.sh").chmod(0o755)
    if not ctx.engines_possible:
        return {"status": "pending", "reason": gap or ctx.engines_detail,
                "finish": "cd OUT && engines/build_engines.sh  (on a GPU host)"}
    if gap:
        raise BuildError(gap)
    import subprocess


    # Build into this stage's temporary folder (renamed to engines/ when done), reading the finished
    # llm/ and vision/ stages by absolute path.
    model = (model_file(family.engine_model), family.trtllm_architecture) if family.engine_model else None
    subprocess.run(trtllm_build_args(ctx.root / "llm", tmp / "llm", o.llm, o.limits, model), check=True)
    built = build_vision_engine(vision_engine_settings(ctx.ckpt.config, ctx.root / "vision", tmp, o.vision_dtype,
                                                       o.limits, quant=o.vision_quant))
    return {"status": "built", "vision_output_shape": built["output_shape"]}


def _triton_repo(ctx: Context, tmp: Path) -> dict:
    """The Triton model repository: `reference` target unless the engines were built here. Python
    models find the build through an absolute path; the repository is regenerated by
    `nvlm-build triton-repo BUILD -o REPO` after moving a build."""

    target = "trt" if ctx.engines_possible else "reference"
    final_root = ctx.root.with_name(ctx.root.name[1:-len(".partial")])  # .OUT.partial → OUT
    models = generate_repo(ctx.root, tmp, target, build_path=final_root, repo_path=final_root / "triton_repo")
    return {"target": target, "models": models}


def _deploy(ctx: Context, tmp: Path) -> dict:
    """deploy/: Dockerfile, launch script and the nvlm-trt source, for serving on a GPU host."""

    return write_kit(tmp, ctx.opts.llm.world_size)


def _reports(ctx: Context, tmp: Path) -> dict:
    llm_report = json.loads((ctx.root / "llm" / "reports" / "fidelity.json").read_text())
    vision = json.loads((ctx.root / "vision" / "config.json").read_text())["checks"]
    checks = [{"component": "llm", **c} for c in llm_report["checks"]]
    checks += [{"component": "vision", "name": name, **c, "why": "onnxruntime check of the exported encoder"}
               for name, c in vision.items()]
    report = {"passed": all(c["passed"] for c in checks), "llm_format": llm_report["format"], "checks": checks}
    (tmp / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    if not report["passed"]:
        raise BuildError("fidelity checks failed: " + ", ".join(c["name"] for c in checks if not c["passed"]))
    return {"passed": True, "checks": len(checks)}


def _vision_bytes(ctx: Context) -> int:
    params = sum(c.num_params(ctx.ckpt.config) for c in family_for(ctx.ckpt.config).components if c.name not in DECODER_ROLES)
    quant = ctx.opts.vision_quant
    return int(params * (4 + (quant.bytes_per_param if quant else 0)))  # fp32 upper bound + a quantized copy


def _llm_bytes(ctx: Context) -> int:
    return llm_bytes(ctx.ckpt.config, ctx.opts.llm.fmt, ctx.opts.llm.awq_group_size)


STAGES = [
    Stage("tokenizer", "tokenizer", _tokenizer),
    Stage("preprocess", "preprocess.json", _preprocess),
    Stage("vision", "vision", _vision, lambda ctx: _vision_bytes(ctx)),
    Stage("llm", "llm", _llm, _llm_bytes),
    Stage("engines", "engines", _engines),
    Stage("triton_repo", "triton_repo", _triton_repo),
    Stage("deploy", "deploy", _deploy),
    Stage("reports", "reports", _reports),
]
