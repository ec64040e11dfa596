"""Fidelity report: proof that a built TensorRT-LLM checkpoint computes what NVLM-D computes.

`reports/fidelity.json`: {"format", "passed", "prompts", "checks": [{name, metric, value,
threshold, passed, why}]}. Checks run on fixed multimodal prompts (synthetic scenes of 1, 3 and 7
tiles, two images in one prompt, and a text-only prompt), through the reference executor of the
checkpoint (runtime/trtllm_executor.py) with image embeddings passed the way the engine gets them:
as a prompt-embedding table addressed by fake ids ≥ vocab_size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from runtime.core.families import family_for
from runtime.core.progress import track
from runtime.preprocess import preprocess_images
from runtime.prompt import build_prompt
from runtime.scenes import synthetic_scene
from runtime.trtllm_executor import KVCache, Request

GREEDY_TOKENS = 8

# Thresholds, with the evidence behind them.
# Unquantized: executor and reference use the same bf16 weights (fp16 builds: the same values
# rounded to fp16) with float32 arithmetic on both sides, so logits differ only by summation order
# (~1e-6 relative observed) and fp16 rounding of tiny weights; 1e-3 relative leaves margin while
# catching any wrong tensor, split or layout (those give O(1) errors).
UNQUANTIZED_LOGITS_REL = 1e-3
# Quantized: the executor reads the exported checkpoint and the fake-quantized model is the one the
# export processed (fused layers share scales), so both quantize identically — except that float32
# summation-order differences can push an activation across an FP8 rounding boundary, an error of
# one e4m3 step (6%) on that element, which propagates. Observed on the embedded default: ≤ 0.003
# (int4_awq), ≤ 0.02 (fp8, w4a8_awq), ≤ 0.03 (fp8 + FP8 KV cache). 0.05 keeps margin; real format
# errors (wrong packing, nibble order, scale layout, split) give ≥ 0.3.
QUANTIZED_LOGITS_REL = 5e-2
# With an FP8 KV cache a flipped rounding step lands in a cached key or value that every later
# position reads, and with few KV heads every query head reads it: 0.051 observed on the released-
# layout writer's checkpoint (one KV head) on an AMD EPYC host, whose float32 kernels sum in another
# order than the Intel hosts where ≤ 0.03 was seen. 0.08 keeps 4× below the real format errors.
QUANTIZED_FP8_KV_LOGITS_REL = 8e-2
# Top-1 agreement (issue requirement ≥ 99%) is counted at text positions: at image-token positions
# the next token is fixed by the prompt (more image tokens or a tile tag), their logits are never
# sampled, and an untrained image embedding gives them no preference to agree on.
TOP1_AGREEMENT_MIN = 0.99


@dataclass
class Check:
    name: str
    metric: str
    value: float
    threshold: float | None  # None: reported, not gated
    passed: bool
    why: str


def fidelity_prompts(seed: int = 12345) -> list[tuple[str, list]]:
    """(prompt, images) pairs, fixed; scenes sized for 1, 3 and 7 tiles."""
    return [
        ("<image>\nWhat is in this picture?", [synthetic_scene(448, 448, seed)]),
        ("Describe <image> in one sentence.", [synthetic_scene(896, 448, seed + 1)]),
        ("<image>\nRead the text and count the shapes.", [synthetic_scene(1400, 700, seed + 2)]),
        ("Compare <image> with <image>.", [synthetic_scene(448, 448, seed + 3), synthetic_scene(896, 448, seed + 4)]),
        ("Explain what a vision encoder does in a multimodal model.", []),
    ]


@dataclass
class PromptRun:
    ids: list[int]  # reference form (<|vision_pad|> ids)
    trt_ids: list[int]  # TensorRT-LLM form (fake ids)
    table: torch.Tensor | None  # [num_image_tokens, hidden]
    embeds: torch.Tensor  # [1, L, hidden] for HF-style models
    text: torch.Tensor  # [L] bool: positions whose input is a text token


def prepare_prompts(reference, tokenizer) -> list[PromptRun]:
    pcfg, layout = reference.cfg.preprocess, family_for(reference.cfg).prompt_layout
    runs = []
    for text, images in fidelity_prompts():
        pre = preprocess_images(images, pcfg, max_images=len(images)) if images else []
        p = build_prompt(tokenizer, text, [x.num_tiles for x in pre], tokens_per_tile=pcfg.tokens_per_tile,
                         layout=layout)
        table = None
        if pre:
            pv = torch.cat([torch.from_numpy(x.pixel_values) for x in pre])
            table = reference.encode_images(pv).flatten(0, 1)  # [ΣT·256, hidden]
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            emb = reference.embed(ids, table, tokenizer.image_pad_id)
        text_mask = torch.tensor(p.input_ids) != tokenizer.image_pad_id
        runs.append(PromptRun(list(p.input_ids), p.trtllm_input_ids(reference.cfg.llm.vocab_size), table, emb,
                              text_mask))
    return runs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def _executor_logits(executor, run: PromptRun) -> torch.Tensor:
    with torch.no_grad():
        return executor.forward(run.trt_ids, run.table, KVCache())


def _hf_logits(model, run: PromptRun) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs_embeds=run.embeds).logits[0].float()


def build_report(fmt_name: str, quantized: bool, executor, reference, tokenizer, fake_quant=None) -> dict:
    runs = prepare_prompts(reference, tokenizer)
    ex = [_executor_logits(executor, r) for r in track(runs, f"fidelity: {fmt_name} checkpoint", unit="prompt")]
    ref = [_hf_logits(reference.llm, r) for r in runs]
    ex_all, ref_all = torch.cat(ex), torch.cat(ref)
    text = torch.cat([r.text for r in runs])
    checks: list[Check] = []
    if not quantized:
        same = 0
        for r in track(runs, "fidelity: greedy decoding", unit="prompt"):
            want = _greedy_reference(reference, r)
            got = executor.generate([Request(r.trt_ids, GREEDY_TOKENS, r.table)])[0].tokens
            same += got == want
        checks.append(Check("greedy_tokens_vs_reference", f"fraction of {len(runs)} prompts whose {GREEDY_TOKENS} "
                            "greedy tokens equal the reference NVLM-D's", same / len(runs), 1.0, same == len(runs),
                            "unquantized builds must decode exactly like the reference"))
        rel = _rel(ex_all, ref_all)
        checks.append(Check("logits_vs_reference", "max |Δlogit| / max |logit| over all prompt positions", rel,
                            UNQUANTIZED_LOGITS_REL, rel <= UNQUANTIZED_LOGITS_REL,
                            "same weights, float32 arithmetic both sides: only summation order differs"))
    else:
        fq = torch.cat([_hf_logits(fake_quant, r) for r in runs])
        rel, top1 = _rel(ex_all, fq), _top1(ex_all[text], fq[text])
        limit = QUANTIZED_FP8_KV_LOGITS_REL if executor.kv_fp8 else QUANTIZED_LOGITS_REL
        checks.append(Check("logits_vs_modelopt_fake_quant", "max |Δlogit| / max |logit| vs modelopt's fake-quantized "
                            "model", rel, limit, rel <= limit,
                            "the exported checkpoint must compute what modelopt calibrated"))
        checks.append(Check("top1_vs_modelopt_fake_quant", "fraction of text positions with the same argmax", top1,
                            TOP1_AGREEMENT_MIN, top1 >= TOP1_AGREEMENT_MIN, "issue requirement: ≥ 99%"))
        checks.append(Check("quantized_vs_unquantized_logits", "max |Δlogit| / max |logit| vs the reference NVLM-D",
                            _rel(ex_all, ref_all), None, True, "the cost of quantization, reported"))
        checks.append(Check("quantized_vs_unquantized_top1", "fraction of text positions with the reference's "
                            "argmax", _top1(ex_all[text], ref_all[text]), None, True, "the cost of quantization, reported"))
    return {"format": fmt_name, "passed": all(c.passed for c in checks), "prompts": len(runs),
            "positions": int(ex_all.shape[0]), "text_positions": int(text.sum()), "checks": [asdict(c) for c in checks]}


def _greedy_reference(reference, run: PromptRun) -> list[int]:
    """Greedy decode of the reference from pre-built embeddings (images already encoded)."""
    from transformers import DynamicCache

    with torch.no_grad():
        out = reference.llm(inputs_embeds=run.embeds, past_key_values=DynamicCache(), use_cache=True)
        tokens = []
        for _ in range(GREEDY_TOKENS):
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            out = reference.llm(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
