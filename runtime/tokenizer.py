"""The checkpoint's tokenizer, loaded from `tokenizer.json` with the `tokenizers` library.

NVLM-D ships a Qwen2 byte-level BPE tokenizer and `auto_map` entries that would make
`AutoTokenizer` ask for remote code; we read `tokenizer.json` directly instead, so no
checkpoint code ever runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.core.config import IMAGE_PAD
from runtime.core.errors import TokenizerError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class NVLMTokenizer:
    def __init__(self, tokenizer, source: Path, config: dict | None = None, chat_format: str = "release"):
        self._tok = tokenizer
        self.source = source
        # how prompts are rendered with this tokenizer (runtime/chat_format.py): the release's format unless a
        # build or command chose the tokenizer's chat_template
        self.chat_format = chat_format
        config = config or {}
        # tokenizer_config.json: the chat template and end-of-turn token of the `tokenizer` chat format
        self.chat_template: str | None = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
        eos = config.get("eos_token")
        self.eos_token: str | None = eos.get("content") if isinstance(eos, dict) else eos
        self.image_pad_id = self._require(IMAGE_PAD)
        self.im_end_id = self._require(IM_END)
        self.im_start_id = self._require(IM_START)

    @classmethod
    def from_dir(cls, directory: str | Path, chat_format: str = "release") -> "NVLMTokenizer":
        from tokenizers import Tokenizer

        file = Path(directory) / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"{file} not found: the checkpoint must include the fast-tokenizer file tokenizer.json "
                "(NVLM-D's release does; for a slow-only tokenizer run `AutoTokenizer.from_pretrained(DIR)"
                ".save_pretrained(DIR)` once to produce it)"
            )
        config = {}
        cfg_file = Path(directory) / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except ValueError as e:
                raise TokenizerError(f"{cfg_file} is not valid JSON ({e})") from None
        return cls(Tokenizer.from_file(str(file)), Path(directory), config if isinstance(config, dict) else {},
                   chat_format)

    def _require(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self.source}: tokenizer has no {token!r} token, which NVLM-D prompts need")
        return tid

    def check_vocab(self, embedding_rows: int) -> None:
        """Every token id must index a row of the LLM's embedding table."""
        if self.vocab_size > embedding_rows:
            raise TokenizerError(
                f"{self.source}: the tokenizer has {self.vocab_size} tokens but the LLM's vocab_size is "
                f"{embedding_rows}; the tokenizer does not belong to this checkpoint"
            )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids and, per token, the index of the first character of `text` it covers."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [start for start, _ in enc.offsets]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)


class StreamDecoder:
    """Text deltas for a growing sequence of generated ids; their concatenation is `decode(all ids)`.

    A byte-level BPE splits multi-byte characters across tokens, so decoding a prefix of the
    output can end in U+FFFD that a later token turns into a real character: `decode(prefix)` is
    then not a prefix of `decode(all)`, and slicing by length (what a naive streamer does) sends
    wrong text. Two offsets into the ids keep it exact and cheap: text is settled up to
    `read`; `prefix` trails it so that tokenizers whose decoders depend on the preceding token
    (e.g. leading-space rules) see their context. A delta is released only when the new text
    extends the settled text and does not end in an incomplete character; `finish` flushes
    whatever is held back (a truly invalid byte sequence stays U+FFFD, as in the full decode).
    """

    def __init__(self, tok: NVLMTokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.settled: str | None = ""  # decode(ids[prefix:read]) while they stay put; None: not decoded yet

    def push(self, new_ids) -> str:
        self.ids += list(new_ids)
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.settled is None:  # decoded once per release, not again for each push that releases nothing
            self.settled = self.tok.decode(self.ids[self.prefix:self.read])
        settled = self.settled
        text = self.tok.decode(self.ids[self.prefix:])
        if not final and (not text.startswith(settled) or len(text) == len(settled) or text.endswith("\ufffd")):
            return ""
        self.prefix, self.read, self.settled = self.read, len(self.ids), None
        return text[len(settled):]
