"""The embedded default's task (demo_model/task.py) and its training recipe (demo_model/train.py)."""

import json

import numpy as np
import pytest

from demo_model.task import (
    CANVASES,
    CELL,
    COLOURS,
    QUESTION_TYPES,
    Sample,
    accuracy,
    ask,
    heldout,
    random_scene,
    sample,
)
from runtime.preprocess import preprocess_image

# issue 17: at least 95% of the colour, which-tile and count questions and 80% of the shape questions
SEE_FLOOR_EASY, SEE_FLOOR_SHAPE = 0.95, 0.80


@pytest.mark.parametrize("canvas,tiles", list(zip(CANVASES, (1, 3, 4, 5))))
def test_canvases_tile_like_the_spec(canvas, tiles):
    scene = random_scene(np.random.default_rng(0), canvas)
    assert scene.image.size == canvas and len(scene.cells) == (canvas[0] // CELL) * (canvas[1] // CELL)
    assert preprocess_image(scene.image).num_tiles == tiles


def test_each_cell_holds_its_shape_in_its_colour():
    """Measured from the pixels, independently of the generator's bookkeeping: each cell's most common
    non-background colour is the recorded one, and the filled fraction of the shape's bounding box tells
    the shape (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2)."""
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(12):
        scene = random_scene(rng, CANVASES[3])
        px = np.asarray(scene.image).astype(int)
        for k, (shape, colour) in enumerate(scene.cells):
            r, c = divmod(k, 2)
            cell = px[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            mask = np.all(cell == COLOURS[colour], axis=-1)
            ys, xs = np.nonzero(mask)
            fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            want = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
            assert abs(fill - want) < 0.05, (shape, fill)
            assert 200 <= xs.max() - xs.min() + 1 <= 302
            seen.add((shape, colour))
    assert len(seen) >= 10  # the draw covers the shape × colour grid


def test_questions_and_answers():
    rng = np.random.default_rng(5)
    scene = random_scene(rng, CANVASES[2])
    assert ask(scene, "count", rng) == ("How many shapes are there?", "3")
    q, a = ask(scene, "colour", rng)
    k = int(q.split("tile ")[1].rstrip("?"))
    assert a == scene.cells[k - 1][1]
    q, a = ask(scene, "shape", rng)
    assert a == scene.cells[int(q.split("tile ")[1].rstrip("?")) - 1][0]
    colours = [c for _, c in scene.cells]
    qa = ask(scene, "which_tile", rng)
    if qa is None:
        assert all(colours.count(c) != 1 for c in COLOURS)
    else:
        colour = qa[0].split("the ")[1].split(" shape")[0]
        assert colours.count(colour) == 1 and qa[1] == f"tile {colours.index(colour) + 1}"


def test_heldout_is_seeded_balanced_and_fresh():
    a, b, c = heldout(40, seed=1), heldout(40, seed=1), heldout(40, seed=2)
    key = [(s.question, s.answer, s.scene.cells) for s in a]
    assert key == [(s.question, s.answer, s.scene.cells) for s in b]
    assert key != [(s.question, s.answer, s.scene.cells) for s in c]
    assert [s.qtype for s in a[:4]] == list(QUESTION_TYPES) and len({s.answer for s in a}) > 8
    # never the training stream: the trainer draws from default_rng([seed, 2024])
    train = [sample(np.random.default_rng([1, 2024])) for _ in range(4)]
    assert all(t.scene.cells != h.scene.cells or t.question != h.question for t, h in zip(train, a))


def test_accuracy_per_type():
    s = heldout(8, seed=0)
    preds = [x.answer for x in s]
    preds[1] = "wrong"  # a shape question
    preds[2] = preds[2].upper() + "."  # normalised, still right
    acc = accuracy(s, preds)
    assert acc["shape"] == 0.5 and acc["colour"] == 1.0 and acc["which_tile"] == 1.0 and acc["all"] == 7 / 8
    assert acc["n"] == {t: 2 for t in QUESTION_TYPES}
    with pytest.raises(ValueError):
        accuracy(s, preds[:3])


def test_twenty_training_steps_lower_the_loss_and_repeat_exactly(tmp_path):
    """The CI check of the recipe: 20 steps from a fixed seed, loss falling, two runs bit-identical."""
    from demo_model.recipe import Recipe
    from demo_model.train import released_tensors, train

    recipe = Recipe(samples=40, batch=2, lr=2e-3, warmup_steps=5, single_tile_fraction=1.0, seed=11, threads=1)
    m1, h1 = train(recipe, tmp_path / "log.jsonl")
    m2, h2 = train(recipe)
    assert len(h1) == 20 and [r["loss"] for r in h1] == [r["loss"] for r in h2]
    # the running exact-match: none at initialisation (a 640-token vocabulary), a fraction per type
    assert h1[0]["exact_by_type"] and set(h1[0]["exact_by_type"].values()) == {0.0}
    assert all(0 <= v <= 1 for r in h1 for v in r["exact_by_type"].values())
    first, last = np.mean([r["loss"] for r in h1[:5]]), np.mean([r["loss"] for r in h1[-5:]])
    assert last < 0.75 * first, (first, last)
    t1, t2 = released_tensors(m1), released_tensors(m2)
    assert all((t1[n] == t2[n]).all() for n in t1)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == list(range(1, 21))


def test_trained_weights_round_trip_through_the_checkpoint_writer(tmp_path, capsys, monkeypatch):
    """demo-train's output: weights + card (checksum, recipe, accuracy); demo-checkpoint --weights FILE and
    nvlm-build eval read it back; eval --no-tile-tags asks the same questions without the tile tags."""
    import demo_model.train as dt
    from builder.cli import main
    from runtime.core.build_dir import sha256_file

    out = tmp_path / "w.safetensors"
    assert main(["demo-train", str(out), "--samples", "4", "--batch", "2", "--threads", "1", "--eval", "4"]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_file(out) and card["recipe"]["samples"] == 4
    assert set(card["eval"]["accuracy"]) >= set(QUESTION_TYPES) and "--samples 4 --batch 2 --threads 1" in card["command"]
    capsys.readouterr()
    assert main(["demo-checkpoint", str(tmp_path / "ck"), "--weights", str(out)]) == 0
    assert main(["eval", str(tmp_path / "ck"), "--n", "4", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert acc == card["eval"]["accuracy"]  # the same weights, the same questions
    prompts, encode = [], dt.encode_sample  # the ids eval sends, with and without tags

    def spy(sample, tok, *rest):
        out = encode(sample, tok, *rest)
        prompts.append(tok.decode([int(i) for i in out[1] if int(i) < tok.vocab_size]))
        return out

    monkeypatch.setattr(dt, "encode_sample", spy)
    for flags in ([], ["--no-tile-tags"]):  # the ablation's prompts
        assert main(["eval", str(tmp_path / "ck"), "--n", "4", "--json", *flags]) == 0
        assert set(json.loads(capsys.readouterr().out.splitlines()[-1])) == set(acc)
    tagged, plain = prompts[:4], prompts[4:]
    assert len(plain) == 4 and all("<tile_" in t for t in tagged) and not any("<tile_" in t for t in plain)
    assert all("<Image>" in t for t in plain)  # the image is still there, only its tags are gone
    assert main(["demo-checkpoint", str(tmp_path / "bad"), "--variant", "x", "--weights", str(out)]) == 2
    assert "do not fit the variant 'x'" in capsys.readouterr().err


def test_sample_types():
    rng = np.random.default_rng(9)
    for t in QUESTION_TYPES:
        s = sample(rng, t)
        assert isinstance(s, Sample) and s.qtype == t


def test_the_packaged_weights_are_the_card_s(trained_ckpt):
    from runtime.core.build_dir import sha256_file
    from runtime.core.demo_checkpoint import TRAINED_WEIGHTS, is_trained_default

    card = json.loads(TRAINED_WEIGHTS.with_suffix(".json").read_text())
    assert sha256_file(TRAINED_WEIGHTS) == card["sha256"]
    assert card["command"].startswith("nvlm-build demo-train") and f"--seed {card['recipe']['seed']}" in card["command"]
    assert is_trained_default(trained_ckpt)


def test_the_shipped_default_answers_fresh_questions(trained_ckpt):
    """Issue 17's floor on 100 questions from a seed neither training, the card nor the fidelity report uses."""
    from demo_model.train import evaluate_checkpoint

    acc = evaluate_checkpoint(trained_ckpt, 100, seed=4242)
    assert acc["n"] == {t: 25 for t in QUESTION_TYPES}
    assert min(acc["colour"], acc["which_tile"], acc["count"]) >= SEE_FLOOR_EASY, acc
    assert acc["shape"] >= SEE_FLOOR_SHAPE, acc


def test_shape_first_phase(capsys):
    from builder.cli import main
    from demo_model.recipe import Recipe
    from demo_model.train import train

    _, h = train(Recipe(samples=6, batch=2, shape_first=4, single_tile_fraction=0.0, seed=2, threads=1))
    assert [set(r["loss_by_type"]) for r in h[:2]] == [{"shape"}, {"shape"}]
    assert main(["demo-train", "/nonexistent/w.safetensors", "--samples", "4", "--shape-first", "5"]) == 2
    assert "--shape-first 5 must be between 0 and --samples 4" in capsys.readouterr().err


def test_phases_are_the_curriculum(capsys):
    """An explicit curriculum: each phase's canvas and question types, in order; the old flags give the same
    schedule as phases; a malformed spec is one line and exit 2."""
    from builder.cli import main
    from demo_model.recipe import Phase, Recipe
    from demo_model.train import train

    phases = Phase.parse("4:one:0,1,0,0;4:all:0,0,0,1")
    assert phases == (Phase(4, "one", (0.0, 1.0, 0.0, 0.0)), Phase(4, "all", (0.0, 0.0, 0.0, 1.0)))
    _, h = train(Recipe(samples=8, batch=2, phases=phases, seed=2, threads=1))
    assert [set(r["loss_by_type"]) for r in h] == [{"shape"}] * 2 + [{"count"}] * 2
    old = Recipe(samples=10, shape_first=4, single_tile_fraction=0.2)
    assert [(p.samples, p.canvas) for p in old.schedule()] == [(4, "one"), (2, "one"), (4, "all")]
    with pytest.raises(ValueError, match="add up to 8"):
        Recipe(samples=9, phases=phases)
    for bad in ("4:some:1,1,1,1", "4:one:1,1", "x:one:1,1,1,1"):
        assert main(["demo-train", "/nonexistent/w.safetensors", "--phases", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nvlm-build demo-train: error: --phases") and err.count("\n") == 1


def test_a_second_stage_starts_from_the_first_stage_s_weights(tmp_path, capsys):
    """--init: the continued run's starting point is exactly the given weights (not a fresh initialisation),
    its card chains the first stage's command, and a file that is not a demo-train output is refused."""
    from safetensors.torch import save_file

    from builder.cli import main
    from demo_model.recipe import Recipe
    from demo_model.train import init_model, load_released, released_tensors
    from runtime.core.demo_checkpoint import DEMO_TRAINED_DIMS, demo_parts
    from runtime.core.errors import CheckpointError

    _, cfg, _ = demo_parts(DEMO_TRAINED_DIMS)
    first, other = init_model(cfg, 3), init_model(cfg, 4)
    w = tmp_path / "first.safetensors"
    save_file(released_tensors(first), str(w))
    a, b = released_tensors(first), released_tensors(other)
    assert any(not (a[n] == b[n]).all() for n in a)  # the two starting points differ
    load_released(other, w)
    b = released_tensors(other)
    assert all((a[n] == b[n]).all() for n in a)

    assert main(["demo-train", str(w), "--samples", "2", "--batch", "2", "--threads", "1", "--eval", "0"]) == 0
    out = tmp_path / "second.safetensors"
    assert main(["demo-train", str(out), "--samples", "2", "--batch", "2", "--threads", "1", "--eval", "0",
                 "--init", str(w), "--seed", "5"]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["recipe"]["init"] == str(w) and f"--init {w}" in card["command"]
    assert card["init"]["command"].startswith(f"nvlm-build demo-train {w} ") and len(card["init"]["sha256"]) == 64

    save_file({"not.a.weight": released_tensors(first)["mlp1.0.weight"]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="not a demo-train output"):
        load_released(other, tmp_path / "bad.safetensors")
    capsys.readouterr()
    assert main(["demo-train", str(out), "--samples", "2", "--init", str(tmp_path / "bad.safetensors")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["demo-train", str(out), "--samples", "2", "--init", str(tmp_path / "none.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert Recipe().init == ""


def test_decoder_probe_targets_and_its_loss_in_training():
    """The training-only probe on the decoder's first layer: each image token's class is its tile (row-major
    cell order) or the thumbnail; the tile a question names is parsed from it; with the probe on, the logged
    probe loss includes it (higher at the start than without) and the run still repeats exactly."""
    from demo_model.aids import DecoderProbe, asked_tile
    from demo_model.recipe import Recipe
    from demo_model.train import train

    t = DecoderProbe.targets(5 * 256, 4, 256)
    assert [int((t == k).sum()) for k in range(5)] == [256] * 5
    assert t[255] == 0 and t[256] == 1 and t[-1] == DecoderProbe.THUMBNAIL
    t = DecoderProbe.targets(3 * 256, 2, 256)  # 896×448: two tiles and the thumbnail
    assert [int((t == k).sum()) for k in range(5)] == [256, 256, 0, 0, 256]
    assert DecoderProbe.targets(256, 1, 256).tolist() == [0] * 256
    rng = np.random.default_rng(3)
    assert asked_tile(sample(rng, "colour", canvas=(896, 896))) in range(4)
    s = Sample(random_scene(rng, (1344, 448)), "shape", "What shape is in tile 3?", "circle")
    assert asked_tile(s) == 2
    assert asked_tile(sample(rng, "count")) is None and asked_tile(sample(rng, "which_tile")) is None

    base = dict(samples=4, batch=2, phases=(), single_tile_fraction=0.0, seed=5, threads=1)
    _, off = train(Recipe(**base))
    _, on1 = train(Recipe(**base, decoder_probe=1.0))
    _, on2 = train(Recipe(**base, decoder_probe=1.0))
    assert [r["loss"] for r in on1] == [r["loss"] for r in on2]
    assert on1[0]["loss"] == off[0]["loss"]  # the first step's answer loss is before any update
    assert on1[0]["probes"] > off[0]["probes"] + 1.0  # + a 5-way and a 4-way cross-entropy at initialisation


def test_attention_hint_targets_the_tile_the_answer_is_about():
    """The second-hop hint: which answer token depends on which tile, per question type; its loss is low when
    the row attends to that tile's image tokens and high when it attends to another tile's."""
    import torch

    from demo_model.aids import attention_mass_loss, looked_up, tile_positions
    from demo_model.recipe import Recipe
    from demo_model.train import train

    scene = random_scene(np.random.default_rng(4), (896, 896))
    assert looked_up(Sample(scene, "colour", "What colour is the shape in tile 4?", "red")) == (0, 3)
    assert looked_up(Sample(scene, "shape", "What shape is in tile 1?", "circle")) == (0, 0)
    assert looked_up(Sample(scene, "which_tile", "Which tile has the red shape?", "tile 2")) == (1, 1)
    assert looked_up(Sample(scene, "count", "How many shapes are there?", "4")) is None

    per_tile, text = 4, 3  # a toy sequence: 3 text tokens, then 3 tiles of 4 image tokens
    image_pos = torch.arange(text, text + 3 * per_tile)
    attn = torch.zeros(20, 20)
    attn[19, image_pos[per_tile:2 * per_tile]] = 0.25  # the last row attends to tile 1 (0-based) only
    ids = [0] * text + [9] * 3 * per_tile + [0] * 5  # 9: the image pad id
    right = attention_mass_loss(attn, 19, tile_positions(1, ids, 9, None, per_tile))
    wrong = attention_mass_loss(attn, 19, tile_positions(2, ids, 9, None, per_tile))
    assert abs(right.item()) < 1e-5 and wrong.item() > 10

    base = dict(samples=4, batch=2, phases=(), single_tile_fraction=0.0, seed=5, threads=1, decoder_probe=1.0)
    _, off = train(Recipe(**base))
    _, on1 = train(Recipe(**base, attention_hint=1.0))
    _, on2 = train(Recipe(**base, attention_hint=1.0))
    assert [r["loss"] for r in on1] == [r["loss"] for r in on2] and on1[0]["loss"] == off[0]["loss"]
    assert on1[0]["probes"] > off[0]["probes"]
    # on every head of the second layer: another (mean) hint loss from the same first step
    _, every = train(Recipe(**base, attention_hint=1.0, attention_hint_heads=4))
    assert every[0]["loss"] == on1[0]["loss"] and every[0]["aids"]["attention_hint"] != on1[0]["aids"]["attention_hint"]
    # which_tile questions on their own head count; the first step's colour/shape samples are unchanged
    _, split = train(Recipe(**base, attention_hint=1.0, which_tile_hint_heads=4))
    assert split[0]["aids"]["attention_hint"] != on1[0]["aids"]["attention_hint"]
    with pytest.raises(ValueError, match="at least 1"):
        Recipe(attention_hint_heads=0)


def test_question_probe_is_a_head_of_the_decoder_probe(capsys, tmp_path):
    from builder.cli import main
    from demo_model.recipe import Recipe
    from demo_model.train import train

    # the card's command names exactly the aids that differ from the defaults
    assert main(["demo-train", str(tmp_path / "w.safetensors"), "--phases", "2:one:1,1,1,1", "--batch", "2",
                 "--decoder-probe", "1", "--question-probe", "0.5", "--probe-pooling", "mean", "--threads", "1",
                 "--eval", "0"]) == 0
    command = json.loads((tmp_path / "w.json").read_text())["command"]
    assert "--decoder-probe 1.0 --question-probe 0.5 --probe-pooling mean" in command and "--attention-hint" not in command
    capsys.readouterr()

    with pytest.raises(ValueError, match="give decoder_probe"):
        Recipe(question_probe=1.0)
    assert main(["demo-train", "/nonexistent/w.safetensors", "--question-probe", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    base = dict(samples=2, batch=2, phases=(), single_tile_fraction=0.0, seed=5, threads=1, decoder_probe=1.0)
    _, off = train(Recipe(**base))
    _, on = train(Recipe(**base, question_probe=1.0))
    assert on[0]["loss"] == off[0]["loss"] and on[0]["probes"] > off[0]["probes"] + 0.5  # + a 4-way cross-entropy


def test_tile_probe_pooling():
    """The tile probe pools mean ‖ max (the earlier runs) or mean only: a tile whose cell is told only by its
    maximum is separable by the first and not by the second."""
    import torch

    from demo_model.aids import TileProbe
    from demo_model.recipe import Recipe

    assert TileProbe(8).head.in_features == 16 and TileProbe(8, "mean").head.in_features == 8
    with pytest.raises(ValueError, match="one of"):
        Recipe(probe_pooling="max")
    # two tiles with the same mean and different maxima
    a = torch.zeros(1, 4, 8)
    a[0, 0, 0], a[0, 1, 0] = 2.0, -2.0
    b = torch.zeros(1, 4, 8)
    b[0, 0, 0], b[0, 1, 0] = 1.0, -1.0
    for pooling, separable in (("mean_max", True), ("mean", False)):
        probe = TileProbe(8, pooling)
        assert (not torch.equal(probe.pool(a), probe.pool(b))) == separable


def test_freeze_vision_trains_the_decoder_only(tmp_path, capsys):
    """--freeze-vision: after a second stage the vision tower and projector are bit-identical to --init and the
    decoder is not; it needs --init (one line, exit 2)."""
    from safetensors.torch import load_file, save_file

    from builder.cli import main
    from demo_model.recipe import Recipe
    from demo_model.train import init_model, released_tensors
    from runtime.core.demo_checkpoint import DEMO_TRAINED_DIMS, demo_parts

    _, cfg, _ = demo_parts(DEMO_TRAINED_DIMS)
    w = tmp_path / "first.safetensors"
    save_file(released_tensors(init_model(cfg, 3)), str(w))
    out = tmp_path / "second.safetensors"
    assert main(["demo-train", str(out), "--phases", "4:all:1,1,1,1", "--batch", "2", "--threads", "1",
                 "--eval", "0", "--init", str(w), "--freeze-vision", "--decoder-probe", "1"]) == 0
    before, after = load_file(str(w)), load_file(str(out))
    vision = [n for n in before if n.startswith(("vision_model.", "mlp1."))]
    decoder = [n for n in before if n.startswith("language_model.")]
    assert vision and decoder
    assert all(before[n].equal(after[n]) for n in vision)
    assert sum(not before[n].equal(after[n]) for n in decoder) > len(decoder) // 2
    assert "--freeze-vision" in json.loads(out.with_suffix(".json").read_text())["command"]
    capsys.readouterr()

    with pytest.raises(ValueError, match="give init"):
        Recipe(freeze_vision=True)
    assert main(["demo-train", str(out), "--samples", "2", "--freeze-vision"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_key_hint_points_at_the_question_word_the_lookup_searches_with():
    """The first-hop hint's target: the question's " K" token (not a tile tag's digit) for colour/shape, read
    where the first answer token is predicted; the colour word for which_tile, read where " K" of "tile K" is
    predicted; none for count. With the hint on, the logged aids' loss includes it and the run repeats exactly."""
    from pathlib import Path

    from demo_model.aids import question_key
    from demo_model.recipe import Recipe
    from demo_model.train import encode_sample, train
    from runtime.core.demo_checkpoint import DEMO_TRAINED_DIMS, demo_parts
    from runtime.core.families import family_for
    from runtime.tokenizer import NVLMTokenizer

    _, cfg, raw = demo_parts(DEMO_TRAINED_DIMS)
    tok = NVLMTokenizer(raw, Path("<demo tokenizer>"))
    layout = family_for(cfg).prompt_layout
    scene = random_scene(np.random.default_rng(4), (896, 896))
    for k in (1, 2, 3, 4):
        s = Sample(scene, "colour" if k % 2 else "shape",
                   f"What colour is the shape in tile {k}?" if k % 2 else f"What shape is in tile {k}?", "red")
        _, ids, _, _ = encode_sample(s, tok, cfg, layout)
        offset, pos = question_key(s, ids, tok)
        assert offset == 0 and tok.decode([ids[pos]]) == f" {k}" and tok.decode(ids[pos + 1:pos + 2]) == "?"
    for colour in ("red", "yellow"):
        s = Sample(scene, "which_tile", f"Which tile has the {colour} shape?", "tile 2")
        _, ids, _, _ = encode_sample(s, tok, cfg, layout)
        offset, pos = question_key(s, ids, tok)
        assert offset == 1 and tok.decode([ids[pos]]) == f" {colour}"
    assert question_key(Sample(scene, "count", "How many shapes are there?", "4"), [], tok) is None

    base = dict(samples=4, batch=2, phases=(), single_tile_fraction=1.0, question_mix=(1.0, 1.0, 1.0, 0.0), seed=5,
                threads=1)
    _, off = train(Recipe(**base))
    _, on1 = train(Recipe(**base, key_hint=1.0))
    _, on2 = train(Recipe(**base, key_hint=1.0))
    assert [r["loss"] for r in on1] == [r["loss"] for r in on2] and on1[0]["loss"] == off[0]["loss"]
    assert on1[0]["probes"] > off[0]["probes"] + 1.0  # −log of a small attention mass
    # the log has each aid's own loss: the tile probe (on by default) and the hint
    assert set(on1[0]["aids"]) == {"tile_probe", "key_hint"} and set(off[0]["aids"]) == {"tile_probe"}
    assert on1[0]["aids"]["key_hint"] > 1.0
    # restricted to colour/shape (run U1's hint), which_tile questions get none
    which_only = dict(base, question_mix=(0.0, 0.0, 1.0, 0.0))
    _, on = train(Recipe(**which_only, key_hint=1.0))
    _, off = train(Recipe(**which_only, key_hint=1.0, key_hint_types=("colour", "shape")))
    assert "key_hint" in on[0]["aids"] and "key_hint" not in off[0]["aids"]
    with pytest.raises(ValueError, match="key_hint_types"):
        Recipe(key_hint_types=("count",))


def test_attention_log_probs_are_the_decoder_s_attention():
    """The key hint's recomputed attention row equals the probabilities transformers' decoder returns, for
    every head of both layers (GQA: heads 2 and 3 read the second KV head), on a real prompt."""
    from pathlib import Path

    import torch

    from demo_model.aids import attention_log_probs
    from demo_model.train import encode_sample, init_model
    from runtime.core.demo_checkpoint import DEMO_TRAINED_DIMS, demo_parts
    from runtime.core.families import family_for
    from runtime.tokenizer import NVLMTokenizer

    _, cfg, raw = demo_parts(DEMO_TRAINED_DIMS)
    tok = NVLMTokenizer(raw, Path("<demo tokenizer>"))
    model = init_model(cfg, 7)
    with torch.no_grad():  # larger biases than the initialisation's zeros, so that rotary and bias both matter
        for layer in model.llm.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.k_proj.bias.normal_(0, 0.5)
    s = sample(np.random.default_rng(8), "colour", canvas=(896, 448))
    pv, ids, _, _ = encode_sample(s, tok, cfg, family_for(cfg).prompt_layout)
    with torch.no_grad():
        embeds = model.embed(torch.tensor([ids]), model.encode_tiles(pv).flatten(0, 1), tok.image_pad_id)
        out = model.llm.model(inputs_embeds=embeds, output_hidden_states=True, output_attentions=True)
        for layer in (0, 1):
            for head in range(cfg.llm.num_heads):
                for row in (len(ids) - 1, 40):
                    got = attention_log_probs(model, layer, out.hidden_states[layer][0], row, head).exp()
                    want = out.attentions[layer][0, head, row, :row + 1]
                    assert torch.allclose(got, want, atol=1e-6), (layer, head, row)
        # and a wrong head is told apart
        assert not torch.allclose(attention_log_probs(model, 0, out.hidden_states[0][0], len(ids) - 1, 0).exp(),
                                  out.attentions[0][0, 2, len(ids) - 1])


@pytest.mark.parametrize("variant", ["d", "x", "h"])
def test_a_teacher_forced_pass_is_the_served_decode(variant, tmp_path):
    """Training's one pass over prompt + answer (`teacher_forced`: NVLM-X/H's answer tokens read every image
    key) gives the logits that prefill + step-by-step decoding with the KV cache give — the path `generate`
    and serving take — on a random default whose cross-attention gates are open (so the keys matter), for a
    question on a 3-tile canvas. And the image is read: another image's tiles change the logits."""
    import torch
    from transformers import DynamicCache

    from demo_model.train import encode_sample
    from runtime.core.demo_checkpoint import write_demo_checkpoint
    from runtime.core.families import family_for
    from runtime.reference import reference_model
    from runtime.tokenizer import NVLMTokenizer

    ckpt = write_demo_checkpoint(tmp_path / "ck", variant=variant)
    model, tok = reference_model(ckpt), NVLMTokenizer.from_dir(ckpt)
    rng = np.random.default_rng(21)
    s, other = sample(rng, "colour", canvas=(1344, 448)), sample(rng, "colour", canvas=(1344, 448))
    pv, ids, answer, cross = encode_sample(s, tok, model.cfg, family_for(model.cfg).prompt_layout)
    answer = tok.encode("blue circle") + [tok.im_end_id]  # any tokens: this is a parity check
    with torch.no_grad():
        embeds, step = model.prefill_inputs(torch.tensor([ids]), pv, tok.image_pad_id, cross)
        with step(None):
            out = model.llm(inputs_embeds=embeds, past_key_values=DynamicCache(), use_cache=True)
        served = [out.logits[0, -1]]
        for i, t in enumerate(answer[:-1]):
            with step(i):
                out = model.llm(input_ids=torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
            served.append(out.logits[0, -1])

        def forced(pixel_values):
            embeds, reading = model.teacher_forced(torch.tensor([ids + answer[:-1]]), model.encode_tiles(pixel_values),
                                                   tok.image_pad_id, cross, generated=len(answer) - 1)
            with reading:
                return model.llm(inputs_embeds=embeds).logits[0, -len(answer):]

        got = forced(pv)
        assert torch.allclose(got, torch.stack(served), atol=1e-4), (got - torch.stack(served)).abs().max()
        other_pv = encode_sample(other, tok, model.cfg, family_for(model.cfg).prompt_layout)[0]
        assert (forced(other_pv) - got).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["x", "h"])
def test_nvlm_x_and_h_train_with_the_same_recipe(variant, tmp_path, capsys):
    """demo-train --variant x|h: the cross-attention families train from scratch (their gates start at 0 and
    move), deterministically, and the card's held-out score is the written checkpoint's; the attention hint,
    which reads inline image tokens, is refused for them with a one-line error."""
    import torch
    from safetensors.torch import load_file

    from builder.cli import main

    out = tmp_path / "w.safetensors"
    args = ["demo-train", str(out), "--phases", "4:one:1,1,1,1;4:all:1,1,1,1", "--batch", "2", "--threads", "1",
            "--variant", variant, "--decoder-probe", "1", "--question-probe", "1", "--key-hint", "1", "--eval", "4"]
    assert main(args) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["recipe"]["variant"] == variant and f"--variant {variant}" in card["command"]
    gates = {n: t for n, t in load_file(str(out)).items() if n.endswith("_gate")}
    assert len(gates) == 4 and all(float(t.abs().max()) > 0 for t in gates.values())
    assert main([*args[:2], "--samples", "2", "--batch", "2", "--threads", "1", "--variant", variant, "--eval", "0"]) == 0
    first = load_file(str(out))
    assert main([*args[:2], "--samples", "2", "--batch", "2", "--threads", "1", "--variant", variant, "--eval", "0"]) == 0
    assert all(torch.equal(first[n], t) for n, t in load_file(str(out)).items())
    capsys.readouterr()
    hinted = [*args[:2], "--phases", "4:all:0,0,1,0", "--batch", "2", "--threads", "1", "--variant", variant,
              "--attention-hint", "1", "--eval", "0", "--log", str(tmp_path / "hint.jsonl")]
    if variant == "x":  # the hint targets the tile's tag tokens
        assert main(hinted) == 0
        rows = [json.loads(line) for line in (tmp_path / "hint.jsonl").read_text().splitlines()]
        hints = [r["aids"]["attention_hint"] for r in rows if "attention_hint" in r["aids"]]
        assert hints and all(h > 0 for h in hints)  # (a one-tile canvas has no target: that sample has none)
    else:
        assert main(hinted) == 2
        err = capsys.readouterr().err
        assert "NVLM-H's regular tiles" in err and len(err.strip().splitlines()) == 1
    assert main(["demo-checkpoint", str(tmp_path / "ck"), "--variant", variant, "--weights", str(out)]) == 0
    assert main(["demo-checkpoint", str(tmp_path / "ck_d"), "--weights", str(out)]) == 2


def test_nvlm_x_s_tile_stands_in_the_decoder_as_its_tag():
    """The attention hint's target in NVLM-X: tile K's tag tokens (the ones that read tile K's keys alone), found
    from the prompt's key ranges; on a one-tile image every token reads the only key tile: no target."""
    from pathlib import Path

    from demo_model.aids import tile_positions
    from demo_model.train import encode_sample
    from runtime.core.demo_checkpoint import demo_parts, trained_dims
    from runtime.core.families import family_for
    from runtime.tokenizer import NVLMTokenizer

    _, cfg, raw = demo_parts(trained_dims("x"))
    tok = NVLMTokenizer(raw, Path("<demo tokenizer>"))
    rng = np.random.default_rng(2)
    s = sample(rng, "colour", canvas=(896, 896))
    _, ids, _, cross = encode_sample(s, tok, cfg, family_for(cfg).prompt_layout)
    spelled = [tok.decode([ids[i] for i in tile_positions(k, ids, tok.image_pad_id, cross, 256)]) for k in range(5)]
    # (BPE merges across the tags' boundaries — "><" is one token — so a tag's tokens spell it with a neighbour's
    # bracket; the rule is the tokens whose first character lies in the tag)
    names = ["tile_1>", "tile_2>", "tile_3>", "tile_4>", "tile_global_thumbnail>"]
    assert all(names[k] in text and all(n not in text for n in names if n != names[k]) for k, text in enumerate(spelled))
    one = sample(rng, "colour", canvas=(448, 448))
    _, ids, _, cross = encode_sample(one, tok, cfg, family_for(cfg).prompt_layout)
    assert tile_positions(0, ids, tok.image_pad_id, cross, 256) is None


def test_recipe_flags_are_the_recipes_fields_and_its_command_line_round_trips():
    """demo-train's flags come from the Recipe dataclass (demo_model/recipe.py): every field has one, and the
    command a card records parses back to the same recipe."""
    import argparse
    import shlex
    from dataclasses import fields

    from demo_model.recipe import Phase, Recipe, add_flags, command_line, from_flags

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    add_flags(ap)
    assert set(vars(ap.parse_args(["o"]))) - {"out"} == {f.name for f in fields(Recipe)}
    recipe = Recipe(samples=150, phases=(Phase(100, "one", (1.0, 2.0, 1.0, 1.0)), Phase(50, "all", (1.0, 1.0, 1.0, 0.5))),
                    tile_tags=False, sincos_positions=False, key_hint=0.5, key_hint_types=("colour", "shape"),
                    freeze_vision=True, init="w.safetensors", lr=3e-4, question_mix=(1.0, 4.0, 1.0, 1.0))
    line = command_line("o", recipe)
    assert from_flags(ap.parse_args(shlex.split(line)[2:])) == recipe
    assert command_line("o", Recipe()) == "nvlm-build demo-train o"

