"""Prompt layout with 1-D tile tags (docs/prompt_formats.md), spelled out for small cases, in the release's chat
format (the default; tests/test_chat_format.py pins both formats on the release's tokenizer)."""

import pytest

from runtime.core.errors import InputError
from runtime.prompt import Message, build_prompt, expand_images, image_text, render_chatml, tile_tags
from runtime.tokenizer import NVLMTokenizer

PAD = "<|vision_pad|>"


@pytest.fixture(scope="module")
def tok(demo_ckpt):
    return NVLMTokenizer.from_dir(demo_ckpt)


@pytest.mark.parametrize("tiles, tags", [
    (1, ["<tile_global_thumbnail>"]),
    (3, ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]),
    (7, ["<tile_1>", "<tile_2>", "<tile_3>", "<tile_4>", "<tile_5>", "<tile_6>", "<tile_global_thumbnail>"]),
])
def test_tile_tags(tiles, tags):
    assert tile_tags(tiles) == tags


def test_image_text_layout():
    assert image_text(3, 2) == f"<Image><tile_1>{PAD}{PAD}<tile_2>{PAD}{PAD}<tile_global_thumbnail>{PAD}{PAD}</Image>"


def test_chatml_rendering():
    text = render_chatml([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"),
                          Message("user", "Again")])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|>"
                    "<|im_start|>assistant\nHello<|im_end|><|im_start|>user\nAgain<|im_end|>"
                    "<|im_start|>assistant\n")


def _system(tok):
    """The release's system turn: its default system message, then the separator (no newline)."""
    return [tok.im_start_id] + tok.encode("system\nAnswer the questions.") + [tok.im_end_id]


def test_one_tile_prompt_tokens_spelled_out(tok):
    p = build_prompt(tok, "<image>\nWhat is it?", [1], tokens_per_tile=256)
    e = tok.encode
    expected = (_system(tok) + [tok.im_start_id] + e("user\n<Image><tile_global_thumbnail>") + [tok.image_pad_id] * 256
                + e("</Image>\nWhat is it?") + [tok.im_end_id] + [tok.im_start_id] + e("assistant\n"))
    assert list(p.input_ids) == expected
    first = len(_system(tok)) + 1 + len(e("user\n<Image><tile_global_thumbnail>"))
    assert p.image_positions == tuple(range(first, first + 256))


def test_two_images_three_and_one_tiles_spelled_out(tok):
    p = build_prompt(tok, "A <image> B <image>", [3, 1], tokens_per_tile=4)
    e, pad = tok.encode, [tok.image_pad_id] * 4
    expected = (_system(tok) + [tok.im_start_id] + e("user\nA <Image><tile_1>") + pad + e("<tile_2>") + pad
                + e("<tile_global_thumbnail>") + pad + e("</Image> B <Image><tile_global_thumbnail>") + pad
                + e("</Image>") + [tok.im_end_id] + [tok.im_start_id] + e("assistant\n"))
    assert list(p.input_ids) == expected
    assert p.num_image_tokens == 16 and p.tiles_per_image == (3, 1)


@pytest.mark.parametrize("tiles", [1, 3, 4, 5, 6, 7])
def test_image_token_count_per_tile_count(tok, tiles):
    p = build_prompt(tok, "<image>\nDescribe.", [tiles], tokens_per_tile=256)
    assert p.num_image_tokens == 256 * tiles
    text = tok.decode(p.input_ids, skip_special_tokens=False)
    for tag in tile_tags(tiles):
        assert text.count(tag) == 1


def test_tags_tokenize_in_context(tok):
    """Tags are plain text and must be tokenized in context: encoding the pieces separately can differ."""
    p = build_prompt(tok, "<image>", [3], tokens_per_tile=1)
    joined = tok.decode(p.input_ids, skip_special_tokens=False)
    assert "<Image><tile_1><|vision_pad|><tile_2><|vision_pad|><tile_global_thumbnail><|vision_pad|></Image>" in joined


def test_trtllm_fake_ids_are_scattered_between_tags(tok):
    vocab = 1024  # above every real id of the demo tokenizer
    p = build_prompt(tok, "<image>", [3], tokens_per_tile=2)
    ids = p.trtllm_input_ids(vocab)
    fake = [i for i in ids if i >= vocab]
    assert fake == list(range(vocab, vocab + 6))  # row k of the prompt table, in order
    positions = [k for k, i in enumerate(ids) if i >= vocab]
    assert positions == list(p.image_positions)
    assert positions[2] - positions[1] > 1 and positions[4] - positions[3] > 1  # tag tokens in between


def test_text_only_prompt(tok):
    p = build_prompt(tok, [Message("system", "S"), Message("user", "Hello")], [], tokens_per_tile=256)
    assert p.num_image_tokens == 0 and p.trtllm_input_ids(512) == list(p.input_ids)


@pytest.mark.parametrize("text, images, message", [
    ("<image> and <image>", [1], "2 <image> placeholder"),
    ("no placeholder", [1], "0 <image> placeholder"),
    ("<image>", [], "1 <image> placeholder"),
])
def test_placeholder_count_mismatch(tok, text, images, message):
    with pytest.raises(InputError, match=message):
        build_prompt(tok, text, images, tokens_per_tile=256)


def test_raw_pad_token_and_control_tokens_are_refused(tok):
    with pytest.raises(InputError, match="vision_pad"):
        build_prompt(tok, f"sneaky {PAD}", [], tokens_per_tile=256)
    with pytest.raises(InputError, match="control tokens"):
        build_prompt(tok, "x<|im_end|>", [], tokens_per_tile=256)
    with pytest.raises(InputError, match="role"):
        render_chatml([Message("tool", "x")])


def test_expand_images_keeps_surrounding_text():
    assert expand_images("a<image>b", [1], 1) == f"a<Image><tile_global_thumbnail>{PAD}</Image>b"


# --------------------------------------------------------------------------- streaming detokenization


def test_stream_decoder_concatenates_to_the_full_decode(tok):
    """Random ids (fresh seed, printed on failure), pushed 1–3 at a time: the deltas join to exactly
    decode(all). Random byte-level ids split multi-byte characters constantly, so this also shows
    that slicing decode(prefix) by length — the naive streamer — gets it wrong on the same inputs."""
    import random

    from runtime.tokenizer import StreamDecoder

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    naive_wrong = 0
    for _ in range(400):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        dec, out, k = StreamDecoder(tok), [], 0
        while k < len(ids):
            step = rng.choice([1, 1, 2, 3])
            out.append(dec.push(ids[k:k + step]))
            k += step
        out.append(dec.finish())
        assert "".join(out) == tok.decode(ids), f"seed {seed}, ids {ids}"
        sent = ""
        naive = []
        for n in range(1, len(ids) + 1):
            now = tok.decode(ids[:n])
            naive.append(now[len(sent):])
            sent = now
        naive_wrong += "".join(naive) != tok.decode(ids)
    assert naive_wrong > 0, f"seed {seed}: the inputs never split a character; the test would not catch the bug"


def test_stream_decoder_holds_back_split_characters(tok):
    from runtime.tokenizer import StreamDecoder

    text = "naïve café – 日本語 😀 done"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    deltas = [dec.push([i]) for i in ids] + [dec.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # a character is released whole or not at all
    assert "" in deltas  # the demo tokenizer does split some of these characters across tokens


def test_prompt_table_extra_ids_key_each_image(tok):
    """One UINT64 per input token: 0 on text, the image's content key on each of its positions. Two
    requests with the same text and different images get different keys at image positions (so the
    engine's KV-cache reuse cannot mix them); the same image gets the same key (reuse still works);
    the client's salt changes every image key."""
    import random

    from runtime.prompt import image_cache_key

    rng = random.Random()
    a, b = rng.randbytes(64), rng.randbytes(64)
    p = build_prompt(tok, "<image> then <image>", [3, 1], tokens_per_tile=256)
    ids = p.trtllm_input_ids(tok.vocab_size)
    extra = p.prompt_table_extra_ids([a, b])
    assert len(extra) == len(ids)
    image_pos = set(p.image_positions)
    assert all(extra[i] == 0 for i in range(len(ids)) if i not in image_pos)
    first, second = p.image_positions[:3 * 256], p.image_positions[3 * 256:]
    assert {extra[i] for i in first} == {image_cache_key(a)} and {extra[i] for i in second} == {image_cache_key(b)}
    assert image_cache_key(a) != image_cache_key(b) and 0 not in (image_cache_key(a), image_cache_key(b))
    swapped = p.prompt_table_extra_ids([b, a])
    assert [extra[i] for i in first] != [swapped[i] for i in first]
    assert p.prompt_table_extra_ids([a, b]) == extra
    salted = p.prompt_table_extra_ids([a, b], salt=7)
    assert all(salted[i] != extra[i] for i in image_pos) and all(salted[i] == 0 for i in range(len(ids)) if i not in image_pos)
    assert all(0 < k < 2**64 for k in extra if k)
    with pytest.raises(InputError, match="1 images for a prompt laid out for 2"):
        p.prompt_table_extra_ids([a])


def test_a_family_prompt_layout_decides_which_tiles_are_inline(tok):
    """A family's PromptLayout (runtime/core/families.py) is what build_prompt writes: with a layout that
    reads only the thumbnail inline (the NVLM-H shape: regular tiles go through cross-attention), the
    regular tiles keep their tags but lose their placeholders, and the image keys cover exactly the
    inline positions of each image."""
    import random

    from runtime.core.config import THUMBNAIL_TAG
    from runtime.core.families import NVLM_D, PromptLayout
    from runtime.prompt import image_cache_key

    thumb = PromptLayout(inline=lambda tag: tag == THUMBNAIL_TAG)
    assert image_text(3, 2, thumb) == f"<Image><tile_1><tile_2><tile_global_thumbnail>{PAD}{PAD}</Image>"
    assert image_text(3, 2, NVLM_D.prompt_layout) == image_text(3, 2)
    d = build_prompt(tok, "<image> then <image>", [3, 1], tokens_per_tile=4, layout=NVLM_D.prompt_layout)
    h = build_prompt(tok, "<image> then <image>", [3, 1], tokens_per_tile=4, layout=thumb)
    assert (d.num_image_tokens, h.num_image_tokens) == (16, 8) and h.tokens_per_image == (4, 4)
    assert d.tokens_per_image == (12, 4)
    assert "<tile_2>" in h.text and h.text.count(PAD) == 8
    a, b = random.Random().randbytes(32), random.Random().randbytes(32)
    extra = h.prompt_table_extra_ids([a, b])
    assert [extra[i] for i in h.image_positions] == [image_cache_key(a)] * 4 + [image_cache_key(b)] * 4
    none = PromptLayout(inline=lambda tag: False)  # the NVLM-X shape: tags only
    x = build_prompt(tok, "<image>", [3], tokens_per_tile=4, layout=none)
    assert x.num_image_tokens == 0 and "<tile_1><tile_2><tile_global_thumbnail></Image>" in x.text
