"""`ar-lm prepare`: read a source (standard library, files, a synthetic Markov chain, images or audio),
tokenize it, and write a dataset directory. Sweeps make their dataset the same way (`make_dataset`).

Files come with their splits (`val_files`, `test_files`: benchmark splits such as WikiText's
train/valid/test) or are split by a hash of each document's name (`val_fraction`); the tokenizer is
trained on the train split only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from ar_lm.data.chat import ChatCorpus, load_template
from ar_lm.data.dataset import TokenDataset, require_fresh_output
from ar_lm.data.media import MediaOptions, media_corpora, parse_size
from ar_lm.data.sources import FileCorpus, stdlib_documents, stdlib_root
from ar_lm.data.synthetic import synthetic_splits
from ar_lm.data.tokenizers import Tokenizer, check_tokenizer_args, with_specials
from ar_lm.data.writer import write_dataset
from ar_lm.errors import UserError, require

MEDIA_SOURCES = ("images", "audio")  # documents of intensity levels or mu-law codes (`ar_lm.data.media`)
SOURCES = ("stdlib", "files", "synthetic", "chat", *MEDIA_SOURCES)


def make_dataset(out: Path, source: str, tokenizer: str, vocab_size: int = 0, val_fraction: float = 0.05,
                 max_mb: float = 0.0, files: Sequence[str] = (), sp_model_type: str = "bpe",
                 synthetic_tokens: int = 2_000_000, synthetic_vocab: int = 32, synthetic_order: int = 3,
                 synthetic_branching: int = 4, seed: int = 0, val_files: Sequence[str] = (),
                 test_files: Sequence[str] = (), buffer_mb: float = 64.0, workers: int = 0,
                 tokenizer_from: str = "", media: MediaOptions | None = None, chat_template: str = "") -> dict:
    """Write the dataset directory `out` (see `write_dataset`) from `source`; returns its metadata.
    `max_mb` limits the train (or hash-split) input only: explicit val and test files are read whole.
    `tokenizer_from`: a dataset directory whose tokenizer to use (e.g. for `data.eval_sets`); then the
    train files may be left out. `media`: the options of --source images|audio. `chat_template`: --source chat's
    template (`ar_lm.data.chat.load_template`: a name or a tokenizer_config.json)."""
    require(0 < val_fraction < 1, f"--val-fraction must lie in (0, 1), got {val_fraction}: training evaluates on "
                                  "the val split")
    if source in MEDIA_SOURCES:
        return _make_media_dataset(Path(out), source, media or MediaOptions(), files, val_files, test_files,
                                   val_fraction, buffer_mb)
    require(media is None or media == MediaOptions(), f"--size, --channels, --bits, --npz, --sample-rate and --mu-law "
                                                       f"belong to --source images|audio, not --source {source}")
    require((source == "chat") == bool(chat_template), "--chat-template NAME|tokenizer_config.json goes with "
            f"--source chat (and only there), got --source {source}" + (" without it" if source == "chat" else ""))
    template = load_template(chat_template) if chat_template else None
    require(source in ("files", "chat") or not (val_files or test_files),
            f"--val-files and --test-files name files of --source files, not --source {source}: "
            "drop them or use --source files")
    existing = _existing_tokenizer(tokenizer_from, vocab_size) if tokenizer_from else None
    if existing is None:
        check_tokenizer_args(tokenizer, vocab_size)
    if template is not None:  # before reading the source
        _check_specials(template, existing, tokenizer)
    require_fresh_output(Path(out).absolute())  # before reading the source
    max_bytes = int(max_mb * 1e6)
    docs, splits, source_meta = (), {}, {"kind": source, **({"chat_template": template.to_json()} if template else {})}
    if tokenizer_from:
        source_meta["tokenizer_from"] = str(Path(tokenizer_from).absolute())
    if source == "stdlib":
        docs = stdlib_documents(max_bytes)
        source_meta["roots"] = {"train": str(stdlib_root())}  # the documents' names are relative to it
    elif source in ("files", "chat"):
        docs, splits = _file_streams(files, val_files, test_files, template, bool(existing), max_bytes, val_fraction,
                                     source_meta)
    elif source == "synthetic":
        splits, info = synthetic_splits(synthetic_tokens, val_fraction, synthetic_vocab, synthetic_order,
                                        synthetic_branching, seed)
        source_meta.update(info)
    else:
        raise UserError(f"source {source!r} is unknown: use one of {', '.join(SOURCES)}")
    meta = write_dataset(Path(out), docs, tokenizer, vocab_size, val_fraction, sp_model_type=sp_model_type,
                         source=source_meta, splits=splits, buffer_mb=buffer_mb, workers=workers, tokenizer=existing,
                         specials=template.specials if template else ())
    _say_chunked(meta)
    return meta


def _file_streams(files: Sequence[str], val_files: Sequence[str], test_files: Sequence[str], template, existing: bool,
                  max_bytes: int, val_fraction: float, source_meta: dict) -> tuple:
    """--source files|chat: (documents to hash-split, explicit splits); records the files in `source_meta`."""
    source, docs, splits = "files" if template is None else "chat", (), {}
    require(files or (existing and (val_files or test_files)),
            f"--source {source} needs --files PATH [PATH ...] (only --tokenizer-from allows val or test files "
            "alone)")
    corpus = FileCorpus if template is None else lambda paths, _, flag="--files": ChatCorpus(paths, template, flag)
    corpora = {"train": files and corpus(files, max_bytes),
               "val": val_files and corpus(val_files, 0, "--val-files"),
               "test": test_files and corpus(test_files, 0, "--test-files")}
    source_meta["files"] = {split: c.files() for split, c in corpora.items() if c}
    source_meta["roots"] = {split: str(c.root) for split, c in corpora.items() if hasattr(c, "root")}
    if val_files or not files:
        splits.update({split: c for split, c in corpora.items() if c})
    else:
        docs = corpora["train"]  # split by name hash into train and val
        splits.update({split: c for split, c in corpora.items() if c and split != "train"})
        source_meta.update(_chunk_for_split(docs, val_fraction))
    return docs, splits


def _chunk_for_split(corpus, val_fraction: float) -> dict:
    """Too few text files for a hash split (one corpus.txt): cut them into documents (`FileCorpus.chunk_for_split`);
    returns what metadata.json's source records: {"chunk_chars": N} or nothing."""
    chunk = corpus.chunk_for_split(val_fraction) if isinstance(corpus, FileCorpus) else 0
    return {"chunk_chars": chunk} if chunk else {}


def _say_chunked(meta: dict) -> None:
    """One line on stderr when the text files were cut into documents for the val split."""
    chunk, splits = meta["source"].get("chunk_chars"), meta["splits"]
    if chunk:
        n = len(meta["source"]["files"]["train"])
        print(f"[prepare] {n} text file{'s are' if n > 1 else ' is'} too few documents for a val split: cut "
              f"{'them' if n > 1 else 'it'} into {splits['train']['documents'] + splits['val']['documents']:,} "
              f"documents of about {chunk:,} characters at blank lines, {splits['val']['documents']:,} for val (listed "
              "in documents_val.txt; --val-files FILE keeps files whole)", file=sys.stderr, flush=True)


def _check_specials(template, existing: Tokenizer | None, kind: str) -> None:
    """The tokenizer (`existing`, or one of `kind` to train) must take the chat template's special tokens."""
    if existing is not None:
        with_specials(existing, template.specials, fixed=True)
    require(existing is not None or kind in ("byte", "char", "sentencepiece"), f"a {kind} tokenizer cannot take the "
            f"chat template's special tokens {', '.join(template.specials)}: use --tokenizer byte, char or sentencepiece")


def _make_media_dataset(out: Path, source: str, opts: MediaOptions, files: Sequence[str], val_files: Sequence[str],
                        test_files: Sequence[str], val_fraction: float, buffer_mb: float) -> dict:
    """Images or audio: documents by a hash of their names into train and val (or the files' own splits)."""
    require_fresh_output(out.absolute())
    corpora, tokenizer, meta = media_corpora(source, opts, {"train": files, "val": val_files, "test": test_files})
    source_meta = {"kind": source, "files": {split: c.files() for split, c in corpora.items()},
                   "roots": {split: str(c.root) for split, c in corpora.items() if hasattr(c, "root")}}
    docs, splits = (), dict(corpora)
    if "val" not in corpora and "train" in corpora:
        docs = splits.pop("train")  # split by name hash into train and val
    return write_dataset(out, docs, val_fraction=val_fraction, source=source_meta, splits=splits, buffer_mb=buffer_mb,
                         tokenizer=tokenizer, media=meta)


def _existing_tokenizer(data_dir: str, vocab_size: int) -> Tokenizer:
    require(not vocab_size, "--vocab-size belongs to a tokenizer trained here: drop it with --tokenizer-from")
    dataset = TokenDataset(data_dir)
    return dataset.tokenizer


def prepare_command(args) -> int:
    """`ar-lm prepare ...`: prints the output directory, vocabulary size and split sizes as JSON."""
    require(args.source != "synthetic" or args.tokenizer == "char",
            "--source synthetic uses --tokenizer char (one token per symbol)")
    require(args.source not in MEDIA_SOURCES or not (args.tokenizer or args.vocab_size or args.tokenizer_from
                                                     or args.max_mb),
            f"--tokenizer, --vocab-size, --tokenizer-from and --max-mb apply to text: --source {args.source} has its "
            "own tokens (intensity levels or mu-law codes)")
    require(args.workers >= 0, f"--workers must be >= 0 (0: one per core), got {args.workers}")
    media = MediaOptions(parse_size(args.size) if args.size is not None else None, args.channels, args.bits,
                         args.npz or "", args.npz_key or "", args.sample_rate, args.mu_law)
    meta = make_dataset(Path(args.out), args.source, args.tokenizer or "byte", args.vocab_size, args.val_fraction,
                        args.max_mb, args.files, args.sp_model_type, args.synthetic_tokens, args.synthetic_vocab,
                        args.synthetic_order, args.synthetic_branching, args.seed, args.val_files, args.test_files,
                        args.buffer_mb, args.workers, args.tokenizer_from or "", media, args.chat_template or "")
    splits = {k: {key: v[key] for key in ("tokens", "bytes", "documents", "words")} for k, v in meta["splits"].items()}
    print(json.dumps({"out": str(Path(args.out).absolute()), "vocab_size": meta["tokenizer"]["vocab_size"],
                      "splits": splits}))
    return 0
