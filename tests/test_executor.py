"""Reference executor of TensorRT-LLM checkpoints: contracts beyond the fidelity report."""

import pytest
import torch

from builder.llm_build import build_llm
from runtime.core.errors import InputError
from runtime.core.llm_formats import LLMBuildOptions, get_format, q8, unpack_int4
from runtime.core.request_schema import Controls
from runtime.decoding import sample
from runtime.executor import KVCache, ReferenceExecutor, Request


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, demo_ckpt):
    d = tmp_path_factory.mktemp("ex") / "bf16"
    build_llm(demo_ckpt, d, LLMBuildOptions(get_format("bf16")), fidelity=False)
    return d


@pytest.fixture(scope="module")
def ex(bf16_dir):
    return ReferenceExecutor.load(bf16_dir)


def test_int4_unpack_inverts_modelopt_packing():
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    q = torch.randint(-8, 8, (6, 256)).float()
    scale = torch.ones(6, 2)
    packed = pack_int4_in_uint8(q, scale, 128)
    assert torch.equal(unpack_int4(packed.view(torch.int8)), q)


def test_fp8_rounding_saturates():
    x = torch.tensor([1000.0, -1000.0, 0.1, 3.3])
    y = q8(x)
    assert y[0] == 448 and y[1] == -448 and abs(y[2] - 0.1) < 0.01 and y[3] in (3.25, 3.5)


def test_prompt_table_rows_replace_fake_ids(ex):
    h = ex.hidden_size
    table = torch.randn(3, h)
    ids = [5, ex.vocab_size + 0, ex.vocab_size + 1, 7, ex.vocab_size + 2]
    x = ex.embed(ids, table)
    assert torch.equal(x[1], table[0]) and torch.equal(x[4], table[2]) and torch.equal(x[0], ex.embedding[5])
    with pytest.raises(InputError, match="no prompt_embedding_table"):
        ex.embed(ids, None)
    with pytest.raises(InputError, match="past the 2-row prompt table"):
        ex.embed(ids, table[:2])


def test_kv_cache_decode_equals_full_forward(ex):
    ids = torch.randint(0, 400, (20,)).tolist()
    full = ex.forward(ids, None, KVCache())
    cache = KVCache()
    ex.forward(ids[:12], None, cache)
    steps = [ex.forward([t], None, cache)[-1] for t in ids[12:]]
    assert torch.allclose(torch.stack(steps), full[12:], atol=1e-4)


def test_batch_of_different_lengths_equals_one_by_one(ex):
    reqs = [Request(torch.randint(0, 400, (n,)).tolist(), 5) for n in (3, 17, 9)]
    batch = ex.generate(reqs)
    for r, b in zip(reqs, batch):
        assert ex.generate([r])[0].tokens == b.tokens


def test_streaming_callback_and_end_id(ex):
    r = Request([1, 2, 3], 6)
    greedy = ex.generate([r])[0].tokens
    seen = []
    res = ex.generate([Request([1, 2, 3], 6, controls=Controls(end_id=greedy[2]))], on_token=lambda i, t, _: seen.append((i, t)))[0]
    assert res.tokens == greedy[:3] and res.finish_reason == "end_id" and [t for _, t in seen] == greedy[:3]
    forced = ex.generate([Request([1, 2, 3], 6, controls=Controls(end_id=greedy[2], min_tokens=4))])[0]
    assert forced.tokens[2] != greedy[2] or len(forced.tokens) > 3


def test_a_cancelled_request_stops_before_its_next_step(ex):
    """Request.cancelled is asked before every decode step: the request ends there with the tokens it
    has ("cancelled"), which are the uncancelled request's first tokens."""
    full = ex.generate([Request([1, 2, 3], 12)])[0]
    asked = []
    stop_after = 3

    def cancelled():
        asked.append(len(asked))
        return len(asked) > stop_after

    res = ex.generate([Request([1, 2, 3], 12, cancelled=cancelled)])[0]
    assert res.finish_reason == "cancelled" and res.tokens == full.tokens[:stop_after]
    assert len(asked) == stop_after + 1  # no step ran after the answer changed
    assert ex.generate([Request([1, 2, 3], 12, cancelled=lambda: False)])[0].tokens == full.tokens


def test_sampling_is_seeded(ex):
    a = ex.generate([Request([4, 5, 6], 8, controls=Controls(temperature=4.0, top_k=50, top_p=0.0, seed=7))])[0].tokens
    b = ex.generate([Request([4, 5, 6], 8, controls=Controls(temperature=4.0, top_k=50, top_p=0.0, seed=7))])[0].tokens
    c = ex.generate([Request([4, 5, 6], 8, controls=Controls(temperature=4.0, top_k=50, top_p=0.0, seed=8))])[0].tokens
    assert a == b and a != c


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, 1.0, 2, 0.0, g) for _ in range(200)}
    assert picks <= {0, 1}
    picks = {sample(logits, 1.0, 0, 0.5, g) for _ in range(200)}
    assert picks == {0}


def test_bad_requests(ex):
    with pytest.raises(InputError, match="empty"):
        ex.generate([Request([], 3)])
    with pytest.raises(InputError, match="request_output_len"):
        ex.generate([Request([1], 0)])


def test_missing_rank_file_is_named(bf16_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(bf16_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["mapping"] = {"world_size": 2, "tp_size": 2, "pp_size": 1}
    (d / "config.json").write_text(json.dumps(cfg))
    from runtime.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="rank1.safetensors missing"):
        ReferenceExecutor.load(d)
