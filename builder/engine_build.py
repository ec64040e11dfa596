"""`nvlm-build engine`: one command from an NVLM checkpoint to a deployable build directory.

    OUT/
      manifest.json         what produced it: source file hashes, options, tool versions,
                            per-stage status, durations and output checksums; overall status
      tokenizer/            the checkpoint's tokenizer files
      preprocess.json       tiling and prompt parameters (DESIGN.md §2.1–2.2)
      vision/               vision_encoder.onnx (+ .fp8.onnx), config.json
      llm/                  TensorRT-LLM checkpoint (config.json, rank*.safetensors, reports/)
      engines/              GPU hosts: llm/ and vision_encoder.engine; elsewhere build_engines.sh
      triton_repo/          Triton model repository (target trt with engines, else reference)
      deploy/               GPU hosts: Dockerfile (NGC Triton + nvlm-trt), launch.sh (TP1 / MPI leader mode)
      reports/fidelity.json LLM and vision fidelity checks

Safety. The build runs in `.OUT.partial/` beside OUT; each stage writes into a temporary folder
that is renamed into place, then the manifest (replaced atomically) records it with its output
checksums. Only when every stage is done is `.OUT.partial/` renamed to OUT, so a build killed at
any point — SIGKILL included — never leaves an OUT that claims to be complete. `--resume`
continues a `.OUT.partial/` built with the same options and source, re-verifying each finished
stage's checksums and redoing any that do not verify.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .checkpoint import Checkpoint
from .engines import ENGINE_RELEASE, EngineLimits, detect, finish_script, trtllm_build_args, vision_engine_settings
from .errors import NVLMError, OutputExistsError
from .llm_formats import BuildOptions, validate

log = logging.getLogger(__name__)
SCHEMA = "nvlm-trt/build/v1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt")
STATUS_PORTABLE = "portable artifacts complete; engines pending (no TensorRT)"
STATUS_COMPLETE = "complete"


class BuildError(NVLMError):
    """The engine build cannot start or continue."""


@dataclass(frozen=True)
class EngineBuildOptions:
    llm: BuildOptions
    target: str = "auto"  # auto | trt | reference
    vision_dtype: str = "fp16"
    vision_quant: str | None = None
    limits: EngineLimits = EngineLimits()
    calib_data: str | None = None
    calib_size: int = 32

    def as_dict(self) -> dict:
        return {"quant": self.llm.fmt.name, "kv_cache_dtype": "fp8" if self.llm.kv_cache_fp8 else "auto",
                "tp": self.llm.tp, "pp": self.llm.pp, "awq_group_size": self.llm.awq_group_size,
                "target": self.target, "vision_dtype": self.vision_dtype, "vision_quant": self.vision_quant,
                "max_batch_size": self.limits.max_batch_size, "max_tiles": self.limits.max_tiles_per_image,
                "max_images": self.limits.max_images_per_request,
                "max_input_text_len": self.limits.max_input_text_len, "max_output_len": self.limits.max_output_len,
                "calib_data": self.calib_data, "calib_size": self.calib_size}


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"nvlm-trt": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "nvidia-modelopt", "onnx", "onnxruntime", "safetensors", "pillow",
                 "tensorrt", "tensorrt_llm", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- stages


@dataclass
class Context:
    ckpt: Checkpoint
    opts: EngineBuildOptions
    root: Path  # the .partial directory
    reference: object = None
    engines_possible: bool = False
    engines_detail: str = ""

    def get_reference(self):
        if self.reference is None:
            from runtime.reference import NVLMDReference

            self.reference = NVLMDReference.from_checkpoint(self.ckpt)
        return self.reference


@dataclass(frozen=True)
class Stage:
    name: str
    output: str | None  # folder or file under the build root this stage owns
    run: Callable[[Context, Path], dict]  # (ctx, stage tmp dir) -> details
    estimate_bytes: Callable[[Context], int] = lambda ctx: 0


def _tokenizer(ctx: Context, tmp: Path) -> dict:
    from runtime.tokenizer import NVLMTokenizer

    tok = NVLMTokenizer.from_dir(ctx.ckpt.directory)
    tok.check_vocab(ctx.ckpt.config.llm.vocab_size)
    copied = [f for f in TOKENIZER_FILES if (ctx.ckpt.directory / f).is_file()]
    for f in copied:
        shutil.copy2(ctx.ckpt.directory / f, tmp / f)
    return {"files": copied, "vocab": tok.vocab_size, "image_pad_id": tok.image_pad_id, "im_end_id": tok.im_end_id}


def _preprocess(ctx: Context, tmp: Path) -> dict:
    from dataclasses import asdict

    p = ctx.ckpt.config.preprocess
    data = {**asdict(p), "max_tiles_per_image": p.max_tiles_per_image,
            "max_images_per_request": ctx.opts.limits.max_images_per_request,
            "image_start": "<Image>", "image_end": "</Image>", "image_pad": "<|vision_pad|>",
            "thumbnail_tag": "<tile_global_thumbnail>", "pillow_below": "12.2"}
    (tmp / "preprocess.json").write_text(json.dumps(data, indent=2) + "\n")
    return {"tokens_per_tile": p.tokens_per_tile, "max_tiles_per_image": p.max_tiles_per_image}


def read_manifest(build: Path) -> dict | None:
    """manifest.json of a build (None when `build` has none). The one reader of what build_engine writes."""
    path = Path(build) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_preprocess(build: Path):
    """preprocess.json of a build → (typed PreprocessConfig, the raw dict with the serving extras).
    The one reader of what `_preprocess` writes."""
    from .config import PreprocessConfig

    raw = json.loads((Path(build) / "preprocess.json").read_text())
    fields = PreprocessConfig.__dataclass_fields__
    cfg = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields})
    return cfg, raw


def _vision(ctx: Context, tmp: Path) -> dict:
    from .vision_export import export_vision

    info = export_vision(ctx.get_reference(), tmp, dtype=ctx.opts.vision_dtype, vision_quant=ctx.opts.vision_quant,
                         max_tiles=ctx.opts.limits.max_vision_tiles)
    return {"dtype": info["dtype"], "files": info["files"], "checks": info["checks"]}


def _llm(ctx: Context, tmp: Path) -> dict:
    from .llm_build import build_llm

    target = tmp / "ckpt"
    summary = build_llm(ctx.ckpt.directory, target, ctx.opts.llm, calib_data=ctx.opts.calib_data,
                        calib_size=ctx.opts.calib_size)
    for p in target.iterdir():  # the stage folder is the checkpoint itself
        p.rename(tmp / p.name)
    target.rmdir()
    return {"format": summary["format"], "fidelity_passed": summary["fidelity_passed"]}


def _engines(ctx: Context, tmp: Path) -> dict:
    o = ctx.opts
    llm_cmd = trtllm_build_args(Path("llm"), Path("engines/llm"), o.llm, o.limits)
    vis = vision_engine_settings(ctx.ckpt.config, Path("vision"), Path("engines"), o.vision_dtype, o.limits,
                                 fp8=o.vision_quant == "fp8")
    settings = {"trtllm_build": llm_cmd, "vision_engine": vis.__dict__}
    (tmp / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    vision_cmd = [sys.executable if ctx.engines_possible else "python3", "-c",
                  "import json; from builder.engines import VisionEngineSettings as S, build_vision_engine as b; "
                  "d = json.load(open('engines/settings.json'))['vision_engine']; "
                  "print(b(S(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})))"]
    repo_cmd = ["python3", "-m", "builder.cli", "triton-repo", ".", "-o", "triton_repo", "--target", "trt", "--force"]
    (tmp / "build_engines.sh").write_text(finish_script([llm_cmd, vision_cmd, repo_cmd]))
    (tmp / "build_engines.sh").chmod(0o755)
    if not ctx.engines_possible:
        return {"status": "pending", "reason": ctx.engines_detail,
                "finish": "cd OUT && engines/build_engines.sh  (on a GPU host)"}
    import subprocess

    from .engines import build_vision_engine

    # Build into this stage's temporary folder (renamed to engines/ when done), reading the finished
    # llm/ and vision/ stages by absolute path.
    subprocess.run(trtllm_build_args(ctx.root / "llm", tmp / "llm", o.llm, o.limits), check=True)
    built = build_vision_engine(vision_engine_settings(ctx.ckpt.config, ctx.root / "vision", tmp, o.vision_dtype,
                                                       o.limits, fp8=o.vision_quant == "fp8"))
    return {"status": "built", "vision_output_shape": built["output_shape"]}


def _triton_repo(ctx: Context, tmp: Path) -> dict:
    """The Triton model repository: `reference` target unless the engines were built here. Python
    models find the build through an absolute path; the repository is regenerated by
    `nvlm-build triton-repo BUILD -o REPO` after moving a build."""
    from triton_repo.generate import generate_repo

    target = "trt" if ctx.engines_possible else "reference"
    final_root = ctx.root.with_name(ctx.root.name[1:-len(".partial")])  # .OUT.partial → OUT
    models = generate_repo(ctx.root, tmp, target, build_path=final_root, repo_path=final_root / "triton_repo")
    return {"target": target, "models": models}


def _deploy(ctx: Context, tmp: Path) -> dict:
    """deploy/: Dockerfile, launch script and the nvlm-trt source, for serving on a GPU host."""
    from .deploy import write_kit

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
    from .weight_map import components_for

    params = sum(c.num_params(ctx.ckpt.config) for c in components_for(ctx.ckpt.config) if c.name != "llm")
    return params * (8 if ctx.opts.vision_quant else 4)  # fp32 upper bound, twice with an FP8 copy


def _llm_bytes(ctx: Context) -> int:
    from .inspect import WEIGHT_FORMATS, llm_breakdown

    b = llm_breakdown(ctx.ckpt.config)
    per = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0}.get(ctx.opts.llm.fmt.name, WEIGHT_FORMATS["int4_awq"].linear_bytes_per_param)
    return int(b.linear * per + 2 * (b.embedding + b.lm_head + b.other))


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


# --------------------------------------------------------------------------- driver


def _source_hashes(ckpt: Checkpoint, progress: Callable[[str], None]) -> dict[str, str]:
    files = sorted({"config.json", *ckpt.shards, *(f for f in TOKENIZER_FILES if (ckpt.directory / f).is_file())}
                   | ({"model.safetensors.index.json"} if (ckpt.directory / "model.safetensors.index.json").exists()
                      else set()))
    out = {}
    for f in files:
        progress(f"hashing {f}")
        out[f] = sha256_file(ckpt.directory / f)
    return out


def _stage_ok(root: Path, record: dict) -> bool:
    out = record.get("output")
    if record.get("status") not in ("done", "pending") or not out:
        return False
    target = root / out
    if not target.exists():
        return False
    sums = tree_checksums(target) if target.is_dir() else {target.name: sha256_file(target)}
    return sums == record.get("checksums")


def build_engine(ckpt_path, out, opts: EngineBuildOptions, *, resume: bool = False, force: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda msg: log.info("%s", msg))
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial")
    ckpt = Checkpoint.open(ckpt_path)
    validate(ckpt.config, opts.llm)
    if opts.target not in ("auto", "trt", "reference"):
        raise BuildError(f"--target {opts.target!r}: choose auto, trt or reference")
    cap = detect()
    engines_possible = opts.target == "trt" or (opts.target == "auto" and cap.can_build)
    if opts.target == "trt" and not cap.can_build:
        raise BuildError(f"--target trt needs TensorRT, an engine-capable TensorRT-LLM and a GPU: {cap.detail}. "
                         f"Use {ENGINE_RELEASE}, or --target reference for the portable artifacts only")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it, or choose another output")
    if partial.exists() and not resume:
        if not force:
            raise BuildError(f"an interrupted build is in {partial}; pass --resume to continue it or --force to "
                             "start over")
        shutil.rmtree(partial)
    options = opts.as_dict()
    sources = _source_hashes(ckpt, say)
    manifest_path = partial / "manifest.json"
    manifest = read_manifest(partial) if resume else None
    if manifest is not None:
        if manifest.get("options") != options or manifest.get("source", {}).get("files") != sources:
            raise BuildError(f"{partial} was started with other options or another source checkpoint; "
                             "use --force to start over")
        say(f"resuming {partial}")
    else:
        partial.mkdir(parents=True, exist_ok=True)
        manifest = {"schema": SCHEMA, "status": "incomplete", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "source": {"path": str(ckpt.directory), "files": sources}, "options": options,
                    "tools": tool_versions(), "stages": {}}
        _write_json_atomic(manifest_path, manifest)
    ctx = Context(ckpt, opts, partial, engines_possible=engines_possible, engines_detail=cap.detail)
    for stage in STAGES:
        record = manifest["stages"].get(stage.name)
        redo_pending = record and record.get("status") == "pending" and engines_possible
        if record and not redo_pending and _stage_ok(partial, record):
            say(f"[{stage.name}] reused (checksums verified)")
            continue
        need = stage.estimate_bytes(ctx)
        free = shutil.disk_usage(partial).free
        if need and need * 1.1 > free:
            raise BuildError(f"stage {stage.name} needs about {need / 1e9:.1f} GB but {free / 1e9:.1f} GB are free on "
                             f"{partial.parent}")
        say(f"[{stage.name}] running")
        t0 = time.perf_counter()
        target = partial / stage.output
        tmp = partial / f".{stage.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        details = stage.run(ctx, tmp)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if stage.output.endswith(".json"):  # single-file stage
            (tmp / stage.output).rename(target)
            shutil.rmtree(tmp)
            sums = {target.name: sha256_file(target)}
        else:
            tmp.rename(target)
            sums = tree_checksums(target)
        status = "pending" if details.get("status") == "pending" else "done"
        manifest["stages"][stage.name] = {
            "status": status, "output": stage.output, "seconds": round(time.perf_counter() - t0, 2),
            "checksums": sums, "details": details}
        _write_json_atomic(manifest_path, manifest)
        say(f"[{stage.name}] {manifest['stages'][stage.name]['status']} in {manifest['stages'][stage.name]['seconds']} s")
    engines_pending = manifest["stages"]["engines"]["status"] == "pending"
    manifest["status"] = STATUS_PORTABLE if engines_pending else STATUS_COMPLETE
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json_atomic(manifest_path, manifest)
    if out.exists():  # --force: replace only now that the new build is whole
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(out)
    return manifest


def format_summary(out: Path, manifest: dict) -> str:
    lines = [f"{out}: {manifest['status']}"]
    for name, rec in manifest["stages"].items():
        lines.append(f"  {name:<12} {rec['status']:<8} {rec['seconds']:>7.2f} s  {rec['output']}")
    eng = manifest["stages"].get("engines", {})
    if eng.get("status") == "pending":
        lines.append(f"  engines pending: {eng['details'].get('reason')}; finish on a GPU host with "
                     f"`cd {out} && engines/build_engines.sh`")
    return "\n".join(lines)
