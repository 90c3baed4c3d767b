"""Text sources for `ar-lm prepare`: documents from the standard library or from files, split by name.

Each document goes to val or train by a hash of its name, so the split is deterministic and
independent of file order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ar_lm.errors import UserError, require

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


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


def _expand(patterns: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        require(matches, f"--files pattern {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                paths += sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            elif p.is_file():
                paths.append(p)
            else:
                raise UserError(f"input file {p} does not exist")
    return paths


def file_documents(patterns: Sequence[str], max_bytes: int = 0) -> list[Document]:
    """Documents from text files (one document each), .jsonl (the "text" field of each line)
    and .parquet (the "text" column). A document is named by its path relative to the inputs'
    common directory (plus the line or row), so a corpus splits the same wherever it lies."""
    require(patterns, "--source files needs --files PATH [PATH ...]")
    docs, total, paths = [], 0, _expand(patterns)
    root = Path(os.path.commonpath([str(p.absolute().parent) for p in paths])) if paths else Path(".")
    for i, path in enumerate(paths):
        start = len(docs)
        suffix = path.suffix.lower()
        name = path.absolute().relative_to(root).as_posix()
        if suffix == ".jsonl":
            docs += _jsonl_documents(path, name)
        elif suffix == ".parquet":
            docs += _parquet_documents(path, name)
        else:
            raw = path.read_bytes()
            if b"\x00" in raw[:8192]:
                raise UserError(f"input file {path} looks binary (NUL bytes): pass text, .jsonl or .parquet files")
            try:
                docs.append(Document(name, raw.decode("utf-8")))
            except UnicodeDecodeError as e:
                raise UserError(f"input file {path} is not UTF-8 text (bad byte at offset {e.start})") from None
        total += sum(len(d.text.encode("utf-8")) for d in docs[start:])
        if max_bytes and total >= max_bytes:
            if i + 1 < len(paths):
                _say_truncated(max_bytes, total, f"the first {i + 1} of {len(paths)} files")
            break
    docs = [d for d in docs if d.text]
    require(docs, f"the input files {', '.join(patterns)} hold no text")
    return docs


def _jsonl_documents(path: Path, name: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{lineno} is not valid JSON") from None
            require(
                isinstance(record, dict) and isinstance(record.get("text"), str),
                f"{path}:{lineno} has no string field 'text'",
            )
            docs.append(Document(f"{name}:{lineno}", record["text"]))
    return docs


def _parquet_documents(path: Path, name: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path, columns=["text"])
    return [Document(f"{name}:{i}", t) for i, t in enumerate(table.column("text").to_pylist()) if t]


def split_of(doc: Document, val_fraction: float) -> str:
    digest = hashlib.sha256(doc.name.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "little") / 2**64 < val_fraction else "train"


def split_documents(docs: list[Document], val_fraction: float) -> dict[str, list[Document]]:
    splits = {s: [] for s in SPLITS}
    for doc in docs:
        splits[split_of(doc, val_fraction)].append(doc)
    if val_fraction > 0 and not splits["val"] and len(splits["train"]) > 1:
        splits["val"].append(splits["train"].pop())  # tiny corpora: keep one document for val
    require(splits["train"], "the source has too few documents for a train split: add data or lower --val-fraction")
    require(splits["val"] or val_fraction == 0, "the source has too few documents for a val split")
    return splits
