"""Tokenized datasets: `write_dataset` writes them, `TokenDataset` opens them.

A dataset directory holds::

    metadata.json          vocab size, tokenizer kind and checksum, per-split token/byte counts, shards
    tokenizer.model|json   the tokenizer (sentencepiece proto or JSON)
    train_00000.bin ...    token shards: flat little-endian uint16 (vocab <= 65536) or uint32
    val_00000.bin ...

Documents are separated by the tokenizer's end-of-document id.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ar_lm.data.sources import Document, split_documents
from ar_lm.data.tokenizers import Tokenizer, load_tokenizer, train_tokenizer
from ar_lm.errors import UserError, require
from ar_lm.io import atomic_write_json, sha256_file

FORMAT_VERSION = 1


def require_fresh_output(out: Path) -> None:
    """A dataset is written only into a missing or empty directory."""
    require(not out.exists() or (out.is_dir() and not any(out.iterdir())),
            f"output directory {out} already exists and is not empty: choose another --out or remove it")


def write_dataset(
    out: Path,
    docs: list[Document],
    tokenizer_kind: str,
    vocab_size: int = 0,
    val_fraction: float = 0.05,
    shard_tokens: int = 1 << 24,
    sp_model_type: str = "bpe",
    source: dict | None = None,
    splits: dict[str, list[Document]] | None = None,
) -> dict:
    """Tokenize `docs` (split by name hash, or the given `splits`) into a dataset directory at
    `out`, which must not exist or be empty."""
    out = Path(out).absolute()
    require_fresh_output(out)
    splits = splits or split_documents(docs, val_fraction)
    tokenizer = train_tokenizer(tokenizer_kind, [d.text for d in splits["train"]], vocab_size, sp_model_type)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        tok_path = tokenizer.save(tmp)
        meta = {
            "format": FORMAT_VERSION,
            "tokenizer": {
                "kind": tokenizer.kind,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "file": tok_path.name,
                "sha256": sha256_file(tok_path),
            },
            "dtype": np.dtype(dtype).name,
            "source": source or {},
            "splits": {},
        }
        for split, split_docs in splits.items():
            meta["splits"][split] = _write_split(tmp, split, split_docs, tokenizer, dtype, shard_tokens)
        atomic_write_json(tmp / "metadata.json", meta)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _encode_all(tokenizer: Tokenizer, texts: list[str]) -> Iterator[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    for start in range(0, len(texts), 256):
        chunk = texts[start : start + 256]
        yield from (batch(chunk) if batch else [tokenizer.encode(t) for t in chunk])


def _write_split(directory: Path, split: str, docs: list[Document], tokenizer, dtype, shard_tokens: int) -> dict:
    shards, buffer, n_bytes, n_tokens = [], [], 0, 0

    def flush():
        nonlocal buffer
        if not buffer:
            return
        path = directory / f"{split}_{len(shards):05d}.bin"
        arr = np.concatenate(buffer).astype(dtype)
        arr.tofile(path)
        shards.append({"file": path.name, "tokens": int(arr.size), "sha256": sha256_file(path)})
        buffer = []

    pending = 0
    for doc, ids in zip(docs, _encode_all(tokenizer, [d.text for d in docs])):
        ids.append(tokenizer.eos_id)
        buffer.append(np.asarray(ids, np.int64))
        pending += len(ids)
        n_tokens += len(ids)
        n_bytes += len(doc.text.encode("utf-8"))
        if pending >= shard_tokens:
            flush()
            pending = 0
    flush()
    return {"documents": len(docs), "tokens": n_tokens, "bytes": n_bytes, "shards": shards}


class TokenDataset:
    """An opened dataset directory: metadata, tokenizer, and memory-mapped token shards.

    Shard sizes are checked on every open; sha256 checksums are verified once and remembered in
    ``.verified.json`` (keyed by size and mtime), so large datasets are not re-hashed each time.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path).absolute()
        require(bool(str(path)), "no dataset given: pass --data DATA_DIR (made by `ar-lm prepare`)")
        meta_path = self.path / "metadata.json"
        require(self.path.is_dir(), f"dataset directory {self.path} does not exist: create it with `ar-lm prepare`")
        require(meta_path.is_file(), f"{self.path} is not an ar_lm dataset (no metadata.json): create it with `ar-lm prepare`")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{meta_path} is corrupt (not JSON): re-create the dataset with `ar-lm prepare`") from None
        require(self.meta.get("format") == FORMAT_VERSION, f"{meta_path} has an unsupported format version")
        tok = self.meta["tokenizer"]
        self.vocab_size: int = tok["vocab_size"]
        self.eos_id: int = tok["eos_id"]
        self.dtype = np.dtype(self.meta["dtype"])
        if verify:
            self.verify()
        self.tokenizer = load_tokenizer(self.path, tok["kind"])

    def split_info(self, split: str) -> dict:
        require(split in self.meta["splits"], f"dataset {self.path} has no {split!r} split")
        return self.meta["splits"][split]

    def shards(self, split: str) -> list[np.ndarray]:
        return [
            np.memmap(self.path / s["file"], dtype=self.dtype, mode="r", shape=(s["tokens"],))
            for s in self.split_info(split)["shards"]
            if s["tokens"] > 0
        ]

    def verify(self) -> None:
        """Raise UserError naming the first shard (or tokenizer file) that is missing or altered."""
        cache_path = self.path / ".verified.json"
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
        tok = self.meta["tokenizer"]
        entries = [(tok["file"], None, tok["sha256"])]
        for split in self.meta["splits"].values():
            entries += [(s["file"], s["tokens"] * self.dtype.itemsize, s["sha256"]) for s in split["shards"]]
        changed = False
        for name, size, digest in entries:
            file = self.path / name
            require(file.is_file(), f"dataset file {file} is missing: re-create the dataset with `ar-lm prepare`")
            st = file.stat()
            if size is not None and st.st_size != size:
                raise UserError(
                    f"dataset shard {file} is truncated or altered ({st.st_size} bytes, expected {size}): re-create the dataset"
                )
            stamp = [st.st_size, st.st_mtime_ns, digest]
            if cache.get(name) == stamp:
                continue
            if sha256_file(file) != digest:
                raise UserError(f"dataset file {file} fails its checksum (altered or corrupt): re-create the dataset")
            cache[name] = stamp
            changed = True
        if changed:
            try:
                atomic_write_json(cache_path, cache)
            except OSError:
                pass  # read-only dataset: verify again next time

    def token_bytes(self) -> np.ndarray:
        return self.tokenizer.token_bytes()


def unigram_entropy_bits(dataset: TokenDataset, split: str = "train") -> float:
    """Entropy of the empirical unigram token distribution, in bits per token."""
    counts = np.zeros(dataset.vocab_size, np.int64)
    for shard in dataset.shards(split):
        counts += np.bincount(shard, minlength=dataset.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
