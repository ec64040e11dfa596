#!/usr/bin/env python3
"""Rebuild NVLM-D-72B's tokenizer.json from the release's vocab.json and tokenizer_config.json.

The public copy of the release this project reads (GitHub `chu-siang/NCHC_hackthon`, folder
`torch_ref_model/`, commit a87a0c9) holds `vocab.json` and `tokenizer_config.json` but not the merges
(`tokenizer.json` is an LFS object there). Qwen2's byte-level BPE is rank-based: a token's id is its merge
rank, and the BPE merges of rank r are exactly the split that byte-pair encoding of token r with only the
merges below r leaves in two pieces (how tiktoken-style vocabularies are converted to merges lists, e.g.
transformers' `TikTokenConverter`). So the merges follow from the vocabulary alone. The pre-tokenizer is
Qwen2's split pattern, NFC normalization, ByteLevel without prefix space; the added tokens are the
release's `added_tokens_decoder`.

    python scripts/release_tokenizer.py VOCAB_JSON TOKENIZER_CONFIG_JSON OUT.json[.xz]

Used once to write the golden-test fixture tests/fixtures/release/tokenizer.json.xz (docs/prompt_formats.md).
"""

import json
import lzma
import sys

# Qwen2's pre-tokenizer split (Qwen2TokenizerFast / tokenization_qwen2.py PRETOKENIZE_REGEX)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def merges_from_ranks(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """One merge per multi-symbol token, in rank order."""
    out = []
    for token, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = list(token)
        while len(parts) > 2:  # byte-pair encode with the merges of lower rank
            best = None
            for i in range(len(parts) - 1):
                r = vocab.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            out.append((parts[0], parts[1]))
    return out


def tokenizer_json(vocab: dict[str, int], config: dict) -> dict:
    added = [{"id": int(i), "content": t["content"], "single_word": t["single_word"], "lstrip": t["lstrip"],
              "rstrip": t["rstrip"], "normalized": t["normalized"], "special": t["special"]}
             for i, t in sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges_from_ranks(vocab)]},
    }


def main(argv):
    vocab_path, config_path, out = argv
    vocab = json.load(open(vocab_path, encoding="utf-8"))
    config = json.load(open(config_path, encoding="utf-8"))
    data = json.dumps(tokenizer_json(vocab, config), ensure_ascii=False).encode()
    if out.endswith(".xz"):
        data = lzma.compress(data, preset=9)
    with open(out, "wb") as f:
        f.write(data)


if __name__ == "__main__":
    main(sys.argv[1:])
