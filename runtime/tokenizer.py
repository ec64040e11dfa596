"""The checkpoint's tokenizer, loaded from `tokenizer.json` with the `tokenizers` library.

NVLM-D ships a Qwen2 byte-level BPE tokenizer and `auto_map` entries that would make
`AutoTokenizer` ask for remote code; we read `tokenizer.json` directly instead, so no
checkpoint code ever runs.
"""

from __future__ import annotations

from pathlib import Path

from builder.config import IMAGE_PAD
from builder.errors import TokenizerError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class NVLMTokenizer:
    def __init__(self, tokenizer, source: Path):
        self._tok = tokenizer
        self.source = source
        self.image_pad_id = self._require(IMAGE_PAD)
        self.im_end_id = self._require(IM_END)
        self.im_start_id = self._require(IM_START)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "NVLMTokenizer":
        from tokenizers import Tokenizer

        file = Path(directory) / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"{file} not found: the checkpoint must include the fast-tokenizer file tokenizer.json "
                "(NVLM-D's release does; for a slow-only tokenizer run `AutoTokenizer.from_pretrained(DIR)"
                ".save_pretrained(DIR)` once to produce it)"
            )
        return cls(Tokenizer.from_file(str(file)), Path(directory))

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

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)
