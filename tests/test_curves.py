"""Whole-loss-curve laws (`ar_lm.scaling.curves`): the multi-power law against a direct evaluation of its
formula, its fit on synthetic curves (known parameters), and on a tiny WSD ladder trained here."""

import json
import math
import time

import numpy as np
import pytest
from scipy.optimize import approx_fprime

from ar_lm.errors import UserError
from ar_lm.scaling import curves as cv

PEAK, T, W = 3e-3, 2000, 50
# the order of the fits of Luo et al. 2025 (Table 5), for lrs of a few 1e-3
TRUE = cv.MPLParams(L0=2.0, A=0.6, alpha=0.45, B=100.0, C=2.0, beta=0.55, gamma=0.5)


def _warm(lrs, w=W):
    s = np.arange(len(lrs))
    return np.where(s < w, PEAK * (s + 1) / w, lrs)


def constant(t=T):
    return _warm(np.full(t, PEAK))


def wsd(t=T, frac=0.2, final=0.1):
    s, k = np.arange(t), round(frac * t)
    return _warm(np.where(s < t - k, PEAK, PEAK * (final + (1 - final) * (1 - (s - (t - k) + 1) / k))))


def cosine(t=T, final=0.1):
    p = np.clip((np.arange(t) - W) / (t - 1 - W), 0, 1)
    return _warm(PEAK * (final + (1 - final) * 0.5 * (1 + np.cos(np.pi * p))))


def mpl_direct(p: cv.MPLParams, lrs, t: int) -> float:
    """The paper's formula term by term (1-based: eta_0 = the peak at the warmup's end, eta_1.. after it)."""
    w = cv.warmup_end(lrs)  # lrs[w] is the first peak update: the paper's eta_0
    eta = lambda k: lrs[w + k]  # noqa: E731
    n = t - w - 1  # post-warmup updates eta_1..eta_n
    ld = sum((eta(k - 1) - eta(k)) * (1 - (p.C * eta(k) ** -p.gamma * sum(eta(u) for u in range(k, n + 1)) + 1) ** -p.beta)
             for k in range(1, n + 1))
    return p.L0 + p.A * sum(lrs[:t]) ** -p.alpha - p.B * ld


def test_predictions_match_the_formula_evaluated_term_by_term():
    rng = np.random.default_rng(0)
    lrs = np.concatenate([PEAK * np.arange(1, 6) / 5, PEAK * rng.uniform(0.1, 1.0, 40)])  # non-monotonic after warmup
    steps = np.arange(6, 46)
    got = cv.predict_mpl(TRUE, lrs, steps)
    want = [mpl_direct(TRUE, lrs, t) for t in steps]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # a constant lr has no decay term: L0 + A S^-alpha exactly
    flat = constant(100)
    np.testing.assert_allclose(cv.predict_mpl(TRUE, flat, [100])[0], 2.0 + 0.6 * flat.sum() ** -0.45, rtol=1e-12)


def test_the_fit_objective_gradient_is_exact():
    curves = [(lrs, np.arange(60, T + 1, 20), cv.predict_mpl(TRUE, lrs, np.arange(60, T + 1, 20)) * 1.01)
              for lrs in (constant(), wsd())]
    designs = [cv._design(*c, scale=PEAK) for c in curves]
    th = np.array([1.9, np.log(0.5), np.log(0.4), np.log(0.8), np.log(0.05), np.log(0.7), np.log(0.4)])
    f = lambda x: cv._objective(x, designs, 0.05, 1.0)  # noqa: E731
    np.testing.assert_allclose(f(th)[1], approx_fprime(th, lambda x: f(x)[0], 1e-7), rtol=1e-4, atol=1e-4)


def _curves(schedules, noise=0.0, every=10, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for lrs in schedules:
        t = np.arange(every, len(lrs) + 1, every)
        out.append((lrs, t, cv.predict_mpl(TRUE, lrs, t) * np.exp(rng.normal(0, noise, len(t)))))
    return out


def test_noise_free_curves_give_back_every_parameter():
    fit = cv.fit_mpl(_curves([constant(), wsd()]), prior=0.0)
    for k, v in TRUE.to_dict().items():
        assert fit["params"][k] == pytest.approx(v, rel=1e-3), k
    assert fit["rmse_log"] < 1e-6 and fit["converged"]


def test_fit_on_constant_and_wsd_predicts_the_cosine_curve():
    """Noisy (0.2% per point) constant and WSD curves: the fit recovers L0, A, alpha and B, and predicts a
    cosine schedule's loss, which it never saw, within 0.5% at its end and all along it. One cooldown does not
    pin C, beta and gamma apart (the prior holds beta and gamma near 0.5), so they are not asserted."""
    fit = cv.fit_mpl(_curves([constant(), wsd()], noise=0.002))
    p = fit["params"]
    assert p["L0"] == pytest.approx(2.0, rel=0.02) and p["A"] == pytest.approx(0.6, rel=0.05)
    assert p["alpha"] == pytest.approx(0.45, rel=0.05) and p["B"] == pytest.approx(100.0, rel=0.25)
    assert fit["rmse_log"] == pytest.approx(0.002, rel=0.1)  # down to the noise
    cos = cosine()
    t = np.arange(W + 1, T + 1)
    rel = cv.predict_mpl(p, cos, t) / cv.predict_mpl(TRUE, cos, t) - 1
    assert abs(rel[-1]) < 0.005 and np.max(np.abs(rel)) < 0.005
    # the schedule matters: a constant lr's final loss is far (> 1%) above the cosine's, so 0.5% is not trivial
    assert cv.predict_mpl(TRUE, constant(), [T])[0] / cv.predict_mpl(TRUE, cos, [T])[0] - 1 > 0.01


def test_a_fit_needs_a_decaying_curve():
    with pytest.raises(UserError, match="decays"):
        cv.fit_mpl(_curves([constant()]))


LADDER = '''
from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.scaling.sweeps import ShapeRule, Sweep, wsd_sweep

RULE = ShapeRule(aspect=16, head_dim=8)
STEPS = (200, 400, 800)  # per budget; 32 x 32 tokens a step


def config():
    return ExperimentConfig(
        name="curves", model=ModelConfig(vocab_size=257, max_seq_len=32), data=DataConfig(seq_len=32, batch_size=32, prefetch=0),
        optim=OptimConfig(lr=1e-2, warmup_steps=4), train=TrainConfig(eval_tokens=8192, log_every=1, checkpoint_every=0,
        keep_checkpoints=1, async_checkpoint=False), mesh=MeshConfig(devices=1), logging=LoggingConfig(wandb=False, progress=False))


def sweep():
    points = wsd_sweep(config(), sizes=(8e3,), tokens=tuple(s * 32 * 32 for s in STEPS), cooldown_frac=0.2, rule=RULE)
    return Sweep(name="curves", base=config(), points=tuple(points), rule=RULE)
'''


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """A one-size WSD ladder (cooldowns to 200, 400 and 800 steps) on 0.9 MB of word text (no token seen twice):
    the trunk and the first two branches trained, the third left to predict. (sweep directory, seconds)."""
    from conftest import make_corpus

    from ar_lm.data.sources import FileCorpus
    from ar_lm.data.writer import write_dataset
    from ar_lm.scaling.dispatch import ExecOptions
    from ar_lm.scaling.runner import run_sweep

    root = tmp_path_factory.mktemp("ladder")
    start = time.perf_counter()
    write_dataset(root / "data", FileCorpus([str(make_corpus(root / "corpus", n_docs=1000))]), "byte", val_fraction=0.02)
    (root / "ladder.py").write_text(LADDER)
    assert run_sweep(str(root / "ladder.py"), str(root / "sweep"), str(root / "data"), ExecOptions(max_concurrent=2),
                     only="n0_*[!2]", fit=False) == 0
    return root / "sweep", time.perf_counter() - start


def test_the_law_fitted_on_the_trunk_and_first_cooldown_predicts_the_next(ladder):
    """The second cooldown's final train loss (mean of its last 5 batches) within 2.5% (measured: -0.7%), and
    closer than the trunk's constant-lr loss at that step (measured: +2.7%, the cooldown's gain) by 2x."""
    sweep_dir, seconds = ladder
    start = time.perf_counter()
    result = cv.check_sweep_curves(sweep_dir)
    print(f"ladder {seconds:.0f} s, check {time.perf_counter() - start:.1f} s\n{cv.format_curves(result)}")
    json.dumps(result)  # JSON-serialisable
    (size,) = result["sizes"]
    assert size["fit_on"] == ["n0_trunk", "n0_d0"] and [r["name"] for r in size["branches"]] == ["n0_d1"]
    (row,) = size["branches"]
    assert row["tail_t"][-1] == row["steps"] - 1 == 399 and row["trunk_reaches_step"]
    assert abs(row["rel_err_train"]) < 0.025
    assert abs(row["rel_err_baseline_trunk"]) > 2 * abs(row["rel_err_train"])
    assert math.isfinite(row["rel_err_val_shifted"])
    assert all(line.startswith("[curves] ") for line in cv.format_curves(result).splitlines())


def test_a_branch_not_run_is_predictable_within_the_error_of_the_checked_one(ladder):
    sweep_dir, _ = ladder
    check = cv.check_sweep_curves(sweep_dir)["sizes"][0]["branches"][0]
    err = abs(check["rel_err_val_shifted"])
    loose = cv.predictable_branches(sweep_dir, tolerance=err * 1.01)
    (size,) = loose["sizes"]
    assert size["measured"] == ["n0_d0", "n0_d1"] and size["validated_on"] == "rel_err_val_shifted"
    assert size["validation_error"] == pytest.approx(err) and size["validated_horizon"] == 2.0
    (row,) = size["branches"]
    assert row["name"] == "n0_d2" and row["horizon_ratio"] == 2.0 and loose["skippable"] == ["n0_d2"]
    assert 0.5 < row["predicted_loss"] < check["measured_val"]  # twice the tokens: lower than the 400-step branch
    assert cv.predictable_branches(sweep_dir, tolerance=err * 0.99)["skippable"] == []
