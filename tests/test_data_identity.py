"""One dataset identity (tokenizer sha256 + each split's shard hashes) recorded in every run and sweep, and
compared wherever a dataset meets a run (issue 34.3)."""

import dataclasses
import json
import shutil

import pytest

from ar_lm.cli import main
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.sources import FileCorpus
from ar_lm.data.writer import write_dataset
from ar_lm.errors import UserError
from ar_lm.scaling.runner import SweepRunner
from ar_lm.scaling.sweep_data import ensure_data, record_data
from ar_lm.scaling.sweeps import ShapeRule, Sweep, isoflop_sweep
from ar_lm.training import rundir
from ar_lm.training.branch import branch_config
from ar_lm.training.evaluate import evaluate_run
from ar_lm.training.loop import train
from conftest import make_corpus, tiny_config


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Byte data of another corpus: the same tokenizer, other train and val splits."""
    root = tmp_path_factory.mktemp("other")
    out = root / "byte"
    write_dataset(out, FileCorpus([str(make_corpus(root / "corpus", seed=7))]), "byte", val_fraction=0.1)
    return out


def test_identity_is_the_data_not_its_path(byte_data, other_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(byte_data, copy)
    mine, theirs = TokenDataset(byte_data).identity(), TokenDataset(other_data).identity()
    assert TokenDataset(copy).identity() == mine
    assert mine["tokenizer"] == theirs["tokenizer"] and mine["splits"]["val"] != theirs["splits"]["val"]
    assert mine["id"] != theirs["id"] and len(mine["id"]) == 16


def test_a_run_resumes_only_on_its_own_data(byte_data, other_data, tmp_path):
    """An interrupted run resumed with --data of another corpus trained on without a word (and kept the old
    tokenizer copy for generate); now it is refused before anything is written, and the same data at another
    path resumes."""
    cfg = tiny_config(byte_data, train={"steps": 4})
    run = tmp_path / "run"
    train(cfg, run, stop_after=2)
    recorded = json.loads((run / rundir.DATA).read_text())
    assert recorded == {"path": str(byte_data), **TokenDataset(byte_data).identity()}
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"run directory .* was trained on .*byte \(data [0-9a-f]{16}\), and "
                                        r".* holds other train/val data: resume with --data"):
        train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(other_data))), run)
    assert (run / "metrics.jsonl").read_text() == before
    moved = tmp_path / "moved"
    shutil.copytree(byte_data, moved)
    result = train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(moved))), run)
    assert result.summary["step"] == 4


def test_eval_refuses_data_of_another_tokenizer_with_the_same_vocabulary(tmp_path, capsys):
    """`ar-lm eval RUN --data OTHER` checked only the vocabulary size: another sentencepiece model with as many
    pieces scored garbage without a warning."""
    datas = []
    for seed in (0, 1):
        out = tmp_path / f"sp{seed}"
        write_dataset(out, FileCorpus([str(make_corpus(tmp_path / f"c{seed}", seed=seed))]), "sentencepiece",
                      vocab_size=300, val_fraction=0.1)
        datas.append(out)
    a, b = (TokenDataset(d) for d in datas)
    assert a.vocab_size == b.vocab_size and a.identity()["tokenizer"] != b.identity()["tokenizer"]
    run = tmp_path / "run"
    train(tiny_config(datas[0], train={"steps": 2}), run)
    assert evaluate_run(run, datas[0], max_tokens=256)["loss"] > 0
    with pytest.raises(UserError, match="and .*sp1 holds another tokenizer: use data made with the run's tokenizer"):
        evaluate_run(run, datas[1], max_tokens=256)
    assert main(["eval", str(run), "--data", str(datas[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: run ") and "another tokenizer" in err[0]


def test_a_sweep_remembers_its_data(byte_data, other_data, tmp_path):
    """A sweep re-run with --data of another corpus reused the finished runs; re-run without --data it
    prepared stdlib and rewrote its points to it. Now sweep.json remembers the data: no --data means that data,
    other data is refused."""
    out = tmp_path / "sweep"
    sweep = Sweep(name="s", base=tiny_config(), points=())
    assert ensure_data(sweep, out, str(byte_data)) == byte_data
    record_data(out, byte_data)
    assert ensure_data(sweep, out, None) == byte_data  # not a freshly prepared stdlib dataset
    assert not (out / "data").exists()
    with pytest.raises(UserError, match=r"sweep directory .* was run on .*byte \(data [0-9a-f]{16}\), and .* holds "
                                        r"other train/val data: pass --data .*byte \(the same data\)"):
        ensure_data(sweep, out, str(other_data))


def test_a_finished_run_on_other_data_is_not_the_sweeps_point(byte_data, other_data, tmp_path):
    rule = ShapeRule(aspect=16, head_dim=8)
    base = tiny_config(model={"vocab_size": 257})
    points = isoflop_sweep(base, (3e8, 6e8), sizes_per_budget=2, spread=2.0, rule=rule, min_steps=1)
    sweep = Sweep(name="s", base=base, points=tuple(points), rule=rule)
    runner = SweepRunner(sweep, tmp_path, byte_data)
    runner.write_points(sweep.points)
    p = points[0]
    run = runner.run_dir(p.name)
    run.mkdir(parents=True)  # finished as `train` leaves it: config, summary, data record
    shutil.copy(runner.config_path(p.name), run / rundir.CONFIG)
    rundir.write_summary(run, {"finished": True, "val_loss": 3.0})
    rundir.write_data(run, other_data, TokenDataset(other_data).identity())
    assert not runner.is_done(p.name)
    (run / rundir.DATA).unlink()
    rundir.write_data(run, byte_data, TokenDataset(byte_data).identity())
    assert runner.is_done(p.name)


def test_a_sweep_point_scored_on_other_windows_is_run_again():
    cfg = tiny_config()
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_tokens=1024))
    assert rundir.function_differences(cfg, other, trained=True) == []  # resuming may change it
    assert rundir.function_differences(cfg, other, trained=True, measured=True) == [("train.eval_tokens", 512, 1024)]


def test_a_cooldown_branch_grows_only_on_its_trunks_data(byte_data, other_data, tmp_path):
    trunk_cfg = tiny_config(byte_data, optim={"schedule": "constant", "warmup_steps": 1},
                            train={"steps": 6, "checkpoint_at_tokens": (4 * 8 * 32,)})
    train(trunk_cfg, tmp_path / "trunk")
    branch = branch_config(trunk_cfg, 6 * 8 * 32, cooldown_frac=0.34, parent=str(tmp_path / "trunk"))
    elsewhere = dataclasses.replace(branch, data=dataclasses.replace(branch.data, path=str(other_data)))
    with pytest.raises(UserError, match="the branch's trunk .*trunk was trained on .* holds other train/val data"):
        train(elsewhere, tmp_path / "branch")
    assert not (tmp_path / "branch").exists()
    assert train(branch, tmp_path / "branch").summary["step"] == 6
