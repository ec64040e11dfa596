"""NVLM-X/H: quantize the gated cross-attention blocks, or keep them in 16 bits? Measured on the embedded defaults.

    .venv/bin/python benchmarks/xattn_quant.py [--variants x,h] [--samples 16] [--seeds 0,1] [--json F]

For each family, format and checkpoint seed, two fake-quantized models (modelopt, the same multimodal
calibration prompts with their images):
  decoder-only  the Qwen2 decoder quantized, the cross-attention blocks as stored (what `nvlm-build` builds);
  everything    the cross-attention blocks quantized too (their q/k/v/o projections and MLPs, modelopt's
                default pattern for each format).
Error on the held-out fidelity prompts (1, 3, 7 tiles, two images, text only) against the unquantized
reference: max and mean |Δlogit| / max |logit|, and top-1 agreement at text positions.
"""

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _errors(outs, base, runs) -> dict:
    from builder.fidelity import logit_errors

    return logit_errors(torch.cat(outs), torch.cat(base), torch.cat([r.text for r in runs]))


def quantize_everything(ckpt, tok, fmt, samples):
    """A fresh reference whose decoder and cross-attention blocks are both fake-quantized. The calibration
    prompts are embedded inside the loop, so the blocks' k/v projections see the image states while
    modelopt calibrates (they run when a prompt's image keys are computed)."""
    import modelopt.torch.quantization as mtq
    from torch import nn

    from builder.calibration import embed_samples
    from builder.llm_build import _quiet
    from runtime.core.llm_formats import LLMBuildOptions
    from runtime.reference import reference_model

    ref = reference_model(ckpt)
    opts = LLMBuildOptions(fmt)
    both = nn.ModuleDict({"llm": ref.llm, "xattn": ref.xattn})

    def loop(_):
        for s in embed_samples(samples, ref, tok):
            s.run(ref.llm)

    with _quiet():
        mtq.quantize(both, fmt.modelopt_config(opts.kv_cache_fp8, opts.awq_group_size), forward_loop=loop)
    return ref


def main():
    from builder.calibration import builtin_samples, embed_samples
    from builder.fidelity import decoder_logits, prepare_prompts
    from builder.llm_build import quantize
    from runtime.core.demo_checkpoint import write_demo_checkpoint
    from runtime.core.llm_formats import LLMBuildOptions, get_format
    from runtime.reference import reference_model
    from runtime.tokenizer import NVLMTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="x,h")
    ap.add_argument("--formats", default="fp8,int4_awq,w4a8_awq")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seeds", default="0,1", help="checkpoint seeds of the embedded defaults")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    rows = []
    tmp = Path(tempfile.mkdtemp())
    samples = builtin_samples(args.samples, seed=7)
    for variant in args.variants.split(","):
        for seed in map(int, args.seeds.split(",")):
            ckpt = write_demo_checkpoint(tmp / f"{variant}-{seed}", variant=variant, seed=seed)
            ref, tok = reference_model(ckpt), NVLMTokenizer.from_dir(ckpt)
            runs = prepare_prompts(ref, tok)
            base = [decoder_logits(ref.llm, r) for r in runs]
            calib = list(embed_samples(samples, ref, tok))
            for name in args.formats.split(","):
                fmt = get_format(name)
                decoder_only = quantize(ref, LLMBuildOptions(fmt), calib)
                rows.append({"variant": variant, "seed": seed, "format": name, "quantized": "decoder only",
                             **_errors([decoder_logits(decoder_only, r) for r in runs], base, runs)})
                everything = quantize_everything(ckpt, tok, fmt, samples)
                runs_q = prepare_prompts(everything, tok)  # image keys through the quantized k/v projections
                rows.append({"variant": variant, "seed": seed, "format": name, "quantized": "+ cross-attention",
                             **_errors([decoder_logits(everything.llm, r) for r in runs_q], base, runs)})
                del decoder_only, everything
    print(f"{'family':<8}{'seed':>5}  {'format':<10}{'quantized':<19}{'max rel':>9}{'mean rel':>10}{'top-1':>7}")
    for r in rows:
        print(f"NVLM-{r['variant'].upper():<3}{r['seed']:>5}  {r['format']:<10}{r['quantized']:<19}{r['max_rel']:>9.4f}"
              f"{r['mean_rel']:>10.5f}{r['top1_text']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "xattn_quant", "date": time.strftime("%Y-%m-%d"),
                                         "samples": args.samples, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
