"""`write_dataset`: tokenize document streams into a dataset directory (format in `ar_lm.data.dataset`).

Two passes over re-iterable corpora, memory bounded by `buffer_mb` rather than by the corpus:

1. survey: count the documents each split gets and gather the tokenizer's training input from train only
   (character counts, or a uniform sample of at most `sp_sample_mb` of lines for sentencepiece);
2. tokenize: documents in chunks, encoded in `workers` processes (at most two chunks in flight each),
   written to each split's shards as they come, with sha256 computed on the way.

A stream is a (split, corpus) pair; split "" sends each document to train or val by a hash of its name
(`sources.split_of`), keeping one document for val when none hashes there.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ar_lm.data.dataset import FORMAT_VERSION, require_fresh_output
from ar_lm.data.sources import Document, split_of
from ar_lm.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    LevelTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_tokenizer_args,
    load_tokenizer,
    vocab_shortfall,
    with_specials,
)
from ar_lm.errors import require
from ar_lm.io import atomic_write_json, cpu_cores, sha256_file

Stream = tuple[str, Iterable[Document]]  # (split, or "" for the hash split; a corpus that can be read again)
PARALLEL_MIN_CHARS = 4_000_000  # workers=0: smaller corpora are tokenized in this process (starting workers costs more)


def write_dataset(out: Path, docs: Iterable[Document] = (), tokenizer_kind: str = "byte", vocab_size: int = 0,
                  val_fraction: float = 0.05, shard_tokens: int = 1 << 24, sp_model_type: str = "bpe",
                  source: dict | None = None, splits: dict[str, Iterable[Document]] | None = None,
                  buffer_mb: float = 64.0, workers: int = 0, sp_sample_mb: float = 20.0,
                  tokenizer: Tokenizer | None = None, media: dict | None = None, specials: Sequence[str] = ()) -> dict:
    """Tokenize `docs` (split by name hash) and the explicit `splits` into a dataset directory at `out`,
    which must not exist or be empty; returns its metadata. `tokenizer`: an existing one (another dataset's,
    so that both score the same tokens) instead of one trained on the train split. `workers` 0: one tokenizer
    process per core for corpora of PARALLEL_MIN_CHARS or more (sentencepiece, char), else this process.
    `media`: metadata of a media dataset ("modality" and its shape; documents with ready ids, read here).
    `specials`: strings the tokenizer must hold as single ids (a chat template's). Documents with loss `spans`
    (chat) get a loss mask: a uint8 shard beside each token shard, 1 where a token carries loss."""
    out = Path(out).absolute()
    require_fresh_output(out)
    if tokenizer is None:
        check_tokenizer_args(tokenizer_kind, vocab_size)
    require(buffer_mb > 0, f"--buffer-mb must be positive, got {buffer_mb}")
    splits = dict(splits or {})
    assert not (docs and "train" in splits), "documents to hash-split next to an explicit train split"
    streams: list[Stream] = ([("", docs)] if docs or not splits else []) + list(splits.items())
    survey = _survey(streams, val_fraction, "" if tokenizer else tokenizer_kind, int(sp_sample_mb * 1e6))
    given = tokenizer is not None
    tokenizer = tokenizer or _make_tokenizer(tokenizer_kind, survey, vocab_size, sp_model_type, specials)
    tokenizer = with_specials(tokenizer, specials, fixed=given)
    vocab = {} if given or not vocab_size else _vocab_record(tokenizer_kind, vocab_size, tokenizer, specials)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        tok_path = tokenizer.save(tmp)
        writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens, survey.masked) for s in survey.documents}
        n_workers = workers or (cpu_cores() if survey.chars >= PARALLEL_MIN_CHARS and tokenizer.kind != "byte" else 1)
        n_workers = 1 if tokenizer.kind == LevelTokenizer.kind or survey.masked else n_workers  # ready ids, masks
        _tokenize(streams, survey, tokenizer, tmp, writers, int(buffer_mb * 1e6), n_workers)
        meta = {
            "format": FORMAT_VERSION,
            "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                          "file": tok_path.name, "sha256": sha256_file(tok_path)},
            "dtype": np.dtype(dtype).name,
            "source": source or {},
            "splits": {s: w.close() for s, w in writers.items()},
            **vocab,
            **(media or {}),
        }
        atomic_write_json(tmp / "metadata.json", meta)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


@dataclass
class _Survey:
    """Pass 1: documents per split, the train documents' characters, the tokenizer's training input."""

    val_fraction: float
    documents: dict[str, int] = field(default_factory=dict)
    chars: int = 0
    masked: bool = False  # some document has loss spans: every split gets mask shards
    moved_to_val: str = ""  # the one document a hash split without val documents gives to val
    char_counts: collections.Counter = field(default_factory=collections.Counter)
    sample: "LineSample | None" = None

    def split(self, tag: str, doc: Document) -> str:
        if tag:
            return tag
        return "val" if doc.name == self.moved_to_val else split_of(doc, self.val_fraction)


def _survey(streams: Sequence[Stream], val_fraction: float, kind: str, sample_chars: int) -> _Survey:
    """`kind`: the tokenizer to gather training input for ("": none, the tokenizer exists)."""
    survey = _Survey(val_fraction, sample=LineSample(sample_chars) if kind == "sentencepiece" else None)
    hashed = any(not tag for tag, _ in streams)
    if hashed:
        survey.documents = {"train": 0, "val": 0}
    last_train = ""
    for tag, corpus in streams:
        for doc in corpus:
            split = survey.split(tag, doc)
            survey.documents[split] = survey.documents.get(split, 0) + doc.ends
            survey.chars += doc.size
            survey.masked |= doc.spans is not None
            if split != "train":
                continue
            if not tag:
                last_train = doc.name
            if kind == "char":
                survey.char_counts.update(doc.text)
            elif survey.sample is not None:
                survey.sample.add(doc.text)
    if hashed and not survey.documents.get("val") and survey.documents.get("train", 0) > 1 and last_train:
        survey.moved_to_val = last_train  # tiny corpora: keep one document for val
        survey.documents["train"] -= 1
        survey.documents["val"] = 1
    require(survey.documents.get("train") or not (kind or hashed),
            "the source has too few documents for a train split: add data or lower --val-fraction")
    require(not hashed or survey.documents.get("val") or val_fraction == 0,
            f"the source has too few documents for a val split ({sum(survey.documents.values())} in all): pass "
            "--val-files FILE (held-out text for val) or more text")
    for tag, _ in streams:
        require(not tag or survey.documents.get(tag), f"the {tag} files hold no text")
    survey.documents = {s: n for s, n in sorted(survey.documents.items(), key=lambda kv: _SPLIT_ORDER.get(kv[0], 3))}
    return survey


_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


class LineSample:
    """A uniform random sample of lines, at most `max_chars` in all, in one pass of unknown length: line i
    draws u_i ~ U(0, 1) (seeded) and is kept while u_i < t; whenever the kept lines exceed `max_chars`, t
    halves and the lines with u_i >= t leave, so every line ends up kept with probability t. A corpus
    under the limit is kept whole, in order."""

    def __init__(self, max_chars: int, seed: int = 0):
        self.max_chars, self.threshold, self.kept_chars = max_chars, 1.0, 0
        self.lines: list[tuple[float, str]] = []
        self._rng = np.random.default_rng([seed, 0x5A3F])

    def add(self, text: str) -> None:
        lines = text.splitlines()
        for u, line in zip(self._rng.random(len(lines)), lines):
            if u < self.threshold:
                self.lines.append((float(u), line))
                self.kept_chars += len(line) + 1
        while self.kept_chars > self.max_chars:
            self.threshold /= 2
            self.lines = [(u, line) for u, line in self.lines if u < self.threshold]
            self.kept_chars = sum(len(line) + 1 for _, line in self.lines)

    def texts(self) -> list[str]:
        return [line for _, line in self.lines]


def _vocab_record(kind: str, requested: int, tokenizer: Tokenizer, specials: Sequence[str]) -> dict:
    """metadata.json's "vocab" {"requested", "obtained"(, "why")}; a notice on stderr when they differ."""
    why = vocab_shortfall(kind, requested, tokenizer, specials)
    if why:
        print(f"[prepare] --vocab-size {requested:,} asked; the {kind} tokenizer has {tokenizer.vocab_size:,} ids: "
              f"{why}", file=sys.stderr, flush=True)
    return {"vocab": {"requested": requested, "obtained": tokenizer.vocab_size, **({"why": why} if why else {})}}


def _make_tokenizer(kind: str, survey: _Survey, vocab_size: int, model_type: str, specials: Sequence[str] = ()):
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.from_counts(survey.char_counts, vocab_size)
    return SentencePieceTokenizer.train(survey.sample.texts(), vocab_size, model_type, specials=specials)


class _SplitWriter:
    """One split's shards: tokens appended as they come; a shard closes at the first document end at or
    past `shard_tokens`. Counts documents, tokens, UTF-8 bytes, characters and whitespace-separated words."""

    def __init__(self, directory: Path, split: str, dtype, shard_tokens: int, masked: bool = False):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, np.dtype(dtype), shard_tokens
        self.info = {"documents": 0, "tokens": 0, "bytes": 0, "chars": 0, "words": 0, "shards": [],
                     "document_names": f"documents_{split}.txt"}
        self._names = open(directory / self.info["document_names"], "w", encoding="utf-8")
        self.masked = masked
        self._file, self._hash, self._shard_tokens = None, None, 0
        self._mask_file, self._mask_hash = None, None

    def add(self, doc: Document, ids: np.ndarray, eos_id: int, mask: np.ndarray | None = None) -> int:
        """Append one document (or piece) and, when it ends the document, the end-of-document id; returns
        its UTF-8 bytes (a media document: its ids, one byte each; no characters, no words). `mask`: its
        tokens' loss mask (masked datasets; the end-of-document id carries no loss)."""
        n_tokens = len(ids) + doc.ends
        if n_tokens:
            if self._file is None:
                stem = self.directory / f"{self.split}_{len(self.info['shards']):05d}"
                self._file, self._hash, self._shard_tokens = open(f"{stem}.bin", "wb"), hashlib.sha256(), 0
                if self.masked:
                    self._mask_file, self._mask_hash = open(f"{stem}.mask.bin", "wb"), hashlib.sha256()
            for part in (ids, [eos_id] if doc.ends else []):
                raw = np.asarray(part).astype(self.dtype).tobytes()
                self._file.write(raw)
                self._hash.update(raw)
            if self.masked:
                bits = np.ones(len(ids), np.uint8) if mask is None else np.asarray(mask, np.uint8)
                raw = np.concatenate([bits, np.zeros(int(doc.ends), np.uint8)]).tobytes()
                self._mask_file.write(raw)
                self._mask_hash.update(raw)
            self._shard_tokens += n_tokens
        info = self.info
        if doc.ends:
            self._names.write(doc.name.replace("\n", "\\n") + "\n")
        info["documents"] += doc.ends
        info["tokens"] += n_tokens
        n_bytes = len(doc.text.encode("utf-8")) if doc.ids is None else len(doc.ids)
        info["bytes"] += n_bytes
        info["chars"] += len(doc.text)
        info["words"] += len(doc.text.split())  # pieces are cut after a newline: word counts add up
        if doc.ends and self._shard_tokens >= self.shard_tokens:
            self._close_shard()
        return n_bytes

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            shard = {"file": Path(self._file.name).name, "tokens": self._shard_tokens, "sha256": self._hash.hexdigest()}
            if self._mask_file is not None:
                self._mask_file.close()
                shard["mask"] = {"file": Path(self._mask_file.name).name, "sha256": self._mask_hash.hexdigest()}
                self._mask_file = None
            self.info["shards"].append(shard)
            self._file = None

    def close(self) -> dict:
        self._close_shard()
        self._names.close()
        return self.info


def encode_texts(tokenizer: Tokenizer, texts: list[str], threads: int = 0) -> list[np.ndarray]:
    """Token ids of each text (integer arrays: uint8 for bytes, else int32)."""
    if tokenizer.kind == "byte" and not tokenizer.specials:
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
    if tokenizer.kind == "sentencepiece":
        return [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(texts, threads)]
    return [np.asarray(tokenizer.encode(t), np.int32) for t in texts]


def encode_with_mask(tokenizer: Tokenizer, doc: Document) -> tuple[np.ndarray, np.ndarray]:
    """A chat document's ids and loss mask: the text encoded piece by piece, cut at its spans' edges, so every
    token lies inside or outside the loss spans; 1 inside."""
    cuts = sorted({0, len(doc.text), *(i for span in doc.spans for i in span)})
    pieces = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    ids = [np.asarray(tokenizer.encode(doc.text[a:b]), np.int32) for a, b in pieces]
    inside = [any(s <= a and b <= e for s, e in doc.spans) for a, b in pieces]
    mask = [np.full(len(i), int(m), np.uint8) for i, m in zip(ids, inside)]
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8)
    return np.concatenate(ids), np.concatenate(mask)


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(directory: str, kind: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(Path(directory), kind)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return encode_texts(_WORKER_TOKENIZER, texts, threads=1)


def _chunks(streams: Sequence[Stream], survey: _Survey, chunk_chars: int):
    """(splits, documents) chunks of about `chunk_chars` characters, in stream order."""
    splits, docs, chars = [], [], 0
    for tag, corpus in streams:
        for doc in corpus:
            splits.append(survey.split(tag, doc))
            docs.append(doc)
            chars += doc.size
            if chars >= chunk_chars:
                yield splits, docs
                splits, docs, chars = [], [], 0
    if docs:
        yield splits, docs


def _tokenize(streams, survey: _Survey, tokenizer: Tokenizer, tok_dir: Path, writers: dict, buffer_chars: int,
              workers: int) -> None:
    """Pass 2: every document's tokens into its split's writer, in order; at most 2 * workers chunks (and
    one being written) of about buffer / (2 * workers + 1) characters each are held at once."""
    chunk_chars = max(1 << 16, buffer_chars // (2 * workers + 1))
    progress = _Progress(survey.chars)
    pool = None
    if workers > 1:
        pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                                      initializer=_init_worker, initargs=(str(tok_dir), tokenizer.kind))
    try:
        pending = collections.deque()
        for splits, docs in _chunks(streams, survey, chunk_chars):
            if docs[0].ids is not None:  # media documents come with their ids
                encoded = [d.ids for d in docs]
            elif survey.masked:  # chat documents: ids and loss mask, in this process
                encoded = [encode_with_mask(tokenizer, d) for d in docs]
            else:
                texts = [d.text for d in docs]
                encoded = pool.submit(_encode_in_worker, texts) if pool else encode_texts(tokenizer, texts)
            pending.append((splits, docs, encoded))
            while pending and (len(pending) > 2 * workers or not pool):
                _write_chunk(*pending.popleft(), writers, tokenizer.eos_id, progress)
        while pending:
            _write_chunk(*pending.popleft(), writers, tokenizer.eos_id, progress)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    progress.done()


def _write_chunk(splits, docs, encoded, writers, eos_id: int, progress: "_Progress") -> None:
    ids = encoded.result() if isinstance(encoded, concurrent.futures.Future) else encoded
    ids = [i if isinstance(i, tuple) else (i, None) for i in ids]  # (ids, loss mask or None)
    n_bytes = sum(writers[split].add(doc, doc_ids, eos_id, mask)
                  for split, doc, (doc_ids, mask) in zip(splits, docs, ids))
    progress.advance(sum(d.ends for d in docs), sum(d.size for d in docs), n_bytes)


class _Progress:
    """Documents, MB and MB/s on stderr (the share done by characters): one updating line on a terminal,
    else a line every 30 s."""

    def __init__(self, total_chars: int):
        self.total, self.docs, self.chars, self.bytes, self.start = total_chars, 0, 0, 0, time.time()
        self.tty, self.last = sys.stderr.isatty(), self.start

    def advance(self, docs: int, chars: int, n_bytes: int) -> None:
        self.docs, self.chars, self.bytes = self.docs + docs, self.chars + chars, self.bytes + n_bytes
        now = time.time()
        if now - self.last >= (0.5 if self.tty else 30.0):
            self.last = now
            print(self._line(now), end="\r" if self.tty else "\n", file=sys.stderr, flush=True)

    def _line(self, now: float) -> str:
        pct = f" ({100 * self.chars / self.total:.0f}%)" if self.total else ""
        rate = self.bytes / 1e6 / max(now - self.start, 1e-9)
        return f"[prepare] {self.docs:,} documents, {self.bytes / 1e6:.1f} MB{pct}, {rate:.1f} MB/s"

    def done(self) -> None:
        if self.tty and self.last > self.start:
            print(file=sys.stderr)
