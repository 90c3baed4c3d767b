"""Seed replicates (issue 34.11): every sweep builder takes `seeds=`, and the fits average a point's replicates
with their seed-to-seed spread in the point's standard error, so `fit-lr` sees seed variance."""

import dataclasses
import json
import math

import numpy as np
import pytest

from ar_lm.cli import main
from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.errors import UserError
from ar_lm.scaling.hparams import average_seeds, fit_lr_sweep
from ar_lm.scaling.points import points_from_sweep
from ar_lm.scaling.runner import SweepRunner, _point_config
from ar_lm.scaling.sweeps import ShapeRule, Sweep, grid_sweep, isoflop_sweep, lr_sweep, wsd_sweep
from ar_lm.training import rundir

RULE = ShapeRule(aspect=32, head_dim=8)
SEEDS = (0, 1, 2)


def _base() -> ExperimentConfig:
    return ExperimentConfig(
        name="seeds", model=ModelConfig(family="gpt2", vocab_size=257, max_seq_len=64),
        data=DataConfig(seq_len=64, batch_size=16),
        optim=OptimConfig(lr=4e-3, schedule="wsd", cooldown_frac=0.2, final_lr_frac=0.1),
        train=TrainConfig(eval_every=0, eval_tokens=4096), mesh=MeshConfig(devices=1),
        logging=LoggingConfig(wandb=False, progress=False))


BUILDERS = {
    "grid": lambda **kw: grid_sweep(_base(), (3312, 19800), (200_000, 800_000), rule=RULE, **kw),
    "isoflop": lambda **kw: isoflop_sweep(_base(), (3e9, 1e10), sizes_per_budget=2, rule=RULE, min_steps=1, **kw),
    "wsd": lambda **kw: wsd_sweep(_base(), (3312, 19800), flops=(1e11, 1e12), rule=RULE, **kw),
    "lr": lambda **kw: lr_sweep(_base(), (3312, 19800), (1e-3, 3e-3, 1e-2), rule=RULE, **kw),
}


def _unseed(cfg: ExperimentConfig, like: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with the name, seed and trunk of `like`: what a replicate may change."""
    train = dataclasses.replace(cfg.train, seed=like.train.seed, branch_of=like.train.branch_of)
    return dataclasses.replace(cfg, name=like.name, train=train)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_every_builder_replicates_each_point_once_per_seed(kind):
    plain, seeded = BUILDERS[kind](), BUILDERS[kind](seeds=SEEDS)
    assert len(seeded) == len(SEEDS) * len(plain)
    by_name = {p.name: p for p in seeded}
    assert len(by_name) == len(seeded)  # names stay unique
    for p in plain:
        for s in SEEDS:
            q = by_name[f"{p.name}_s{s}"]
            assert q.config.name == q.name and q.config.train.seed == s
            assert q.coords["seed"] == s and q.coords["replicate_of"] == p.name
            assert _unseed(q.config, p.config) == p.config  # nothing else changes
            rest = {k: v for k, v in q.coords.items() if k not in ("seed", "replicate_of", "trunk")}
            assert rest == {k: v for k, v in p.coords.items() if k != "trunk"}


def test_no_seeds_is_the_sweep_as_before():
    for kind, build in BUILDERS.items():
        plain = build(seeds=())
        assert plain == build(), kind
        assert all("seed" not in p.coords and "replicate_of" not in p.coords for p in plain), kind
        assert all(p.config.train.seed == _base().train.seed for p in plain), kind
    for bad in ((1, 1), (-1,), (0.5,)):
        with pytest.raises(UserError, match="seeds must be distinct integers >= 0"):
            BUILDERS["grid"](seeds=bad)


def test_a_wsd_branch_grows_from_its_own_seeds_trunk(tmp_path):
    points = BUILDERS["wsd"](seeds=SEEDS)
    order = {p.name: i for i, p in enumerate(points)}
    trunks = {p.name: p for p in points if p.coords["role"] == "trunk"}
    branches = [p for p in points if p.coords["role"] == "branch"]
    assert len(trunks) == 2 * len(SEEDS) and branches
    sweep = Sweep(name="s", base=_base(), points=tuple(points), rule=RULE)
    for b in branches:
        trunk = trunks[b.config.train.branch_of]
        assert b.coords["trunk"] == trunk.name == f"n{b.coords['size_index']}_trunk_s{b.coords['seed']}"
        assert trunk.config.train.seed == b.config.train.seed == b.coords["seed"]
        assert b.config.train.branch_step * b.config.tokens_per_step in trunk.config.train.checkpoint_at_tokens
        assert order[trunk.name] < order[b.name]  # the trunk runs first
        ran = _point_config(b, sweep, tmp_path, tmp_path / "data")  # as `ar-lm sweep` runs it
        assert ran.train.branch_of == str(tmp_path / "runs" / trunk.name)


def _combined(losses, ses) -> tuple[float, float]:
    """Mean, and se² = mean(se_i²)/k + var(L_i, ddof=1)/k, written out term by term."""
    k = len(losses)
    mean = sum(losses) / k
    var_between = sum((x - mean) ** 2 for x in losses) / (k - 1)
    return mean, math.sqrt(sum(s * s for s in ses) / k / k + var_between / k)


def test_replicates_average_to_their_mean_with_seed_spread_in_the_se():
    losses, ses = [2.10, 2.16, 2.07], [0.004, 0.006, 0.005]
    rows = [{"N": 1e4, "lr": 1e-3, "batch_size": 8, "seq_len": 32, "loss": x, "loss_se": se, "seed": s}
            for s, x, se in zip((4, 5, 6), losses, ses)]
    lone = {"N": 1e4, "lr": 3e-3, "batch_size": 8, "seq_len": 32, "loss": 2.0, "loss_se": 0.003}
    out = average_seeds(rows + [lone])
    assert len(out) == 2
    mean, se = _combined(losses, ses)
    assert out[0]["loss"] == pytest.approx(mean, rel=1e-12) and out[0]["loss_se"] == pytest.approx(se, rel=1e-12)
    assert out[0]["seeds"] == 3 and "seed" not in out[0]
    assert se > max(ses)  # these seeds disagree by more than their eval noise
    assert out[1] == {**lone, "seeds": 1}  # a row without a seed is kept as it is
    with pytest.raises(UserError, match="seeds \\[4, 4, 6\\] repeat"):
        average_seeds([dict(r, seed=4) if r["seed"] == 5 else r for r in rows])


def _parabola(n: float, lr: float) -> float:
    return 2.0 + 0.05 * math.log(lr / (3e-3 * (n / 4e4) ** -0.4)) ** 2


def test_a_size_whose_seeds_disagree_gets_a_wider_lr_interval():
    """Two sizes, three seeds each, the same eval se: the size whose replicates scatter by 0.03 nats gets a
    wider lr* interval (the bootstrap redraws each averaged loss from its combined se) than the one at 0.001."""
    rng = np.random.default_rng(0)
    spread = {1e4: 0.001, 1.6e5: 0.03}
    rows = [{"N": n, "lr": float(lr), "batch_size": 8, "seq_len": 32, "loss_se": 0.001, "seed": s,
             "loss": _parabola(n, lr) + rng.normal(0, spread[n])}
            for n in spread for lr in np.geomspace(1e-4, 1e-1, 9) for s in SEEDS]
    result = fit_lr_sweep(rows, n_boot=300, seed=1)
    assert [len(result["points"]), {p["seeds"] for p in result["points"]}] == [2 * 9, {3}]
    width = {e["N"]: e["lr_opt_ci"][1] / e["lr_opt_ci"][0] for e in result["sizes"]}
    assert all(e["seeds"] == 3 for e in result["sizes"])
    assert math.log(width[1.6e5]) > 5 * math.log(width[1e4]) > 0
    for p in result["points"]:  # the fit's points are the seeds' mean losses
        same = [r["loss"] for r in rows if (r["N"], r["lr"]) == (p["N"], p["lr"])]
        assert len(same) == 3 and p["loss"] == pytest.approx(np.mean(same), rel=1e-12)


def _finished(runner: SweepRunner, point, loss: float, se: float) -> None:
    """A finished run of `point` as `train` leaves it (config and summary; no training needed for a fit)."""
    run = runner.run_dir(point.name)
    rundir.write_config(run, point.config)
    rundir.write_summary(run, {"val_loss": loss, "val_loss_se": se, "step": point.config.total_steps,
                               "tokens": point.coords["D"], "epochs": 0.1})


def _seed_offset(seed: int) -> float:
    return 0.02 * (seed - 1)  # seeds 0, 1, 2: -0.02, 0, +0.02 around the point's loss


def test_sweep_fits_read_a_points_replicates_as_one_point(tmp_path):
    points = BUILDERS["isoflop"](seeds=SEEDS)
    sweep = Sweep(name="s", base=_base(), points=tuple(points), rule=RULE)
    runner = SweepRunner(sweep, tmp_path, tmp_path / "data")
    runner.write_points(sweep.points)
    base_loss = {p.coords["replicate_of"]: 3.0 + p.coords["size_index"] / 10 + p.coords["budget_index"]
                 for p in points}
    for p in points:
        _finished(runner, p, base_loss[p.coords["replicate_of"]] + _seed_offset(p.coords["seed"]), 0.01)
    pts = points_from_sweep(tmp_path)
    assert len(pts.N) == len(points) // len(SEEDS) == len(base_loss)
    _, se = _combined([_seed_offset(s) for s in SEEDS], [0.01] * len(SEEDS))
    assert sorted(pts.L) == pytest.approx(sorted(base_loss.values()), rel=1e-12)
    assert pts.se == pytest.approx([se] * len(pts.N), rel=1e-12)

    wsd = BUILDERS["wsd"](seeds=(0, 1))  # branches of different seeds' trunks: one bootstrap cluster per size
    wsd_dir = tmp_path / "wsd"
    runner = SweepRunner(dataclasses.replace(sweep, points=tuple(wsd)), wsd_dir, tmp_path / "data")
    runner.write_points(wsd)
    for p in wsd:
        if p.coords["role"] == "branch":
            _finished(runner, p, 3.0 + p.coords["tokens_index"] + p.coords["size_index"] / 10, 0.01)
    pts = points_from_sweep(wsd_dir)
    assert sorted(pts.trunk) == sorted(p.coords["trunk"] for p in BUILDERS["wsd"]() if p.coords["role"] == "branch")


def test_fit_lr_averages_a_seeded_lr_sweep_dir(tmp_path, capsys):
    points = lr_sweep(_base(), (3312, 19800), (1e-3, 3e-3, 1e-2, 3e-2), rule=RULE, seeds=(0, 1))
    runner = SweepRunner(Sweep(name="lr", base=_base(), points=tuple(points), rule=RULE), tmp_path, tmp_path / "d")
    runner.write_points(points)
    for p in points:
        _finished(runner, p, _parabola(p.coords["N"], p.coords["lr"]) + _seed_offset(p.coords["seed"] * 2), 0.002)
    assert main(["fit-lr", str(tmp_path), "--bootstrap", "0"]) == 0
    fit = json.loads((tmp_path / "lr_fit.json").read_text())
    assert len(fit["points"]) == len(points) // 2 and {p["seeds"] for p in fit["points"]} == {2}
    _, se = _combined([_seed_offset(0), _seed_offset(2)], [0.002, 0.002])
    assert [p["loss_se"] for p in fit["points"]] == pytest.approx([se] * len(fit["points"]), rel=1e-12)
    for p in fit["points"]:  # seeds 0 and 2 sit 0.02 either side: the mean is the noiseless loss
        assert p["loss"] == pytest.approx(_parabola(p["N"], p["lr"]), rel=1e-12)
    assert "mean of 2 seeds" in capsys.readouterr().out
