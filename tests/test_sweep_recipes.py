"""Sweep numbers right by construction (issue 34): WSD branches that cool down, one warmup recipe for the fit
points and the held-out run, warmup shares that do not grow with N along an IsoFLOP curve, fits of the sweep's
current points only, and a held-out check that cannot take the sweep down."""

import dataclasses
import json
import math

import pytest

from ar_lm.cli import main
from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.errors import UserError
from ar_lm.scaling.holdout import fit_and_check
from ar_lm.scaling.hparams import lr_sweep_rows
from ar_lm.scaling.points import points_from_sweep
from ar_lm.scaling.runner import SweepRunner
from ar_lm.scaling.sweeps import (ShapeRule, Sweep, compute_optimal_point, isoflop_sweep, ladder, ladder_model,
                                  lr_sweep, wsd_sweep)
from ar_lm.training import rundir
from ar_lm.training.branch import branch_config
from ar_lm.training.optimizer import check_schedule, lr_schedule, warmup_steps

RULE = ShapeRule(aspect=32, head_dim=8)


def _base(**optim) -> ExperimentConfig:
    return ExperimentConfig(
        name="recipe", model=ModelConfig(family="gpt2", vocab_size=257, max_seq_len=64),
        data=DataConfig(seq_len=64, batch_size=16),
        optim=OptimConfig(lr=4e-3, schedule="wsd", cooldown_frac=0.2, final_lr_frac=0.1, **optim),
        train=TrainConfig(eval_every=0, eval_tokens=4096), mesh=MeshConfig(devices=1),
        logging=LoggingConfig(wandb=False, progress=False))


def _warmup(cfg: ExperimentConfig) -> int:
    return warmup_steps(cfg.optim, cfg.total_steps, cfg.tokens_per_step)


def _lr(cfg: ExperimentConfig, step: int) -> float:
    return float(lr_schedule(cfg.optim, cfg.total_steps, cfg.tokens_per_step)(step))


def test_every_wsd_branch_cools_down_to_its_final_lr():
    """Issue 34.1: with the trunk's warmup sized by the largest budget (5% of ~40k steps = 2,029) the smallest
    branch (T=507) branched at step 406, inside the warmup: its lr quadrupled there and ended at the peak."""
    points = wsd_sweep(_base(), (19800,), flops=(1e11, 1e13), cooldown_frac=0.2, rule=RULE)
    trunk, branches = points[0].config, [p.config for p in points[1:]]
    for cfg in branches:
        w, start, t = _warmup(cfg), cfg.train.branch_step, cfg.total_steps
        assert w == _warmup(trunk) and 0 < w < start, (cfg.name, w, start)
        assert _lr(cfg, t - 1) == pytest.approx(cfg.optim.final_lr_frac * cfg.optim.lr, rel=1e-5)
        assert _lr(cfg, start) < _lr(cfg, start - 1) <= cfg.optim.lr * (1 + 1e-6)  # it decays from the branch on
    smallest = branches[0]
    assert _warmup(smallest) == round(0.05 * smallest.total_steps)  # warmup_frac of the smallest budget's run


def test_a_warmup_longer_than_a_branch_is_refused():
    with pytest.raises(UserError, match=r"size [\d,]+: the warmup \(450 steps\) does not end before the cooldown"):
        wsd_sweep(_base(warmup_steps=450), (19800,), flops=(1e11, 1e13), rule=RULE)
    cfg = dataclasses.replace(_base(warmup_steps=90), train=TrainConfig(steps=100))
    with pytest.raises(UserError, match=r"the warmup \(90 steps\) does not end before the wsd cooldown starts "
                                        r"\(step 80 of 100\)"):
        check_schedule(cfg)
    check_schedule(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_steps=79)))
    trunk = dataclasses.replace(_base(warmup_steps=300), optim=dataclasses.replace(
        _base(warmup_steps=300).optim, schedule="constant"), train=TrainConfig(steps=2000))
    with pytest.raises(UserError, match="before the trunk's warmup \\(300 steps\\) ends"):
        branch_config(trunk, 250 * trunk.tokens_per_step, cooldown_frac=0.2)


def test_warmup_share_is_the_same_for_every_size_along_an_isoflop_curve():
    """Issue 34.13: a fixed warmup in steps is a growing share of the run as N grows at fixed C (47% of the
    largest size's smallest budget in the main job); a warmup of a fixed share of the smallest budget's compute
    is the same share of every size's run at each budget."""
    budgets = (1e11, 3e11, 1e12)
    points = wsd_sweep(_base(), (3312, 19800, 126432), flops=budgets, rule=RULE)
    for j in range(len(budgets)):
        branches = [p.config for p in points if p.coords.get("tokens_index") == j]
        shares = [_warmup(c) / c.total_steps for c in branches]
        expected = 0.05 * budgets[0] / budgets[j]
        for c, share in zip(branches, shares):
            assert share == pytest.approx(expected, abs=1.0 / c.total_steps + 1e-3 * expected), (c.name, share)


def test_the_held_out_run_warms_up_like_the_fit_points():
    """The held-out run at 4x the largest budget spends the fit points' warmup compute (5% of the smallest
    budget) rather than a share of its own length (issue 34.1: 254 warmup steps vs 2,029)."""
    points = wsd_sweep(_base(), (3312, 19800), flops=(1e11, 1e12), rule=RULE)
    held = compute_optimal_point(_base(), 4e12, 19800, "holdout0", RULE, points=points)
    w = _warmup(held.config)
    warm_flops = w * held.config.tokens_per_step * held.coords["flops_per_token"]
    assert warm_flops == pytest.approx(0.05 * 1e11, rel=1.0 / w)
    straight = isoflop_sweep(_base(), (1e11,), sizes_per_budget=2, rule=RULE)
    own = compute_optimal_point(_base(), 4e11, 3312, "holdout0", RULE, points=straight)
    assert _warmup(own.config) == round(0.05 * own.config.total_steps)  # an IsoFLOP grid: a share of each run


def _finished(runner: SweepRunner, point, loss: float) -> None:
    """A finished run of `point` as `train` leaves it (config and summary; no training needed for a fit)."""
    run = runner.run_dir(point.name)
    rundir.write_config(run, point.config)
    rundir.write_summary(run, {"val_loss": loss, "val_loss_se": 0.01, "step": point.config.total_steps,
                               "tokens": point.coords["D"], "epochs": 0.1})


def _law(n: float, d: float) -> float:
    return 1.5 + 400 / n**0.35 + 900 / d**0.3


def test_a_fit_reads_the_sweep_as_defined_now(tmp_path):
    """Issue 34.4: after dropping sizes and re-running, sweep.json kept the dropped points and the fit used
    them (old losses paired with the new sweep); now they are listed as stale, not fitted."""
    base = dataclasses.replace(_base(), optim=OptimConfig(lr=4e-3))
    points = isoflop_sweep(base, (3e9, 1e10, 3e10), sizes_per_budget=3, rule=RULE, min_steps=1)
    full = Sweep(name="s", base=base, points=tuple(points), rule=RULE)
    runner = SweepRunner(full, tmp_path, tmp_path / "data")
    runner.write_points(full.points)
    for p in full.points:
        _finished(runner, p, _law(p.coords["N"], p.coords["D"]))
    assert len(points_from_sweep(tmp_path).N) == 9
    kept = tuple(p for p in points if p.coords["size_index"] != 0)
    SweepRunner(dataclasses.replace(full, points=kept), tmp_path, tmp_path / "data").write_points(kept)
    pts = points_from_sweep(tmp_path)
    assert len(pts.N) == len(kept) == 6
    assert sorted(pts.stale) == sorted(p.name for p in points if p.coords["size_index"] == 0)
    assert sorted(pts.L) == sorted(_law(p.coords["N"], p.coords["D"]) for p in kept)


def test_a_held_out_budget_the_law_cannot_place_is_skipped_not_fatal(tmp_path, capsys):
    """Issue 34.7: a UserError from predict_compute (here: a law with a zero exponent has no compute-optimal
    frontier) escaped fit_and_check and `ar-lm sweep` exited 2 after every run had finished."""
    base = dataclasses.replace(_base(), optim=OptimConfig(lr=4e-3))
    points = isoflop_sweep(base, (3e9, 1e10, 3e10), sizes_per_budget=3, rule=RULE, min_steps=1)
    sweep = Sweep(name="s", base=base, points=tuple(points), rule=RULE, holdout_budgets=(1e11,))
    runner = SweepRunner(sweep, tmp_path, tmp_path / "data")
    runner.write_points(sweep.points)
    for p in sweep.points:  # loss independent of D: the fitted beta is 0, no compute-optimal frontier
        _finished(runner, p, 1.5 + 400 / p.coords["N"] ** 0.35)
    fit_and_check(sweep, runner, tmp_path)  # returns: the sweep's runs and its fit stand
    err = capsys.readouterr().err
    assert "[holdout] holdout0 at C=1e+11 skipped: the fitted law has a zero exponent" in err
    assert json.loads((tmp_path / "fit" / "holdout.json").read_text()) == [
        {"name": "holdout0", "budget": 1e11, "skipped": "the fitted law has a zero exponent: it has no "
                                                       "compute-optimal frontier"}]
    p3 = json.loads((tmp_path / "fit" / "fit.json").read_text())["approach3"]
    assert p3["a"] is None and (p3["beta"] == 0.0 or p3["B"] < 1e-250)  # no D term (variable projection zeroes B)
    assert not runner.run_dir("holdout0").exists()


def test_points_past_one_epoch_are_left_out_of_the_fit_by_default(tmp_path, capsys):
    """Issue 34.12: points over one epoch were fitted by default (the main job's n0_d2 at 2.67 epochs moved
    Approach 3's a from 0.393 to 0.435); now they are listed, not fitted, unless --include-repeated."""
    rows = [(n, d) for n in (2e4, 5e4, 1.2e5) for d in (4e5, 1.5e6, 6e6)]
    csv_path = tmp_path / "pts.csv"
    csv_path.write_text("params,tokens,loss,epochs\n" + "".join(
        f"{n},{d},{_law(n, d)},{d / 2e6}\n" for n, d in rows))  # the 6e6-token points saw 3 epochs
    assert main(["fit", "--points", str(csv_path), "--bootstrap", "0", "--out", str(tmp_path / "a")]) == 0
    fit = json.loads((tmp_path / "a" / "fit.json").read_text())
    assert fit["n_points"] == 6 and [r["epochs"] for r in fit["repeated_excluded"]] == [3.0] * 3
    assert "[fit] not fitted: 3 points past one epoch of their train split" in capsys.readouterr().out
    assert main(["fit", "--points", str(csv_path), "--bootstrap", "0", "--include-repeated", "--out",
                 str(tmp_path / "b")]) == 0
    fit = json.loads((tmp_path / "b" / "fit.json").read_text())
    assert fit["n_points"] == 9 and fit["repeated_excluded"] == []


def test_shape_rules_as_the_field_uses_them(tmp_path):
    """Issue 34.14: the default ShapeRule(aspect=32, head_dim=16) made a 1B model 64 layers x 128 heads of
    dimension 16. Now heads are 64-dimensional by default, depth follows a depth-width law, and GQA and the MLP
    width are options; sweep.json records the rule and each point's coords its shape."""
    base = ModelConfig(family="llama", vocab_size=32000, max_seq_len=2048)
    big = ladder_model(base, 1e9)
    assert big.d_model // big.n_heads == 64 and big.d_model / big.n_layers == 64
    chat = ladder_model(base, 1e9, ShapeRule.nanochat())
    assert chat.d_model // chat.n_heads == 128 and chat.d_model == 64 * chat.n_layers
    wide = ShapeRule(aspect=16, head_dim=128, depth_exponent=0.75, kv_groups=4, ffn_ratio=3.0)
    aspects = [m.d_model / m.n_layers for m in ladder(base, wide, max_params=3e9)[4::8]]
    assert all(b > a for a, b in zip(aspects, aspects[1:]))  # larger models relatively wider
    for m in ladder(base, wide, max_params=3e9):
        assert m.n_layers == max(1, round((m.d_model / 16) ** 0.75)) and m.d_ff == round(3.0 * m.d_model)
        assert m.kv_heads == (m.n_heads // 4 if m.n_heads % 4 == 0 else m.n_heads)
    points = isoflop_sweep(_base(), (3e9, 1e10), sizes_per_budget=2, rule=RULE, min_steps=1)
    runner = SweepRunner(Sweep(name="s", base=_base(), points=tuple(points), rule=RULE), tmp_path, tmp_path / "d")
    runner.write_points(points)
    listing = json.loads((tmp_path / "sweep.json").read_text())
    assert ShapeRule(**listing["shapes"]["rule"]) == RULE
    for p in listing["points"]:
        m = next(q.config.model for q in points if q.name == p["name"])
        assert (p["coords"]["n_layers"], p["coords"]["n_heads"], p["coords"]["n_kv_heads"], p["coords"]["d_ff"]) == (
            m.n_layers, m.n_heads, m.kv_heads, m.ff_dim)


def test_fit_lr_reads_the_lr_sweep_as_defined_now(tmp_path):
    base = dataclasses.replace(_base(), optim=OptimConfig(lr=4e-3))
    points = lr_sweep(base, (3312, 19800), (1e-3, 3e-3, 1e-2), tokens_per_param=2.0, rule=RULE)
    sweep = Sweep(name="lr", base=base, points=tuple(points), rule=RULE)
    runner = SweepRunner(sweep, tmp_path, tmp_path / "data")
    runner.write_points(sweep.points)
    for p in points:
        _finished(runner, p, 2.0 + math.log(p.coords["lr"] / 3e-3) ** 2)
    assert len(lr_sweep_rows(tmp_path)) == 6
    kept = tuple(p for p in points if p.coords["size_index"] == 1)
    SweepRunner(dataclasses.replace(sweep, points=kept), tmp_path, tmp_path / "data").write_points(kept)
    assert sorted(r["N"] for r in lr_sweep_rows(tmp_path)) == [kept[0].coords["N"]] * 3
