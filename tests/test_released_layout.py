"""A checkpoint this project did not write loads, inspects and runs end to end."""

import json
import subprocess
import sys

import pytest
import torch

from builder.cli import main
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "release"


def test_writer_runs_as_a_script(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tests/released_layout_writer.py"), str(tmp_path / "c")],
                         capture_output=True, text=True, check=True)
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file(), out.stderr


def test_released_layout_inspects(released_ckpt, capsys):
    assert main(["inspect", str(released_ckpt), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["weights"]["shards"]) == 3
    w = r["weights"]
    # stored as the release stores them: F32 q/k/v (LLM) and qkv/proj/q_norm/k_norm (vision), bf16 beside them
    assert w["components"]["vision"]["dtypes"].keys() == w["components"]["llm"]["dtypes"].keys() == {"float32", "bfloat16"}
    assert sum(w["bytes_by_dtype"].values()) == w["total_bytes"]
    qkv = 3 * (3 + 7) * 16 * 48  # one vision layer's qkv with its 7 padding heads, F32
    assert w["components"]["vision"]["bytes_by_dtype"]["float32"] == 3 * 4 * (qkv + 48 * (3 + 7) * 16 + 2 * (3 + 7) * 16)
    assert w["vision_padding_heads"] == 7 and r["dimensions"]["vision"]["padding_heads_from"] == "weights"


def test_released_layout_runs_through_reference(released_ckpt, capsys):
    assert main(["reference", str(released_ckpt), "--prompt", "<image>\nWhat is it?", "--synthetic-tiles", "3",
                 "--max-new-tokens", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["image_tokens"] == 3 * 256 and len(r["tokens"]) == 4


def test_demo_checkpoint_cli_is_deterministic(tmp_path, capsys):
    assert main(["demo-checkpoint", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert main(["demo-checkpoint", str(tmp_path / "b"), "--seed", "3"]) == 0
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    assert main(["demo-checkpoint", str(tmp_path / "a")]) == 2
    assert "already exists" in capsys.readouterr().err


# --------------------------------------------------------------------------- padding heads, from the definition


def _released_vision(ckpt, x, depth):
    """InternViT as the release's modeling_intern_vit.py defines it (`_naive_attn`), written from that
    definition with plain tensor ops and no project code: qkv reshaped to (3, heads + padding heads, head_dim),
    the q/k RMS variance summed over the first hidden_size channels and divided by hidden_size, the scale
    head_dim^-0.5, proj from all heads back to hidden_size."""
    cfg = json.loads((ckpt / "config.json").read_text())["vision_config"]
    c, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    d = c // heads

    def w(name):
        return _tensor(ckpt, "vision_model." + name)

    def rms(t, weight):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    t = x.shape[0]
    patches = torch.nn.functional.conv2d(x, w("embeddings.patch_embedding.weight"),
                                         w("embeddings.patch_embedding.bias"), stride=cfg["patch_size"])
    h = torch.cat([w("embeddings.class_embedding").expand(t, -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    h = h + w("embeddings.position_embedding")
    for i in range(depth):
        p = f"encoder.layers.{i}."
        a = rms(h, w(p + "norm1.weight"))
        qkv = a @ w(p + "attn.qkv.weight").T
        n = h.shape[1]
        all_heads = qkv.shape[-1] // 3 // d  # heads + padding heads
        q, k, v = qkv.reshape(t, n, 3, all_heads, d).permute(2, 0, 3, 1, 4)
        flat_q, flat_k = (z.transpose(1, 2).flatten(-2) for z in (q, k))  # [T, N, all_heads·d]
        q_var = flat_q[..., :c].pow(2).sum(-1, keepdim=True) / c
        k_var = flat_k[..., :c].pow(2).sum(-1, keepdim=True) / c
        q = (flat_q * torch.rsqrt(q_var + eps) * w(p + "attn.q_norm.weight")).view(t, n, all_heads, d).transpose(1, 2)
        k = (flat_k * torch.rsqrt(k_var + eps) * w(p + "attn.k_norm.weight")).view(t, n, all_heads, d).transpose(1, 2)
        attn = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(t, n, -1) @ w(p + "attn.proj.weight").T + w(p + "attn.proj.bias")
        h = h + o * w(p + "ls1")
        m = rms(h, w(p + "norm2.weight")) @ w(p + "mlp.fc1.weight").T + w(p + "mlp.fc1.bias")
        m = torch.nn.functional.gelu(m) @ w(p + "mlp.fc2.weight").T + w(p + "mlp.fc2.bias")
        h = h + m * w(p + "ls2")
    return h


def _tensor(ckpt, name):
    from safetensors import safe_open

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(ckpt / index[name]), "pt") as f:
        return f.get_tensor(name).float()


def test_padded_vision_tower_equals_the_released_definition(released_ckpt):
    """The reference InternViT with 7 non-zero padding heads against the definition (≤ 1e-5 relative, float32,
    fresh inputs); the same weights with the padding heads dropped must fail the same bound."""
    import torch as _t

    from runtime.reference import reference_model

    model = reference_model(released_ckpt)
    assert model.cfg.vision.num_dummy_heads == 7
    x = _t.randn(2, 3, 448, 448, generator=_t.Generator().manual_seed(_t.seed() % 2**31))
    depth = model.cfg.vision.num_layers - 1  # select_layer -2
    want = _released_vision(released_ckpt, x, depth)
    with _t.no_grad():
        got = model.vision(x, model.cfg.select_layer)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-5, f"relative error {rel:.2e}"

    # dropping the padding heads (zeroing their q/k/v rows) changes the answer far beyond the bound
    dropped = copy_without_padding(model)
    with _t.no_grad():
        other = dropped.vision(x, dropped.cfg.select_layer)
    assert ((other - want).norm() / want.norm()).item() > 1e-2


def copy_without_padding(model):
    import copy

    m = copy.deepcopy(model)
    v = m.cfg.vision
    real = v.hidden_size
    with torch.no_grad():
        for layer in m.vision.encoder.layers:
            w = layer.attn.qkv.weight.view(3, v.attn_dim, -1)
            w[:, real:] = 0
    return m


def test_trained_default_adapted_to_padding_heads_computes_the_same(tmp_path):
    """The default was trained (stages 1-5) without padding heads and adapted with zero ones, which stage 6 kept
    (its vision tower was frozen). The adaptation is exact: stripping the padding and padding again gives the
    shipped tensors, and the unpadded tower computes the padded one's features (float32, fresh inputs)."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from runtime.core.demo_checkpoint import (
        TRAINED_WEIGHTS,
        demo_parts,
        trained_available,
        trained_dims,
        with_padding_heads,
    )
    from runtime.internvit import InternViT

    if not trained_available():
        pytest.skip("the trained default is not packaged")
    cfg = demo_parts(trained_dims("d"))[1].vision
    assert cfg.num_dummy_heads == 7
    shipped = {n: t.float() for n, t in load_file(str(TRAINED_WEIGHTS)).items() if n.startswith("vision_model.")}
    c = cfg.hidden_size
    plain_w = {}
    for n, t in shipped.items():
        if n.endswith("attn.qkv.weight"):
            t = t.view(3, cfg.attn_dim, -1)[:, :c].reshape(3 * c, -1)
        elif n.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
            t = t[:c]
        elif n.endswith("attn.proj.weight"):
            t = t[:, :c]
        plain_w[n] = t
    assert all(torch.equal(with_padding_heads(plain_w, cfg)[n], shipped[n]) for n in shipped)  # zero padding
    strip = lambda d: {n[len("vision_model."):]: t for n, t in d.items()}  # noqa: E731
    padded, plain = InternViT(cfg).float(), InternViT(replace(cfg, num_dummy_heads=0)).float()
    padded.load_state_dict(strip(shipped))
    plain.load_state_dict(strip(plain_w))
    x = torch.randn(3, 3, 448, 448)
    with torch.no_grad():
        a, b = padded(x, -1), plain(x, -1)
    assert ((a - b).norm() / b.norm()).item() <= 1e-6


# --------------------------------------------------------------------------- the release's own index


def _sparse_release(directory):
    """NVLM-D-72B's 46 shards with their real tensor names, shapes and dtypes (tests/release_index.py) as sparse
    files: valid safetensors headers in front of 177 GB of holes, and the release's config.json."""
    import shutil
    import struct

    fx = json.loads((FIXTURES / "nvlm_d_72b_tensors.json").read_text())
    width = {"F32": 4, "BF16": 2}
    shards: dict[str, dict] = {}
    for name, t in sorted(fx["tensors"].items()):
        shards.setdefault(t["shard"], {})[name] = t
    for shard, tensors in shards.items():
        header, offset = {}, 0
        for name, t in tensors.items():
            n = width[t["dtype"]]
            for d in t["shape"]:
                n *= d
            header[name] = {"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        with open(directory / shard, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": fx["total_size"]}, "weight_map": {n: t["shard"] for n, t in fx["tensors"].items()}}))
    shutil.copy(FIXTURES / "config.json", directory / "config.json")
    return fx



def test_the_release_s_index_validates_and_inspects_at_79_4_billion(tmp_path, capsys):
    """Every released name and shape passes the weight map (padding heads read from the weights), and inspect
    reports 79.4 B parameters and the stored bytes by dtype, which add up to the release's total_size."""
    fx = _sparse_release(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    w = r["weights"]
    assert r["total_parameters"] == 79_379_593_344
    assert len(w["shards"]) == 46 and w["tensors"] == len(fx["tensors"]) == 1556
    assert w["total_bytes"] == sum(w["bytes_by_dtype"].values()) == fx["total_size"] == 176_901_927_168
    f32 = 80 * 4 * (8192 * 8192 + 8192 + 2 * (1024 * 8192 + 1024)) + 45 * 4 * (3 * 4096 * 3200 + 2 * 4096 + 3200 * 4096)
    assert w["bytes_by_dtype"] == {"float32": f32, "bfloat16": fx["total_size"] - f32}
    assert w["vision_padding_heads"] == 7 and r["dimensions"]["vision"]["padding_heads_from"] == "weights"


# --------------------------------------------------------------------------- rope_scaling


def test_rope_scaling_is_not_applied_past_32768_positions(demo_ckpt):
    """The release states rope_scaling {"dynamic", 3.0} but runs on transformers 4.39.3, whose Qwen2 never reads it:
    plain RoPE with rope_theta at every position. The reference's rotary tables past max_position_embeddings
    (where dynamic NTK would change the base) equal plain RoPE computed here; dynamic NTK's would not."""
    from runtime.reference import reference_model

    model = reference_model(demo_ckpt)
    llm = model.cfg.llm
    assert llm.rope_scaling is not None and llm.rope_scaling.type == "dynamic"  # stated in config.json
    assert llm.applied_rope_scaling is None
    d, theta, limit = llm.head_dim, llm.rope_theta, llm.max_position_embeddings
    pos = torch.tensor([[limit - 1, limit + 5, 3 * limit + 123]])
    x = torch.zeros(1, 3, d)
    cos, sin = model.llm.model.rotary_emb(x, pos)

    def plain(base):
        inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
        ang = pos[0, :, None].float() * inv[None]
        return torch.cat([ang, ang], -1).cos()

    assert torch.allclose(cos[0], plain(theta), atol=1e-5)
    seq = 3 * limit + 124  # what dynamic NTK (factor 3) would have used for this sequence
    ntk = theta * ((3.0 * seq / limit) - 2.0) ** (d / (d - 2))
    assert not torch.allclose(cos[0], plain(ntk), atol=1e-3)


def test_vision_only_reference_loads_no_decoder_and_encodes_the_same(released_ckpt):
    """The vision export's reference holds the vision tower and projector only (NVLM-D-72B: 6.7 B of 79 B
    parameters); its image embeddings equal the whole model's."""
    from runtime.reference import VISION_ROLES, reference_model

    whole = reference_model(released_ckpt)
    part = reference_model(released_ckpt, components=VISION_ROLES)
    assert all(p.is_meta for p in part.llm.parameters()) and not any(p.is_meta for p in part.vision.parameters())
    x = torch.randn(2, 3, 448, 448)
    assert torch.equal(part.encode_images(x), whole.encode_images(x))


# --------------------------------------------------------------------------- served


def _reference_answer(ckpt, prompt, image, n):
    """Greedy tokens and their log-probabilities from the float32 reference on the source weights."""
    from runtime.preprocess import preprocess_files
    from runtime.prompt import build_prompt
    from runtime.reference import reference_model
    from runtime.tokenizer import NVLMTokenizer

    model, tok = reference_model(ckpt), NVLMTokenizer.from_dir(ckpt)
    pv, tiles = preprocess_files([str(image)], model.cfg.preprocess, max_images=1)
    p = build_prompt(tok, prompt, tiles, tokens_per_tile=model.cfg.preprocess.tokens_per_tile)
    tokens = model.generate(p.input_ids, pv, image_token_id=tok.image_pad_id, max_new_tokens=n,
                            eos_token_id=None).tokens
    with torch.no_grad():
        logits = model.logits(torch.tensor([list(p.input_ids) + tokens[:-1]]), pv, image_token_id=tok.image_pad_id)
    lp = logits[0, len(p.input_ids) - 1:].float().log_softmax(-1)
    return tokens, [float(lp[k, t]) for k, t in enumerate(tokens)]


def test_a_build_of_the_released_layout_serves_the_reference_s_answers(released_ckpt, tmp_path):
    """Padding heads, F32 tensors and the release's chat format through a real tritonserver: for each of two
    images the served greedy tokens equal the float32 reference's on the source weights, and so do their
    log-probabilities (the build holds bf16 weights where the source has F32: 1e-2; 2e-3 measured). The two
    images' log-probabilities differ by far more than that (0.68), so a dropped or swapped image fails (a random model's greedy tokens alone barely depend
    on the image)."""
    from builder.engine_build import DeploymentOptions, build_deployment
    from clients.triton_client import NVLMClient
    from runtime.core.limits import EngineLimits
    from runtime.core.llm_formats import LLMBuildOptions, get_format
    from runtime.scenes import synthetic_scene
    from tests.conftest import server_ports
    from triton_repo.server import TritonServer

    build = tmp_path / "build"
    build_deployment(released_ckpt, build, DeploymentOptions(LLMBuildOptions(get_format("bf16")), target="reference",
                                                           vision_dtype="fp32", calib_size=4,
                                                           limits=EngineLimits(max_images_per_request=1)))
    assert json.loads((build / "preprocess.json").read_text())["chat_format"] == "release"
    images = [ROOT / "assets" / "demo_scene.png", tmp_path / "scene.png"]
    synthetic_scene(896, 448, 3).save(images[1])
    prompt = "<image>\nWhat is in this picture?"
    want = [_reference_answer(released_ckpt, prompt, img, 6) for img in images]
    base = server_ports(2)  # test_serving's per-test slot: no other server holds it while this module runs
    with TritonServer(build / "triton_repo", grpc_port=base, http_port=base + 1, metrics_port=base + 2,
                      hang_timeout=0) as srv:
        client = NVLMClient(srv.grpc_url)
        client.check()
        got = [client.generate(prompt, [img], max_tokens=6, return_log_probs=True) for img in images]
    for answer, (tokens, log_probs) in zip(got, want):
        assert answer.tokens == tokens
        assert max(abs(a - b) for a, b in zip(answer.log_probs, log_probs)) <= 1e-2
    assert max(abs(a - b) for a, b in zip(want[0][1], want[1][1])) > 0.1


def test_a_stated_padding_head_count_must_match_the_weights(released_ckpt, tmp_path):
    """vision_config.num_dummy_heads, when a config states it, is checked against the qkv rows; agreeing is fine."""
    import shutil

    from runtime.core.checkpoint import Checkpoint
    from runtime.core.errors import ShapeMismatchError

    ckpt = tmp_path / "c"
    shutil.copytree(released_ckpt, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["vision_config"]["num_dummy_heads"] = 3
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ShapeMismatchError, match=r"num_dummy_heads is 3 .* the weights hold 7 padding heads"):
        Checkpoint.open(ckpt)
    raw["vision_config"]["num_dummy_heads"] = 7
    (ckpt / "config.json").write_text(json.dumps(raw))
    v = Checkpoint.open(ckpt).config.vision
    assert (v.num_dummy_heads, v.dummy_heads_source) == (7, "weights")
