"""The reference NVLM-D is the ground truth, so it is checked against independent implementations."""

import json
from pathlib import Path

import pytest
import torch

from runtime.core.checkpoint import Checkpoint
from runtime.core.errors import InputError
from runtime.reference import pixel_shuffle, reference_model
from runtime.tokenizer import NVLMTokenizer


@pytest.fixture(scope="module")
def demo_model(demo_ckpt):
    return reference_model(demo_ckpt)


@pytest.fixture(scope="module")
def released_model(released_ckpt):
    return reference_model(released_ckpt)


def _hf_qwen2(ckpt_dir, tmp_path):
    """transformers' Qwen2ForCausalLM built from the raw llm_config and the language_model.* tensors."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    raw = json.loads((ckpt_dir / "config.json").read_text())["llm_config"]
    raw = {k: v for k, v in raw.items() if k != "model_type"}
    ckpt = Checkpoint.open(ckpt_dir)
    prefix = "language_model."
    state = {n[len(prefix):]: t.float() for n, t in ckpt.iter_tensors() if n.startswith(prefix)}
    out = tmp_path / "qwen2"
    out.mkdir()
    Qwen2Config(**raw).save_pretrained(out)
    save_file(state, str(out / "model.safetensors"))
    return Qwen2ForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("which", ["demo_ckpt", "released_ckpt"])
def test_text_logits_equal_transformers_qwen2_exactly(which, request, tmp_path):
    ckpt_dir = request.getfixturevalue(which)
    model = reference_model(ckpt_dir)
    hf = _hf_qwen2(ckpt_dir, tmp_path)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    tok = NVLMTokenizer.from_dir(ckpt_dir)
    ids = torch.randint(0, tok.image_pad_id, (2, 37), generator=g)
    ours = model.logits(ids, image_token_id=tok.image_pad_id)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    assert torch.equal(ours, theirs)


def _hf_internvit(ckpt_dir, model):
    """transformers' InternVLVisionModel (an independent InternViT) with the released weights renamed."""
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
    from transformers.models.internvl.modeling_internvl import InternVLVisionModel

    v = model.cfg.vision
    hf_cfg = InternVLVisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size, image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2,
        norm_type="rms_norm", layer_norm_eps=v.norm_eps, use_qk_norm=True, attention_bias=False,
        use_mean_pooling=True, hidden_act="gelu")
    hf_cfg._attn_implementation = "eager"
    hf_cfg.output_hidden_states = True
    hf = InternVLVisionModel(hf_cfg).eval()
    ckpt = Checkpoint.open(ckpt_dir)
    get = lambda n: ckpt.get("vision_model." + n).float()  # noqa: E731
    state = {
        "embeddings.cls_token": get("embeddings.class_embedding"),
        "embeddings.position_embeddings": get("embeddings.position_embedding"),
        "embeddings.patch_embeddings.projection.weight": get("embeddings.patch_embedding.weight"),
        "embeddings.patch_embeddings.projection.bias": get("embeddings.patch_embedding.bias"),
    }
    for i in range(v.num_layers):
        src, dst = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        q, k, vv = get(src + "attn.qkv.weight").chunk(3, dim=0)
        state.update({
            dst + "attention.q_proj.weight": q, dst + "attention.k_proj.weight": k,
            dst + "attention.v_proj.weight": vv,
            dst + "attention.projection_layer.weight": get(src + "attn.proj.weight"),
            dst + "attention.projection_layer.bias": get(src + "attn.proj.bias"),
            dst + "attention.q_norm.weight": get(src + "attn.q_norm.weight"),
            dst + "attention.k_norm.weight": get(src + "attn.k_norm.weight"),
            dst + "layernorm_before.weight": get(src + "norm1.weight"),
            dst + "layernorm_after.weight": get(src + "norm2.weight"),
            dst + "lambda_1": get(src + "ls1"), dst + "lambda_2": get(src + "ls2"),
            dst + "mlp.fc1.weight": get(src + "mlp.fc1.weight"), dst + "mlp.fc1.bias": get(src + "mlp.fc1.bias"),
            dst + "mlp.fc2.weight": get(src + "mlp.fc2.weight"), dst + "mlp.fc2.bias": get(src + "mlp.fc2.bias"),
        })
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.fixture(scope="module")
def unpadded_ckpt(tmp_path_factory):
    """The independent writer's checkpoint without the vision attention's padding heads (transformers'
    InternVL has none; the padded layout is checked against its definition in test_released_layout.py)."""
    from tests.released_layout_writer import write

    return Path(write(str(tmp_path_factory.mktemp("unpadded") / "c"), seed=5, padding_heads=0))


def test_vision_tower_matches_transformers_internvl(unpadded_ckpt):
    ckpt_dir = unpadded_ckpt
    model = reference_model(ckpt_dir)
    hf = _hf_internvit(ckpt_dir, model)
    x = torch.randn(2, 3, 448, 448)
    layer = model.cfg.select_layer
    ours = model.vision(x, layer)
    with torch.no_grad():
        theirs = hf(pixel_values=x).hidden_states[layer]
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel <= 1e-5, f"relative error {rel:.2e}"


def test_released_checkpoint_uses_select_layer_minus_two(released_model):
    assert released_model.cfg.select_layer == -2
    x = torch.randn(1, 3, 448, 448)
    assert not torch.equal(released_model.vision(x, -1), released_model.vision(x, -2))


def _tokens(x):
    return [list(map(int, t)) for t in x.reshape(-1, x.shape[-1])]


def test_pixel_shuffle_hand_computed_2x2():
    # tokens row-major over a 2×2 grid, one channel each: t0=row0col0, t1=row0col1, t2=row1col0, t3=row1col1
    grid = torch.tensor([0.0, 1, 2, 3]).reshape(1, 2, 2, 1)
    for version in ("v1", "v2"):
        assert _tokens(pixel_shuffle(grid, 0.5, version)) == [[0, 1, 2, 3]]


def test_pixel_shuffle_hand_computed_4x4():
    # value at (row a, col b) is 10a + b
    grid = torch.tensor([[10.0 * a + b for b in range(4)] for a in range(4)]).reshape(1, 4, 4, 1)
    # v2: output tokens row-major over 2×2 blocks; channels = block's top-left, top-right, bottom-left, bottom-right
    assert _tokens(pixel_shuffle(grid, 0.5, "v2")) == [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]]
    # v1 leaves the block grid transposed (column-major over blocks)
    assert _tokens(pixel_shuffle(grid, 0.5, "v1")) == [[0, 1, 10, 11], [20, 21, 30, 31], [2, 3, 12, 13], [22, 23, 32, 33]]


def test_pixel_shuffle_multichannel_keeps_channel_vectors_together():
    c = 3
    grid = torch.arange(16 * c, dtype=torch.float32).reshape(1, 4, 4, c)  # token k holds k*c … k*c+c-1
    out = pixel_shuffle(grid, 0.5, "v2").reshape(4, 4 * c)
    tok = lambda k: list(range(k * c, k * c + c))  # noqa: E731
    assert list(map(int, out[1])) == tok(2) + tok(3) + tok(6) + tok(7)


def test_image_embeddings_replace_vision_pad_positions(demo_model, demo_ckpt):
    tok = NVLMTokenizer.from_dir(demo_ckpt)
    from runtime.prompt import build_prompt

    p = build_prompt(tok, "<image>\nWhat is this?", [1], tokens_per_tile=256)
    ids = torch.tensor([p.input_ids])
    x = torch.randn(1, 3, 448, 448)
    ours = demo_model.logits(ids, x, image_token_id=tok.image_pad_id)
    # independent: build inputs_embeds by hand
    img = demo_model.encode_images(x)[0]  # [256, hidden]
    emb = demo_model.llm.get_input_embeddings()(ids).clone()
    emb[0, list(p.image_positions)] = img
    with torch.no_grad():
        manual = demo_model.llm(inputs_embeds=emb).logits
    assert torch.equal(ours, manual)
    other = demo_model.logits(ids, torch.randn(1, 3, 448, 448), image_token_id=tok.image_pad_id)
    assert not torch.allclose(ours[0, -1], other[0, -1])


def test_image_count_mismatch_is_an_input_error(demo_model, demo_ckpt):
    tok = NVLMTokenizer.from_dir(demo_ckpt)
    ids = torch.tensor([[1, 2, tok.image_pad_id, 3]])
    with pytest.raises(InputError, match="1 image token positions but 256"):
        demo_model.logits(ids, torch.randn(1, 3, 448, 448), image_token_id=tok.image_pad_id)
    with pytest.raises(InputError, match="pixel_values must be"):
        demo_model.encode_images(torch.randn(1, 3, 224, 224))


def test_greedy_generation_with_kv_cache_equals_full_recompute(released_model, released_ckpt):
    tok = NVLMTokenizer.from_dir(released_ckpt)
    from runtime.prompt import build_prompt

    p = build_prompt(tok, "Look: <image> and <image>. Which is brighter?", [3, 1], tokens_per_tile=256)
    x = torch.randn(4, 3, 448, 448)
    res = released_model.generate(p.input_ids, x, image_token_id=tok.image_pad_id, max_new_tokens=8, eos_token_id=None)
    assert len(res.tokens) == 8 and not res.finished
    img = released_model.encode_images(x).flatten(0, 1)
    ids = list(p.input_ids)
    expected = []
    for _ in range(8):
        t = torch.tensor([ids])
        emb = released_model.embed(t, img, tok.image_pad_id)
        with torch.no_grad():
            nxt = int(released_model.llm(inputs_embeds=emb).logits[0, -1].argmax())
        expected.append(nxt)
        ids.append(nxt)
    assert res.tokens == expected


def test_generation_stops_on_eos(demo_model, demo_ckpt):
    tok = NVLMTokenizer.from_dir(demo_ckpt)
    from runtime.prompt import build_prompt

    p = build_prompt(tok, "Hello", [], tokens_per_tile=256)
    first = demo_model.generate(p.input_ids, None, image_token_id=tok.image_pad_id, max_new_tokens=1,
                                eos_token_id=None).tokens[0]
    res = demo_model.generate(p.input_ids, None, image_token_id=tok.image_pad_id, max_new_tokens=5,
                              eos_token_id=first)
    assert res.tokens == [first] and res.finished
