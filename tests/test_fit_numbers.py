"""Sweep numbers that are right by construction (issue 34): bootstrap laws stay paired with their
optima, compared sweeps draw independent bootstraps, the exact compute model extrapolates along the
sweep's own shapes, WSD branches resample by trunk, and Approach 2 counts eval noise once."""

import dataclasses
import json
import math

import numpy as np
import pytest

from ar_lm.config import ModelConfig
from ar_lm.errors import UserError
from ar_lm.model.counts import flops_per_token, param_counts
from ar_lm.scaling import ShapeRule, ladder, ladder_model
from ar_lm.scaling import compute as CM
from ar_lm.scaling import fit as F
from ar_lm.scaling import isoflop as I
from ar_lm.scaling import parametric as PR
from ar_lm.scaling import points as P
from ar_lm.scaling import predict as Q
from ar_lm.scaling.compute import ComputeModel

TRUE = {"E": 1.8, "A": 400.0, "B": 600.0, "alpha": 0.35, "beta": 0.30}


def _law(p, n, d):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _boot_laws(n_boot, seed=0):
    """Bootstrap-like laws: TRUE with its exponents and coefficients jittered."""
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(n_boot):
        b = {**TRUE, "alpha": TRUE["alpha"] + rng.normal(0, 0.03), "beta": TRUE["beta"] + rng.normal(0, 0.03),
             "A": TRUE["A"] * math.exp(rng.normal(0, 0.3)), "E": TRUE["E"] + rng.normal(0, 0.05)}
        laws.append({**b, **PR.asymptotic_exponents(b)})
    return laws


def _result(boots):
    rng = np.random.default_rng(1)
    n, d = np.meshgrid(np.geomspace(1e6, 1e8, 4), np.geomspace(1e8, 1e10, 4))
    pts = [{"N": float(x), "D": float(y), "loss": float(_law(TRUE, x, y) * math.exp(rng.normal(0, 0.005)))}
           for x, y in zip(n.ravel(), d.ravel())]
    return {"approach3": {**TRUE, **PR.asymptotic_exponents(TRUE), "bootstrap": boots},
            "compute": ComputeModel().to_json(), "points": pts}


# ---------------------------------------------------------------------------------------------
# A. predict_compute keeps each bootstrap law with its own optimum


def test_a_degenerate_bootstrap_law_does_not_shift_the_others_optima():
    boots = _boot_laws(30)
    degenerate = {**boots[5], "beta": 0.0}  # fitted, but no compute-optimal frontier (a is None)
    degenerate.update(PR.asymptotic_exponents(degenerate))
    assert degenerate["a"] is None
    clean = Q.predict_compute(_result(boots), 1e20)
    mixed = Q.predict_compute(_result(boots[:3] + [degenerate] + boots[3:]), 1e20)
    for k in ("N_interval", "D_interval", "interval"):
        assert mixed[k] == pytest.approx(clean[k], rel=1e-12), k
    # and the band is what each law predicts at its own optimum
    opt = [PR.optimal_size(b, ComputeModel(), 1e20) for b in boots]
    own = np.log([_law(b, n, d) for b, (n, d) in zip(boots, opt)])
    lo, hi = np.percentile((own[:, None] + Q.residuals(_result(boots))[None, :]).ravel(), (2.5, 97.5))
    assert clean["interval"] == pytest.approx([math.exp(lo), math.exp(hi)], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# B. compared sweeps draw independent bootstraps; a frontier needs more minima than parameters


def _isoflop(seed, budgets=np.geomspace(1e17, 1e21, 6), noise=0.005, sizes=9, span=10.0):
    """IsoFLOP points of TRUE under C = 6ND, the optimum mid-span of each budget (N_opt / span to N_opt x span)."""
    rng = np.random.default_rng(seed)
    p = {**TRUE, **PR.asymptotic_exponents(TRUE)}
    rows = []
    for g, c in enumerate(budgets):
        n_star, _ = PR.optimal_size(p, ComputeModel(), c)
        for n in np.geomspace(n_star / span, n_star * span, sizes):
            d = c / (6 * n)
            rows.append((n, d, c, _law(TRUE, n, d) * math.exp(rng.normal(0, noise)), g))
    a = np.array(rows)
    return P.Points(a[:, 0], a[:, 1], a[:, 2], a[:, 3], group=a[:, 4].astype(int))


def test_compared_sweeps_are_bootstrapped_independently():
    a = _isoflop(0)
    b = dataclasses.replace(a, L=a.L - 0.03)  # B = A - 0.03 nats: the same noise in the data themselves
    fa, fb = Q.fit_compared([a, b], n_boot=40)
    assert fa["bootstrap_seed"] != fb["bootstrap_seed"]
    e_a = np.array([r["E"] for r in fa["approach2"]["bootstrap"] if r["E"] is not None])
    e_b = np.array([r["E"] for r in fb["approach2"]["bootstrap"] if r["E"] is not None])
    k = min(len(e_a), len(e_b))
    assert k >= 30
    # independent replicates: var(E_A - E_B) ~ 2 var(E_A); shared noise would make the difference ~constant
    assert np.std(e_a[:k] - e_b[:k]) > np.std(e_a[:k])
    res = Q.compute_multiplier(fa, fb)
    lo, hi = res["interval"]
    assert lo < res["multiplier"] < hi
    same = [F.fit_points(p, n_boot=20, seed=7, approaches=(2,)) for p in (a, b)]
    with pytest.raises(UserError, match="same seed"):
        Q.compute_multiplier(*same)


def test_a_frontier_through_as_many_minima_as_parameters_is_refused():
    three = _isoflop(0, budgets=np.geomspace(1e17, 1e21, 3))
    fit3 = F.fit_points(three, n_boot=0, approaches=(2,))["approach2"]
    assert len(fit3["minima"]) == 3 and fit3["frontier"] is None  # 3 parameters through 3 minima: exact, untested
    four = F.fit_points(_isoflop(1, budgets=np.geomspace(1e17, 1e21, 4)), n_boot=0, seed=1, approaches=(2,))
    assert four["approach2"]["frontier"] is not None
    with pytest.raises(UserError, match="more minima than its 3 parameters: A has 3"):
        Q.compute_multiplier({"approach2": fit3}, four)


# ---------------------------------------------------------------------------------------------
# C. the exact compute model extrapolates along the sweep's own shapes


def _family(family="gpt2", seq_len=128, n_kind="non_embedding", rule=ShapeRule(aspect=16, head_dim=16)):
    base = ModelConfig(family=family, vocab_size=257, max_seq_len=64)
    return base, rule, CM.ShapeFamily(base, rule, seq_len, n_kind)


def _run_shape(base, target, rule, seq_len, n_kind):
    """(N, fpt) of the ladder shape nearest `target`, as a sweep's run of window seq_len builds it."""
    m = ladder_model(base, target, rule, n_kind)
    m = dataclasses.replace(m, max_seq_len=max(m.max_seq_len, seq_len))
    return param_counts(m)[n_kind], flops_per_token(m, seq_len)


@pytest.mark.parametrize("family,n_kind", [("gpt2", "non_embedding"), ("llama", "total")])
def test_exact_compute_beyond_the_measured_sizes_is_the_shape_rules_own(family, n_kind):
    base, rule, shapes = _family(family, n_kind=n_kind)
    runs = [_run_shape(base, t, rule, 128, n_kind) for t in (2e4, 1e5, 5e5)]
    n, fpt = np.array(runs, float).T
    model = CM.measured(n, fpt, shapes)
    np.testing.assert_allclose(model.fpt(n), fpt, rtol=1e-12)  # on the measured runs: the measured values
    n_far, fpt_far = _run_shape(base, 100 * n.max(), rule, 128, n_kind)
    assert n_far > 50 * n.max()
    assert float(model.fpt(n_far)) == pytest.approx(fpt_far, rel=1e-6) and model.fpt(n_far) >= 6 * n_far
    between = _run_shape(base, 1e6, rule, 128, n_kind)  # beyond the runs but a shape of the ladder
    assert float(model.fpt(between[0])) == pytest.approx(between[1], rel=1e-6)
    old = CM.measured(n, fpt)  # the end segment's slope carried on (gpt2, non-embedding N: 0.78 x 6N, truth 1.03)
    assert abs(float(old.fpt(n_far)) / fpt_far - 1) > 0.01
    back = CM.ComputeModel.from_json(json.loads(json.dumps(model.to_json())))
    assert back == model and float(back.fpt(n_far)) == float(model.fpt(n_far))


def test_the_shape_family_is_the_sweeps_ladder():
    base, rule, shapes = _family("llama", rule=ShapeRule(aspect=24, head_dim=32, max_width=1024))
    ladder_shapes = {(m.d_model, m.n_layers, m.n_heads, m.ff_dim) for m in ladder(base, rule, max_params=1e12)}
    assert ladder_shapes == {(m.d_model, m.n_layers, m.n_heads, m.ff_dim) for m in shapes.shapes()}


def test_runs_off_the_recorded_shape_rule_keep_their_measured_model():
    """Points not shaped by the recorded rule (hand-made, or another rule than the Sweep's) are fitted with the
    model through their own measured FLOPs per token, not the rule's."""
    base, rule, shapes = _family()
    runs = np.array([_run_shape(base, t, rule, 128, "non_embedding") for t in (2e4, 1e5)], float)
    assert CM.measured(runs[:, 0], runs[:, 1], shapes) == CM.analytic(shapes)
    assert CM.measured(runs[:, 0], runs[:, 1] * 1.01, shapes) == CM.measured(runs[:, 0], runs[:, 1] * 1.01)


# ---------------------------------------------------------------------------------------------
# D. approach 3 resamples a WSD ladder by trunk


def _wsd_points(seed=0, sizes=(1e6, 4e6, 1.6e7), budgets=(2e8, 5e8, 1.2e9, 3e9)):
    """Branches of one trunk per size: D = each budget, 0.3% noise."""
    rng = np.random.default_rng(seed)
    n, d = (a.ravel() for a in np.meshgrid(np.array(sizes), np.array(budgets), indexing="ij"))
    loss = _law(TRUE, n, d) * np.exp(rng.normal(0, 0.003, n.size))
    trunk = np.array([f"n{sizes.index(x)}_trunk" for x in n])
    return P.Points(n, d, 6 * n * d, loss), trunk


def test_approach3_bootstraps_whole_trunks(monkeypatch):
    pts, trunk = _wsd_points()
    seen = []
    real = F.fit_parametric

    def spy(n, d, loss, **kw):
        seen.append(np.array(n))
        return real(n, d, loss, **kw)

    monkeypatch.setattr(F, "fit_parametric", spy)
    res = F.fit_points(pts, n_boot=12, approaches=(3,), top=4, clusters=trunk)["approach3"]
    replicates = seen[1:]  # the first call is the fit itself
    assert len(replicates) >= 6 and res["bootstrap_ok"][1] == 12
    per_trunk = (trunk == trunk[0]).sum()
    for n in replicates:
        _, counts = np.unique(n, return_counts=True)
        assert len(n) == len(pts.N) and np.all(counts % per_trunk == 0)  # every trunk all in, as often as drawn
    assert any(len(np.unique(n)) < len(pts.N) / per_trunk for n in replicates)  # and some trunks drawn twice


def test_resampling_without_clusters_draws_single_points():
    rng = np.random.default_rng(0)
    idx = F.resample(rng, [None] * 12)
    assert len(idx) == 12 and len(np.unique(idx)) < 12
    mixed = F.resample(np.random.default_rng(1), ["t0", "t0", "t0", None, None])
    assert np.isin([0, 1, 2], mixed).all() == np.isin(0, mixed)  # the trunk's points come and go together


# ---------------------------------------------------------------------------------------------
# E. approach 2's parametric bootstrap counts the eval noise once


def _pooled(pts):
    """RSS / dof of one parabola in ln N per budget (every point in its window here), and dof."""
    rss, dof = 0.0, 0
    for g in np.unique(pts.group):
        m = pts.group == g
        x = np.log(pts.N[m])
        rss += float(np.sum((pts.L[m] - np.polyval(np.polyfit(x, pts.L[m], 2), x)) ** 2))
        dof += int(m.sum()) - 3
    return rss / dof, dof


@pytest.mark.parametrize("se_over_scatter", [0.3, 3.0])
def test_approach2_noise_counts_the_eval_noise_once(se_over_scatter):
    pts = _isoflop(2, budgets=np.geomspace(1e17, 1e20, 4), noise=0.004, sizes=6, span=3.0)
    pooled, dof = _pooled(pts)
    se = se_over_scatter * math.sqrt(pooled)
    pts = dataclasses.replace(pts, se=np.full(len(pts.L), se))
    res = F.fit_points(pts, n_boot=12, approaches=(2,))["approach2"]
    assert all(m["window_points"] == 6 for m in res["minima"]) and len(res["minima"]) == 4
    noise = res["noise"]
    assert noise["dof"] == dof == 12 and noise["residual_variance"] == pytest.approx(pooled, rel=1e-9)
    scale, _ = F._noise_scale(pts, I.WINDOW)
    # the residual variance already holds the eval noise: the total is the larger of the two, not their sum
    np.testing.assert_allclose(scale**2, max(pooled, se**2), rtol=1e-9)
