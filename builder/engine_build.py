"""`nvlm-build engine`: one command from an NVLM checkpoint to a deployable build directory.

    OUT/
      manifest.json         what produced it: source file hashes, options, tool versions,
                            per-stage status, durations and output checksums; overall status
      tokenizer/            the checkpoint's tokenizer files
      preprocess.json       tiling and prompt parameters (docs/upstream.md, docs/prompt_formats.md)
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

This module is the driver; the stages are builder/stages.py, and what the build directory holds (the
manifest and preprocess.json, their writers and readers) is runtime/core/build_dir.py.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from runtime.core import __version__
from runtime.core.build_dir import SCHEMA, read_manifest, sha256_file, tree_checksums, write_json_atomic
from runtime.core.build_host import DTYPE_BYTES, engine_needs, largest_stored_tensor
from runtime.core.checkpoint import Checkpoint
from runtime.core.errors import OutputExistsError
from runtime.core.families import family_for
from runtime.core.fsutil import human_bytes
from runtime.core.gpu_host import ENGINE_RELEASE, detect
from runtime.core.llm_formats import validate
from runtime.core.progress import bar
from runtime.tokenizer import NVLMTokenizer

from .llm_build import choose_layerwise
from .preflight import check, remedies_for
from .stages import STAGES, TOKENIZER_FILES, BuildError, Context, DeploymentOptions

log = logging.getLogger(__name__)
STATUS_PORTABLE = "portable artifacts complete; engines pending (no TensorRT)"
STATUS_COMPLETE = "complete"






# --------------------------------------------------------------------------- hashing


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




























# --------------------------------------------------------------------------- driver


def _source_hashes(ckpt: Checkpoint, progress: Callable[[str], None]) -> dict[str, str]:
    files = sorted({"config.json", *ckpt.shards, *(f for f in TOKENIZER_FILES if (ckpt.directory / f).is_file())}
                   | ({"model.safetensors.index.json"} if (ckpt.directory / "model.safetensors.index.json").exists()
                      else set()))
    out = {}
    total = sum((ckpt.directory / f).stat().st_size for f in files)
    with bar(total, "hashing the source checkpoint", unit="B", unit_scale=True) as advance:
        for f in files:
            progress(f"hashing {f}")
            out[f] = sha256_file(ckpt.directory / f, advance=advance)
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


def build_deployment(ckpt_path, out, opts: DeploymentOptions, *, resume: bool = False, force: bool = False,
                 progress: Callable[[str], None] | None = None, preflight: bool = True) -> dict:
    say = progress or (lambda msg: log.info("%s", msg))
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial")
    ckpt = Checkpoint.open(ckpt_path)
    validate(ckpt.config, opts.llm)
    layout = family_for(ckpt.config).prompt_layout
    tag_tokens = None
    if layout.tag_keys:  # NVLM-H's keys include its tags' tokens
        tok = NVLMTokenizer.from_dir(ckpt.directory)
        tag_tokens = lambda tag: len(tok.encode(tag))  # noqa: E731
    opts = replace(opts, limits=opts.limits.resolve(ckpt.config.preprocess, layout, tag_tokens))
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
    largest = largest_stored_tensor(ckpt.config, ckpt.tensors)
    by_layer = choose_layerwise(ckpt, opts.llm, opts.layerwise, fidelity=True, calib_size=opts.calib_size)
    needs = engine_needs(ckpt.config, opts.llm.fmt, vision_dtype_bytes=DTYPE_BYTES[opts.vision_dtype],
                         vision_fp8=opts.vision_quant is not None, largest_tensor=largest,
                         group_size=opts.llm.awq_group_size, layerwise=by_layer, calib_size=opts.calib_size)
    say(needs.summary())
    if preflight:  # before hashing 177 GB of shards, and long before an out-of-memory kill
        check(needs, out, command="nvlm-build engine", remedies=remedies_for(
            ckpt.config, opts.llm.fmt, needs, fidelity=True, largest_tensor=largest))
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
                    "limits": opts.limits.record(), "tools": tool_versions(), "stages": {}}
        write_json_atomic(manifest_path, manifest)
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
            raise BuildError(f"stage {stage.name} needs about {human_bytes(need)} but {human_bytes(free)} are free on "
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
        write_json_atomic(manifest_path, manifest)
        say(f"[{stage.name}] {manifest['stages'][stage.name]['status']} in {manifest['stages'][stage.name]['seconds']} s")
    engines_pending = manifest["stages"]["engines"]["status"] == "pending"
    manifest["status"] = STATUS_PORTABLE if engines_pending else STATUS_COMPLETE
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(manifest_path, manifest)
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
