"""A newcomer's first `ar-lm prepare`: overlapping --files read once, the documents of each split listed, one big
corpus.txt cut into documents for a val split, and a --vocab-size that cannot be met said and recorded."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from ar_lm.cli import main
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.sources import PIECE_CHARS, Document, FileCorpus, split_of


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _paragraphs(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the cat dog sat on mat ran to a big red house and then slept in sun".split()
    paras = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(rng.randint(1, 6)))
             for _ in range(n)]
    return "\n\n".join(paras) + "\n"


def _docs(ds: TokenDataset, split: str) -> list[str]:
    tokens = np.concatenate(ds.shards(split))
    ends = np.flatnonzero(tokens == ds.eos_id)
    return [ds.tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]


def _names(out: Path, split: str) -> list[str]:
    meta = json.loads((out / "metadata.json").read_text())
    return (out / meta["splits"][split]["document_names"]).read_text(encoding="utf-8").splitlines()


def _one_line_error(capsys, args: list[str], out: Path) -> str:
    assert main(["prepare", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()
    return err[0]


def test_overlapping_globs_and_directories_read_each_file_once(tmp_path, capsys):
    a = _write(tmp_path / "corpus" / "docs" / "a.txt", "alpha text\n" * 20)
    b = _write(tmp_path / "corpus" / "docs" / "b.txt", "beta text\n" * 20)
    val = _write(tmp_path / "val.txt", "held out\n" * 5)
    out = tmp_path / "data"
    assert main(["prepare", "--source", "files", "--files", str(tmp_path / "corpus" / "**" / "*.txt"),
                 str(tmp_path / "corpus" / "docs"), a, "--val-files", val, "--out", str(out)]) == 0
    assert "--files: 3 file(s) named more than once" in capsys.readouterr().err
    meta = TokenDataset(out).meta
    assert [f["path"] for f in meta["source"]["files"]["train"]] == [str(Path(a).absolute()), str(Path(b).absolute())]
    assert meta["splits"]["train"]["documents"] == 2
    assert sorted(_docs(TokenDataset(out), "train")) == sorted(Path(p).read_text() for p in (a, b))


def test_each_split_lists_its_documents(tmp_path, corpus_dir):
    jl = _write(tmp_path / "extra" / "rows.jsonl", "".join(json.dumps({"text": f"row {i} text\n"}) + "\n"
                                                           for i in range(30)))
    out = tmp_path / "data"
    assert main(["prepare", "--source", "files", "--files", str(corpus_dir), jl, "--val-fraction", "0.2",
                 "--out", str(out)]) == 0
    meta = TokenDataset(out).meta
    corpus = FileCorpus([str(corpus_dir), jl])
    expected = {"train": [], "val": []}
    for doc in corpus:
        if doc.ends:  # a text file's last piece
            expected[split_of(doc, 0.2)].append(doc.name)
    for split in ("train", "val"):
        assert meta["splits"][split]["document_names"] == f"documents_{split}.txt"
        assert _names(out, split) == expected[split] and len(expected[split]) == meta["splits"][split]["documents"]
    root = Path(meta["source"]["roots"]["train"])  # the names are relative to it
    assert root.joinpath(expected["train"][0]).is_file()
    assert f"{Path(jl).relative_to(root)}:3" in expected["train"] + expected["val"]
    assert "chunk_chars" not in meta["source"]  # 41 files at 0.2: enough documents, files stay whole


def test_stdlib_splits_list_their_files(tmp_path):
    out = tmp_path / "data"
    assert main(["prepare", "--source", "stdlib", "--max-mb", "0.3", "--val-fraction", "0.2", "--out", str(out)]) == 0
    meta = TokenDataset(out).meta
    root = Path(meta["source"]["roots"]["train"])
    for split in ("train", "val"):
        names = _names(out, split)
        assert len(names) == meta["splits"][split]["documents"] and all((root / n).is_file() for n in names)
    assert {split_of(Document(n, ""), 0.2) for n in _names(out, "val")} == {"val"}


def test_one_big_corpus_txt_is_cut_into_documents_for_val(tmp_path, capsys):
    text = _paragraphs(3000)
    assert len(text) > PIECE_CHARS  # read in pieces too
    path = _write(tmp_path / "corpus.txt", text)
    outs = [tmp_path / "d1", tmp_path / "d2"]
    for out in outs:
        assert main(["prepare", "--source", "files", "--files", path, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 text file is too few documents for a val split: cut it into " in err and " for val (listed" in err
    assert (outs[0] / "metadata.json").read_text() == (outs[1] / "metadata.json").read_text()  # deterministic
    ds = TokenDataset(outs[0])
    chunk = ds.meta["source"]["chunk_chars"]
    assert chunk == max(len(text.encode()) // 1000, 1024)
    named = {}
    for split in ("train", "val"):
        assert ds.meta["splits"][split]["documents"] > 0
        named.update(zip(_names(outs[0], split), _docs(ds, split)))
    order = sorted(named, key=lambda n: int(n.split("#")[1].split()[0]))
    assert "".join(named[n] for n in order) == text  # the cut loses and repeats nothing
    assert all(named[n].endswith("\n\n") and chunk <= len(named[n]) <= 2 * chunk for n in order[:-1])
    first, second = order[0], order[1]
    lines = named[first].count("\n")
    assert first == f"corpus.txt#0 lines 1-{lines}" and second.startswith(f"corpus.txt#1 lines {lines + 1}-")


def test_text_without_newlines_is_still_cut(tmp_path):
    text = "x" * 5000 + "é" * 3001
    corpus = FileCorpus([_write(tmp_path / "one.txt", text)])
    corpus.chunk_chars = 1000
    docs = list(corpus)
    assert "".join(d.text for d in docs) == text and len({d.name for d in docs}) == len(docs) > 3


def test_a_file_too_small_to_cut_says_what_to_pass(tmp_path, capsys):
    path = _write(tmp_path / "tiny.txt", "just one short line\n")
    err = _one_line_error(capsys, ["--source", "files", "--files", path], tmp_path / "out")
    assert "too few documents for a val split (1 in all): pass --val-files FILE" in err


def test_an_unreachable_vocab_size_is_said_and_recorded(tmp_path, capsys):
    path = _write(tmp_path / "c" / "corpus.txt", _paragraphs(60))
    val = _write(tmp_path / "v.txt", _paragraphs(5, seed=1))
    for kind, asked in (("sentencepiece", 70000), ("char", 5000)):
        out = tmp_path / kind
        assert main(["prepare", "--source", "files", "--files", path, "--val-files", val, "--tokenizer", kind,
                     "--vocab-size", str(asked), "--out", str(out)]) == 0
        got = TokenDataset(out).vocab_size
        err = capsys.readouterr().err
        assert got < asked and f"--vocab-size {asked:,} asked; the {kind} tokenizer has {got:,} ids: " in err
        vocab = TokenDataset(out).meta["vocab"]
        assert (vocab["requested"], vocab["obtained"]) == (asked, got) and vocab["why"] in err
    assert "distinct characters" in vocab["why"]
    out = tmp_path / "exact"
    assert main(["prepare", "--source", "files", "--files", path, "--val-files", val, "--tokenizer", "sentencepiece",
                 "--vocab-size", "300", "--out", str(out)]) == 0
    assert "--vocab-size" not in capsys.readouterr().err
    assert TokenDataset(out).meta["vocab"] == {"requested": 300, "obtained": 300}


@pytest.mark.parametrize("kind, size, message", [
    ("sentencepiece", 100, "--vocab-size 100 is below the "),
    ("char", 200, "--vocab-size 200 leaves --tokenizer char no character ids"),
    ("byte", 300, "--vocab-size 300 does not apply to --tokenizer byte"),
])
def test_an_impossible_vocab_size_is_one_line(tmp_path, capsys, kind, size, message):
    path = _write(tmp_path / "corpus.txt", _paragraphs(60))
    err = _one_line_error(capsys, ["--source", "files", "--files", path, "--val-files", path, "--tokenizer", kind,
                                   "--vocab-size", str(size)], tmp_path / "out")
    assert message in err
    if kind == "sentencepiece":
        need = int(err.split("is below the ")[1].split()[0])
        assert f"use --vocab-size {need} or more" in err and need > 256
