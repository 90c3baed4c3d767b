"""grain input pipelines over token shards: index-based, deterministic, resumable.

A record is a window of ``seq_len + 1`` tokens (inputs and shifted targets) starting at a
multiple of ``seq_len`` inside one shard. Training shuffles the record indices with a seed
(a fresh permutation every epoch) and repeats forever; batch j of the global batch B holds
records [j*B, (j+1)*B) of that order. Process p of P reads only records p, p+P, p+2P, ..., so
its local batch j is exactly its share of global batch j, and the union over processes is the
same global batch that a single process would read. The iterator state is grain's (a small
JSON dict), saved in every checkpoint, so a resumed run continues with exactly the next batch.

Evaluation reads a fixed set of val records (`eval_window_indices`): the whole split, or, when the token
budget (`train.eval_tokens`, 0: up to config.EVAL_TOKENS_CAP) allows fewer, a random subset spread over it,
seeded by `data.eval_seed` and independent of the batch size, so every run on a dataset scores the same windows.
Whole-split scoring (`strided_batches`) reads the split's shards as one token stream in sliding windows of
seq_len + 1 tokens at stride S, each scoring only the targets no earlier window scored, so every token but
the first is scored exactly once with at least seq_len - S tokens of context (the strided perplexity of
fixed-context models, as in Hugging Face's "Perplexity of fixed-length models").
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
from typing import Iterator

import grain
import numpy as np

from ar_lm.config import EVAL_TOKENS_CAP
from ar_lm.data.dataset import NO_LOSS_BIT, TokenDataset
from ar_lm.errors import require


def pack_loss_mask(tokens: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """int32 tokens with NO_LOSS_BIT set where `mask` is 0 (`mask` None: the tokens unchanged)."""
    tokens = np.asarray(tokens, dtype=np.int32)
    return tokens if mask is None else tokens | np.where(np.asarray(mask) == 0, NO_LOSS_BIT, 0).astype(np.int32)


class WindowSource:
    """grain random-access source: record i is tokens [i*L, i*L + L + 1) within one shard (with the loss mask
    packed in, `pack_loss_mask`, when `masks` are given)."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, masks: list[np.ndarray] | None = None):
        self.shards, self.masks = shards, masks
        self.seq_len = seq_len
        counts = [max(0, (len(s) - 1) // seq_len) for s in shards]
        self.starts = np.cumsum([0] + counts).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> np.ndarray:
        shard = bisect.bisect_right(self.starts, index) - 1
        offset = (index - self.starts[shard]) * self.seq_len
        window = slice(offset, offset + self.seq_len + 1)
        return pack_loss_mask(self.shards[shard][window], None if self.masks is None else self.masks[shard][window])


def require_split(dataset: TokenDataset, split: str) -> dict:
    """The split's metadata, or a UserError naming the splits the dataset has."""
    splits = dataset.meta["splits"]
    require(split in splits, f"dataset {dataset.path} has no {split!r} split (it has {', '.join(splits)}): "
            "use one of those, or prepare the data with that split (`ar-lm prepare --val-files/--test-files`)")
    return splits[split]


def _windows(dataset: TokenDataset, split: str, seq_len: int) -> WindowSource:
    require_split(dataset, split)
    source = WindowSource(dataset.shards(split), seq_len, dataset.mask_shards(split))
    require(
        len(source) > 0,
        f"the {split} split of {dataset.path} has fewer than {seq_len + 1} tokens: use more data or a smaller data.seq_len",
    )
    return source


def train_dataset(
    dataset: TokenDataset, seq_len: int, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
    """Infinite, shuffled batches [global_batch / process_count, seq_len + 1] for this process."""
    require(
        global_batch % process_count == 0,
        f"data.batch_size={global_batch} is not divisible by the {process_count} processes",
    )
    ds = grain.MapDataset.source(_windows(dataset, "train", seq_len)).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count]
    return ds.batch(global_batch // process_count, drop_remainder=True)


def split_windows(dataset: TokenDataset, split: str, seq_len: int) -> int:
    """Number of records (windows of seq_len target tokens) in `split`."""
    return len(_windows(dataset, split, seq_len))


def eval_window_indices(n_windows: int, seq_len: int, max_tokens: int, seed: int) -> np.ndarray:
    """Sorted record indices evaluated: the first k = ceil(tokens / seq_len) records (tokens = `max_tokens`,
    0: EVAL_TOKENS_CAP; at least 1, at most the split) of a permutation of the split seeded by `seed`
    (`data.eval_seed`). They depend on the dataset, the window length, the budget and that seed only, never on
    the batch size or the training seed, so every run on a dataset is scored on the same windows, and a
    smaller budget's windows are a subset of a larger one's."""
    k = min(n_windows, max(1, -(-(max_tokens or EVAL_TOKENS_CAP) // seq_len)))
    if k == n_windows:
        return np.arange(n_windows)
    rng = np.random.default_rng([seed, 0xE7A1])  # its own stream: not the init's or the data order's
    return np.sort(rng.permutation(n_windows)[:k])


def padding_window(seq_len: int) -> np.ndarray:
    """A window [seq_len + 1] whose targets all carry no loss (`NO_LOSS_BIT`): it fills a last eval batch and
    scores nothing."""
    return np.full(seq_len + 1, NO_LOSS_BIT, np.int32)


def eval_batches(
    dataset: TokenDataset,
    seq_len: int,
    global_batch: int,
    max_tokens: int,
    seed: int,
    split: str = "val",
    process_index: int = 0,
    process_count: int = 1,
) -> list[np.ndarray]:
    """This process's share of the fixed eval batches over the records `eval_window_indices` picks, in index
    order: global batch j holds picked records [j*B, (j+1)*B), the last one filled with `padding_window`s,
    process p every P-th of them from p."""
    source = _windows(dataset, split, seq_len)
    idx = eval_window_indices(len(source), seq_len, max_tokens, seed)
    idx = np.concatenate([idx, np.full(-len(idx) % global_batch, -1)])
    local = idx[process_index::process_count].reshape(len(idx) // global_batch, global_batch // process_count)
    pad = padding_window(seq_len)
    return [np.stack([source[int(i)] if i >= 0 else pad for i in row]) for row in local]


class TokenStream:
    """The shards of a split read as one token stream (with the loss mask packed in when `masks` are given)."""

    def __init__(self, shards: list[np.ndarray], masks: list[np.ndarray] | None = None):
        self.shards, self.masks = shards, masks
        self.starts = np.cumsum([0] + [len(s) for s in shards]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, min(stop, len)) as int32."""
        tokens = self._read(self.shards, start, stop).astype(np.int32)
        return tokens if self.masks is None else pack_loss_mask(tokens, self._read(self.masks, start, stop))

    def _read(self, arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        parts, shard = [], bisect.bisect_right(self.starts, start) - 1
        while start < min(stop, len(self)):
            offset = start - self.starts[shard]
            part = arrays[shard][offset : offset + stop - start]
            parts.append(part)
            start, shard = start + len(part), shard + 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def strided_windows(n_tokens: int, seq_len: int, stride: int) -> int:
    """Windows that score all targets 1..n_tokens-1 of a stream: window k holds tokens [kS, kS + L + 1),
    window 0 scores all its L targets and window k > 0 its last S, so K = 1 + ceil((n - 1 - L) / S)."""
    return 1 + max(0, -(-(n_tokens - 1 - seq_len) // stride))


def strided_window(stream: TokenStream, k: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Window k: tokens [L + 1] (zero-padded past the end) and target weights [L] (1: scored here)."""
    tokens = stream.read(k * stride, k * stride + seq_len + 1)
    first = 0 if k == 0 else seq_len - stride  # index of the first target this window scores
    weight = np.zeros(seq_len, np.float32)
    weight[first : len(tokens) - 1] = 1.0
    return np.pad(tokens, (0, seq_len + 1 - len(tokens))), weight


def strided_batches(
    dataset: TokenDataset,
    split: str,
    seq_len: int,
    stride: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's share of the whole split as (tokens [B/P, L+1], weights [B/P, L]) batches of strided
    windows (`strided_windows`); global batch j holds windows [j*B, (j+1)*B), process p every P-th from p;
    rows past the last window have weight 0."""
    require(0 < stride <= seq_len, f"--stride must be in [1, data.seq_len={seq_len}], got {stride}")
    require_split(dataset, split)
    stream = TokenStream(dataset.shards(split), dataset.mask_shards(split))
    require(len(stream) >= 2, f"the {split} split of {dataset.path} has fewer than 2 tokens: nothing to score")
    return _strided_rows(stream, seq_len, stride, global_batch, process_index, process_count)


def _strided_rows(stream: TokenStream, seq_len: int, stride: int, global_batch: int, pidx: int, pcount: int):
    n_windows = strided_windows(len(stream), seq_len, stride)
    empty = (np.zeros(seq_len + 1, np.int32), np.zeros(seq_len, np.float32))
    for start in range(0, n_windows, global_batch):
        rows = [strided_window(stream, k, seq_len, stride) if k < n_windows else empty
                for k in range(start + pidx, start + global_batch, pcount)]
        yield np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A named validation set: `data.eval_sets` entry "name=DATA_DIR[:split]" (split default val)."""

    name: str
    path: str
    split: str = "val"

    @staticmethod
    def parse(spec: str) -> "EvalSet":
        name, sep, rest = spec.partition("=")
        require(bool(sep and rest) and re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None,
                f"data.eval_sets entry {spec!r} is not name=DATA_DIR[:split] with a name of letters, digits, _ "
                "or -: write e.g. web=data/web:val")
        path, colon, split = rest.rpartition(":")
        return EvalSet(name, path, split) if colon and split and "/" not in split else EvalSet(name, rest)


def open_eval_sets(specs: tuple[str, ...], dataset: TokenDataset) -> list[tuple[EvalSet, TokenDataset]]:
    """Each `data.eval_sets` entry parsed and opened; a repeated name, a missing split or another tokenizer
    than `dataset`'s is a UserError."""
    sets = [EvalSet.parse(spec) for spec in specs]
    names = [s.name for s in sets]
    require(len(set(names)) == len(names) and "macro" not in names,
            f"data.eval_sets names must be unique and not 'macro', got {', '.join(names)}: rename them")
    opened = []
    for s in sets:
        other = TokenDataset(s.path)
        mine, theirs = dataset.meta["tokenizer"], other.meta["tokenizer"]
        require((mine["sha256"], mine["vocab_size"]) == (theirs["sha256"], theirs["vocab_size"]),
                f"eval set {s.name!r} ({other.path}) has another tokenizer ({theirs['kind']}, {theirs['vocab_size']} "
                f"tokens) than the run's data {dataset.path} ({mine['kind']}, {mine['vocab_size']} tokens): "
                "prepare it with the run's tokenizer")
        require_split(other, s.split)
        opened.append((s, other))
    return opened


class TrainIterator:
    """Iterator over training batches with `get_state()`/`set_state()` (JSON-serialisable) and
    background prefetch."""

    def __init__(self, ds: grain.MapDataset, prefetch: int = 2):
        options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=max(prefetch, 1))
        self._ds = ds.to_iter_dataset(options)
        self._it = iter(self._ds)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return next(self._it)

    def get_state(self) -> dict:
        return json.loads(json.dumps(self._it.get_state()))

    @staticmethod
    def initial_state() -> dict:
        """The state of any train iterator before its first batch (what a step-0 checkpoint holds)."""
        return TrainIterator(grain.MapDataset.range(1), prefetch=0).get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)
