"""`nvlm-build`: the command-line entry point. Subcommands register themselves in COMMANDS."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Callable

from demo_model.recipe import add_flags as recipe_flags
from demo_model.recipe import command_line
from demo_model.recipe import from_flags as recipe_from_flags
from demo_model.train import evaluate_checkpoint, train_and_save
from runtime.chat_format import stop_id
from runtime.core import progress
from runtime.core.build_host import DTYPE_BYTES, HostNeeds, build_host_report, vision_need
from runtime.core.checkpoint import Checkpoint, plan_config, scan_tensors
from runtime.core.demo_checkpoint import VARIANTS, is_trained_default, trained_available, write_demo_checkpoint
from runtime.core.errors import NVLMError
from runtime.core.families import family_for
from runtime.core.fsutil import human_bytes, publish_dir
from runtime.core.inspect import DEFAULT_KV_TOKENS, format_report, inspect
from runtime.core.limits import EngineLimits
from runtime.core.llm_formats import (
    FORMATS,
    KV_CACHE_DTYPES,
    VISION_FORMATS,
    LLMBuildOptions,
    awq_group_help,
    get_format,
    get_vision_format,
    kv_cache_fp8,
)
from runtime.preprocess import preprocess_files
from runtime.prompt import Message, build_prompt
from runtime.reference import reference_model
from runtime.tokenizer import NVLMTokenizer
from triton_repo.generate import auto_entry_instances, generate_repo, plan_pending

from .engine_build import DeploymentOptions, build_deployment, format_summary
from .llm_build import build_llm
from .preflight import MARGIN, check
from .vision_export import VisionModels, export_vision

log = logging.getLogger("nvlm")


@dataclass(frozen=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    def deco(fn):
        COMMANDS[name] = Command(help, configure, fn)
        return fn

    return deco


# --------------------------------------------------------------------------- demo-checkpoint


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="directory to create")
    p.add_argument("--variant", default="d", choices=sorted(VARIANTS),
                   help="d: NVLM-D (released layout); x: NVLM-X; h: NVLM-H (the layout in docs/nvlm_xh_layout.md); "
                        "default d")
    p.add_argument("--seed", type=int, default=0, help="weight seed of --weights random (default: 0)")
    p.add_argument("--weights", default=None, metavar="trained|random|FILE",
                   help="trained: the packaged NVLM-D weights trained on the tile task (the default for variant d "
                        "when packaged); random: seeded random weights (the default for x and h); FILE: a "
                        "`demo-train` output")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


@command("demo-checkpoint", "write the embedded default: a tiny NVLM-D (or -X, -H) checkpoint", _demo_args)
def _demo(args) -> int:
    weights = args.weights or ("trained" if args.variant == "d" and trained_available() else "random")
    out = write_demo_checkpoint(args.out, variant=args.variant, seed=args.seed, force=args.force, weights=weights)
    what = f"seed {args.seed}" if weights == "random" else f"{weights} weights"
    print(f"wrote demo NVLM checkpoint (variant {args.variant}, {what}) to {out}")
    return 0


# --------------------------------------------------------------------------- demo-train, eval


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="safetensors file to write (a card OUT.json is written beside it)")
    recipe_flags(p)  # one flag per Recipe field (demo_model/recipe.py)
    p.add_argument("--eval", type=int, default=400, metavar="N", help="held-out questions to score (0: none)")
    p.add_argument("--eval-seed", type=int, default=1)
    p.add_argument("--log", help="append the per-step loss log here (JSONL)")


@command("demo-train", "train the embedded default (NVLM-D; X/H to compare) from scratch on the tile task (CPU, deterministic)",
         _train_args)
def _train(args) -> int:
    from pathlib import Path

    try:
        recipe = recipe_from_flags(args)
    except ValueError as e:
        raise NVLMError(str(e)) from None
    if recipe.init and not Path(recipe.init).is_file():
        raise NVLMError(f"--init {recipe.init}: no such file (give a demo-train output)")
    command = command_line(args.out, recipe)
    card = train_and_save(Path(args.out), recipe, command=command, eval_n=args.eval, eval_seed=args.eval_seed,
                          log_file=Path(args.log) if args.log else None)
    print(json.dumps(card, indent=2))
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint directory (e.g. the embedded default)")
    p.add_argument("--n", type=int, default=400, help="held-out questions, the four types in turn (default 400)")
    p.add_argument("--seed", type=int, default=1, help="question seed (default 1; training never uses it)")
    p.add_argument("--no-tile-tags", action="store_true",
                   help="prompts without the 1-D tile tags (a model trained with demo-train --no-tile-tags)")
    p.add_argument("--chat-format", choices=["release", "tokenizer"], default="release",
                   help="prompt format: release (the released model.chat()'s template, the default) or tokenizer "
                        "(tokenizer_config.json's chat_template); docs/prompt_formats.md")
    p.add_argument("--json", action="store_true")


@command("eval", "task accuracy of a checkpoint's reference model on fresh held-out tile-task questions", _eval_args)
def _eval(args) -> int:
    acc = evaluate_checkpoint(args.ckpt, args.n, args.seed, tile_tags=not args.no_tile_tags,
                              chat_format=args.chat_format)
    if args.json:
        print(json.dumps(acc))
    else:
        per = ", ".join(f"{t} {acc[t]:.1%} ({acc['n'][t]})" for t in acc["n"] if t in acc)
        print(f"{args.ckpt}: {acc['all']:.1%} of {args.n} held-out questions (seed {args.seed}): {per}")
    return 0


# --------------------------------------------------------------------------- inspect


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint directory (or its config.json alone)")
    p.add_argument("--kv-tokens", type=int, default=DEFAULT_KV_TOKENS,
                   help=f"KV-cache budget in tokens for the memory plan (default: {DEFAULT_KV_TOKENS})")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema in docs/inspect.md)")


@command("inspect", "describe a checkpoint and plan its H100 memory (works from config.json alone)", _inspect_args)
def _inspect(args) -> int:
    report = inspect(args.ckpt, kv_tokens=args.kv_tokens)
    tensors = scan_tensors(args.ckpt)
    report["build_host"] = build_host_report(plan_config(args.ckpt, tensors), tensors)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# --------------------------------------------------------------------------- reference


def _reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="NVLM checkpoint directory")
    p.add_argument("--prompt", required=True, help="user message; put <image> where each image belongs")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--synthetic-tiles", type=int, default=0, metavar="N",
                   help="instead of --image: one image of N random pre-normalized tiles (seeded)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-format", choices=["release", "tokenizer"], default="release",
                   help="prompt format: release (the released model.chat()'s template, the default) or tokenizer "
                        "(tokenizer_config.json's chat_template); docs/prompt_formats.md")
    p.add_argument("--json", action="store_true")


@command("reference", "generate greedily with the reference model of the checkpoint's family (CPU PyTorch)",
         _reference_args)
def _reference(args) -> int:
    import time

    import torch


    model = reference_model(args.ckpt)
    tok = NVLMTokenizer.from_dir(args.ckpt, chat_format=args.chat_format)
    tok.check_vocab(model.cfg.llm.vocab_size)
    pcfg = model.cfg.preprocess
    if args.image and args.synthetic_tiles:
        raise NVLMError("use either --image or --synthetic-tiles, not both")
    tiles, pixel_values = [], None
    if args.synthetic_tiles:
        g = torch.Generator().manual_seed(args.seed)
        pixel_values = torch.randn(args.synthetic_tiles, 3, pcfg.image_size, pcfg.image_size, generator=g)
        tiles = [args.synthetic_tiles]
    elif args.image:
        pixel_values, tiles = preprocess_files(args.image, pcfg, max_images=len(args.image))
    messages = ([Message("system", args.system)] if args.system else []) + [Message("user", args.prompt)]
    prompt = build_prompt(tok, messages, tiles, tokens_per_tile=pcfg.tokens_per_tile,
                          layout=family_for(model.cfg).prompt_layout)
    t0 = time.perf_counter()
    result = model.generate(prompt.input_ids, pixel_values, image_token_id=tok.image_pad_id,
                            max_new_tokens=args.max_new_tokens, eos_token_id=stop_id(tok), cross=prompt.cross)
    elapsed = time.perf_counter() - t0
    out = {"prompt_tokens": len(prompt.input_ids), "image_tokens": prompt.num_image_tokens,
           "cross_attention_keys": prompt.cross.num_keys if prompt.cross else 0,
           "tiles_per_image": list(tiles), "tokens": result.tokens, "text": tok.decode(result.tokens),
           "finished": result.finished, "seconds": round(elapsed, 3)}
    if args.json:
        print(json.dumps(out))
    else:
        keys = f", {out['cross_attention_keys']} cross-attention keys" if prompt.cross else ""
        print(f"prompt: {out['prompt_tokens']} tokens ({out['image_tokens']} image tokens{keys}, "
              f"tiles {out['tiles_per_image']})")
        print(f"generated {len(result.tokens)} tokens in {elapsed:.2f}s: {result.tokens}")
        print(f"text: {out['text']!r}")
    return 0


# --------------------------------------------------------------------------- llm


def _llm_args_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="NVLM checkpoint directory")
    p.add_argument("-o", "--out", required=True, help="TensorRT-LLM checkpoint directory to create")
    p.add_argument("--quant", default="bf16", help=f"weight format: {', '.join(FORMATS)} (default: bf16)")
    p.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default=KV_CACHE_DTYPES[0],
                   help="fp8: calibrated FP8 KV cache (quantized formats only)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--awq-group-size", type=int, default=128, help=f"int4 group size of the AWQ formats ({awq_group_help()})")
    p.add_argument("--calib-data", help="folder of images, or JSONL of {\"prompt\": …, \"image\": path} lines")
    p.add_argument("--calib-size", type=int, default=32, help="calibration samples (default: 32)")
    p.add_argument("--no-preflight", action="store_true",
                   help="run even when the preflight estimate says this host has too little RAM or disk")
    p.add_argument("--chat-format", choices=["release", "tokenizer"], default="release",
                   help="prompt format: release (the released model.chat()'s template, the default) or tokenizer "
                        "(tokenizer_config.json's chat_template); docs/prompt_formats.md")
    p.add_argument("--layerwise", choices=["auto", "on", "off"], default="auto",
                   help="run calibration and the fidelity report a decoder layer at a time (auto: when the whole "
                        "model does not fit this host's RAM); the same checkpoint either way")
    p.add_argument("--device", default="auto", help="where the layer-at-a-time path computes: auto (CUDA when "
                   "torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true")


def _llm_args(p: argparse.ArgumentParser) -> None:
    _llm_args_common(p)
    p.add_argument("--no-fidelity", action="store_true", help="skip the fidelity report")
    p.add_argument("--resume", action="store_true", help="continue a killed layer-at-a-time quantization of the "
                   "same options from OUT.layerwise (byte-identical result)")


@command("llm", "convert NVLM-D's LLM to a TensorRT-LLM checkpoint (bf16/fp16 streamed; fp8/int4_awq/w4a8_awq "
         "via modelopt with multimodal calibration)", _llm_args)
def _llm(args) -> int:
    opts = LLMBuildOptions(get_format(args.quant), tp=args.tp, pp=args.pp, kv_cache_fp8=kv_cache_fp8(args.kv_cache_dtype),
                        awq_group_size=args.awq_group_size, chat_format=args.chat_format)
    summary = build_llm(args.ckpt, args.out, opts, calib_data=args.calib_data, calib_size=args.calib_size,
                        force=args.force, fidelity=not args.no_fidelity, preflight=not args.no_preflight,
                        layerwise=args.layerwise, device=args.device, resume=args.resume)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote TensorRT-LLM checkpoint ({summary['format']}, TP{summary['tp']} PP{summary['pp']}) to "
              f"{args.out} in {summary['seconds']} s; fidelity: "
              f"{'passed' if summary['fidelity_passed'] else 'skipped' if summary['fidelity_passed'] is None else 'FAILED'}")
    return 0


# --------------------------------------------------------------------------- vision


def _vision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="NVLM checkpoint directory")
    p.add_argument("-o", "--out", required=True, help="directory to create")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--vision-quant", choices=list(VISION_FORMATS), default=None,
                   help="also write a quantized Q/DQ encoder (modelopt)")
    p.add_argument("--max-tiles", type=int, default=28, help="largest tile batch the engine should accept")
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-preflight", action="store_true",
                   help="run even when the preflight estimate says this host has too little RAM or disk")


@command("vision", "export the vision encoder (InternViT → pixel shuffle → mlp1) to ONNX, checked with onnxruntime",
         _vision_args)
def _vision(args) -> int:
    from pathlib import Path



    ckpt = Checkpoint.open(args.ckpt)
    needs = HostNeeds((vision_need(ckpt.config, DTYPE_BYTES[args.dtype], args.vision_quant is not None),))
    log.info("%s", needs.summary())
    if not args.no_preflight:
        check(needs, Path(args.out), command="nvlm-build vision",
              remedies=[f"a host with at least {human_bytes(needs.peak_ram * MARGIN)} of RAM available"])
    trained = is_trained_default(args.ckpt)  # its export checks task accuracy: the whole model
    models = VisionModels(reference=reference_model(ckpt)) if trained else VisionModels(ckpt=ckpt)
    task = NVLMTokenizer.from_dir(args.ckpt) if trained else None
    info = {}
    publish_dir(Path(args.out), lambda tmp: info.update(export_vision(
        models, tmp, dtype=args.dtype, vision_quant=args.vision_quant, max_tiles=args.max_tiles, task_tokenizer=task)),
                force=args.force)
    checks = ", ".join(f"{k} {v['value']:.2e}" for k, v in info["checks"].items() if v["value"] is not None)
    print(f"wrote {', '.join(info['files'])} to {args.out} ({args.dtype}); {checks or 'no onnxruntime check'}")
    return 0


# --------------------------------------------------------------------------- engine


def _engine_args(p: argparse.ArgumentParser) -> None:
    _llm_args_common(p)
    p.add_argument("--target", choices=["auto", "trt", "reference"], default="auto",
                   help="trt: build engines (GPU hosts); reference: portable artifacts only; auto: trt if possible")
    p.add_argument("--vision-dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--vision-quant", choices=list(VISION_FORMATS), default=None)
    d = EngineLimits()
    p.add_argument("--max-tiles", type=int, default=None,
                   help="tiles per image the engines must accept (default: the checkpoint's max tiles + thumbnail)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-images", type=int, default=d.max_images_per_request,
                   help=f"images per request the deployment accepts (default {d.max_images_per_request})")
    p.add_argument("--max-input-len", type=int, default=d.max_input_text_len,
                   help="text tokens per request besides image tokens")
    p.add_argument("--max-output-len", type=int, default=d.max_output_len)
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="requests that may wait beyond the max batch size before the server answers \"server busy\" "
                        "(default: 8 × the max batch size; nvlm-serve --max-queue overrides it)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build of the same options")


@command("engine", "run every stage: validate, tokenizer, vision ONNX, LLM checkpoint, engines (GPU hosts), reports",
         _engine_args)
def _engine(args) -> int:
    from pathlib import Path


    llm = LLMBuildOptions(get_format(args.quant), tp=args.tp, pp=args.pp, kv_cache_fp8=kv_cache_fp8(args.kv_cache_dtype),
                       awq_group_size=args.awq_group_size, chat_format=args.chat_format)
    limits = EngineLimits(max_batch_size=args.max_batch_size, max_tiles_per_image=args.max_tiles,
                          max_images_per_request=args.max_images,
                          max_input_text_len=args.max_input_len, max_output_len=args.max_output_len,
                          max_queue=args.max_queue)
    opts = DeploymentOptions(llm, target=args.target, vision_dtype=args.vision_dtype,
                              vision_quant=get_vision_format(args.vision_quant),
                              limits=limits, calib_data=args.calib_data, calib_size=args.calib_size,
                              layerwise=args.layerwise, device=args.device)
    quiet = args.json
    manifest = build_deployment(args.ckpt, args.out, opts, resume=args.resume, force=args.force,
                            progress=None if not quiet else (lambda m: None), preflight=not args.no_preflight)
    print(json.dumps(manifest) if args.json else format_summary(Path(args.out), manifest))
    return 0


# --------------------------------------------------------------------------- triton-repo


def _repo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("build", help="an nvlm-build engine output directory")
    p.add_argument("-o", "--out", required=True, help="model repository directory to create")
    p.add_argument("--target", choices=["trt", "reference", "contract"], default="reference",
                   help="trt: TensorRT engines on NVIDIA's tensorrtllm backend (GPU hosts); reference: the reference "
                        "executor (CPU); contract: the trt repository with CPU stand-ins for the two GPU backends")
    p.add_argument("--entry-instances", default="1", metavar="N|auto",
                   help="processes of the entry model nvlm (auto: from this host's cores, what deploy/launch.sh uses "
                        "on a GPU host; default 1)")
    p.add_argument("--null-engine", action="store_true",
                   help="benchmarks only, with --target contract: an LLM step that runs no model and returns seeded "
                        "tokens, to measure the serving path alone (benchmarks/serving_capacity.py)")
    p.add_argument("--force", action="store_true")


@command("triton-repo", "write the Triton model repository for a build (target trt, contract or reference)",
         _repo_args)
def _repo(args) -> int:
    from pathlib import Path



    if args.entry_instances == "auto":
        instances, why = auto_entry_instances(args.build)
        log.info("%s", why)
    elif args.entry_instances.isdigit() and int(args.entry_instances) >= 1:
        instances = int(args.entry_instances)
    else:
        raise NVLMError(f"--entry-instances takes a number ≥ 1 or auto, got {args.entry_instances!r}")
    models: list = []
    out = Path(args.out)
    publish_dir(out, lambda tmp: models.extend(generate_repo(args.build, tmp, args.target, repo_path=out,
                                                                 null_engine=args.null_engine,
                                                                 entry_instances=instances)),
                force=args.force)
    print(f"wrote {args.target} repository with {', '.join(models)} to {args.out}")
    if plan_pending(out):
        print(f"note: {out}/vision_encoder/1/model.plan is missing until the engines are built; "
              f"engines/build_engines.sh in the build directory builds them and rewrites this repository")
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvlm-build", description="Compile NVLM checkpoints for TensorRT-LLM "
                                     "and Triton Inference Server.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress.silence(bool(getattr(args, "json", False)))  # bars only for people at a terminal
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command].run(args)
    except NVLMError as e:
        print(f"nvlm-build {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output under a file, on a read-only mount, in /proc, without permission…
        where = f" {e.filename}" if e.filename else ""
        print(f"nvlm-build {args.command}: error: cannot write or read{where}: {e.strerror or e}; choose another "
              "path", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
