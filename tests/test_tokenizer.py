"""Tokenizers round-trip any UTF-8 text exactly, and their byte counts are exact."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ar_lm.data.tokenizers import ByteTokenizer, CharTokenizer, SentencePieceTokenizer

CODE = '''def f(x):\n\tif x  >  1:\n        return "héllo"  # comment\r\n\n\n    return [1, 2,   3]\n'''
SAMPLES = [
    CODE,
    "   leading and trailing spaces   ",
    "\n\n\t\t  \n",
    "emoji 😀🚀👩‍👩‍👧 and flags 🇫🇷",
    "mixed 中文 русский العربية हिन्दी 123456789 0.5e-10",
    "",
    "\x00 control \x07 chars \u200b zero width",
]


def _random_unicode(seed: int, n: int = 200) -> str:
    rng = random.Random(seed)
    chars = []
    while len(chars) < n:
        cp = rng.randint(1, 0x10FFFF)
        if 0xD800 <= cp <= 0xDFFF:
            continue
        chars.append(chr(cp))
    return "".join(chars)


@pytest.fixture(scope="module")
def sp_tokenizers(corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())] + [CODE * 20]
    return [SentencePieceTokenizer.train(texts, 400, t) for t in ("bpe", "unigram")]


def _check(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert sum(int(tok.token_bytes()[i]) for i in ids) == len(text.encode("utf-8"))


@pytest.mark.parametrize("text", SAMPLES + [_random_unicode(s) for s in range(3)])
def test_round_trip_all_tokenizers(text, sp_tokenizers, corpus_dir):
    char = CharTokenizer.train([p.read_text() for p in sorted(corpus_dir.iterdir())])
    for tok in [ByteTokenizer(), char, *sp_tokenizers]:
        _check(tok, text)


def test_sentencepiece_is_lossless_and_compresses(sp_tokenizers, tmp_path):
    bpe = sp_tokenizers[0]
    text = "the cat sat on the mat.\nthe dog ran to a big red house."
    assert len(bpe.encode(text)) < len(text) / 2  # it learned words, not just bytes
    bpe.save(tmp_path)
    again = SentencePieceTokenizer((tmp_path / "tokenizer.model").read_bytes())
    assert again.encode(text) == bpe.encode(text)


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=64))
def test_property_byte_and_char_round_trip(text):
    _check(ByteTokenizer(), text)
    _check(CharTokenizer(["a", "é", " "]), text)
