"""Tokenizers: lossless sentencepiece (BPE/unigram), bytes, characters with byte fallback, and media levels.

Every text tokenizer round-trips any UTF-8 text exactly, and each knows how many UTF-8 bytes each token
stands for (`token_bytes`), so bits per byte is computed from the evaluated tokens themselves, and how
many characters (`token_chars`: its UTF-8 bytes that are not continuation bytes 0x80..0xBF, so the sum
over any text's tokens is its character count) for bits per character.
Files are sentencepiece's own model proto or JSON: nothing is pickled.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ar_lm.errors import UserError, require
from ar_lm.io import cpu_cores

KINDS = ("sentencepiece", "byte", "char")
LEAD_BYTES = np.array([0 if 0x80 <= b <= 0xBF else 1 for b in range(256)], np.int32)  # 1: a byte starts a character


def split_specials(text: str, specials: Sequence[str]) -> list[tuple[str, int]]:
    """`text` cut at its special strings (longest first): (ordinary text, -1) and (special, its index) parts."""
    if not specials:
        return [(text, -1)] if text else []
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    index, parts, pos = {s: i for i, s in enumerate(specials)}, [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            parts.append((text[pos : m.start()], -1))
        parts.append((m.group(), index[m.group()]))
        pos = m.end()
    return parts + ([(text[pos:], -1)] if pos < len(text) else [])


def _special_counts(specials: Sequence[str]) -> tuple[list[int], list[int]]:
    """UTF-8 bytes and characters each special stands for (so bits per byte counts the rendered text)."""
    return [len(s.encode("utf-8")) for s in specials], [len(s) for s in specials]


class ByteTokenizer:
    """ids 0..255 are bytes; 256 is end-of-document; 257.. the `specials` (chat boundary strings, one id each)."""

    kind = "byte"
    filename = "tokenizer.json"

    def __init__(self, specials: Sequence[str] = ()):
        self.specials = list(specials)
        self.vocab_size = 257 + len(self.specials)
        self.eos_id = 256

    def encode(self, text: str) -> list[int]:
        ids = []
        for part, special in split_specials(text, self.specials):
            ids.extend(list(part.encode("utf-8")) if special < 0 else [257 + special])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
            elif i >= 257:
                out.append(pending.decode("utf-8", errors="replace") + self.specials[i - 257])
                pending = bytearray()
        return "".join(out) + pending.decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.array([1] * 256 + [0] + _special_counts(self.specials)[0], np.int32)

    def token_chars(self) -> np.ndarray:
        return np.concatenate([LEAD_BYTES, [0], _special_counts(self.specials)[1]]).astype(np.int32)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / self.filename
        data = {"kind": "byte", **({"specials": self.specials} if self.specials else {})}
        path.write_text(json.dumps(data, ensure_ascii=True) + "\n")
        return path


class CharTokenizer:
    """id 0 is end-of-document, 1..256 are byte fallbacks, then one id per known character, then the `specials`."""

    kind = "char"
    filename = "tokenizer.json"

    def __init__(self, chars: Sequence[str], specials: Sequence[str] = ()):
        self.chars, self.specials = list(chars), list(specials)
        self.eos_id = 0
        self.vocab_size = 257 + len(self.chars) + len(self.specials)
        self._ids = {c: 257 + i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 0) -> "CharTokenizer":
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text)
        return cls.from_counts(counts, vocab_size)

    @classmethod
    def from_counts(cls, counts: dict[str, int], vocab_size: int = 0) -> "CharTokenizer":
        """The most frequent characters (ties by code point), up to `vocab_size` ids in all (0: every one)."""
        chars = sorted(counts, key=lambda c: (-counts[c], c))
        if vocab_size:
            chars = chars[: max(0, vocab_size - 257)]
        return cls(sorted(chars))

    def encode(self, text: str) -> list[int]:
        ids = []
        for part, special in split_specials(text, self.specials):
            if special >= 0:
                ids.append(257 + len(self.chars) + special)
                continue
            for c in part:
                i = self._ids.get(c)
                if i is None:
                    ids.extend(1 + b for b in c.encode("utf-8"))
                else:
                    ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if 1 <= i <= 256:
                pending.append(i - 1)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            if i >= 257:
                k = i - 257
                out.append(self.chars[k] if k < len(self.chars) else self.specials[k - len(self.chars)])
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_bytes(self) -> np.ndarray:
        specials = _special_counts(self.specials)[0]
        return np.array([0] + [1] * 256 + [len(c.encode("utf-8")) for c in self.chars] + specials, np.int32)

    def token_chars(self) -> np.ndarray:
        specials = _special_counts(self.specials)[1]
        return np.concatenate([[0], LEAD_BYTES, np.ones(len(self.chars)), specials]).astype(np.int32)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / self.filename
        data = {"kind": "char", "chars": self.chars, **({"specials": self.specials} if self.specials else {})}
        path.write_text(json.dumps(data, ensure_ascii=True) + "\n")
        return path


class SentencePieceTokenizer:
    """sentencepiece with settings that make it lossless (byte fallback, identity normalisation,
    whitespace kept as is, no dummy prefix, newline and tab as their own symbols)."""

    kind = "sentencepiece"
    filename = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe", max_chars: int = 20_000_000,
              specials: Sequence[str] = ()):
        """`specials`: strings kept whole as user-defined pieces (a chat template's boundary tokens)."""
        import sentencepiece as spm

        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.txt"
            total = 0
            with open(corpus, "w", encoding="utf-8") as f:
                for text in texts:
                    # one line per sentence for the trainer; "\n" itself is a user symbol
                    for line in text.splitlines():
                        f.write(line + "\n")
                        total += len(line) + 1
                    if total >= max_chars:
                        break
            prefix = Path(tmp) / "sp"
            try:
                spm.SentencePieceTrainer.train(
                    input=str(corpus),
                    model_prefix=str(prefix),
                    vocab_size=vocab_size,
                    model_type=model_type,
                    byte_fallback=True,
                    normalization_rule_name="identity",
                    remove_extra_whitespaces=False,
                    allow_whitespace_only_pieces=True,
                    split_digits=True,
                    add_dummy_prefix=False,
                    user_defined_symbols=["\n", "\t", *specials],
                    character_coverage=0.9995,
                    max_sentence_length=1 << 16,
                    num_threads=cpu_cores(),
                    hard_vocab_limit=False,  # small corpora: fewer pieces rather than an error
                    minloglevel=2,
                )
            except RuntimeError as e:
                raise _training_error(str(e), vocab_size) from None
            return cls((prefix.with_suffix(".model")).read_bytes())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    @property
    def pieces_learned(self) -> int:
        """Its pieces beyond byte fallbacks and control pieces (user-defined ones, newline and tab, included)."""
        return sum(not (self.sp.is_byte(i) or self.sp.is_control(i) or self.sp.is_unknown(i)
                        or self.sp.is_unused(i)) for i in range(self.vocab_size))

    def encode_batch(self, texts: list[str], threads: int = 0) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=threads or cpu_cores())

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                out[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                out[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out

    def token_chars(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                out[i] = LEAD_BYTES[int(self.sp.id_to_piece(i)[1:-1], 16)]  # piece "<0xAB>"
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                out[i] = len(self.sp.id_to_piece(i))  # code points; "\u2581" stands for one space
        return out

    def save(self, directory: Path) -> Path:
        path = Path(directory) / self.filename
        path.write_bytes(self.proto)
        return path


class LevelTokenizer:
    """Media tokens (`ar_lm.data.media`): ids 0..levels-1 are intensity levels (images: 2^bits) or mu-law codes
    (audio), `levels` is end-of-document. Each level counts as one byte and no character, so bits per byte is
    bits per dimension (sub-pixel or sample). There is no text to encode; decode writes the levels as numbers."""

    kind = "levels"
    filename = "tokenizer.json"

    def __init__(self, levels: int):
        self.levels = int(levels)
        self.eos_id = self.levels
        self.vocab_size = self.levels + 1

    def encode(self, text: str) -> list[int]:
        raise UserError("a levels tokenizer (images, audio) encodes no text: give media tokens, not a text prompt")

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids if 0 <= i < self.levels)

    def token_bytes(self) -> np.ndarray:
        return np.array([1] * self.levels + [0], np.int32)

    def token_chars(self) -> np.ndarray:
        return np.zeros(self.vocab_size, np.int32)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / self.filename
        path.write_text(json.dumps({"kind": "levels", "levels": self.levels}) + "\n")
        return path


Tokenizer = ByteTokenizer | CharTokenizer | SentencePieceTokenizer | LevelTokenizer


def _training_error(message: str, vocab_size: int) -> UserError:
    """sentencepiece's failure as one line with what to do."""
    need = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message)
    if need:
        return UserError(f"--vocab-size {vocab_size} is below the {need.group(1)} pieces sentencepiece needs for this "
                         "text (256 byte fallbacks, control pieces, newline, tab and the train text's characters): use "
                         f"--vocab-size {need.group(1)} or more (e.g. 4096)")
    return UserError(f"sentencepiece training failed: {message.splitlines()[0]} (try another --vocab-size)")


def check_tokenizer_args(kind: str, vocab_size: int) -> None:
    require(kind in KINDS, f"tokenizer {kind!r} is unknown: use one of {', '.join(KINDS)}")
    require(vocab_size >= 0, f"--vocab-size must be >= 0, got {vocab_size}")
    require(kind != "sentencepiece" or vocab_size > 0, "--tokenizer sentencepiece needs --vocab-size N (e.g. 4096)")
    require(kind != "byte" or not vocab_size, f"--vocab-size {vocab_size} does not apply to --tokenizer byte (always "
            "257 ids: 256 bytes and end-of-document): drop --vocab-size, or use --tokenizer sentencepiece or char")
    require(kind != "char" or not vocab_size or vocab_size > 257, f"--vocab-size {vocab_size} leaves --tokenizer "
            "char no character ids (257 ids are end-of-document and 256 byte fallbacks): use 0 (every character) "
            "or more than 257")


def vocab_shortfall(kind: str, requested: int, tokenizer: "Tokenizer", specials: Sequence[str] = ()) -> str:
    """Why a tokenizer trained for `requested` ids has another number ('' when it has that many)."""
    got = tokenizer.vocab_size
    if not requested or got == requested:
        return ""
    if got > requested:
        return f"the chat template's {len(specials)} special tokens come on top"
    if kind == "char":
        return (f"the train text holds only {len(tokenizer.chars)} distinct characters (+ 257 ids for "
                "end-of-document and byte fallbacks)")
    return (f"sentencepiece learned only {tokenizer.pieces_learned:,} pieces from the train text (a small corpus has "
            "no more to merge; more text gives more)")


def train_tokenizer(kind: str, texts: list[str], vocab_size: int = 0, model_type: str = "bpe") -> Tokenizer:
    check_tokenizer_args(kind, vocab_size)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.train(texts, vocab_size)
    return SentencePieceTokenizer.train(texts, vocab_size, model_type)


def load_tokenizer(directory: Path, kind: str) -> Tokenizer:
    directory = Path(directory)
    if kind == "sentencepiece":
        path = directory / SentencePieceTokenizer.filename
        if not path.is_file():
            raise UserError(f"tokenizer file {path} is missing")
        return SentencePieceTokenizer(path.read_bytes())
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer file {path} is missing")
    data = json.loads(path.read_text())
    if data.get("kind") == "byte":
        return ByteTokenizer(data.get("specials", ()))
    if data.get("kind") == "char":
        return CharTokenizer(data["chars"], data.get("specials", ()))
    if data.get("kind") == "levels":
        return LevelTokenizer(data["levels"])
    raise UserError(f"tokenizer file {path} holds unknown kind {data.get('kind')!r}")


def with_specials(tokenizer: Tokenizer, specials: Sequence[str], fixed: bool = False) -> Tokenizer:
    """`tokenizer` holding every string of `specials` as one id (appended after its ids). `fixed`: an existing
    dataset's tokenizer, whose ids cannot grow: it must hold them already."""
    if not specials:
        return tokenizer
    require(tokenizer.kind != LevelTokenizer.kind, "a levels tokenizer (images, audio) cannot take a chat template's "
            "special tokens: chat data is text (--tokenizer byte, char or sentencepiece)")
    have = list(getattr(tokenizer, "specials", ()))
    missing = [s for s in specials if s not in have and len(tokenizer.encode(s)) != 1]  # sentencepiece: its pieces
    if not missing:
        return tokenizer
    require(not fixed, f"the {tokenizer.kind} tokenizer given lacks the chat template's special tokens "
            f"{', '.join(missing)}: prepare with a new tokenizer (drop --tokenizer-from) or another template")
    require(tokenizer.kind in ("byte", "char"), f"a {tokenizer.kind} tokenizer cannot take the chat template's special "
            f"tokens {', '.join(missing)} as single ids: use --tokenizer byte, char or a sentencepiece one trained here")
    if tokenizer.kind == "byte":
        return ByteTokenizer(have + missing)
    return CharTokenizer(tokenizer.chars, have + missing)
