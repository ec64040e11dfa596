"""Where does a demo-train output's tile lookup fail? (docs/demo_model.md, "The lookup, diagnosed and learned")

    .venv/bin/python scripts/lookup_diagnosis.py WEIGHTS [--images 40]

"What colour is the shape in tile K?" on a 2×2 canvas is a two-hop lookup in a two-layer decoder. This
prints, for fresh 896×896 colour questions (a fixed seed no training run uses):
1. first hop, key side: a linear probe (fit on half the images, scored on the other half) reads each image
   token's tile from the first layer's output, and how much of the image tokens' first-layer attention goes
   to text (the tile tags), per head;
2. first hop, query side: a linear probe reads K from the prompt's last token after the first layer, and that
   token's first-layer attention mass on the question's tile number and on image tokens, per head;
3. second hop: the last token's second-layer attention mass on tile K's image tokens, per head (0.25 when a
   head spreads evenly over the four tiles).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from demo_model.aids import DecoderProbe, asked_tile, question_key
from demo_model.task import sample
from demo_model.train import encode_sample, init_model, load_released
from runtime.core.demo_checkpoint import DEMO_TRAINED_DIMS, demo_parts
from runtime.core.families import family_for
from runtime.tokenizer import NVLMTokenizer

CANVAS = (896, 896)  # four tiles and the thumbnail
TILES = 4


@torch.enable_grad()
def probe_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    """Held-out accuracy of a linear probe fit on the first half of (x, y), scored on the second."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = len(x) // 2
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x[:n]), y[:n]).backward()
        opt.step()
    return (head(x[n:]).argmax(-1) == y[n:]).float().mean().item()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights")
    ap.add_argument("--images", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, cfg, raw = demo_parts(DEMO_TRAINED_DIMS)
    tok = NVLMTokenizer(raw, Path("<demo tokenizer>"))
    model = init_model(cfg, 0)
    load_released(model, Path(args.weights))
    model.eval()
    per_tile = cfg.preprocess.tokens_per_tile
    rng = np.random.default_rng([9, 17])
    image_x, image_y, last_x, last_y = [], [], [], []
    image_text_mass, number_mass, last_image_mass, asked_mass = [], [], [], []
    every = torch.arange(0, TILES * per_tile, 16)  # a sample of each image's regular-tile tokens
    for _ in range(args.images):
        s = sample(rng, "colour", canvas=CANVAS)
        pv, ids, _, _ = encode_sample(s, tok, cfg, family_for(cfg).prompt_layout)
        seq = torch.tensor([ids])
        embeds = model.embed(seq, model.encode_tiles(pv).flatten(0, 1), tok.image_pad_id)
        out = model.llm.model(inputs_embeds=embeds, output_hidden_states=True, output_attentions=True)
        first, a1, a2 = out.hidden_states[1][0], out.attentions[0][0], out.attentions[1][0]  # a: [heads, S, S]
        image_pos = (seq[0] == tok.image_pad_id).nonzero().flatten()
        text = torch.ones(len(ids), dtype=torch.bool)
        text[image_pos] = False
        k = asked_tile(s)
        image_x.append(first[image_pos[every]])
        image_y.append(DecoderProbe.targets(len(image_pos), TILES, per_tile)[every])
        last_x.append(first[-1:])
        last_y.append(torch.tensor([k]))
        image_text_mass.append(a1[:, image_pos][:, :, text].sum(-1).mean(-1))
        number_mass.append(a1[:, -1, question_key(s, ids, tok)[1]])
        last_image_mass.append(a1[:, -1, image_pos].sum(-1))
        asked_mass.append(a2[:, -1, image_pos[k * per_tile:(k + 1) * per_tile]].sum(-1))

    def heads(rows) -> str:
        return " ".join(f"{v:.2f}" for v in torch.stack(rows).mean(0).tolist())

    print(f"{args.weights}: {args.images} colour questions on {CANVAS[0]}x{CANVAS[1]} (chance 0.25)")
    print(f"1. image tokens' tile after layer 1, linear probe:     {probe_accuracy(torch.cat(image_x), torch.cat(image_y), TILES):.2f}")
    print(f"   image tokens' layer-1 mass on text, per head:      {heads(image_text_mass)}")
    print(f"2. K at the prompt's last token after layer 1, probe:  {probe_accuracy(torch.cat(last_x), torch.cat(last_y), TILES):.2f}")
    print(f"   its layer-1 mass on the tile number, per head:     {heads(number_mass)}")
    print(f"   its layer-1 mass on image tokens, per head:        {heads(last_image_mass)}")
    print(f"3. its layer-2 mass on tile K's tokens, per head:      {heads(asked_mass)}")


if __name__ == "__main__":
    main()
