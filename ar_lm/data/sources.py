"""Text sources for `ar-lm prepare`: documents from the standard library or from files.

A corpus is re-iterable (`prepare` reads it twice: once to train the tokenizer and count, once to
tokenize) and streamed: a long text file comes in pieces of about `PIECE_CHARS` characters cut after a
newline, only the last piece ending the document (`Document.ends`). Without explicit split files, each
document goes to val or train by a hash of its name, so the split is deterministic and independent of
file order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from ar_lm.errors import UserError, require
from ar_lm.io import sha256_file

if TYPE_CHECKING:
    import numpy as np

SPLITS = ("train", "val", "test")
PIECE_CHARS = 1 << 18  # a text file is read (and tokenized) in pieces of about this many characters


@dataclass(frozen=True)
class Document:
    """A document, or a piece of one: `ends` is false for every piece of a file but its last. `ids`: a media
    document's ready token ids (`ar_lm.data.media`; its text is then empty). `spans`: a chat document's character
    spans [start, stop) that carry loss (`ar_lm.data.chat`; the writer stores a loss mask), None: all of it."""

    name: str
    text: str
    ends: bool = True
    ids: Optional["np.ndarray"] = field(default=None, compare=False, repr=False)
    spans: Optional[tuple[tuple[int, int], ...]] = None

    @property
    def size(self) -> int:
        """Its weight in a tokenizing buffer: characters, or ready ids."""
        return len(self.text) if self.ids is None else len(self.ids)


def stdlib_documents(max_bytes: int) -> list[Document]:
    """The running Python's standard-library sources (*.py), in sorted order, up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "/test" in f"/{rel}":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        docs.append(Document(rel, text))
        total += len(text.encode("utf-8"))
        if max_bytes and total >= max_bytes:
            _say_truncated(max_bytes, total, f"{len(docs)} standard-library files")
            break
    require(docs, f"no Python sources found under {root}")
    return docs


def _say_truncated(max_bytes: int, total: int, what: str) -> None:
    print(f"[prepare] read {what} ({total / 1e6:.2f} MB) and stopped at the --max-mb limit of {max_bytes / 1e6:g} MB; "
          "the rest of the source is left out (--max-mb 0 reads it all)", file=sys.stderr, flush=True)


def expand_paths(patterns: Sequence[str], flag: str) -> list[Path]:
    """The files that `patterns` (paths, globs, directories) name, in order; a UserError for one that is missing."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        require(matches, f"{flag} pattern {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                paths += sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            elif p.is_file():
                paths.append(p)
            else:
                raise UserError(f"input file {p} does not exist")
    require(paths, f"{flag} {' '.join(patterns)} names no file")
    return paths


class FileCorpus:
    """Documents from text files (one document each, read in pieces), .jsonl (the "text" field of each
    line) and .parquet (the "text" column), in sorted path order. A document is named by its path
    relative to the inputs' common directory (plus the line or row), so a corpus splits the same
    wherever it lies. `max_bytes`: stop after the first file that reaches it (0: read all)."""

    def __init__(self, patterns: Sequence[str], max_bytes: int = 0, flag: str = "--files"):
        require(patterns, f"--source files needs {flag} PATH [PATH ...]")
        self.patterns, self.max_bytes, self.flag = list(patterns), max_bytes, flag
        self.paths = expand_paths(patterns, flag)
        self.root = Path(os.path.commonpath([str(p.absolute().parent) for p in self.paths]))
        for path in self.paths:
            if path.suffix.lower() not in (".jsonl", ".parquet"):
                with open(path, "rb") as f:
                    require(b"\x00" not in f.read(8192),
                            f"input file {path} looks binary (NUL bytes): pass text, .jsonl or .parquet files")
        require(any(p.stat().st_size for p in self.paths), f"the input files {', '.join(patterns)} hold no text")
        self._said_truncated = False

    def files(self) -> list[dict]:
        """Each input file's absolute path and sha256 (what `metadata.json` records)."""
        return [{"path": str(p.absolute()), "sha256": sha256_file(p)} for p in self.paths]

    def __iter__(self) -> Iterator[Document]:
        total = 0
        for i, path in enumerate(self.paths):
            name = path.absolute().relative_to(self.root).as_posix()
            suffix = path.suffix.lower()
            docs = (_jsonl_documents(path, name) if suffix == ".jsonl" else
                    _parquet_documents(path, name) if suffix == ".parquet" else _text_pieces(path, name))
            for doc in docs:
                total += len(doc.text.encode("utf-8"))
                yield doc
            if self.max_bytes and total >= self.max_bytes:
                if i + 1 < len(self.paths) and not self._said_truncated:
                    _say_truncated(self.max_bytes, total, f"the first {i + 1} of {len(self.paths)} files")
                    self._said_truncated = True
                return


def _text_pieces(path: Path, name: str) -> Iterator[Document]:
    """A UTF-8 text file as pieces of about PIECE_CHARS characters, each cut after a newline when it has one."""
    carry, started = "", False
    with open(path, encoding="utf-8", newline="") as f:
        while True:
            try:
                block = f.read(PIECE_CHARS)
            except UnicodeDecodeError:
                raise UserError(f"input file {path} is not UTF-8 text: convert it to UTF-8") from None
            text = carry + block
            if not block:
                if text or started:
                    yield Document(name, text)  # the last piece ends the document (it may be empty)
                return
            cut = text.rfind("\n") + 1 or len(text)
            carry = text[cut:]
            if text[:cut]:
                started = True
                yield Document(name, text[:cut], ends=False)


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) of each non-blank line of a .jsonl file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{lineno} is not valid JSON") from None


def _jsonl_documents(path: Path, name: str) -> Iterator[Document]:
    for lineno, record in jsonl_records(path):
        require(
            isinstance(record, dict) and isinstance(record.get("text"), str),
            f"{path}:{lineno} has no string field 'text'",
        )
        if record["text"]:
            yield Document(f"{name}:{lineno}", record["text"])


def _parquet_documents(path: Path, name: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column("text").to_pylist():
            if text:
                yield Document(f"{name}:{row}", text)
            row += 1


def split_of(doc: Document, val_fraction: float) -> str:
    """"val" for a `val_fraction` of document names (by their sha256), else "train"."""
    digest = hashlib.sha256(doc.name.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "little") / 2**64 < val_fraction else "train"
