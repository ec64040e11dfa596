"""The release's chat format and the tokenizer's, pinned on the release's own README example.

The tokenizer is NVLM-D-72B's, rebuilt from the release's vocab.json and tokenizer_config.json
(scripts/release_tokenizer.py; docs/prompt_formats.md). Two independent anchors: Qwen2's documented ids of
"<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n", and the token counts of the README's image
example that the release's own `model.chat()` produces (1,852) and the old newline-after-every-turn
rendering produced (1,845), both measured with the release's tokenizer when the prompt defect was found.
The golden ids (tests/fixtures/release/golden_prompts.json; a run of image pads is written [id, count])
were written by this project's renderer after those anchors held; the expected texts below are spelled out
by hand from conversation.py and the tokenizer's chat_template.
"""

import json
import lzma
from pathlib import Path

import pytest

from runtime.chat_format import CHAT_FORMATS, DEFAULT_CHAT_FORMAT, Message, get_chat_format
from runtime.core.errors import InputError, TokenizerError
from runtime.prompt import build_prompt, render_chatml
from runtime.tokenizer import NVLMTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "release"
TEXT_QUESTION = "Hello, who are you?"  # the release README's pure-text conversation
IMAGE_QUESTION = "<image>\nPlease describe the image shortly."  # its single-image example (max_num=6)
TILES = 7  # six tiles and the thumbnail


@pytest.fixture(scope="module")
def release_tok():
    from tokenizers import Tokenizer

    raw = lzma.decompress((FIXTURES / "tokenizer.json.xz").read_bytes()).decode()
    return NVLMTokenizer(Tokenizer.from_str(raw), FIXTURES, json.loads((FIXTURES / "tokenizer_config.json").read_text()))


def _expand(runs):
    out = []
    for r in runs:
        out += [r[0]] * r[1] if isinstance(r, list) else [r]
    return out


def test_the_rebuilt_tokenizer_gives_qwen2_s_documented_ids(release_tok):
    ids = release_tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert release_tok.image_pad_id == 151654 and release_tok.im_end_id == 151645


def test_release_text_is_conversation_py_s_chatml():
    text = render_chatml([Message("user", TEXT_QUESTION)])
    assert text == ("<|im_start|>system\nAnswer the questions.<|im_end|>"
                    "<|im_start|>user\nHello, who are you?<|im_end|><|im_start|>assistant\n")
    # a system message replaces the default one; history turns end with the separator, no newline
    text = render_chatml([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"),
                          Message("user", "Bye")])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|>"
                    "<|im_start|>assistant\nHello<|im_end|><|im_start|>user\nBye<|im_end|><|im_start|>assistant\n")
    with pytest.raises(InputError, match="one system message"):
        render_chatml([Message("user", "a"), Message("system", "b"), Message("user", "c")])


def test_tokenizer_format_renders_the_release_s_chat_template(release_tok):
    text = render_chatml([Message("user", TEXT_QUESTION)], chat_format="tokenizer", tokenizer=release_tok)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("fmt", sorted(CHAT_FORMATS))
def test_golden_ids_of_the_readme_example(release_tok, fmt):
    golden = json.loads((FIXTURES / "golden_prompts.json").read_text())[fmt]
    text = build_prompt(release_tok, TEXT_QUESTION, [], tokens_per_tile=256, chat_format=fmt)
    image = build_prompt(release_tok, IMAGE_QUESTION, [TILES], tokens_per_tile=256, chat_format=fmt)
    assert list(text.input_ids) == _expand(golden["text"])
    assert list(image.input_ids) == _expand(golden["image_6_tiles_and_thumbnail"])
    assert image.num_image_tokens == TILES * 256
    if fmt == "release":  # what the release's chat() tokenizes for this example, measured with its tokenizer
        assert len(image.input_ids) == 1852


def test_the_formats_differ_where_the_release_says(release_tok):
    """The old rendering (newline after each turn, no system turn) gave 1,845 tokens: 7 fewer than chat()."""
    rel = build_prompt(release_tok, IMAGE_QUESTION, [TILES], tokens_per_tile=256, chat_format="release")
    tok = build_prompt(release_tok, IMAGE_QUESTION, [TILES], tokens_per_tile=256, chat_format="tokenizer")
    assert len(rel.input_ids) != len(tok.input_ids) and rel.input_ids[-3:] == tok.input_ids[-3:]
    assert rel.text.count("\n") < tok.text.count("\n")


def test_stop_token_follows_the_format(release_tok):
    assert DEFAULT_CHAT_FORMAT == "release"
    assert get_chat_format("release").stop_id(release_tok) == 151645  # conversation.py's sep, <|im_end|>
    assert get_chat_format("tokenizer").stop_id(release_tok) == 151645  # tokenizer_config's eos_token
    with pytest.raises(InputError, match="release, tokenizer"):
        get_chat_format("vicuna")


def test_a_tokenizer_without_chat_template_is_refused_with_the_remedy(release_tok):
    bare = NVLMTokenizer(release_tok._tok, Path("x"), {})
    with pytest.raises(TokenizerError, match="--chat-format release"):
        render_chatml([Message("user", "hi")], chat_format="tokenizer", tokenizer=bare)
