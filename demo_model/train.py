"""`nvlm-build demo-train`: train the embedded default from scratch on the tile task, on CPU.

The recipe (issue 17): the NVLM-D embedded default's architecture and real geometry (448 tiles, patch 14,
pixel shuffle to 256 tokens per tile, the released prompt with 1-D tile tags) trained end to end — vision
tower, projector and decoder — on freshly generated images of `demo_model.task`, with the loss on the
answer tokens only. Standard initialisation (not the random default's "decisive" head). A curriculum: the
first part of the run sees one-tile images only (shape and colour of one cell, cheap), the rest every
canvas (tile indexing, counting). AdamW with warm-up and cosine decay; each optimizer step accumulates
`batch` samples (their sequence lengths differ, so they run one at a time).

Deterministic for a given seed and thread count: the data stream is a numpy Generator of the seed, the
initialisation torch's generator of the seed, and every op runs on the CPU with a fixed thread count.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from demo_model.aids import (
    Aids,
)
from demo_model.recipe import Recipe
from demo_model.task import CANVASES, QUESTION_TYPES, accuracy, heldout, sample
from runtime.chat_format import stop_id
from runtime.core.build_dir import sha256_file
from runtime.core.demo_checkpoint import demo_parts, trained_dims, with_padding_heads, write_demo_checkpoint
from runtime.core.errors import CheckpointError
from runtime.core.families import PromptLayout, family_for
from runtime.core.progress import bar
from runtime.preprocess import preprocess_image_fast
from runtime.prompt import Message, build_prompt
from runtime.reference import NVLMReference, reference_class, reference_model
from runtime.tokenizer import NVLMTokenizer

log = logging.getLogger(__name__)

def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """[1 + side², dim] fixed 2-D sine-cosine position codes (MAE's): half the channels encode the row, half
    the column, at geometrically spaced frequencies; the CLS position gets zeros."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                indexing="ij")
    parts = [f(p.reshape(-1, 1) * freq) for p in (rows, cols) for f in (torch.sin, torch.cos)]
    grid = torch.cat(parts, dim=1)  # [side², 4·quarter]
    return torch.cat([torch.zeros(1, dim), torch.nn.functional.pad(grid, (0, dim - grid.shape[1]))])


def init_model(cfg, seed: int, sincos_positions: bool = True) -> NVLMReference:
    """Standard initialisation of the config's family: transformers' for the decoder (normal 0.02), small normals
    for the vision embeddings (or 2-D sin-cos position codes), InternViT's layer scale 0.1, torch's defaults
    elsewhere (NVLM-X/H's cross-attention gates at 0, as Flamingo's and mllama's: the untrained blocks add
    nothing)."""
    torch.manual_seed(seed)
    model = reference_class(cfg)(cfg).float()
    with torch.no_grad():
        emb = model.vision.embeddings
        emb.class_embedding.normal_(0, 0.02)
        emb.position_embedding.normal_(0, 0.02)
        if sincos_positions:
            emb.position_embedding.copy_(sincos_2d(cfg.vision.patches_per_side, cfg.vision.hidden_size)[None])
        for layer in model.vision.encoder.layers:
            layer.ls1.fill_(0.1)
            layer.ls2.fill_(0.1)
    return model


def lr_at(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def encode_sample(s, tok, cfg, layout):
    """(pixel values [T, 3, S, S], prompt ids, answer ids ending with <|im_end|>, the prompt's cross-attention
    inputs or None)."""
    pre = preprocess_image_fast(s.scene.image, config=cfg.preprocess)
    prompt = build_prompt(tok, [Message("user", "<image>\n" + s.question)], [pre.num_tiles],
                          tokens_per_tile=cfg.preprocess.tokens_per_tile, layout=layout)
    return (torch.from_numpy(pre.pixel_values), list(prompt.input_ids), tok.encode(s.answer) + [stop_id(tok)],
            prompt.cross)


def untagged(layout: PromptLayout) -> PromptLayout:
    """The ablation's prompt: the same image tokens without NVLM's 1-D tile tags (`<Image>` + tokens + `</Image>`)."""
    return replace(layout, in_text=lambda tag: False)


def sample_loss(model: NVLMReference, s, pv: torch.Tensor, ids: list[int], answer: list[int], pad_id: int,
                aids: Aids | None = None, cross=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(mean cross-entropy of the answer tokens given the prompt (teacher forcing), the training aids' weighted
    loss or 0, whether every answer token is the argmax). `cross`: the prompt's cross-attention inputs (NVLM-X/H)."""
    seq = torch.tensor([ids + answer[:-1]])
    with torch.set_grad_enabled(any(p.requires_grad for p in model.vision.parameters())):
        tiles = model.encode_tiles(pv)  # [T, 256, hidden]
    embeds, reading = model.teacher_forced(seq, tiles, pad_id, cross, generated=len(answer) - 1)
    with reading:
        out = model.llm.model(inputs_embeds=embeds, **(aids.wants(s) if aids else {}))
    logits = model.llm.lm_head(out.last_hidden_state[0, -len(answer):])  # [A, vocab]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(answer))
    # teacher-forced exact match of the whole answer: a running accuracy for the loss log (the loss is a mean over
    # the answer's tokens, most of which are decided by its first, so it understates how often the answer is wrong)
    exact = bool((logits.argmax(-1) == torch.tensor(answer)).all())
    return loss, (aids.loss(s, tiles, ids, pad_id, out, model, cross) if aids else torch.zeros(())), exact


def train(recipe: Recipe, log_file: Path | None = None) -> tuple[NVLMReference, list[dict]]:
    """Train from scratch; returns the model and the per-step log (also appended to `log_file` as JSONL)."""
    torch.set_num_threads(recipe.threads)
    _, cfg, raw_tok = demo_parts(trained_dims(recipe.variant))
    tok = NVLMTokenizer(raw_tok, Path("<demo tokenizer>"))
    layout = family_for(cfg).prompt_layout if recipe.tile_tags else untagged(family_for(cfg).prompt_layout)
    model = init_model(cfg, recipe.seed, recipe.sincos_positions)
    if recipe.init:
        load_released(model, Path(recipe.init))
    model.train()
    if recipe.freeze_vision:
        for module in (model.vision, model.projector):
            module.requires_grad_(False)
    aids = Aids.of(recipe, cfg.llm.hidden_size, tok)
    params = [p for p in model.parameters() if p.requires_grad] + aids.parameters()
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    rng = np.random.default_rng([recipe.seed, 2024])
    # the phase of each sample, in order
    plan = [p for p in recipe.schedule() for _ in range(p.samples)]
    history, done, t0 = [], 0, time.perf_counter()
    out = open(log_file, "a") if log_file else None
    try:
        with bar(recipe.steps, "training the embedded default", unit="step") as progress:
            for step in range(recipe.steps):
                for group in opt.param_groups:
                    group["lr"] = lr_at(recipe, step)
                opt.zero_grad(set_to_none=True)
                losses, auxes, by_type, hits, by_aid = [], [], {}, {}, {}
                for _ in range(min(recipe.batch, recipe.samples - done)):
                    phase = plan[done]
                    canvas = CANVASES[0] if phase.canvas == "one" else None
                    if sum(w > 0 for w in phase.mix) == 1:  # one question type: no draw (as the runs before phases)
                        qtype = QUESTION_TYPES[next(i for i, w in enumerate(phase.mix) if w > 0)]
                    else:
                        mix = np.array(phase.mix) / sum(phase.mix)
                        qtype = QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=mix))]
                    s = sample(rng, qtype, canvas=canvas)
                    pv, ids, answer, cross = encode_sample(s, tok, cfg, layout)
                    loss, aux, exact = sample_loss(model, s, pv, ids, answer, tok.image_pad_id, aids, cross)
                    ((loss + aux) / recipe.batch).backward()
                    losses.append(loss.item())
                    auxes.append(aux.item())
                    for name, value in aids.last.items():
                        by_aid.setdefault(name, []).append(value)
                    by_type.setdefault(qtype, []).append(loss.item())
                    hits.setdefault(qtype, []).append(exact)
                    done += 1
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                row = {"step": step + 1, "samples": done, "loss": sum(losses) / len(losses),
                       "loss_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
                       "exact_by_type": {t: sum(v) / len(v) for t, v in sorted(hits.items())},
                       "probes": sum(auxes) / len(auxes),
                       # each aid's unweighted loss, mean over the samples it applies to
                       "aids": {name: sum(v) / len(v) for name, v in sorted(by_aid.items())},
                       "lr": lr_at(recipe, step), "seconds": round(time.perf_counter() - t0, 2)}
                history.append(row)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                progress(1)
                if (step + 1) % 25 == 0 or step + 1 == recipe.steps:
                    log.info("step %d/%d: %d samples, loss %.4f, %.0f s", step + 1, recipe.steps, done, row["loss"],
                             row["seconds"])
    finally:
        if out:
            out.close()
    return model.eval(), history


def released_tensors(model: NVLMReference, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's weights under the released checkpoint's names (the family's weight map, read backwards)."""
    cfg = model.cfg
    modules = model.component_modules()
    out = {}
    for comp in family_for(cfg).components:
        state = modules[comp.name].state_dict()
        for source, target, shape in comp.expand(cfg):
            t = state[target]
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{target}: {tuple(t.shape)} is not the weight map's {shape}")
            out[source] = t.detach().to(dtype).contiguous()
    return out


def load_released(model: NVLMReference, path: Path) -> None:
    """Load weights saved by `released_tensors` (the family's weight map, forwards) into `model`, in its dtype."""
    from safetensors.torch import load_file

    # weights trained before the released layout's vision padding heads get zero padding heads (same function)
    tensors = with_padding_heads(load_file(str(path)), model.cfg.vision)
    modules = model.component_modules()
    for comp in family_for(model.cfg).components:
        module = modules[comp.name]
        wanted = {target: tensors.pop(source) for source, target, _ in comp.expand(model.cfg) if source in tensors}
        params = {name for name, _ in module.named_parameters()}  # tied weights appear once here
        missing = params - set(wanted)
        if missing:
            raise CheckpointError(f"{path}: no weights for {comp.name} {sorted(missing)[:3]} — not a demo-train output "
                             f"of these dimensions")
        module.load_state_dict({k: v.to(torch.float32) for k, v in wanted.items()}, strict=False)
    if tensors:
        raise CheckpointError(f"{path}: tensors the embedded default does not have: {sorted(tensors)[:3]}…")


@torch.no_grad()
def predict(model: NVLMReference, tok, samples, layout: PromptLayout | None = None, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers of the reference model to task samples (the prompt exactly as training and serving build it)."""
    layout = layout or family_for(model.cfg).prompt_layout
    answers = []
    for s in samples:
        pv, ids, _, cross = encode_sample(s, tok, model.cfg, layout)
        r = model.generate(ids, pv.to(model.dtype), image_token_id=tok.image_pad_id, max_new_tokens=max_new_tokens,
                           eos_token_id=stop_id(tok), cross=cross)
        answers.append(tok.decode(r.tokens))
    return answers


def train_and_save(out: Path, recipe: Recipe, *, command: str, eval_n: int = 400, eval_seed: int = 1,
                   log_file: Path | None = None) -> dict:
    """Train, write the bf16 weights (released names) to `out` atomically and a card beside it
    (`out` with .json: recipe, command, seed, checksum, held-out accuracy of the saved bf16 weights)."""
    from safetensors.torch import save_file

    out = Path(out)
    t0 = time.perf_counter()
    model, history = train(recipe, log_file)
    seconds = time.perf_counter() - t0
    tensors = released_tensors(model)
    tmp = out.with_name(f".{out.name}.partial")
    save_file(tensors, str(tmp), metadata={"format": "pt", "recipe": json.dumps(asdict(recipe))})
    tmp.replace(out)
    accuracy = None
    if eval_n:  # through a checkpoint written exactly as `demo-checkpoint --weights FILE` writes it
        with tempfile.TemporaryDirectory() as tmpdir:
            ckpt = write_demo_checkpoint(Path(tmpdir) / "ckpt", variant=recipe.variant, weights=out)
            accuracy = evaluate_checkpoint(ckpt, eval_n, eval_seed, tile_tags=recipe.tile_tags)
    card = {"weights": out.name, "sha256": sha256_file(out), "command": command, "recipe": asdict(recipe),
            "init": _init_card(recipe.init),
            "train_seconds": round(seconds, 1), "final_loss": history[-1]["loss"],
            "eval": {"questions": eval_n, "seed": eval_seed, "accuracy": accuracy}}
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _init_card(init: str) -> dict | None:
    """What a continued run started from: the weights' checksum and, when present, their own card's command
    and init (so the card of the last stage holds every command of the chain)."""
    if not init:
        return None
    path = Path(init)
    card = path.with_suffix(".json")
    prior = json.loads(card.read_text()) if card.exists() else {}
    return {"weights": path.name, "sha256": sha256_file(path), "command": prior.get("command"),
            "train_seconds": prior.get("train_seconds"), "init": prior.get("init")}


def evaluate_checkpoint(path: Path, n: int, seed: int, *, tile_tags: bool = True, chat_format: str = "release") -> dict:
    """Task accuracy of a checkpoint's reference model on n held-out questions (all four types, seeded)."""
    model, tok = reference_model(path), NVLMTokenizer.from_dir(path, chat_format=chat_format)
    layout = family_for(model.cfg).prompt_layout
    samples = heldout(n, seed)
    return accuracy(samples, predict(model, tok, samples, layout if tile_tags else untagged(layout)))
