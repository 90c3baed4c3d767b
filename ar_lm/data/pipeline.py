"""grain input pipelines over token shards: index-based, deterministic, resumable.

A record is a window of ``seq_len + 1`` tokens (inputs and shifted targets) starting at a
multiple of ``seq_len`` inside one shard. Training shuffles the record indices with a seed
(a fresh permutation every epoch) and repeats forever; batch j of the global batch B holds
records [j*B, (j+1)*B) of that order. Process p of P reads only records p, p+P, p+2P, ..., so
its local batch j is exactly its share of global batch j, and the union over processes is the
same global batch that a single process would read. The iterator state is grain's (a small
JSON dict), saved in every checkpoint, so a resumed run continues with exactly the next batch.

Evaluation reads a fixed set of val records (`eval_window_indices`): the whole split, or, when the token
budget (`train.eval_tokens`, 0: up to config.EVAL_TOKENS_CAP) allows fewer, a seeded random subset spread over it.
"""

from __future__ import annotations

import bisect
import json

import grain
import numpy as np

from ar_lm.config import EVAL_TOKENS_CAP
from ar_lm.data.dataset import TokenDataset
from ar_lm.errors import require


class WindowSource:
    """grain random-access source: record i is tokens [i*L, i*L + L + 1) within one shard."""

    def __init__(self, shards: list[np.ndarray], seq_len: int):
        self.shards = shards
        self.seq_len = seq_len
        counts = [max(0, (len(s) - 1) // seq_len) for s in shards]
        self.starts = np.cumsum([0] + counts).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> np.ndarray:
        shard = bisect.bisect_right(self.starts, index) - 1
        offset = (index - self.starts[shard]) * self.seq_len
        return np.asarray(self.shards[shard][offset : offset + self.seq_len + 1], dtype=np.int32)


def _windows(dataset: TokenDataset, split: str, seq_len: int) -> WindowSource:
    source = WindowSource(dataset.shards(split), seq_len)
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


def eval_window_indices(n_windows: int, seq_len: int, global_batch: int, max_tokens: int, seed: int) -> np.ndarray:
    """Sorted record indices evaluated: max(1, tokens // (global_batch * seq_len)) full batches, tokens =
    `max_tokens` (0: EVAL_TOKENS_CAP), at most all the full batches of the split. Fewer records than the split
    holds: a random subset seeded by `seed`, spread over the whole split. A split smaller than one global batch
    wraps around to fill one."""
    if n_windows < global_batch:
        return np.arange(global_batch) % n_windows
    n_batches = min(n_windows // global_batch, max(1, (max_tokens or EVAL_TOKENS_CAP) // (global_batch * seq_len)))
    if n_batches * global_batch == n_windows:
        return np.arange(n_windows)
    rng = np.random.default_rng([seed, 0xE7A1])  # its own stream: not the init's or the data order's
    return np.sort(rng.choice(n_windows, n_batches * global_batch, replace=False))


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
    order: global batch j holds picked records [j*B, (j+1)*B), process p every P-th of them from p."""
    source = _windows(dataset, split, seq_len)
    idx = eval_window_indices(len(source), seq_len, global_batch, max_tokens, seed)
    local = idx[process_index::process_count].reshape(len(idx) // global_batch, global_batch // process_count)
    return [np.stack([source[int(i)] for i in row]) for row in local]


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
