"""Benchmark-grade evaluation: whole-split strided scoring, the test split, bits per character, word
perplexity, the fixed eval subset across resumes, and several validation sets during training."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import final_params, tiny_config

from ar_lm.cli import main
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.pipeline import (
    EvalSet,
    WindowSource,
    eval_window_indices,
    open_eval_sets,
    strided_batches,
    strided_windows,
)
from ar_lm.data.sources import Document, FileCorpus
from ar_lm.data.tokenizers import train_tokenizer
from ar_lm.data.writer import write_dataset
from ar_lm.errors import UserError
from ar_lm.model.transformer import apply
from ar_lm.training.evaluate import evaluate_run
from ar_lm.training.loop import train
from ar_lm.training.rundir import load_run_config

L, B = 32, 8  # tiny_config's seq_len and batch
ACCENTED = "vu le chât dans la maison — 日 und Straße\n"


@pytest.fixture(scope="module")
def split_data(tmp_path_factory, corpus_dir):
    """Byte-level data with several shards per split: val holds 2 documents with multi-byte characters and
    its word count, test one 512-byte document (513 tokens: 16 whole windows, 2 batches)."""
    docs = [Document(f.name, f.read_text()) for f in sorted(corpus_dir.glob("*.txt"))]
    val = [Document(f"v{i}", ACCENTED + d.text + ACCENTED) for i, d in enumerate(docs[36:38])]
    splits = {"train": docs[:36], "val": val, "test": [Document("t", docs[39].text.replace("\n", " ")[:512])]}
    out = tmp_path_factory.mktemp("splits") / "data"
    meta = write_dataset(out, [], "byte", shard_tokens=300, splits=splits)
    assert meta["splits"]["val"]["words"] == sum(len(d.text.split()) for d in val)
    return out, val


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, split_data):
    cfg = tiny_config(split_data[0], train={"steps": 4, "eval_every": 2, "eval_tokens": 2 * B * L})
    run = tmp_path_factory.mktemp("split_run") / "run"
    train(cfg, run)
    return run


def _log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_token_chars_sum_to_the_character_count():
    text = "naïve café — 日本語 ✓ plain ascii\tand tabs\n"
    train_text = "the cat sat on the mat and then it ran\n" * 50
    for kind, vocab in (("byte", 0), ("char", 0), ("sentencepiece", 300)):
        tok = train_tokenizer(kind, [train_text], vocab)
        ids = tok.encode(text)
        assert tok.token_chars()[ids].sum() == len(text), kind
        assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8")), kind
        assert tok.token_chars()[tok.eos_id] == 0


def test_strided_windows_score_every_token_once_with_enough_context(split_data):
    ds = TokenDataset(split_data[0])
    stream = np.concatenate(ds.shards("val"))
    assert len(ds.shards("val")) == 2  # the stream crosses a shard boundary
    n = len(stream)
    for stride in (1, 5, 8, L):
        batches = list(strided_batches(ds, "val", L, stride, B))
        tokens = np.concatenate([t for t, _ in batches])
        weight = np.concatenate([w for _, w in batches])
        k_windows = strided_windows(n, L, stride)
        assert len(tokens) == -(-k_windows // B) * B and not weight[k_windows:].any()  # padding rows score nothing
        counts = np.zeros(n, int)
        for k in range(k_windows):
            window = stream[k * stride : k * stride + L + 1]
            np.testing.assert_array_equal(tokens[k, : len(window)], window)
            scored = np.flatnonzero(weight[k])  # target j (0-based) has j + 1 tokens of context
            assert scored.min() + 1 >= (1 if k == 0 else L - stride + 1), (stride, k)
            np.add.at(counts, k * stride + scored + 1, 1)
        assert counts[0] == 0 and np.all(counts[1:] == 1), stride
        parts = [list(strided_batches(ds, "val", L, stride, B, p, 2)) for p in range(2)]
        for j, (t, w) in enumerate(batches):  # two processes hold interleaved halves of the same batches
            np.testing.assert_array_equal(np.stack([parts[0][j][0], parts[1][j][0]], 1).reshape(t.shape), t)
            np.testing.assert_array_equal(np.stack([parts[0][j][1], parts[1][j][1]], 1).reshape(w.shape), w)


def test_stride_seq_len_equals_windowed_eval(split_data, split_run):
    ds = TokenDataset(split_data[0])
    assert len(WindowSource(ds.shards("test"), L)) == 2 * B  # the test split is exactly 2 batches of windows
    strided = evaluate_run(split_run, split="test", stride=L)
    windowed = evaluate_run(split_run, split="test", max_tokens=0)
    assert strided["eval_tokens"] == windowed["eval_tokens"] == 2 * B * L
    for key in ("loss", "stderr", "bits_per_byte", "bits_per_char"):
        assert strided[key] == pytest.approx(windowed[key], rel=1e-6), key
    assert (strided["split"], strided["stride"], strided["whole_split"]) == ("test", L, True)


def test_strided_loss_equals_brute_force_per_token_computation(split_data, split_run):
    data, val_docs = split_data
    stride = 8
    result = evaluate_run(split_run, split="val", stride=stride)
    cfg, params = load_run_config(split_run), final_params(split_run)
    stream = np.concatenate(TokenDataset(data).shards("val")).astype(np.int32)
    n = len(stream)
    nll_of, window_of = np.zeros(n), np.zeros(n, int)
    for p in range(1, n):  # each target from the window that scores it: the first start c with c + L >= p
        window_of[p] = 0 if p <= L else -(-(p - L) // stride) * stride
    starts = np.unique(window_of[1:])
    windows = np.stack([np.pad(stream[c : c + L], (0, max(0, c + L - n))) for c in starts])
    logp = _log_softmax64(apply(cfg.model, params, windows))  # [windows, L, V], model applied directly
    for i, c in enumerate(starts):
        for p in np.flatnonzero(window_of == c):
            if p > 0:
                assert (1 if c == 0 else L - stride) <= p - c <= L  # context length
                nll_of[p] = -logp[i, p - c - 1, stream[p]]
    nll = nll_of[1:].sum()
    assert result["eval_tokens"] == n - 1
    assert result["loss"] == pytest.approx(nll / (n - 1), rel=1e-5)
    texts = [d.text for d in val_docs]  # every byte but the first (an ASCII letter) is a scored target
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / (sum(len(t.encode()) for t in texts) - 1), rel=1e-5)
    assert result["bits_per_char"] == pytest.approx(nll / math.log(2) / (sum(len(t) for t in texts) - 1), rel=1e-5)
    assert result["bits_per_char"] > result["bits_per_byte"] * 1.01  # the multi-byte characters count once
    words = sum(len(t.split()) for t in texts)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    s = np.array([nll_of[window_of == c].sum() for c in starts])
    k_n = np.array([np.sum(window_of[1:] == c) for c in starts])
    se = math.sqrt(np.sum((s - nll / (n - 1) * k_n) ** 2) / (len(s) * (len(s) - 1))) / k_n.mean()
    assert result["stderr"] == pytest.approx(se, rel=1e-3)


def test_eval_cli_json_text_and_bad_input(split_data, split_run, byte_data, capsys):
    assert main(["eval", str(split_run), "--split", "test", "--stride", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "bits_per_byte", "bits_per_char", "stderr", "eval_tokens", "split", "run_dir",
            "step", "data", "stride", "word_perplexity"} <= set(out)
    assert out["eval_tokens"] == 512 and out["stride"] == 16 and out["step"] == 4
    words = TokenDataset(split_data[0]).split_info("test")["words"]
    assert out["word_perplexity"] == pytest.approx(math.exp(out["loss"] * 512 / words), rel=1e-9)
    assert main(["eval", str(split_run), "--batches", "1"]) == 0
    text = capsys.readouterr().out
    assert "seeded subset" in text and f"{B * L:,} tokens scored" in text and "bits/char" in text
    assert "word ppl" not in text  # a subset: not every word was scored
    cases = [
        (["--data", str(byte_data), "--split", "test"], "has no 'test' split"),
        (["--stride", "0"], "--stride must be in [1, data.seq_len=32], got 0"),
        (["--stride", "33"], "--stride must be in [1, data.seq_len=32], got 33"),
        (["--tokens", "256", "--stride", "8"], "--stride applies to whole-split scoring"),
        (["--all", "--tokens", "256"], "not allowed with argument"),
        (["--batches", "0"], "--batches must be >= 1"),
    ]
    for args, fragment in cases:
        assert main(["eval", str(split_run), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (args, err)


def test_eval_subset_covers_the_split_and_is_fixed_across_resumes_with_eval_sets(tmp_path, split_data, split_run,
                                                                                  byte_data):
    data = split_data[0]
    n_val = len(WindowSource(TokenDataset(data).shards("val"), L))
    idx = eval_window_indices(n_val, L, 2 * B * L, seed=0)
    assert len(idx) == 2 * B < n_val and idx.min() < n_val / 4 and idx.max() >= 3 * n_val / 4  # both quartiles
    sets = (f"web={byte_data}", f"held={data}:test")
    cfg = tiny_config(data, train={"steps": 4, "eval_every": 2, "eval_tokens": 2 * B * L},
                      data={"eval_sets": sets})
    train(cfg, tmp_path / "run", stop_after=2)
    summary = train(cfg, tmp_path / "run").summary  # resumed: the same val windows as the straight run
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (split_run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in records if r["split"] == "val"}
    assert sorted(val) == [2, 4]
    for r in (r for r in straight if r["split"] == "val"):
        assert val[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-6)
    by_split = {(r["split"], r["step"]): r for r in records if r["split"].startswith("val/")}
    assert set(by_split) == {(s, t) for s in ("val/web", "val/held", "val/macro") for t in (2, 4)}
    web = evaluate_run(tmp_path / "run", data_dir=byte_data, max_tokens=2 * B * L)
    held = evaluate_run(tmp_path / "run", split="test", max_tokens=2 * B * L)
    assert by_split["val/web", 4]["loss"] == pytest.approx(web["loss"], rel=1e-6)
    assert by_split["val/held", 4]["bpb"] == pytest.approx(held["bits_per_byte"], rel=1e-6)
    assert by_split["val/macro", 4]["loss"] == pytest.approx((web["loss"] + held["loss"]) / 2, rel=1e-6)
    assert summary["val_sets"]["macro"]["bpb"] == by_split["val/macro", 4]["bpb"]


def test_eval_sets_bad_input(tmp_path, split_data, corpus_dir, capsys):
    data = split_data[0]
    other = tmp_path / "chars"
    write_dataset(other, FileCorpus([str(corpus_dir)]), "char", val_fraction=0.1)
    ds = TokenDataset(data)
    assert EvalSet.parse(f"a-1={data}:test") == EvalSet("a-1", str(data), "test")
    assert EvalSet.parse(f"b={data}") == EvalSet("b", str(data), "val")
    for specs, fragment in [(("x y=d",), "is not name=DATA_DIR[:split]"), ((f"a={data}", f"a={data}"), "unique"),
                            ((f"a={data}:nope",), "has no 'nope' split")]:
        with pytest.raises(UserError, match=fragment.replace("[", r"\[")):
            open_eval_sets(specs, ds)
    args = ["train", str(Path(__file__).parents[1] / "experiments" / "tiny.py"), "--data", str(data), "--run-dir", str(tmp_path / "r"),
            "--set", f"data.eval_sets=ok={data},c={other}", "--set", "logging.wandb=false"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval set 'c'" in err[0] and "has another tokenizer" in err[0], err
    assert not (tmp_path / "r").exists()
