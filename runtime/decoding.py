"""One request's decoding controls, as TensorRT-LLM's sampling layers apply them (reference executor).

What the `tensorrtllm` backend does to a request's logits before it samples, and how it decides to stop,
written for one request at a time so that the reference executor (and its in-flight batching loop, which
keeps one `Decoder` per active request) computes the same tokens as the engine would:

- penalties (cpp/tensorrt_llm/kernels/penaltyKernels.cu, `batchApplyPenalty`): token occurrences are
  counted over the prompt's real ids (prompt-table ids ≥ vocab_size are not counted) and every generated
  token; the logits are divided by the temperature first, then each token seen n > 0 times gets
    repetition: l < 0 ? l · r : l / r      presence: l − p      frequency: l − f · n
  and the end id is masked while fewer than `min_tokens` tokens were generated;
- bad words (`bad_words_list`): a one-token word is never produced; for a longer word, its last token
  is banned whenever the sequence ends with the word's other tokens;
- stop and bad words are sent as their tokens alone and after a space (`word_list`);
- stop words (`stop_words_list`): generation ends as soon as the generated tokens end with one of them
  (a word is matched within the generated tokens, never across the prompt's end); the engine returns the
  stop word's tokens, the entry model removes them (`StopFilter`);
- log-probs (`return_log_probs`): the log-softmax of the processed logits (after temperature, penalties
  and bans; before any top-k / top-p cut) at the chosen token, and their sum.

Word lists travel in TensorRT-LLM's layout: [2, L] int32, row 0 the words' token ids end to end (padded
with 0), row 1 the cumulative end offset of each word (padded with −1) — what the backend's preprocessing
model (`_to_word_list_format`) produces by tokenizing each word alone, without special tokens.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from runtime.core.errors import InputError
from runtime.core.request_schema import Controls  # noqa: F401 — the executor's controls, from the request schema

Words = tuple[tuple[int, ...], ...]  # token sequences, each non-empty


def word_list(encode: Callable[[str], list[int]], words: Iterable[str], spaced: bool = True) -> Words:
    """Words → token sequences, each word tokenized alone (as NVIDIA's preprocessing does; words with no
    tokens are dropped). `spaced`: also the word after a space — a byte-level BPE spells "cat" inside a
    sentence as the token " cat", which the word alone never matches."""
    out: list[tuple[int, ...]] = []
    for w in words:
        for variant in (w, " " + w) if spaced and not w.startswith(" ") else (w,):
            ids = tuple(encode(variant))
            if ids and ids not in out:
                out.append(ids)
    return tuple(out)


def to_trtllm(words: Words) -> np.ndarray:
    """Token sequences → TensorRT-LLM's [2, L] word-list tensor (L ≥ 1)."""
    flat = [t for w in words for t in w]
    ends = np.cumsum([len(w) for w in words]).tolist() if words else []
    width = max(1, len(flat))
    out = np.zeros((2, width), np.int32)
    out[1, :] = -1
    out[0, :len(flat)] = flat
    out[1, :len(ends)] = ends
    return out


def from_trtllm(arr: np.ndarray | None, name: str) -> Words:
    """TensorRT-LLM's word-list tensor ([2, L], or [1, 2, L] with the batch dimension) → token sequences."""
    if arr is None or arr.size == 0:
        return ()
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.shape[0] != 2:
        raise InputError(f"{name} must have shape [2, L] (token ids, cumulative offsets), got {list(np.shape(arr))}")
    ids, ends = a[0].tolist(), [int(e) for e in a[1].tolist() if e >= 0]
    if any(b <= e for e, b in zip([0] + ends, ends)) or (ends and ends[-1] > len(ids)):
        raise InputError(f"{name}: offsets {ends} must be increasing and within the {len(ids)} token ids")
    return tuple(tuple(ids[s:e]) for s, e in zip([0] + ends, ends))


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, c: Controls) -> torch.Tensor:
    """penaltyKernels.cu's formulas on one request's logits [vocab] given token counts [vocab]."""
    seen = counts > 0
    out = logits.clone()
    if c.repetition_penalty != 1.0:
        r = c.repetition_penalty
        out = torch.where(seen, torch.where(out < 0, out * r, out / r), out)
    if c.presence_penalty:
        out = out - c.presence_penalty * seen
    if c.frequency_penalty:
        out = out - c.frequency_penalty * counts
    return out


def banned(history: Sequence[int], bad_words: Words) -> list[int]:
    """Tokens that would complete a bad word after `history`."""
    out = []
    for w in bad_words:
        head = w[:-1]
        if not head or (len(history) >= len(head) and tuple(history[len(history) - len(head):]) == head):
            out.append(w[-1])
    return out


def ends_with_stop(history: Sequence[int], stop_words: Words) -> tuple[int, ...] | None:
    """The stop word `history` ends with (the first one listed), or None."""
    for w in stop_words:
        if len(history) >= len(w) and tuple(history[len(history) - len(w):]) == w:
            return w
    return None


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, g: torch.Generator) -> int:
    """Greedy when temperature == 0 or top_k == 1; otherwise top-k, top-p sampling of already
    temperature-scaled logits."""
    if temperature <= 0 or top_k == 1:
        return int(logits.argmax())
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if 0 < top_p < 1:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[idx[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=g))


class Decoder:
    """The decoding state of one request: token counts, the sequence so far, its random generator, its
    log-probs. `step(logits)` returns the next token and, once the request is finished, why."""

    def __init__(self, prompt_ids: Sequence[int], vocab_size: int, controls: Controls):
        self.c = controls
        self.vocab = vocab_size
        real = [t for t in prompt_ids if 0 <= t < vocab_size]
        self.counts = torch.bincount(torch.as_tensor(real, dtype=torch.long), minlength=vocab_size).float() \
            if controls.penalised else None
        # bad and stop words are matched against the real ids only: a prompt-table id is an image
        # position, never a word's token
        self.history = list(real)
        self.generated: list[int] = []
        self.log_probs: list[float] = []
        self.g = torch.Generator().manual_seed(controls.seed)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [vocab] → what the sampler draws from: temperature, penalties, bans, min length."""
        c = self.c
        x = logits.float()
        if c.temperature > 0:
            x = x / c.temperature
        if self.counts is not None:
            x = apply_penalties(x, self.counts, c)
        ban = banned(self.history, c.bad_words)
        if c.end_id is not None and len(self.generated) < c.min_tokens:
            ban.append(c.end_id)
        if ban:
            x = x.clone()
            x[torch.as_tensor(ban, dtype=torch.long)] = float("-inf")
        return x

    def step(self, logits: torch.Tensor) -> tuple[int, str | None]:
        """Choose the next token from the model's logits [vocab]; (token, finish reason or None):
        "end_id" or "stop_words" (the stop word's tokens are part of the output, as the engine returns them)."""
        x = self.process(logits)
        tok = sample(x, self.c.temperature, self.c.top_k, self.c.top_p, self.g)
        if self.c.return_log_probs:
            self.log_probs.append(float(torch.log_softmax(x, -1)[tok]))
        self.generated.append(tok)
        self.history.append(tok)
        if self.counts is not None:
            self.counts[tok] += 1
        if self.c.end_id is not None and tok == self.c.end_id:
            return tok, "end_id"
        if ends_with_stop(self.generated, self.c.stop_words) is not None:
            return tok, "stop_words"
        return tok, None


class StopFilter:
    """The entry model's side of stop words: the engine returns the stop word's tokens, the client must not
    see them. Tokens that could still be the start of a stop word are held back until they cannot; when
    the engine stops on a stop word, the held tokens that form it are dropped."""

    def __init__(self, stop_words: Words):
        self.stop_words = stop_words
        self.held: list[int] = []

    def _hold_from(self, seq: list[int]) -> int:
        """The index from which `seq`'s tail is a proper prefix of some stop word (len(seq) if none)."""
        for start in range(len(seq)):
            tail = tuple(seq[start:])
            if any(len(w) > len(tail) and w[:len(tail)] == tail for w in self.stop_words):
                return start
        return len(seq)

    def push(self, tokens: Sequence[int]) -> list[int]:
        """New tokens from the engine → the tokens safe to pass on now."""
        seq = self.held + list(tokens)
        for w in self.stop_words:  # a complete stop word: the engine stops here; drop it
            if len(seq) >= len(w) and tuple(seq[len(seq) - len(w):]) == w:
                self.held = []
                return seq[:len(seq) - len(w)]
        cut = self._hold_from(seq) if self.stop_words else len(seq)
        self.held = seq[cut:]
        return seq[:cut]

    def finish(self) -> list[int]:
        """At the end of the request: the held tokens were not a stop word after all."""
        out, self.held = self.held, []
        return out
