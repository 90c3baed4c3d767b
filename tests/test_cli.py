"""The `ar-lm` command line: end to end, and one-line errors (exit 2, nothing changed) on bad input."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ar_lm.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "tiny.py")
FAST = ["--set", "train.steps=4", "--set", "train.eval_tokens=256", "--set", "model.d_model=32", "--set",
        "data.seq_len=32", "--set", "data.batch_size=8", "--set", "mesh.devices=1", "--set", "logging.wandb=false",
        "--set", "train.checkpoint_every=2"]


def tree_hashes(path: Path) -> dict:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, byte_data):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", TINY, "--data", str(byte_data), "--run-dir", str(run), *FAST]) == 0
    return run


def test_end_to_end_subprocess(tmp_path, corpus_dir):
    cache = tmp_path / "jax_cache"
    env = {**os.environ, "WANDB_MODE": "offline", "XLA_FLAGS": "", "AR_LM_COMPILE_CACHE": str(cache)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "ar_lm", "prepare", "--source", "files", "--files", str(corpus_dir),
                    "--tokenizer", "sentencepiece", "--vocab-size", "320", "--out", str(data)], check=True, env=env)
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "ar_lm", "train", TINY, "--data", str(data), "--run-dir", str(run),
                          *FAST[:-6], "--set", "logging.wandb=true"],
                         check=True, env=env, capture_output=True, text=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["step"] == 4
    assert summary["xla_flags"] == ""  # recorded: on CPU none of ours (the GPU set goes only where CUDA is)
    for name in ("config.json", "metrics.jsonl", "summary.json", "tokenizer/tokenizer.model"):
        assert (run / name).is_file(), name
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run files"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(records[0])
    assert list(cache.iterdir()), "the persistent compilation cache holds the compiled train step"
    ev = subprocess.run([sys.executable, "-m", "ar_lm", "eval", str(run), "--tokens", "256", "--json"], check=True,
                        env=env, capture_output=True, text=True)  # training's eval budget: its windows
    result = json.loads(ev.stdout)
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert result["bits_per_byte"] > 0


def test_rerun_of_finished_run_changes_nothing(trained_run, byte_data, capsys):
    before = tree_hashes(trained_run)
    assert main(["train", TINY, "--data", str(byte_data), "--run-dir", str(trained_run), *FAST]) == 0
    assert tree_hashes(trained_run) == before


BAD_TRAIN = [
    (["--set", "model.n_layrs=3"], "did you mean model.n_layers"),
    (["--set", "model.n_layers=three"], "expects an integer"),
    (["--set", "model.n_heads=5"], "not divisible by model.n_heads"),
    (["--set", "model.n_kv_heads=3"], "not divisible by model.n_kv_heads"),
    (["--set", "mesh.data=3"], "does not match the 1 devices"),
    (["--set", "mesh.devices=0", "--set", "mesh.fsdp=3"], "do not divide the 8 devices"),
    (["--set", "mesh.rules=zigzag"], "mesh.rules='zigzag' is unknown"),
    (["--set", "mesh.rule_overrides=mlp=pipeline"], "unknown mesh axis 'pipeline'"),
    (["--set", "mesh.rule_overrides=mpl=tensor"], "names unknown logical axis 'mpl'"),
    (["--set", "train.log_every=0"], "train.log_every must be >= 1, got 0"),
    (["--set", "train.eval_every=-5"], "train.eval_every must be >= 0"),
    (["--set", "train.eval_tokens=-1"], "train.eval_tokens must be >= 0 (0: the whole split, up to EVAL_TOKENS_CAP="),
    (["--set", "optim.warmup_frac=1.5"], "optim.warmup_frac must be in [0, 1)"),
    (["--set", "optim.b2=1"], "optim.b2 must be in [0, 1)"),
    (["--set", "train.max_skips=-1"], "train.max_skips must be >= 0"),
    (["--set", "data.seq_len=4096"], "exceeds model.max_seq_len"),
    (["--set", "model.vocab_size=300"], "does not match the dataset's tokenizer"),
    (["--set", "model.n_layers=3"], "was trained with model.n_layers=2"),
    (["--set", "data.batch_size=12", "--set", "mesh.devices=0"], "not divisible by the data-parallel size 8"),
]


@pytest.mark.parametrize("extra, fragment", BAD_TRAIN)
def test_bad_train_input(extra, fragment, trained_run, byte_data, capsys, tmp_path):
    before = tree_hashes(trained_run)
    fresh = tmp_path / "fresh"
    for run_dir in (trained_run, fresh):
        code, err = run_cli(["train", TINY, "--data", str(byte_data), "--run-dir", str(run_dir), *FAST, *extra], capsys)
        if run_dir == fresh and "was trained with" in fragment:
            continue  # a fresh directory accepts any architecture
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
        assert not fresh.exists()
    assert tree_hashes(trained_run) == before


def test_bad_prepare_and_eval_input(tmp_path, byte_data, trained_run, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["prepare", "--source", "files", "--files", str(empty), "--out", str(tmp_path / "o1")], "hold no text"),
        (["prepare", "--source", "files", "--out", str(tmp_path / "o2")], "needs --files"),
        (["prepare", "--source", "files", "--files", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o3")], "does not exist"),
        (["prepare", "--source", "stdlib", "--tokenizer", "sentencepiece", "--out", str(tmp_path / "o4")], "--vocab-size"),
        (["prepare", "--source", "stdlib", "--out", str(byte_data)], "already exists and is not empty"),
        (["prepare", "--source", "web", "--out", str(tmp_path / "o5")], "invalid choice"),
        (["prepare", "--source", "stdlib", "--val-fraction", "0", "--out", str(tmp_path / "o6")],
         "--val-fraction must lie in (0, 1), got 0.0"),
        (["train", TINY, "--run-dir", str(tmp_path / "r")], "no dataset given"),
        (["train", TINY, "--data", str(tmp_path), "--run-dir", str(tmp_path / "r")], "not an ar_lm dataset"),
        (["train", str(tmp_path / "missing.py")], "does not exist"),
        (["eval", str(tmp_path / "norun")], "does not exist"),
        (["eval", str(byte_data)], "not an ar_lm run directory"),
        (["eval", str(trained_run), "--tokens", "-1"], "--tokens must be >= 0, got -1"),
        (["frobnicate"], "invalid choice"),
        ([], "no command given"),
    ]
    protected = {p: tree_hashes(p) for p in (byte_data, trained_run)}
    for args, fragment in cases:
        code, err = run_cli(args, capsys)
        assert code == 2 and len(err) == 1 and fragment in err[0], (args, err)
        assert not (tmp_path / "r").exists()
    assert {p: tree_hashes(p) for p in protected} == protected


def _prepared_bytes(out: Path) -> int:
    meta = json.loads((out / "metadata.json").read_text())
    return sum(split["bytes"] for split in meta["splits"].values())


def test_prepare_reads_all_of_a_corpus_by_default(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):  # 10 MB in all
        (corpus / f"{i}.txt").write_text(f"document {i} " + "x" * 2_000_000)
    assert main(["prepare", "--source", "files", "--files", str(corpus), "--out", str(tmp_path / "d")]) == 0
    assert _prepared_bytes(tmp_path / "d") == sum(p.stat().st_size for p in corpus.iterdir())
    assert "--max-mb" not in capsys.readouterr().err


def test_prepare_max_mb_counts_bytes_and_says_it_truncated(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):  # 1.2 MB (0.6 M characters) each
        (corpus / f"{i}.txt").write_text("é" * 600_000)
    assert main(["prepare", "--source", "files", "--files", str(corpus), "--max-mb", "2",
                 "--out", str(tmp_path / "d")]) == 0
    assert _prepared_bytes(tmp_path / "d") == 2 * 1_200_000  # two files reach 2 MB; characters would take all three
    err = capsys.readouterr().err
    assert "read the first 2 of 3 files (2.40 MB) and stopped at the --max-mb limit of 2 MB" in err


def test_debug_shows_traceback(capsys):
    from ar_lm.errors import UserError

    with pytest.raises(UserError):
        main(["train", "missing.py", "--debug"])
