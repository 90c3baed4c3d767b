"""`ar-lm prepare`: read a source (standard library, files, or a synthetic Markov chain), tokenize it,
and write a dataset directory. Sweeps make their dataset the same way (`make_dataset`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ar_lm.data.dataset import require_fresh_output, write_dataset
from ar_lm.data.sources import file_documents, stdlib_documents
from ar_lm.data.synthetic import synthetic_splits
from ar_lm.data.tokenizers import check_tokenizer_args
from ar_lm.errors import UserError, require

SOURCES = ("stdlib", "files", "synthetic")


def make_dataset(out: Path, source: str, tokenizer: str, vocab_size: int = 0, val_fraction: float = 0.05,
                 max_mb: float = 0.0, files: Sequence[str] = (), sp_model_type: str = "bpe",
                 synthetic_tokens: int = 2_000_000, synthetic_vocab: int = 32, synthetic_order: int = 3,
                 synthetic_branching: int = 4, seed: int = 0) -> dict:
    """Write the dataset directory `out` (see `write_dataset`) from `source`; returns its metadata."""
    require(0 < val_fraction < 1, f"--val-fraction must lie in (0, 1), got {val_fraction}: training evaluates on "
                                  "the val split")
    check_tokenizer_args(tokenizer, vocab_size)
    require_fresh_output(Path(out).absolute())  # before reading the source
    max_bytes = int(max_mb * 1e6)
    splits, source_meta = None, {"kind": source, "files": list(files)}
    if source == "stdlib":
        docs = stdlib_documents(max_bytes)
    elif source == "files":
        docs = file_documents(files, max_bytes)
    elif source == "synthetic":
        splits, source_meta = synthetic_splits(synthetic_tokens, val_fraction, synthetic_vocab,
                                               synthetic_order, synthetic_branching, seed)
        docs = splits["train"] + splits["val"]
    else:
        raise UserError(f"source {source!r} is unknown: use one of {', '.join(SOURCES)}")
    return write_dataset(Path(out), docs, tokenizer, vocab_size, val_fraction, sp_model_type=sp_model_type,
                         source=source_meta, splits=splits)


def prepare_command(args) -> int:
    """`ar-lm prepare ...`: prints the output directory, vocabulary size and split sizes as JSON."""
    require(args.source != "synthetic" or args.tokenizer == "char",
            "--source synthetic uses --tokenizer char (one token per symbol)")
    meta = make_dataset(Path(args.out), args.source, args.tokenizer, args.vocab_size, args.val_fraction, args.max_mb,
                        args.files, args.sp_model_type, args.synthetic_tokens, args.synthetic_vocab,
                        args.synthetic_order, args.synthetic_branching, args.seed)
    splits = {k: {"tokens": v["tokens"], "bytes": v["bytes"], "documents": v["documents"]}
              for k, v in meta["splits"].items()}
    print(json.dumps({"out": str(Path(args.out).absolute()), "vocab_size": meta["tokenizer"]["vocab_size"],
                      "splits": splits}))
    return 0
