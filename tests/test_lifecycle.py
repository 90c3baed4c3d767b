"""A run's lifecycle: the start line, re-running a finished run, Ctrl-C of a train and of a sweep, wall time
over resumes, and `train.init_from` (a new run from another run's parameters)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import final_params, tiny_config

from ar_lm.cli import main
from ar_lm.config import save_json
from ar_lm.data.dataset import TokenDataset
from ar_lm.errors import UserError
from ar_lm.parallel.mesh import logical_rules, make_mesh
from ar_lm.training.lifecycle import init_state_from
from ar_lm.training.loop import prepare_config, train
from ar_lm.training.optimizer import run_optimizer
from ar_lm.training.state import state_shardings

ENV = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""}


def _first_losses(run_dir: Path, n: int) -> list:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == "train"][:n]


def test_start_line_before_compiling_and_a_finished_run_says_so(tmp_path, byte_data, capsys):
    cfg = tiny_config(byte_data, train={"steps": 3}, logging={"wandb": False, "progress": True})
    exp = tmp_path / "exp.json"
    save_json(cfg, exp)
    run = tmp_path / "run"
    assert main(["train", str(exp), "--run-dir", str(run)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["finished"]  # stdout: the summary only
    start = next(i for i, l in enumerate(err.splitlines()) if l.endswith("compiling..."))
    line = err.splitlines()[start]
    assert line.startswith(f"[train] {run}: ") and " parameters, 1 cpu device, mesh data=1 " in line
    assert any("took" in l and "compiling included" in l for l in err.splitlines()[start + 1:])

    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", str(exp), "--run-dir", str(run)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["step"] == 3
    assert (f"[train] {run} already finished (3 steps): its summary is {run}/summary.json; to train "
                           f"on from it, use a new --run-dir with --set train.init_from={run}") in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=6))
    with pytest.raises(UserError, match=rf"train.steps=3, not 6.*--set train.init_from={run} to start from"):
        train(longer, run)


def test_wall_time_is_summed_over_resumes(tmp_path, byte_data):
    cfg = tiny_config(byte_data, train={"steps": 6})
    t0 = time.time()
    first = train(cfg, tmp_path / "run", stop_after=3)
    segments = json.loads((tmp_path / "run" / "wall_time.json").read_text())["segments_s"]
    assert len(segments) == 1 and segments[0] == pytest.approx(first.summary["wall_time_s"])
    second = train(cfg, tmp_path / "run")
    elapsed = time.time() - t0
    s = second.summary
    assert s["finished"] and s["wall_time_s"] == pytest.approx(segments[0] + s["segment_wall_time_s"], abs=0.05)
    assert segments[0] + s["segment_wall_time_s"] <= s["wall_time_s"] + 0.05 and s["wall_time_s"] <= elapsed
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["wall_time_s"] == s["wall_time_s"]


def test_sigint_checkpoints_and_says_how_to_resume(tmp_path, byte_data):
    cfg = tiny_config(byte_data, train={"steps": 100_000, "checkpoint_every": 5, "log_every": 5})
    exp = tmp_path / "exp.json"
    save_json(cfg, exp)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ar_lm", "train", str(exp), "--run-dir", str(run)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not any(
            p.name.isdigit() for p in (run / "checkpoints").glob("*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preempted"] and not summary["finished"]
    assert f"[train] stopped at step {summary['step']} with a checkpoint: rerun the same command to resume" in err
    assert summary["step"] in [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]


SWEEP = '''
import dataclasses
from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.scaling.sweeps import Sweep, SweepPoint


def config():
    return ExperimentConfig(
        name="long", model=ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=257, max_seq_len=32),
        data=DataConfig(seq_len=32, batch_size=8, prefetch=0), optim=OptimConfig(lr=3e-3),
        train=TrainConfig(steps=100_000, eval_every=0, eval_tokens=256, log_every=5, checkpoint_every=5,
                          async_checkpoint=False),
        mesh=MeshConfig(devices=1), logging=LoggingConfig(wandb=False, progress=False))


def sweep():
    base = config()
    wide = dataclasses.replace(base, model=dataclasses.replace(base.model, d_model=64))
    return Sweep(name="long", base=base, points=(SweepPoint("a", base, {"N": 1, "D": 1, "C": 1.0}),
                                                 SweepPoint("b", wide, {"N": 2, "D": 1, "C": 2.0})))
'''


def test_ctrl_c_of_a_sweep_checkpoints_its_runs_and_clears_running(tmp_path, byte_data):
    exp = tmp_path / "long.py"
    exp.write_text(SWEEP)
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "ar_lm", "sweep", str(exp), "--sweep-dir", str(sweep_dir), "--data",
                             str(byte_data), "--no-fit"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not any(
            p.name.isdigit() for p in sweep_dir.glob("runs/*/checkpoints/*")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the sweep and its runs get SIGINT
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "[sweep] interrupted: rerun the same command to resume" in err
    status = json.loads((sweep_dir / "status.json").read_text())
    assert [s["state"] for s in status.values()] == ["pending", "pending"]  # none left "running"
    (name,) = [n for n, s in status.items() if "interrupted" in s]
    log = (sweep_dir / "logs" / f"{name}.log").read_text()
    assert "with a checkpoint: rerun the same command to resume" in log  # the run checkpointed before the sweep left


def test_init_from_starts_from_the_source_params_with_lineage(tmp_path, byte_data, capsys):
    source_cfg = tiny_config(byte_data, train={"steps": 8})
    train(source_cfg, tmp_path / "source")
    # a longer schedule, another layer layout (a speed setting): the source's parameters, a fresh optimizer
    cfg = tiny_config(byte_data, model={"scan_layers": False}, optim={"lr": 1e-3},
                      train={"steps": 4, "init_from": str(tmp_path / "source")})
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    resolved = prepare_config(cfg, TokenDataset(byte_data))  # the dataset's vocabulary
    tx, _ = run_optimizer(resolved)
    state = init_state_from(resolved, {"run_dir": str(tmp_path / "source"), "step": 8}, tx,
                            state_shardings(resolved, tx, mesh, rules), mesh, rules)
    source = final_params(tmp_path / "source")
    assert int(state["step"]) == 0 and "layer_1" in state["params"]
    np.testing.assert_array_equal(np.asarray(state["params"]["layer_1"]["attn"]["q_kernel"]),
                                  np.asarray(source["layers"]["attn"]["q_kernel"][1]))
    np.testing.assert_array_equal(np.asarray(state["params"]["embed"]), np.asarray(source["embed"]))
    assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(state["opt_state"]) if np.ndim(m) > 0)

    new = train(cfg, tmp_path / "new").summary
    # the same first batch (the same data order): the source's trained parameters score it better than its init
    first, trained = _first_losses(tmp_path / "new", 1)[0], _first_losses(tmp_path / "source", 1)[0]
    assert first < trained - 0.3, (first, trained)
    data = json.loads((tmp_path / "source" / "data.json").read_text())
    assert new["init_from"] == {"run_dir": str(tmp_path / "source"), "step": 8, "data": data}
    assert "starting from the parameters of" in capsys.readouterr().err
    assert "init_from" not in json.loads((tmp_path / "source" / "summary.json").read_text())


def test_init_from_refuses_another_architecture_or_no_checkpoint(tmp_path, byte_data):
    train(tiny_config(byte_data, train={"steps": 2}), tmp_path / "source")
    wider = tiny_config(byte_data, model={"d_model": 64}, train={"init_from": str(tmp_path / "source")})
    with pytest.raises(UserError, match=r"train.init_from=.*source has model.d_model=32, not 64: start from a run"):
        train(wider, tmp_path / "new")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "source" / "config.json").read_text())
    nothing = tiny_config(byte_data, train={"init_from": str(tmp_path / "empty")})
    with pytest.raises(UserError, match="has no checkpoint yet: train it first"):
        train(nothing, tmp_path / "new")
    with pytest.raises(UserError, match="is not a run directory"):
        train(tiny_config(byte_data, train={"init_from": str(tmp_path / "nowhere")}), tmp_path / "new")
    assert not (tmp_path / "new").exists()
