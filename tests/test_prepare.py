"""`ar-lm prepare`: explicit train/val/test files, word and character counts, streaming in bounded memory,
tokenizer processes, the sentencepiece training sample, and one-line errors on bad input."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ar_lm.cli import main
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.sources import PIECE_CHARS
from ar_lm.data.writer import LineSample


def _split_text(ds: TokenDataset, split: str) -> list[str]:
    """The split's documents, decoded."""
    tokens = np.concatenate(ds.shards(split))
    docs, start = [], 0
    for end in np.flatnonzero(tokens == ds.eos_id):
        docs.append(ds.tokenizer.decode(tokens[start:end].tolist()))
        start = end + 1
    return docs


def _write(directory: Path, name: str, text: str) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text, encoding="utf-8")
    return str(directory / name)


def test_explicit_splits_hold_exactly_their_files(tmp_path, capsys):
    train = [_write(tmp_path / "tr", f"t{i}.txt", f"the cat sat on mat {i}\nand ran\n" * 20) for i in range(3)]
    val = _write(tmp_path / "va", "valid.txt", "Zebra Quagga runs\n" * 5)  # Z, Q: characters train lacks
    test = _write(tmp_path / "te", "test.txt", "the dog ran ünïcode\n" * 4)
    out = tmp_path / "data"
    assert main(["prepare", "--source", "files", "--files", *train, "--val-files", val, "--test-files", test,
                 "--tokenizer", "char", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    ds = TokenDataset(out)
    assert _split_text(ds, "train") == [Path(p).read_text() for p in train]
    assert _split_text(ds, "val") == [Path(val).read_text()]
    assert _split_text(ds, "test") == [Path(test).read_text()]
    train_chars = set("".join(Path(p).read_text() for p in train))
    assert set(ds.tokenizer.chars) == train_chars and "Z" not in ds.tokenizer.chars  # trained on train only
    meta = ds.meta
    for split, paths in (("train", train), ("val", [val]), ("test", [test])):
        assert meta["source"]["files"][split] == [
            {"path": str(Path(p).absolute()), "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()}
            for p in paths]
        text = "".join(Path(p).read_text() for p in paths)
        info = meta["splits"][split]
        assert (info["words"], info["chars"], info["bytes"]) == (len(text.split()), len(text), len(text.encode()))
        assert printed["splits"][split]["words"] == info["words"]


def test_test_files_without_val_files_hash_split_the_rest(tmp_path, corpus_dir):
    test = _write(tmp_path / "te", "test.txt", "held out text\n" * 3)
    out = tmp_path / "data"
    assert main(["prepare", "--source", "files", "--files", str(corpus_dir), "--test-files", test,
                 "--val-fraction", "0.2", "--out", str(out)]) == 0
    meta = TokenDataset(out).meta
    assert list(meta["splits"]) == ["train", "val", "test"]
    assert meta["splits"]["test"]["documents"] == 1
    n_docs = len(list(corpus_dir.iterdir()))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == n_docs
    assert 0 < meta["splits"]["val"]["documents"] < n_docs


def test_tokenizer_from_another_dataset_scores_the_same_tokens(tmp_path, corpus_dir):
    base = tmp_path / "base"
    assert main(["prepare", "--source", "files", "--files", str(corpus_dir), "--tokenizer", "sentencepiece",
                 "--vocab-size", "300", "--out", str(base)]) == 0
    extra = _write(tmp_path / "web", "web.txt", "a web page about the red house\n" * 30)
    out = tmp_path / "web_data"  # a val split only: an eval set for runs on `base`
    assert main(["prepare", "--source", "files", "--val-files", extra, "--tokenizer-from", str(base),
                 "--out", str(out)]) == 0
    a, b = TokenDataset(base), TokenDataset(out)
    assert b.meta["tokenizer"] == a.meta["tokenizer"] and list(b.meta["splits"]) == ["val"]
    assert _split_text(b, "val") == [Path(extra).read_text()]
    assert b.meta["source"]["tokenizer_from"] == str(base)


def test_a_long_file_is_one_document_read_in_pieces(tmp_path):
    line = "a line of text, with ünïcode — and more\n"
    text = line * (2 * PIECE_CHARS // len(line) + 7) + "no newline at the end"
    path = _write(tmp_path / "in", "long.txt", text)
    out = tmp_path / "data"
    assert main(["prepare", "--source", "files", "--files", path, "--val-files", path, "--out", str(out)]) == 0
    ds = TokenDataset(out)
    assert _split_text(ds, "train") == [text]  # three pieces, one end-of-document token
    assert ds.meta["splits"]["train"]["words"] == len(text.split())


def test_tokenizer_processes_write_the_same_dataset(tmp_path):
    rng = np.random.default_rng(0)
    words = np.array("the cat dog sat on mat ran to a big red house ünï".split())
    corpus = tmp_path / "corpus"
    for i in range(6):
        _write(corpus, f"d{i}.txt", "\n".join(" ".join(rng.choice(words, 12)) for _ in range(1500)) + "\n")
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        assert main(["prepare", "--source", "files", "--files", str(corpus), "--tokenizer", "char", "--workers",
                     str(workers), "--buffer-mb", "0.2", "--out", str(outs[workers])]) == 0
    assert (outs[1] / "metadata.json").read_text() == (outs[2] / "metadata.json").read_text()
    assert len(json.loads((outs[1] / "metadata.json").read_text())["splits"]["train"]["shards"]) == 1


def _peak_rss_mb(args: list[str]) -> float:
    """Peak resident memory of `ar-lm ARGS` (and of its largest child), in MB, measured by the kernel."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "ar_lm", *args],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024


def test_streaming_prepare_stays_under_its_memory_cap(tmp_path):
    rng = np.random.default_rng(1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    big = 0
    for i in range(4):  # 4 files of 25 MB: each one document, read in pieces
        raw_RxW = rng.integers(ord("a"), ord("z") + 1, (500_000, 50), dtype=np.uint8)
        raw_RxW[:, 5::6] = ord(" ")
        raw_RxW[:, -1] = ord("\n")
        (corpus / f"part{i}.txt").write_bytes(raw_RxW.tobytes())
        big += raw_RxW.size
    tiny = _write(tmp_path / "tiny", "t.txt", "tiny corpus\n" * 50)
    buffer_mb = 8
    base = _peak_rss_mb(["prepare", "--source", "files", "--files", tiny, "--val-files", tiny,
                         "--out", str(tmp_path / "tiny_data")])
    args = ["prepare", "--source", "files", "--files", str(corpus), "--val-fraction", "0.25"]
    peak = _peak_rss_mb([*args, "--buffer-mb", str(buffer_mb), "--out", str(tmp_path / "streamed")])
    cap = base + 2 * buffer_mb  # the bound --buffer-mb states: text in flight, its tokens, the reader's pieces
    assert big / 1e6 > cap, "the corpus must be larger than the cap for the test to mean anything"
    assert peak < cap, f"peak RSS {peak:.0f} MB over the cap {cap:.0f} MB (interpreter alone: {base:.0f} MB)"
    in_memory = tmp_path / "in_memory"  # one chunk holds the whole corpus
    assert main([*args, "--buffer-mb", "1000", "--out", str(in_memory)]) == 0
    streamed_meta = (tmp_path / "streamed" / "metadata.json").read_text()
    assert streamed_meta == (in_memory / "metadata.json").read_text()  # every shard's sha256 included
    assert json.loads(streamed_meta)["splits"]["train"]["bytes"] + json.loads(streamed_meta)["splits"]["val"][
        "bytes"] == big


def test_line_sample_is_uniform_bounded_and_whole_when_small():
    small = LineSample(10_000)
    small.add("one\ntwo\n")
    small.add("three")
    assert small.texts() == ["one", "two", "three"]
    lines = [f"line {i:05d}" for i in range(20_000)]
    big = LineSample(20_000)
    for start in range(0, len(lines), 1000):
        big.add("\n".join(lines[start:start + 1000]))
    kept = big.texts()
    assert sum(len(t) + 1 for t in kept) <= 20_000 < sum(len(t) + 1 for t in lines)
    index = np.array([int(t.split()[1]) for t in kept])
    assert np.all(np.diff(index) > 0)  # in corpus order
    assert 0.4 < np.mean(index < 10_000) < 0.6  # both halves of the stream represented equally
    again = LineSample(20_000)
    for start in range(0, len(lines), 1000):
        again.add("\n".join(lines[start:start + 1000]))
    assert again.texts() == kept  # seeded


@pytest.mark.parametrize("args, message", [
    (["--source", "stdlib", "--val-files", "x.txt"], "--val-files and --test-files name files of --source files"),
    (["--source", "files", "--files", "{train}", "--test-files", "{missing}"], "--test-files pattern"),
    (["--source", "files", "--files", "{train}", "--buffer-mb", "0"], "--buffer-mb must be positive"),
    (["--source", "files", "--val-files", "{train}"], "--source files needs --files"),
    (["--source", "files", "--val-files", "{train}", "--tokenizer-from", "{train}", "--vocab-size", "9"],
     "drop it with --tokenizer-from"),
])
def test_bad_prepare_input_is_one_line(tmp_path, capsys, args, message):
    train = _write(tmp_path / "tr", "t.txt", "text\n" * 10)
    out = tmp_path / "out"
    args = [a.format(train=train, missing=str(tmp_path / "nope*.txt")) for a in args]
    assert main(["prepare", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))
