"""Text sources for `ar-lm prepare`: documents from the standard library or from files.

A corpus is re-iterable (`prepare` reads it twice: once to train the tokenizer and count, once to
tokenize) and streamed: a long text file comes in pieces of about `PIECE_CHARS` characters cut after a
newline, only the last piece ending the document (`Document.ends`). Without explicit split files, each
document goes to val or train by a hash of its name, so the split is deterministic and independent of
file order; text files too few for that (one corpus.txt) are cut into documents at blank lines first.
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
CHUNK_DOCUMENTS = 1000  # a hash split of too few text files cuts them into about this many documents,
CHUNK_MIN_CHARS, CHUNK_MAX_CHARS = 1 << 10, 1 << 20  # each of this many characters at least and at most


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


def stdlib_root() -> Path:
    """The running Python's standard-library directory (what stdlib documents are named relative to)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(max_bytes: int) -> list[Document]:
    """The running Python's standard-library sources (*.py), in sorted order, up to `max_bytes`."""
    root = stdlib_root()
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
    """The files that `patterns` (paths, globs, directories) name, in order, each once (by resolved path: globs
    and directories may overlap; says how many repeats it dropped); a UserError for one that is missing."""
    paths: list[Path] = []
    seen: set[Path] = set()
    repeats = 0
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        require(matches, f"{flag} pattern {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            elif p.is_file():
                found = [p]
            else:
                raise UserError(f"input file {p} does not exist")
            for q in found:
                key = q.resolve()
                repeats += key in seen
                if key not in seen:
                    seen.add(key)
                    paths.append(q)
    require(paths, f"{flag} {' '.join(patterns)} names no file")
    if repeats:
        print(f"[prepare] {flag}: {repeats} file(s) named more than once (overlapping globs or directories) are read "
              f"once: {len(paths)} files", file=sys.stderr, flush=True)
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
        self.chunk_chars = 0  # > 0: text files come as documents of about this many characters (`chunk_for_split`)

    def chunk_for_split(self, val_fraction: float) -> int:
        """Cut text files into documents (`chunk_chars`, returned; 0: not) when they are too few for a hash split
        to give val two documents on average (e.g. one big corpus.txt) and hold two chunks at least. Deterministic:
        the chunk size follows the text's size (about CHUNK_DOCUMENTS chunks); .jsonl and .parquet hold their own
        documents."""
        if len(self.paths) * val_fraction >= 2 or any(p.suffix.lower() in (".jsonl", ".parquet") for p in self.paths):
            return 0
        size = sum(p.stat().st_size for p in self.paths)
        size = min(size, self.max_bytes) if self.max_bytes else size
        if size < 2 * CHUNK_MIN_CHARS:
            return 0  # too little text to cut in two: the split says what to pass
        self.chunk_chars = min(max(size // CHUNK_DOCUMENTS, CHUNK_MIN_CHARS), CHUNK_MAX_CHARS)
        return self.chunk_chars

    def files(self) -> list[dict]:
        """Each input file's absolute path and sha256 (what `metadata.json` records)."""
        return [{"path": str(p.absolute()), "sha256": sha256_file(p)} for p in self.paths]

    def __iter__(self) -> Iterator[Document]:
        total = 0
        for i, path in enumerate(self.paths):
            name = path.absolute().relative_to(self.root).as_posix()
            suffix = path.suffix.lower()
            docs = (_jsonl_documents(path, name) if suffix == ".jsonl" else
                    _parquet_documents(path, name) if suffix == ".parquet" else
                    _text_chunks(path, name, self.chunk_chars) if self.chunk_chars else _text_pieces(path, name))
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


def _text_chunks(path: Path, name: str, chunk_chars: int) -> Iterator[Document]:
    """A text file as documents of about `chunk_chars` characters, each named by its index and lines ("a.txt#3
    lines 120-168"): cut after the first blank line at or past `chunk_chars`, else after a line, else anywhere."""
    buf, index, line = "", 0, 1
    for piece in _text_pieces(path, name):
        buf += piece.text
        pos = 0
        while len(buf) - pos >= 2 * chunk_chars or (piece.ends and pos < len(buf)):
            stop = _chunk_end(buf, pos, chunk_chars, piece.ends)
            text = buf[pos:stop]
            newlines = text.count("\n")
            last = line + newlines - (text.endswith("\n") and newlines > 0)
            yield Document(f"{name}#{index} lines {line}-{last}", text)
            index, line, pos = index + 1, line + newlines, stop
        buf = buf[pos:]


def _chunk_end(text: str, start: int, chunk_chars: int, final: bool) -> int:
    """Where the chunk from `start` ends: after a blank line in [start + chunk, start + 2 chunk), else after a
    newline there, else at start + 2 chunk; the file's last stretch (`final`, under 2 chunks) ends at its end
    unless a blank line cuts it."""
    lo, hi = start + chunk_chars, min(start + 2 * chunk_chars, len(text))
    for sep in ("\n\n",) if final and hi == len(text) else ("\n\n", "\n"):
        i = text.find(sep, lo, hi)
        if i >= 0:
            return i + len(sep)
    return hi


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
