"""Learning-rate schedules against their formulas, and WSD cooldowns branched from a constant trunk."""

import json
import math
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
from ar_lm.config import OptimConfig, save_json
from ar_lm.training import rundir
from ar_lm.training.checkpoint import Checkpointer
from ar_lm.training.loop import train
from ar_lm.training.optimizer import lr_schedule

ENV = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""}
T, W, F = 100, 10, 0.1


def _values(cfg, total=T, tokens_per_step=1):
    f = lr_schedule(cfg, total, tokens_per_step)
    return np.array([float(f(s)) for s in range(total)])


def test_each_schedule_follows_its_formula():
    s = np.arange(T, dtype=float)
    warm = (s + 1) / W
    progress = np.clip((s - W) / (T - 1 - W), 0, 1)
    base = dict(lr=1.0, warmup_steps=W, final_lr_frac=F)
    expected = {
        "cosine": F + (1 - F) * 0.5 * (1 + np.cos(np.pi * progress)),
        "linear": F + (1 - F) * (1 - progress),
        "constant": np.ones(T),
    }
    for name, after in expected.items():
        got = _values(OptimConfig(schedule=name, **base))
        np.testing.assert_allclose(got, np.where(s < W, warm, after), rtol=1e-6, atol=1e-7, err_msg=name)
    assert _values(OptimConfig(**base))[-1] == pytest.approx(F, abs=1e-7)  # cosine is still the default

    k = 20  # wsd: cooldown_frac 0.2 of 100 steps, or cooldown_steps
    p = np.clip((s - (T - k) + 1) / k, 0, 1)
    for shape, g in (("linear", 1 - p), ("1-sqrt", 1 - np.sqrt(p)), ("cosine", 0.5 * (1 + np.cos(np.pi * p)))):
        for cooldown in ({"cooldown_frac": 0.2}, {"cooldown_steps": k, "cooldown_frac": 0.5}):
            got = _values(OptimConfig(schedule="wsd", cooldown_shape=shape, **cooldown, **base))
            want = np.where(s < W, warm, np.where(s < T - k, 1.0, F + (1 - F) * g))
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=shape)
            assert got[-1] == pytest.approx(F, abs=1e-7) and got[T - k - 1] == 1.0 and got[T - k] < 1.0
    # the stable phase of wsd is the constant schedule's lr, bit for bit (what makes branches exact)
    const = _values(OptimConfig(schedule="constant", **base), total=300)
    wsd = _values(OptimConfig(schedule="wsd", **base))
    assert np.array_equal(wsd[: T - k], const[: T - k])

    # warmup in tokens: 640 tokens at 64 per step = 10 steps; in a fraction: 5% of 100
    by_tokens = _values(OptimConfig(schedule="constant", lr=1.0, warmup_tokens=640), tokens_per_step=64)
    by_frac = _values(OptimConfig(schedule="constant", lr=1.0, warmup_frac=0.05))
    assert by_tokens[9] == 1.0 and by_tokens[8] == pytest.approx(0.9) and by_frac[4] == 1.0 and by_frac[3] < 1.0


def _trunk_config_file(tmp_path, data, steps, branch_at):
    cfg = tiny_config(data, optim={"schedule": "constant"},
                      train={"steps": steps, "checkpoint_every": 4, "keep_checkpoints": 1,
                             "checkpoint_at_tokens": tuple(branch_at)})
    path = tmp_path / "trunk.json"
    save_json(cfg, path)
    return cfg, path


def _train_losses(run_dir):
    recs = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in recs if r["split"] == "train"]


def test_cooldown_branch_equals_a_straight_wsd_run_after_a_kill_of_the_trunk(tmp_path, byte_data):
    tokens_per_step = 8 * 32
    cfg, path = _trunk_config_file(tmp_path, byte_data, steps=40, branch_at=[12 * tokens_per_step])
    trunk = tmp_path / "trunk"
    cmd = [sys.executable, "-m", "ar_lm", "train", str(path), "--run-dir", str(trunk)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 14 for s, _, _ in _safe_losses(trunk)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # kill -9 mid-run, past the branch point
    proc.wait()
    assert not (trunk / "summary.json").exists()
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)  # resume to the end
    ckpt = Checkpointer(trunk / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [12, 40]  # the branch point is kept beside the latest (keep_checkpoints=1)
    ckpt.close()

    # branch: D = 16 steps with a 4-step cooldown starts from the trunk's step 12
    branch = tmp_path / "branch"
    out = subprocess.run([sys.executable, "-m", "ar_lm", "cooldown", str(trunk), "--at-tokens", str(16 * tokens_per_step),
                          "--cooldown-steps", "4", "--run-dir", str(branch)], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["step"] == 16 and summary["branch_of"] == str(trunk) and summary["branch_step"] == 12
    branch_cfg = rundir.load_run_config(branch)
    assert (branch_cfg.optim.schedule, branch_cfg.optim.cooldown_steps, branch_cfg.optim.warmup_steps) == ("wsd", 4, 2)

    straight_cfg = tiny_config(byte_data, optim={"schedule": "wsd", "cooldown_steps": 4},
                               train={"steps": 16, "checkpoint_every": 4})
    save_json(straight_cfg, tmp_path / "straight.json")
    subprocess.run([sys.executable, "-m", "ar_lm", "train", str(tmp_path / "straight.json"), "--run-dir",
                    str(tmp_path / "straight")], env=ENV, check=True, capture_output=True)
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert _train_losses(branch) == _train_losses(tmp_path / "straight")  # steps 1-12 from the trunk, 13-16 its own
    assert [lr for _, _, lr in _train_losses(branch)][-1] == pytest.approx(0.1 * 3e-3)
    assert summary["val_loss"] == straight["val_loss"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 final_params(branch), final_params(tmp_path / "straight"))


def _safe_losses(run_dir):
    try:
        return _train_losses(run_dir)
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def test_cooldown_bad_input_is_one_line_and_writes_nothing(tmp_path, byte_data, capsys):
    cosine = tmp_path / "cosine"
    train(tiny_config(byte_data, train={"steps": 8, "checkpoint_every": 4}), cosine)
    constant = tmp_path / "constant"
    train(tiny_config(byte_data, optim={"schedule": "constant"}, train={"steps": 8, "checkpoint_every": 0}), constant)
    per_step = 8 * 32
    cases = [
        (cosine, ["--at-tokens", str(6 * per_step)], "optim.schedule='cosine'"),
        (constant, ["--at-tokens", str(12 * per_step)], "starts at step 10, past the trunk's budget (8 steps)"),
        (constant, ["--at-tokens", str(6 * per_step), "--cooldown-steps", "2"], "no checkpoint at step 4"),
        (constant, ["--at-tokens", str(6 * per_step), "--cooldown-steps", "6"], "takes the whole branch"),
        (constant, ["--at-tokens", "10"], "less than one step"),
        (tmp_path / "missing", ["--at-tokens", "512"], "does not exist"),
    ]
    for trunk, extra, fragment in cases:
        out = tmp_path / "out"
        assert main(["cooldown", str(trunk), "--run-dir", str(out)] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (fragment, err)
        assert not out.exists()
    assert math.isclose(json.loads((constant / "summary.json").read_text())["step"], 8)

    # a seed interrupted before its config.json was written starts over
    seeded = tmp_path / "seeded"
    (seeded / "checkpoints" / "8" / "state").mkdir(parents=True)
    (seeded / "metrics.jsonl").write_text('{"step": 99}\n')
    assert main(["cooldown", str(constant), "--at-tokens", str(10 * per_step), "--cooldown-steps", "2",
                 "--run-dir", str(seeded)]) == 0
    steps = [json.loads(l)["step"] for l in (seeded / "metrics.jsonl").read_text().splitlines()]
    assert 99 not in steps and steps[-1] == 10 and json.loads((seeded / "summary.json").read_text())["branch_step"] == 8


WSD_EXPERIMENT = '''
from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.scaling.sweeps import ShapeRule, Sweep, wsd_sweep

RULE = ShapeRule(aspect=16, head_dim=8)


def config():
    return ExperimentConfig(
        name="wsd", model=ModelConfig(vocab_size=257, max_seq_len=32), data=DataConfig(seq_len=32, batch_size=8, prefetch=0),
        optim=OptimConfig(lr=3e-3, warmup_steps=2), train=TrainConfig(eval_tokens=256, log_every=5, checkpoint_every=0,
        keep_checkpoints=1, async_checkpoint=False), mesh=MeshConfig(devices=1), logging=LoggingConfig(wandb=False, progress=False))


def sweep():
    points = wsd_sweep(config(), sizes=(2e3, 8e3), tokens=(2560, 5120, 10240), cooldown_frac=0.2, rule=RULE)
    return Sweep(name="wsd", base=config(), points=tuple(points), rule=RULE)
'''


def test_wsd_sweep_trains_one_trunk_per_size_and_branches_each_budget(tmp_path, byte_data, capsys):
    from ar_lm.model.counts import flops_per_token
    from ar_lm.scaling.runner import load_sweep, run_sweep
    from ar_lm.scaling.sweeps import wsd_compute

    exp = tmp_path / "wsd.py"
    exp.write_text(WSD_EXPERIMENT)
    sweep_dir = tmp_path / "sweep"
    points = load_sweep(exp).points
    trunks = [p for p in points if p.coords["role"] == "trunk"]
    assert [p.name for p in points] == ["n0_trunk", "n0_d0", "n0_d1", "n0_d2", "n1_trunk", "n1_d0", "n1_d1", "n1_d2"]
    # steps 10, 20, 40 with cooldowns 2, 4, 8: branch points 8, 16, 32; each trunk runs to 32
    assert [t.config.total_steps for t in trunks] == [32, 32]
    assert [t.config.train.checkpoint_at_tokens for t in trunks] == [(2048, 4096, 8192)] * 2

    assert run_sweep(str(exp), str(sweep_dir), str(byte_data), fit=False) == 0
    printed = capsys.readouterr().out
    for t in trunks:
        ckpt = Checkpointer(sweep_dir / "runs" / t.name / "checkpoints", read_only=True)
        assert ckpt.all_steps() == [8, 16, 32]  # the branch points are kept (keep_checkpoints=1)
        ckpt.close()
    spent = 0.0
    for p in points:
        summary = json.loads((sweep_dir / "runs" / p.name / "summary.json").read_text())
        fpt = flops_per_token(p.config.model, 32)
        assert p.coords["C"] == pytest.approx(fpt * p.coords["D"]) and summary["flops"] == pytest.approx(p.coords["C"])
        if p.coords["role"] == "branch":
            assert summary["branch_of"] == str(sweep_dir / "runs" / p.coords["trunk"])
            records = [json.loads(l) for l in (sweep_dir / "runs" / p.name / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in records if r["split"] == "train"][:1] == [5]  # the trunk's history comes along
            spent += fpt * (p.config.total_steps - p.config.train.branch_step) * 256
        else:
            spent += p.coords["C"]
    independent = sum(p.coords["C"] for p in points if p.coords["role"] == "branch")
    c = wsd_compute(points)
    assert c["spent"] == pytest.approx(spent) and c["independent"] == pytest.approx(independent)
    assert c["saved_frac"] == pytest.approx(1 - spent / independent) and c["saved_frac"] > 0.3
    assert f"({100 * c['saved_frac']:.0f}% saved)" in printed

    # a branch whose trunk checkpoint is gone fails with one line naming it; the others stay done
    import shutil
    shutil.rmtree(sweep_dir / "runs" / "n0_d1")
    shutil.rmtree(sweep_dir / "runs" / "n0_trunk" / "checkpoints" / "16")
    assert run_sweep(str(exp), str(sweep_dir), str(byte_data), fit=False) == 1
    status = json.loads((sweep_dir / "status.json").read_text())
    assert status["n0_d1"]["state"] == "failed" and "has no checkpoint at step 16" in status["n0_d1"]["error"]
    assert all(status[p.name]["state"] == "done" for p in points if p.name != "n0_d1")
