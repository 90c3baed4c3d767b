"""Datasets and grain pipelines: metadata, checksums, deterministic resumable batches."""

import ast
import json

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ar_lm.config import EVAL_TOKENS_CAP
from ar_lm.data.dataset import NO_LOSS_BIT, TokenDataset
from ar_lm.data.pipeline import (TrainIterator, WindowSource, eval_batches, eval_window_indices, padding_window,
                                 train_dataset)
from ar_lm.data.sources import FileCorpus, split_of, stdlib_documents
from ar_lm.data.writer import write_dataset
from ar_lm.errors import UserError
from ar_lm.training.step import split_loss_mask


def test_metadata_counts_and_round_trip(byte_data, corpus_dir):
    ds = TokenDataset(byte_data)
    meta = json.loads((byte_data / "metadata.json").read_text())
    total_bytes = sum(len(p.read_bytes()) for p in corpus_dir.iterdir())
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == total_bytes
    for split in ("train", "val"):
        tokens = np.concatenate(ds.shards(split))
        assert tokens.size == meta["splits"][split]["tokens"]
        n_eos = int((tokens == ds.eos_id).sum())
        assert n_eos == meta["splits"][split]["documents"]


def _val_names(corpus) -> set[str]:
    return {d.name for d in corpus if split_of(d, 0.2) == "val"}


def test_split_is_deterministic_and_order_independent(corpus_dir):
    files = sorted(str(p) for p in corpus_dir.iterdir())
    a, b = _val_names(FileCorpus(files)), _val_names(FileCorpus(list(reversed(files))))
    assert a == b and a and a != {d.name for d in FileCorpus(files)}


def test_a_corpus_splits_the_same_wherever_it_lies(tmp_path, corpus_dir):
    import shutil

    copy = shutil.copytree(corpus_dir, tmp_path / "elsewhere" / "corpus")
    here, there = (_val_names(FileCorpus([str(d)])) for d in (corpus_dir, copy))
    assert here == there and here
    assert all(n.startswith("doc_") for n in here)  # named relative to the inputs' common directory


def test_stdlib_source_is_real_python():
    docs = stdlib_documents(200_000)
    names = [d.name for d in docs]
    assert names == sorted(names) and all(n.endswith(".py") for n in names)
    assert not any(n.startswith(("site-packages/", "dist-packages/")) or "/test" in f"/{n}" for n in names)
    for d in docs:
        ast.parse(d.text, filename=d.name)  # real Python source
    sizes = [len(d.text.encode("utf-8")) for d in docs]
    assert sum(sizes[:-1]) < 200_000 <= sum(sizes)  # stops at the first document past the cap


def test_output_dir_not_overwritten(byte_data, corpus_dir):
    before = (byte_data / "metadata.json").read_bytes()
    with pytest.raises(UserError, match="already exists and is not empty"):
        write_dataset(byte_data, FileCorpus([str(corpus_dir)]), "byte")
    assert (byte_data / "metadata.json").read_bytes() == before


def test_corrupt_shard_is_named(tmp_path, corpus_dir):
    out = tmp_path / "d"
    write_dataset(out, FileCorpus([str(corpus_dir)]), "byte", val_fraction=0.1)
    TokenDataset(out)  # verifies and caches
    shard = out / "train_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="train_00000.bin fails its checksum"):
        TokenDataset(out)
    shard.write_bytes(bytes(raw[:-10]))
    with pytest.raises(UserError, match="train_00000.bin is truncated"):
        TokenDataset(out)


def test_bad_sources(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="hold no text"):
        FileCorpus([str(empty)])
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(UserError, match="looks binary"):
        FileCorpus([str(binary)])
    with pytest.raises(UserError, match="matches no file"):
        FileCorpus([str(tmp_path / "nothing*.txt")])
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"text": "hello"}\n{"txt": 1}\n')
    with pytest.raises(UserError, match="x.jsonl:2 has no string field 'text'"):
        list(FileCorpus([str(jl)]))


def test_windows_cover_shards_without_crossing():
    shards = [np.arange(0, 50), np.arange(100, 121)]
    src = WindowSource(shards, seq_len=10)
    assert len(src) == 4 + 2
    np.testing.assert_array_equal(src[3], np.arange(30, 41))
    np.testing.assert_array_equal(src[4], np.arange(100, 111))


def test_grain_resume_yields_the_same_batches(byte_data):
    ds = TokenDataset(byte_data)
    make = lambda: TrainIterator(train_dataset(ds, 16, 4, seed=3), prefetch=2)  # noqa: E731
    straight = make()
    ref = [next(straight) for _ in range(12)]
    first = make()
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = make()
    resumed.set_state(state)
    for i in range(5, 12):
        np.testing.assert_array_equal(next(resumed), ref[i])


def test_initial_state_starts_at_the_first_batch(byte_data):
    ds = TokenDataset(byte_data)
    fresh = TrainIterator(train_dataset(ds, 16, 4, seed=3), prefetch=2)
    assert TrainIterator.initial_state() == fresh.get_state()
    moved = TrainIterator(train_dataset(ds, 16, 4, seed=3), prefetch=2)
    for _ in range(3):
        next(moved)
    moved.set_state(TrainIterator.initial_state())
    np.testing.assert_array_equal(next(moved), next(fresh))


def test_process_slices_union_is_the_global_batch(byte_data):
    ds = TokenDataset(byte_data)
    global_it = iter(train_dataset(ds, 16, 8, seed=1).to_iter_dataset())
    local = [iter(train_dataset(ds, 16, 8, seed=1, process_index=p, process_count=4).to_iter_dataset()) for p in range(4)]
    for _ in range(5):
        g = next(global_it)
        parts = [next(it) for it in local]
        assert all(p.shape == (2, 17) for p in parts)
        as_set = lambda a: sorted(map(tuple, a.tolist()))  # noqa: E731
        assert as_set(np.concatenate(parts)) == as_set(g)


def test_eval_batches_are_fixed_and_are_the_chosen_windows(byte_data):
    ds = TokenDataset(byte_data)
    a = eval_batches(ds, 16, 4, 3 * 4 * 16, seed=5)
    b = eval_batches(ds, 16, 4, 3 * 4 * 16, seed=5)  # a later evaluation of the same run
    assert len(a) == 3 and all(x.shape == (4, 17) for x in a)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    source = WindowSource(ds.shards("val"), 16)
    idx = eval_window_indices(len(source), 16, 3 * 4 * 16, seed=5)
    np.testing.assert_array_equal(np.concatenate(a), np.stack([source[int(i)] for i in idx]))
    parts = [eval_batches(ds, 16, 4, 3 * 4 * 16, seed=5, process_index=p, process_count=2) for p in range(2)]
    for j, g in enumerate(a):  # each process holds its share of the same global batches
        assert sorted(map(tuple, np.concatenate([parts[0][j], parts[1][j]]).tolist())) == sorted(map(tuple, g.tolist()))


def test_eval_windows_are_a_seeded_subset_spread_over_the_split():
    idx = eval_window_indices(1000, 16, 40 * 16, seed=0)
    assert len(idx) == 40 and len(set(idx.tolist())) == 40 and np.all(np.diff(idx) > 0)  # distinct, sorted
    assert idx.max() >= 750 and idx.min() < 250  # from the whole split, not its first windows
    np.testing.assert_array_equal(idx, eval_window_indices(1000, 16, 40 * 16, seed=0))
    assert not np.array_equal(idx, eval_window_indices(1000, 16, 40 * 16, seed=1))
    assert len(eval_window_indices(1000, 16, 40 * 16 + 1, seed=0)) == 41  # every token of the budget
    assert len(eval_window_indices(1000, 16, 1, seed=0)) == 1  # at least one window
    assert set(idx.tolist()) <= set(eval_window_indices(1000, 16, 80 * 16, seed=0).tolist())  # nested budgets


def test_eval_windows_whole_split_and_cap():
    np.testing.assert_array_equal(eval_window_indices(12, 16, 0, seed=0), np.arange(12))  # 0: all
    np.testing.assert_array_equal(eval_window_indices(12, 16, 10**6, seed=0), np.arange(12))
    np.testing.assert_array_equal(eval_window_indices(14, 16, 0, seed=0), np.arange(14))  # no batch rounding
    capped = eval_window_indices(10**6, 16, 0, seed=0)
    assert len(capped) * 16 == EVAL_TOKENS_CAP and capped.max() > 750_000


def test_every_batch_size_scores_the_same_val_windows(byte_data):
    """Issue 34.2: the scored windows depended on data.batch_size and train.seed (9% overlap between batch 16
    and 48); now a budget picks the same windows for every batch size, the last batch padded with windows
    that score nothing."""
    ds, budget = TokenDataset(byte_data), 10 * 16

    def scored(batch: int) -> list[tuple]:
        rows = np.concatenate(eval_batches(ds, 16, batch, budget, seed=0))
        assert len(rows) % batch == 0
        return sorted(map(tuple, rows[~np.all((rows & NO_LOSS_BIT) != 0, axis=1)].tolist()))

    windows = scored(4)
    assert len(windows) == 10 and scored(3) == windows and scored(16) == windows
    pad = np.concatenate(eval_batches(ds, 16, 16, budget, seed=0))[10:]
    assert np.all(pad == padding_window(16))


def test_padding_windows_score_nothing(byte_data):
    """The rows that fill the last eval batch carry no target weight (a split smaller than one batch used to wrap
    around and count some windows twice)."""
    ds = TokenDataset(byte_data)
    (batch,) = eval_batches(ds, 16, 8, 3 * 16, seed=0)
    tokens, weights = split_loss_mask(jnp.asarray(batch))
    assert float(weights[:3].sum()) == 3 * 16 and float(weights[3:].sum()) == 0.0


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=80), min_size=1, max_size=5),
    seq_len=st.integers(min_value=1, max_value=20),
)
def test_property_windows(lengths, seq_len):
    shards = [np.arange(n) + 1000 * i for i, n in enumerate(lengths)]
    src = WindowSource(shards, seq_len)
    assert len(src) == sum(max(0, (n - 1) // seq_len) for n in lengths)
    for i in range(len(src)):
        w = src[i]
        assert w.shape == (seq_len + 1,)
        assert np.all(np.diff(w) == 1)  # contiguous and within one shard
