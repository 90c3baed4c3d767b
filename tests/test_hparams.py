"""Size-aware hyperparameters: rule presets, rules applied by sweeps, lr sweeps and their fitted rule."""

import json
import math

import numpy as np
import pytest
from conftest import tiny_config

from ar_lm.cli import main
from ar_lm.config import DataConfig, ExperimentConfig, ModelConfig
from ar_lm.errors import UserError
from ar_lm.model.counts import flops_per_token
from ar_lm.scaling.hparams import HParamRule, PowerLaw, deepseek_2024, fit_lr_sweep, porian_2024
from ar_lm.scaling.runner import SweepRunner
from ar_lm.scaling.sweeps import ShapeRule, Sweep, isoflop_sweep, lr_sweep, wsd_sweep
from ar_lm.training.loop import train

BASE = ExperimentConfig(model=ModelConfig(vocab_size=257, max_seq_len=2048), data=DataConfig(seq_len=2048, batch_size=8))


def test_presets_give_their_published_values_at_two_sizes():
    rule = porian_2024()
    for n, factor in ((1.08e8, 1.0), (8 * 1.08e8, 8.0)):
        v = rule.resolve(BASE, n, 1e9)
        assert v["lr"] == pytest.approx(0.0047 * factor ** (-1 / 3))  # 0.0047, then 0.00235
        assert v["batch_size"] == round(160 * factor ** (2 / 3))  # 160, then 640 sequences of 2048
        assert v["warmup_tokens"] == round(n)  # warmup = N tokens
    fpt = flops_per_token(BASE.model, 2048)
    for tokens in (1e9, 1e11):
        c = fpt * tokens
        v = deepseek_2024().resolve(BASE, 1e6, tokens)
        assert v["lr"] == pytest.approx(0.3118 * c**-0.125)
        assert v["batch_size"] == max(1, round(0.2920 * c**0.3271 / 2048))
    cfg, values = rule.apply(BASE, 1.08e8, 1e9)
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.optim.warmup_tokens, cfg.optim.warmup_steps) == (
        values["lr"], 160, 108_000_000, 0)
    assert HParamRule.from_json(json.loads(json.dumps(rule.to_json()))) == rule


def test_sweeps_apply_the_rule_and_record_it_in_coords_and_config():
    base = tiny_config(model={"vocab_size": 257})
    rule = HParamRule("test", lr=PowerLaw(1e-2, -0.5, 1e4), batch_tokens=PowerLaw(256, 0.5, 1e4), b2=0.99,
                      warmup_tokens_per_param=1.0)
    points = isoflop_sweep(base, (3e8, 1e9), sizes_per_budget=3, rule=ShapeRule(aspect=16, head_dim=8), hparams=rule,
                           min_steps=2)
    lrs = set()
    for p in points:
        n = p.coords["N"]
        assert p.config.optim.lr == p.coords["lr"] == pytest.approx(1e-2 * (n / 1e4) ** -0.5)
        assert p.config.data.batch_size == p.coords["batch_size"] == max(1, round(256 * (n / 1e4) ** 0.5 / 32))
        assert p.config.optim.b2 == p.coords["b2"] == 0.99
        assert p.coords["warmup_steps"] == min(round(n / (p.config.data.batch_size * 32)), p.config.total_steps - 1)
        assert p.coords["D"] == p.config.total_steps * p.config.data.batch_size * 32
        lrs.add(p.coords["lr"])
    assert len(lrs) >= 3  # sizes differ, so their learning rates do
    wsd = wsd_sweep(base, sizes=(2e3, 8e3), tokens=(25600, 51200), rule=ShapeRule(aspect=16, head_dim=8), hparams=rule)
    for trunk in (p for p in wsd if p.coords["role"] == "trunk"):
        branches = [p for p in wsd if p.coords.get("trunk") == trunk.name]
        assert {b.config.optim.lr for b in branches} == {trunk.config.optim.lr}  # one lr per trunk
        assert {b.config.data.batch_size for b in branches} == {trunk.config.data.batch_size}


def _synthetic_rows(lr_star, sizes=(1e4, 4e4, 1.6e5), lrs=np.geomspace(1e-4, 1e-1, 7), se=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [{"N": n, "lr": float(lr), "batch_size": 8, "seq_len": 32, "loss_se": se,
             "loss": 2.0 + 0.05 * math.log(lr / lr_star(n)) ** 2 + rng.normal(0, se) if se else
             2.0 + 0.05 * math.log(lr / lr_star(n)) ** 2} for n in sizes for lr in lrs]


def test_lr_fit_recovers_a_known_law_and_round_trips_as_a_rule(tmp_path):
    lr_star = lambda n: 3e-3 * (n / 4e4) ** -0.4  # noqa: E731
    result = fit_lr_sweep(_synthetic_rows(lr_star), n_boot=0)
    for e in result["sizes"]:
        assert e["lr_opt"] == pytest.approx(lr_star(e["N"]), rel=1e-6)  # exact on an exact parabola
    assert result["fits"]["lr"]["exponent"] == pytest.approx(-0.4, abs=1e-6)
    path = tmp_path / "lr_fit.json"
    path.write_text(json.dumps(result))
    rule = HParamRule.from_fit(path)
    for n in (2e4, 3e5):
        assert rule.resolve(BASE, n, 1e6)["lr"] == pytest.approx(lr_star(n), rel=1e-6)

    noisy = fit_lr_sweep(_synthetic_rows(lr_star, se=0.002, seed=1), n_boot=200)
    lo, hi = noisy["fits"]["lr"]["exponent_ci"]
    assert lo < -0.4 < hi and hi - lo < 0.3 and noisy["fits"]["lr"]["bootstrap_ok"][0] >= 150

    # several batch sizes: the optimal batch per size (of the per-batch minima) and its power law
    b_star = lambda n: 16 * (n / 4e4) ** 0.5  # noqa: E731
    rows = [dict(r, batch_size=b, loss=r["loss"] + 0.03 * math.log(b / b_star(r["N"])) ** 2)
            for r in _synthetic_rows(lr_star) for b in (2, 4, 8, 16, 32, 64)]
    both = fit_lr_sweep(rows, n_boot=0)
    for e in both["sizes"]:
        assert e["batch_opt"] == pytest.approx(b_star(e["N"]), rel=0.05) and e["lr_opt"] == pytest.approx(lr_star(e["N"]))
    assert both["fits"]["batch"]["exponent"] == pytest.approx(0.5, abs=0.05)
    rule = HParamRule.from_json(both["rule"])
    assert rule.resolve(tiny_config(), 4e4, 1e6)["batch_size"] == round(rule.batch_tokens(4e4, 0, 0) / 32)

    edge = _synthetic_rows(lambda n: 1.0)  # every optimum above the grid
    with pytest.raises(UserError, match=r"size N=10,000 \(batch 8\): the lowest loss is at the largest learning rate"):
        fit_lr_sweep(edge, n_boot=0)


def test_lr_sweep_runs_and_an_optimum_at_the_edge_is_one_line(tmp_path, byte_data, capsys):
    base = tiny_config(byte_data, model={"vocab_size": 257}, train={"steps": 1, "eval_tokens": 256})
    points = lr_sweep(base, sizes=(2e3, 8e3), lrs=(1e-6, 2e-6, 4e-6), tokens_per_param=0.5,
                      rule=ShapeRule(aspect=16, head_dim=8))
    assert [p.name for p in points] == ["n0_lr0", "n0_lr1", "n0_lr2", "n1_lr0", "n1_lr1", "n1_lr2"]
    assert [p.coords["lr"] for p in points[:3]] == [1e-6, 2e-6, 4e-6]
    runner = SweepRunner(Sweep("lr", base, tuple(points)), tmp_path / "sweep", byte_data)
    runner.write_points(points)
    for p in points:
        train(p.config, runner.run_dir(p.name))
    # a few steps at tiny learning rates: the loss still falls with lr, so each optimum is at the top edge
    assert main(["fit-lr", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the lowest loss is at the largest learning rate (4e-06)" in err[0], err
    assert not (tmp_path / "sweep" / "lr_fit.json").exists()
    assert main(["fit-lr", str(tmp_path)]) == 2 and "no sweep.json" in capsys.readouterr().err
