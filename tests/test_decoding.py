"""Decoding controls of the reference executor (runtime/decoding.py) against the formulas written out
here once more, element by element: penalties (TensorRT-LLM's penaltyKernels.cu), bad words, stop words,
log-probs, the word-list layout, and the entry model's stop-word filter."""

import math

import numpy as np
import pytest
import torch

from builder.llm_build import build_llm
from runtime.core.errors import InputError
from runtime.core.llm_formats import LLMBuildOptions, get_format
from runtime.decoding import Controls, Decoder, StopFilter, apply_penalties, from_trtllm, to_trtllm, word_list
from runtime.executor import KVCache, ReferenceExecutor, Request


@pytest.fixture(scope="module")
def ex(tmp_path_factory, demo_ckpt):
    d = tmp_path_factory.mktemp("dec") / "bf16"
    build_llm(demo_ckpt, d, LLMBuildOptions(get_format("bf16")), fidelity=False)
    return ReferenceExecutor.load(d)


def penalised(logit: float, n: int, rep: float, pres: float, freq: float) -> float:
    """One logit of a token seen n times, as penaltyKernels.cu computes it."""
    if n == 0:
        return logit
    logit = logit * rep if logit < 0 else logit / rep
    return logit - pres - freq * n


def test_penalty_formulas_elementwise():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(64, generator=g) * 3
    counts = torch.randint(0, 4, (64,), generator=g).float()
    c = Controls(repetition_penalty=1.7, presence_penalty=0.4, frequency_penalty=0.25)
    got = apply_penalties(logits, counts, c)
    want = [penalised(float(v), int(n), 1.7, 0.4, 0.25) for v, n in zip(logits, counts)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert not torch.allclose(got, logits)  # the inputs were chosen so that the penalties change them


def greedy_reference(ex, prompt, n, rep=1.0, pres=0.0, freq=0.0, bad=(), stop=(), end_id=None):
    """Greedy decoding written out plainly: a full forward pass per step, the penalties per token from
    counts over the prompt and the generated tokens, bans and stop words by list comparison."""
    out = []
    for _ in range(n):
        logits = ex.forward(prompt + out, None, KVCache())[-1].tolist()
        seq = prompt + out
        for t in range(len(logits)):
            logits[t] = penalised(logits[t], seq.count(t), rep, pres, freq)
        for w in bad:
            if len(w) == 1 or seq[-(len(w) - 1):] == list(w[:-1]):
                logits[w[-1]] = -math.inf
        tok = max(range(len(logits)), key=lambda i: logits[i])
        out.append(tok)
        if tok == end_id or any(out[-len(w):] == list(w) for w in stop):
            break
    return out


# greedy on the embedded default repeats a prompt token (333) and then loops: every penalty has work to do
PROMPT = [39, 506, 333]


def test_penalties_change_greedy_tokens_as_the_formulas_predict(ex):
    plain = ex.generate([Request(PROMPT, 10)])[0].tokens
    # the embedded default's logits are large (its "decisive" random head): penalties must be too
    for rep, pres, freq in [(30.0, 0.0, 0.0), (1.0, 30.0, 0.0), (1.0, 0.0, 30.0), (5.0, 10.0, 10.0)]:
        got = ex.generate([Request(PROMPT, 10, controls=Controls(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq))])[0].tokens
        assert got == greedy_reference(ex, PROMPT, 10, rep, pres, freq), (rep, pres, freq)
        assert got != plain, (rep, pres, freq)
    strong = ex.generate([Request(PROMPT, 10, controls=Controls(presence_penalty=1e4))])[0].tokens
    assert strong != plain
    assert len(set(strong)) == len(strong) and not set(strong) & set(PROMPT)  # nothing seen comes back
    keen = ex.generate([Request(PROMPT, 10, controls=Controls(presence_penalty=-1e4))])[0].tokens  # negative: only seen tokens
    assert set(keen) <= set(PROMPT) and keen == greedy_reference(ex, PROMPT, 10, pres=-1e4)


def test_prompt_table_ids_are_not_counted(ex):
    c = Controls(frequency_penalty=1.0)
    d = Decoder([3, 3, ex.vocab_size + 1, ex.vocab_size + 1], ex.vocab_size, c)
    assert d.counts[3] == 2 and d.counts.sum() == 2


def test_bad_words_are_never_produced(ex):
    plain = ex.generate([Request(PROMPT, 8)])[0].tokens
    one = ((plain[0],),)
    got = ex.generate([Request(PROMPT, 8, controls=Controls(bad_words=one))])[0].tokens
    assert plain[0] not in got and got == greedy_reference(ex, PROMPT, 8, bad=one)
    two = ((plain[0], plain[1]),)  # the pair is banned, its first token alone is not
    got = ex.generate([Request(PROMPT, 8, controls=Controls(bad_words=two))])[0].tokens
    assert got[0] == plain[0] and got[1] != plain[1] and got == greedy_reference(ex, PROMPT, 8, bad=two)


def test_stop_words_end_generation_at_the_first_match(ex):
    plain = ex.generate([Request(PROMPT, 8, controls=Controls(presence_penalty=1e4))])[0].tokens
    assert len(set(plain)) == len(plain)  # distinct tokens, so each stop word below matches at one place
    for stop, k in [(((plain[2],),), 3), (((plain[1], plain[2]),), 3), (((999999,), (plain[3],)), 4)]:
        res = ex.generate([Request(PROMPT, 8, controls=Controls(presence_penalty=1e4, stop_words=stop))])[0]
        assert res.tokens == plain[:k] and res.finish_reason == "stop_words", stop
    # a two-token word whose first token never comes right before the second does not stop anything
    res = ex.generate([Request(PROMPT, 8, controls=Controls(presence_penalty=1e4, stop_words=((plain[3], plain[2]),)))])[0]
    assert res.tokens == plain and res.finish_reason == "length"


def test_log_probs_are_the_processed_distribution_at_the_chosen_tokens(ex):
    res = ex.generate([Request(PROMPT, 6, controls=Controls(return_log_probs=True))])[0]
    full = ex.forward(PROMPT + res.tokens[:-1], None, KVCache())[len(PROMPT) - 1:]
    want = torch.log_softmax(full.float(), -1)[torch.arange(6), torch.tensor(res.tokens)]
    assert torch.allclose(torch.tensor(res.log_probs), want, atol=1e-4)
    assert res.cum_log_prob == pytest.approx(float(want.sum()), abs=1e-3)
    # with temperature 2 and a presence penalty, the log-probs are those of the processed logits
    res = ex.generate([Request(PROMPT, 4, controls=Controls(temperature=2.0, top_k=0, seed=3, presence_penalty=1.0, return_log_probs=True))])[0]
    seq, want = list(PROMPT), []
    for tok in res.tokens:
        x = ex.forward(seq, None, KVCache())[-1] / 2.0
        x = torch.tensor([penalised(float(v), seq.count(i), 1.0, 1.0, 0.0) for i, v in enumerate(x)])
        want.append(float(torch.log_softmax(x, -1)[tok]))
        seq.append(tok)
    assert res.log_probs == pytest.approx(want, abs=1e-4)
    assert ex.generate([Request(PROMPT, 2)])[0].log_probs is None


def test_word_list_layout_is_tensorrt_llm_s():
    arr = to_trtllm(((5, 6), (9,), (1, 2, 3)))
    assert arr.tolist() == [[5, 6, 9, 1, 2, 3], [2, 3, 6, -1, -1, -1]]
    assert from_trtllm(arr, "stop_words_list") == ((5, 6), (9,), (1, 2, 3))
    assert from_trtllm(arr[None], "stop_words_list") == ((5, 6), (9,), (1, 2, 3))  # with the batch dimension
    assert to_trtllm(()).tolist() == [[0], [-1]] and from_trtllm(to_trtllm(()), "x") == ()
    with pytest.raises(InputError, match="shape"):
        from_trtllm(np.zeros((3, 4), np.int32), "bad_words_list")
    with pytest.raises(InputError, match="increasing"):
        from_trtllm(np.array([[1, 2, 3], [2, 1, -1]]), "bad_words_list")
    enc = lambda w: [ord(ch) for ch in w]  # noqa: E731 — one token per character
    assert word_list(enc, ["ab", "", "c"], spaced=False) == ((97, 98), (99,))
    assert word_list(enc, ["ab", " c"]) == ((97, 98), (32, 97, 98), (32, 99))  # and after a space


@pytest.mark.parametrize("chunks, stopped, want", [
    ([[1], [5], [2], [5], [6]], True, [1, 5, 2]),  # one token at a time, the stop word at the end
    ([[1, 5, 2, 5, 6]], True, [1, 5, 2]),  # all at once (not streaming)
    ([[1], [5]], False, [1, 5]),  # ended by length on a stop word's first token: released at the end
    ([[7, 5], [5, 6]], True, [7, 5]),  # "5 5 6": the first 5 was not the start of the stop word
])
def test_stop_filter_hides_the_stop_word_and_nothing_else(chunks, stopped, want):
    f = StopFilter(((5, 6), (8,)))
    out = []
    for c in chunks:
        out += f.push(c)
    if not stopped:
        out += f.finish()
    assert out == want
