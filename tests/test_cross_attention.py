"""NVLM-X and NVLM-H: configs, weight maps, the key-range rule, the reference models and the embedded defaults.

Expected values are built here independently: the 72B parameter counts by hand arithmetic, the dense
cross-attention mask from the prompt text with str.find, the bare Qwen2 decoder from transformers."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from builder.cli import main
from runtime.core.checkpoint import Checkpoint
from runtime.core.config import THUMBNAIL_TAG
from runtime.core.errors import ConfigError, ShapeMismatchError, WeightMapError
from runtime.core.families import family_for, from_hf, tile_tags
from runtime.core.inspect import inspect, request_shape
from runtime.cross_reference import CrossAttention, CrossAttentionReference, ranged_attention
from runtime.prompt import build_prompt
from runtime.reference import reference_model
from runtime.tokenizer import NVLMTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
PER_TILE = 256


@pytest.fixture(scope="module", params=["x", "h"])
def demo_xh(request, tmp_path_factory):
    from runtime.core.demo_checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("xh") / f"nvlm-{request.param}-demo", variant=request.param)


@pytest.fixture(scope="module", params=["x", "h"])
def written_xh(request, tmp_path_factory):
    """The layout written by the independent script in tests/, run as a user would."""
    out = tmp_path_factory.mktemp("xhw") / f"other-{request.param}"
    subprocess.run([sys.executable, str(ROOT / "tests/xattn_layout_writer.py"), str(out), "--variant", request.param],
                   check=True, capture_output=True)
    return out


def tiles(n_tiles, seed):
    return torch.randn(sum(n_tiles), 3, 448, 448, generator=torch.Generator().manual_seed(seed)) if n_tiles else None


def prompt_for(model, tok, n_tiles, question="What is shown?"):
    text = "".join("<image>\n" for _ in n_tiles) + question
    return build_prompt(tok, text, n_tiles, tokens_per_tile=PER_TILE, layout=family_for(model.cfg).prompt_layout)


def bare_qwen2(model):
    """transformers' Qwen2ForCausalLM with the model's decoder weights and no cross-attention at all."""
    from transformers import Qwen2ForCausalLM

    bare = Qwen2ForCausalLM._from_config(model.cfg.llm.to_transformers(), attn_implementation="eager")
    bare.load_state_dict(model.llm.state_dict())
    return bare.eval()


def set_gates(model, value):
    with torch.no_grad():
        for layer in model.xattn:
            layer.cross_attn_attn_gate.fill_(value)
            layer.cross_attn_mlp_gate.fill_(value)


# --------------------------------------------------------------------------- 72B: configs, counts, memory

C, VL, VM, P, A = 3200, 45, 12800, 14, (25 + 7) * 128  # A: attention width with the release's 7 padding heads
VISION = VL * ((3 * A * C) + 2 * A + (C * A + C) + (VM * C + VM) + (C * VM + C) + 2 * C + 2 * C) + C + (
    C * 3 * P * P + C) + 1025 * C
H, LL, I, V, KV = 8192, 80, 29568, 152064, 1024
LLM = LL * (2 * H * H + 2 * KV * H + 3 * I * H) + LL * (H + 2 * KV + 2 * H) + H + 2 * V * H
X_PROJECTOR = 2 * 12800 + 12800 * H  # LayerNorm, then one Linear 12800 → 8192
H_PROJECTOR = 2 * 12800 + 12800 * 29568 + 29568 * 8192  # NVLM-D's MLP
XATTN_LINEAR = 10 * (2 * H * H + 2 * KV * H + 3 * I * H)
XATTN_OTHER = 10 * (2 * H + 2)  # two RMSNorms and two gates per layer


@pytest.mark.parametrize("variant,projector", [("x", X_PROJECTOR), ("h", H_PROJECTOR)])
def test_72b_parameters_and_memory_by_hand(tmp_path, variant, projector):
    shutil.copy(FIXTURES / f"nvlm_{variant}_72b_config.json", tmp_path / "config.json")
    r = inspect(tmp_path)
    assert r["family"] == f"nvlm-{variant}"
    assert r["dimensions"]["llm"]["cross_attention_layers"] == [7, 15, 23, 31, 39, 47, 55, 63, 71, 79]
    comps = {c["name"]: c["parameters"] for c in r["components"]}
    assert comps == {"vision": VISION, "projector": projector, "llm": LLM, "xattn": XATTN_LINEAR + XATTN_OTHER}
    assert XATTN_LINEAR + XATTN_OTHER == 8_776_744_980  # 10 layers of 877.7 M: q, k, v, o and a full MLP each
    mp = r["memory_plan"]
    assert mp["cross_kv_bytes_per_key"] == {"bf16": 2 * 10 * 8 * 128 * 2, "fp8": 2 * 10 * 8 * 128}
    plans = {(p["weights"], p["tp"]): p for p in mp["plans"]}
    linear = LL * (2 * H * H + 2 * KV * H + 3 * I * H)  # fp8: one byte each
    # the cross-attention blocks stay in 16 bits in every format (docs/llm.md), their linear layers too
    sixteen_bit = 2 * (2 * V * H + LL * (H + 2 * KV + 2 * H) + H + XATTN_OTHER + XATTN_LINEAR)
    fp8_tp2 = plans[("fp8", 2)]
    assert fp8_tp2["llm_weight_bytes"] == linear + sixteen_bit
    assert fp8_tp2["weight_bytes_per_gpu"] == (linear + sixteen_bit) // 2 + 2 * (VISION + projector)
    # the self-attention KV cache is NVLM-D's: the cross-attention layers add none per decoder token
    assert mp["kv_bytes_per_token"]["bf16"] == 2 * 80 * 8 * 128 * 2


def test_72b_request_shapes_and_d_unchanged(config_72b):
    d = from_hf(config_72b)
    x = from_hf(json.loads((FIXTURES / "nvlm_x_72b_config.json").read_text()))
    h = from_hf(json.loads((FIXTURES / "nvlm_h_72b_config.json").read_text()))
    assert request_shape(d, [7], 64).decoder_tokens == 64 + 7 * 256 and request_shape(d, [7], 64).key_tokens == 0
    assert (request_shape(x, [7], 64).decoder_tokens, request_shape(x, [7], 64).key_tokens) == (64, 7 * 256)
    assert (request_shape(h, [7], 64).decoder_tokens, request_shape(h, [7], 64).key_tokens) == (64 + 256, 6 * 261)
    assert request_shape(h, [1], 64).key_tokens == 0  # a one-tile image: the thumbnail only, inline


# --------------------------------------------------------------------------- config and weight errors


def _raw(variant):
    return json.loads((FIXTURES / f"nvlm_{variant}_72b_config.json").read_text())


@pytest.mark.parametrize("layers,match", [
    ([7, 80], r"cross_attention_layers has \[80\], outside the decoder's 80 layers"),
    ([15, 7], "strictly increasing"),
    ([], "cross_attention_layers"),
    (None, "cross_attention_layers is missing"),
    ([7, "15"], "must hold integers"),
])
def test_config_errors_name_the_key(layers, match):
    raw = _raw("x")
    raw["cross_attention_layers"] = layers
    if layers is None:
        del raw["cross_attention_layers"]
    with pytest.raises(ConfigError, match=match):
        from_hf(raw)


def _rewrite(src, dst, edit):
    """Copy a demo checkpoint, changing its tensors with `edit(dict)`; one shard, index rewritten."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    ckpt = Checkpoint.open(dst, validate=False)
    tensors = {n: ckpt.get(n) for n in ckpt.tensors}
    edit(tensors)
    for f in list(dst.glob("*.safetensors")) + [dst / "model.safetensors.index.json"]:
        f.unlink()
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_gate_of_the_wrong_shape_is_named(demo_xh, tmp_path):
    name = "language_model.model.xattn_layers.1.cross_attn_mlp_gate"
    bad = _rewrite(demo_xh, tmp_path / "c", lambda t: t.__setitem__(name, torch.zeros(2, dtype=torch.bfloat16)))
    with pytest.raises(ShapeMismatchError, match=f"'{name}' has shape \\[2\\] but config.json implies \\[1\\]"):
        Checkpoint.open(bad)


def test_missing_cross_attention_layer_is_named(demo_xh, tmp_path):
    def drop(t):
        for n in [n for n in t if ".xattn_layers.1." in n]:
            del t[n]
    bad = _rewrite(demo_xh, tmp_path / "c", drop)
    with pytest.raises(WeightMapError, match=r"missing tensors \(11\): language_model\.model\.xattn_layers\.1\."):
        Checkpoint.open(bad)


# --------------------------------------------------------------------------- which query reads which key


def expected_mask(model, tok, n_tiles, pr):
    """The dense [tokens, keys] mask, built from the prompt text with str.find and hand-counted key offsets."""
    layout = family_for(model.cfg).prompt_layout
    text = pr.text
    opens, tag_spans, key_end = [], [], []  # per image: <Image> char; (first char, end char, keys) of its tags
    base, pos = 0, 0
    for n in n_tiles:
        pos = text.index("<Image>", pos)
        opens.append(pos)
        cursor = pos
        for k, tag in enumerate(tile_tags(n)):
            width = PER_TILE + (len(tok.encode(tag)) if layout.tag_keys else 0)
            if layout.keys(tag):
                if layout.in_text(tag):
                    cursor = text.index(tag, cursor)
                    tag_spans.append((cursor, cursor + len(tag), range(base, base + width)))
                base += width
        key_end.append(base)
        pos += 1
    starts = [a for a, _ in tok._tok.encode(text, add_special_tokens=False).offsets]
    mask = torch.zeros(len(starts), base, dtype=torch.bool)
    for t, c in enumerate(starts):
        tag = [keys for a, b, keys in tag_spans if a <= c < b]
        if tag:
            mask[t, list(tag[0])] = True
        else:
            opened = [e for o, e in zip(opens, key_end) if o <= c]
            mask[t, :opened[-1] if opened else 0] = True
    return mask


@pytest.mark.parametrize("n_tiles", [[], [1], [3], [4, 1], [3, 7]])
def test_key_ranges_equal_an_independent_dense_mask(demo_xh, n_tiles):
    model = reference_model(demo_xh)
    tok = NVLMTokenizer.from_dir(demo_xh)
    pr = prompt_for(model, tok, n_tiles)
    cross = pr.cross
    ranges = torch.tensor(cross.key_ranges).reshape(-1, 2)
    pos = torch.arange(cross.num_keys)
    got = (pos[None] >= ranges[:, :1]) & (pos[None] < ranges[:, 1:])
    want = expected_mask(model, tok, n_tiles, pr)
    assert got.shape == want.shape and torch.equal(got, want)
    assert cross.key_ranges[0] == (0, 0)  # <|im_start|>: before any image, reads nothing
    assert cross.key_ranges[-1] == cross.decode_range == (0, cross.num_keys)
    if family_for(model.cfg).name == "nvlm-x" and n_tiles:
        # some tokens read exactly one tile (their tag's); with two images, image 2's tags read past image 1
        widths = {hi - lo for lo, hi in cross.key_ranges}
        assert PER_TILE in widths
        assert len(cross.key_tiles) == sum(n_tiles) and cross.inline_tiles == ()
    if family_for(model.cfg).name == "nvlm-h" and n_tiles:
        assert pr.num_image_tokens == PER_TILE * len(n_tiles)  # the thumbnails, inline
        assert THUMBNAIL_TAG in pr.text and "<tile_1>" not in pr.text


def test_ranged_attention_matches_the_kernel_reference():
    """runtime's dense-mask attention and plugins' one-query-at-a-time definition agree (GQA, empty rows)."""
    from plugins.xattn_kernels import gated_cross_attention_reference

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(9, 8, 32, generator=g), torch.randn(40, 2, 32, generator=g), torch.randn(40, 2, 32, generator=g))
    lo = torch.tensor([0, 0, 5, 10, 39, 20, 0, 3, 7])
    hi = torch.tensor([0, 40, 6, 30, 40, 20, 1, 3, 40])
    ours = ranged_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), torch.stack([lo, hi], 1))
    ref = gated_cross_attention_reference(q, k, v, lo, hi, gate=10.0) / torch.tanh(torch.tensor(10.0))
    torch.testing.assert_close(ours.transpose(0, 1), ref, rtol=1e-5, atol=1e-5)
    assert ours[:, [0, 5, 7]].abs().max() == 0  # empty ranges: exactly zero


# --------------------------------------------------------------------------- the reference models


def test_gates_at_zero_give_the_bare_qwen2_decoder(demo_xh):
    model = reference_model(demo_xh)
    tok = NVLMTokenizer.from_dir(demo_xh)
    bare = bare_qwen2(model)
    pv = tiles([3, 4], seed=1)
    pr = prompt_for(model, tok, [3, 4])
    ids = torch.tensor([pr.input_ids])
    with torch.no_grad():
        inline = model.encode_images(pv)[list(pr.cross.inline_tiles)].flatten(0, 1) if pr.cross.inline_tiles else None
        want = bare(inputs_embeds=model.embed(ids, inline, tok.image_pad_id)).logits
    gated = model.logits(ids, pv, image_token_id=tok.image_pad_id, cross=pr.cross)
    first_image = pr.text.index("<Image>")
    before = sum(1 for a, _ in tok._tok.encode(pr.text, add_special_tokens=False).offsets if a < first_image)
    # with the demo's gates the image changes every position after the first <Image>, and none before it
    assert torch.equal(gated[0, :before], want[0, :before])
    assert (gated[0, before:] - want[0, before:]).abs().amax(-1).min() > 1e-4
    set_gates(model, 0.0)
    assert torch.equal(model.logits(ids, pv, image_token_id=tok.image_pad_id, cross=pr.cross), want)


@pytest.mark.parametrize("n_tiles", [[], [3], [1, 4]])
def test_cached_decoding_equals_full_recompute(demo_xh, n_tiles, monkeypatch):
    model = reference_model(demo_xh)
    tok = NVLMTokenizer.from_dir(demo_xh)
    pv, pr = tiles(n_tiles, seed=2), prompt_for(model, tok, n_tiles)
    calls = []
    original = CrossAttention.key_values
    monkeypatch.setattr(CrossAttention, "key_values", lambda self, s: calls.append(1) or original(self, s))
    result = model.generate(pr.input_ids, pv, image_token_id=tok.image_pad_id, max_new_tokens=6, eos_token_id=None,
                            cross=pr.cross)
    assert len(calls) == len(model.xattn)  # the image keys/values: once per request and layer
    ids = torch.tensor([list(pr.input_ids) + result.tokens[:-1]])
    cross = replace(pr.cross, key_ranges=pr.cross.key_ranges + (pr.cross.decode_range,) * 5)
    logits = model.logits(ids, pv, image_token_id=tok.image_pad_id, cross=cross)[0]
    assert logits[len(pr.input_ids) - 1:].argmax(-1).tolist() == result.tokens


def test_images_change_the_answer_logits(demo_xh):
    """Different images give different logits; one image dropped from two gives others still."""
    model = reference_model(demo_xh)
    tok = NVLMTokenizer.from_dir(demo_xh)
    pr = prompt_for(model, tok, [3, 1])
    ids = torch.tensor([pr.input_ids])
    a = model.logits(ids, tiles([3, 1], seed=3), image_token_id=tok.image_pad_id, cross=pr.cross)[0, -1]
    b = model.logits(ids, tiles([3, 1], seed=4), image_token_id=tok.image_pad_id, cross=pr.cross)[0, -1]
    assert (a - b).abs().max() > 1e-3


def test_the_independent_layout_loads_and_runs(written_xh):
    model = reference_model(written_xh)
    assert isinstance(model, CrossAttentionReference) and len(model.xattn) == 2
    tok = NVLMTokenizer.from_dir(written_xh)
    gates = [float(layer.cross_attn_attn_gate.detach()) for layer in model.xattn]
    assert gates == pytest.approx([0.9, -0.7], abs=0.01)
    for n_tiles in ([], [1], [3, 1]):
        pr = prompt_for(model, tok, n_tiles)
        r = model.generate(pr.input_ids, tiles(n_tiles, seed=5), image_token_id=tok.image_pad_id, max_new_tokens=4,
                           eos_token_id=None, cross=pr.cross)
        assert len(r.tokens) == 4


def test_wrong_tile_count_is_a_clear_error(demo_xh):
    from runtime.core.errors import InputError

    model = reference_model(demo_xh)
    tok = NVLMTokenizer.from_dir(demo_xh)
    pr = prompt_for(model, tok, [3])
    with pytest.raises(InputError, match="tiles given for a prompt laid out for 3"):
        model.generate(pr.input_ids, tiles([4], seed=0), image_token_id=tok.image_pad_id, max_new_tokens=1,
                       eos_token_id=None, cross=pr.cross)
    with pytest.raises(InputError, match="needs the prompt's cross-attention inputs"):
        model.generate(pr.input_ids, tiles([3], seed=0), image_token_id=tok.image_pad_id, max_new_tokens=1,
                       eos_token_id=None)


def test_cli_demo_inspect_and_reference(tmp_path, capsys):
    image = str(ROOT / "assets/demo_scene.png")
    for variant in ("x", "h"):
        out = tmp_path / variant
        assert main(["demo-checkpoint", str(out), "--variant", variant]) == 0
        capsys.readouterr()
        assert main(["inspect", str(out), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["family"] == f"nvlm-{variant}" and report["weights"]["components"]["xattn"]["bytes"] > 0
        answers = []
        for args in (["--prompt", "Hello"], ["--prompt", "<image>\nWhat?", "--image", image],
                     ["--prompt", "<image>\n<image>\nCompare.", "--image", image, "--image", image]):
            assert main(["reference", str(out), *args, "--max-new-tokens", "3", "--json"]) == 0
            answers.append(json.loads(capsys.readouterr().out))
        assert [a["tiles_per_image"] for a in answers] == [[], [3], [3, 3]]
        assert all(len(a["tokens"]) == 3 for a in answers)
