"""Tokenized datasets: `TokenDataset` opens them (`ar_lm.data.writer.write_dataset` writes them).

A dataset directory holds::

    metadata.json          vocab size, tokenizer kind and checksum, per split: documents, tokens, UTF-8
                           bytes, characters, words, shards (and the split's input files with sha256); "vocab":
                           the --vocab-size requested and obtained (and why they differ)
    documents_val.txt ...  each split's document names, one a line, in order ("document_names"): paths relative
                           to source.roots (.jsonl/.parquet: "path:line"/"path:row"; cut text: "path#i lines a-b")
    tokenizer.model|json   the tokenizer (sentencepiece proto or JSON)
    train_00000.bin ...    token shards: flat little-endian uint16 (vocab <= 65536) or uint32
    val_00000.bin ...      (and test_00000.bin ... when the dataset has a test split)
    train_00000.mask.bin   chat datasets: the loss mask, one uint8 per token (1: the token is a target that
                           carries loss), listed as the shard's "mask" {"file", "sha256"}

Documents are separated by the tokenizer's end-of-document id. The pipeline packs a masked dataset's
"no loss" bit into bit `NO_LOSS_BIT` of its int32 token windows (`ar_lm.data.pipeline`), so a batch stays
one integer array; datasets without masks never set it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ar_lm.data.tokenizers import load_tokenizer
from ar_lm.errors import UserError, require
from ar_lm.io import atomic_write_json, sha256_file

FORMAT_VERSION = 1
NO_LOSS_BIT = 1 << 30  # set on a window token whose target position carries no loss (vocabularies stay < 2^30)


def require_fresh_output(out: Path) -> None:
    """A dataset is written only into a missing or empty directory."""
    require(not out.exists() or (out.is_dir() and not any(out.iterdir())),
            f"output directory {out} already exists and is not empty: choose another --out or remove it")


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

    @property
    def has_loss_mask(self) -> bool:
        """Whether the shards come with loss masks (chat data)."""
        return any("mask" in s for split in self.meta["splits"].values() for s in split["shards"])

    def mask_shards(self, split: str) -> list[np.ndarray] | None:
        """The split's loss masks (uint8, parallel to `shards`), or None for a dataset without masks."""
        if not self.has_loss_mask:
            return None
        return [np.memmap(self.path / s["mask"]["file"], dtype=np.uint8, mode="r", shape=(s["tokens"],))
                for s in self.split_info(split)["shards"] if s["tokens"] > 0]

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
            entries += [(s["mask"]["file"], s["tokens"], s["mask"]["sha256"]) for s in split["shards"] if "mask" in s]
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

    def identity(self) -> dict:
        """What makes two datasets the same data, wherever they lie: {"id": sha256 of the rest (16 hex digits),
        "tokenizer": the tokenizer file's sha256, "splits": {split: sha256 of its shards' (and masks') sha256s in
        order}}. Recorded in every run (RUN_DIR/data.json) and sweep (sweep.json) and compared wherever a dataset
        meets a run."""
        splits = {name: _digest([s["sha256"] + s.get("mask", {}).get("sha256", "") for s in split["shards"]])
                  for name, split in sorted(self.meta["splits"].items())}
        tokenizer = self.meta["tokenizer"]["sha256"]
        return {"id": _digest([tokenizer, *(f"{k}={v}" for k, v in splits.items())])[:16], "tokenizer": tokenizer,
                "splits": splits}

    def token_bytes(self) -> np.ndarray:
        return self.tokenizer.token_bytes()

    def token_chars(self) -> np.ndarray:
        return self.tokenizer.token_chars()


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def identity_difference(recorded: dict, current: dict) -> str:
    """'' when two `TokenDataset.identity()`s are the same data, else what differs (the tokenizer, or which
    splits)."""
    if recorded.get("tokenizer") != current.get("tokenizer"):
        return "another tokenizer"
    splits = sorted(set(recorded.get("splits", {})) | set(current.get("splits", {})))
    differ = [s for s in splits if recorded.get("splits", {}).get(s) != current.get("splits", {}).get(s)]
    return f"other {'/'.join(differ)} data" if differ else ""


def unigram_entropy_bits(dataset: TokenDataset, split: str = "train") -> float:
    """Entropy of the empirical unigram token distribution, in bits per token."""
    counts = np.zeros(dataset.vocab_size, np.int64)
    for shard in dataset.shards(split):
        counts += np.bincount(shard, minlength=dataset.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
