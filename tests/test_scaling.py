"""Scaling laws: the fitter recovers known laws; IsoFLOP grids spend their budget; ladder sizes."""

import math

import numpy as np
import pytest
from conftest import tiny_config
from scipy import optimize

from ar_lm.config import ModelConfig
from ar_lm.errors import UserError
from ar_lm.model.counts import flops_per_token, param_counts
from ar_lm.scaling import ShapeRule, grid_sweep, isoflop_sweep, ladder, ladder_model
from ar_lm.scaling import fit as F
from ar_lm.scaling import isoflop as I
from ar_lm.scaling import parametric as PR
from ar_lm.scaling import points as P
from ar_lm.scaling import predict as Q
from ar_lm.scaling.compute import ComputeModel, measured

TRUE = {"E": 1.8, "A": 400.0, "B": 600.0, "alpha": 0.35, "beta": 0.30}
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def _law(p, n, d):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _noisy_grid(seed=0, noise=0.005):
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.geomspace(1e6, 1e9, 7), np.geomspace(1e8, 1e11, 7))
    n, d = n.ravel(), d.ravel()
    loss = _law(TRUE, n, d) * np.exp(rng.normal(0, noise, n.size))
    return P.Points(n, d, 6 * n * d, loss)


def test_parametric_fit_recovers_known_law():
    pts = _noisy_grid()
    res = F.fit_points(pts, n_boot=20, approaches=(3,))["approach3"]
    # tolerances for 0.5% multiplicative noise on 49 points: exponents within 0.03; E within 0.1
    # (E is an extrapolation: the lowest observed loss is 2.38, 0.58 above it)
    assert res["alpha"] == pytest.approx(TRUE["alpha"], abs=0.03)
    assert res["beta"] == pytest.approx(TRUE["beta"], abs=0.03)
    assert res["E"] == pytest.approx(TRUE["E"], abs=0.1)
    assert res["a"] == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), abs=0.03)
    lo, hi = res["ci"]["alpha"]
    assert lo <= res["alpha"] <= hi and hi - lo < 0.2


def test_parametric_fit_is_exact_without_noise():
    res = F.fit_points(_noisy_grid(noise=0.0), n_boot=0, approaches=(3,))["approach3"]
    for k in ("E", "alpha", "beta"):
        assert res[k] == pytest.approx(TRUE[k], rel=1e-3)


def test_chinchilla_published_fit_gives_its_exponent():
    p = dict(CHINCHILLA)
    p.update(PR.asymptotic_exponents(p))
    assert p["a"] == pytest.approx(0.46, abs=0.01)
    # independently: minimise L(N, C / 6N) over N numerically at two budgets and take the slope
    n_opts = []
    for c in (1e21, 1e23):
        res = optimize.minimize_scalar(lambda logn: _law(p, math.exp(logn), c / (6 * math.exp(logn))),
                                       bounds=(10, 40), method="bounded", options={"xatol": 1e-10})
        n_opts.append(math.exp(res.x))
        n_formula, _ = PR.optimal_size(p, ComputeModel(), c)
        assert n_formula == pytest.approx(n_opts[-1], rel=1e-4)
    slope = math.log(n_opts[1] / n_opts[0]) / math.log(100)
    assert slope == pytest.approx(p["a"], abs=1e-4)


def test_approach2_recovers_the_frontier():
    p = dict(TRUE)
    p.update(PR.asymptotic_exponents(p))
    rows = []
    for g, c in enumerate((1e18, 1e19, 1e20, 1e21)):
        n_star, _ = PR.optimal_size(p, ComputeModel(), c)
        for n in n_star * np.geomspace(1 / 4, 4, 7):
            rows.append((n, c / (6 * n), c, _law(p, n, c / (6 * n)), g))
    arr = np.array(rows)
    pts = P.Points(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], group=arr[:, 4].astype(int))
    res = F.fit_points(pts, n_boot=20, approaches=(2,))["approach2"]
    assert res["a"] == pytest.approx(p["a"], abs=0.02)
    assert res["b"] == pytest.approx(p["b"], abs=0.02)
    assert len(res["minima"]) == 4 and not res["excluded"]


def test_approach1_envelope_picks_the_best_run():
    cs = np.geomspace(1e10, 1e12, 30)
    curves = [(1e5, cs, 3 + 1e3 / cs**0.3), (1e6, cs[10:], 2.9 + 1e3 / cs[10:] ** 0.3 - 0.05)]
    env = F.envelope(curves)
    assert set(env["N"][env["C"] < cs[10]]) == {1e5}
    assert set(env["N"][env["C"] > cs[11]]) == {1e6}


def test_isoflop_points_spend_their_budget():
    base = tiny_config(model={"vocab_size": 257, "max_seq_len": 64}, data={"seq_len": 64, "batch_size": 8})
    tiny = ShapeRule(aspect=32, head_dim=16)  # the default's 64-dimensional heads have 2 shapes this small
    assert len(isoflop_sweep(base, (1e11,), sizes_per_budget=4, spread=3.0, rule=tiny)) == 4  # distinct sizes
    budgets = (3e10, 1e11, 3e11)
    points = isoflop_sweep(base, budgets, sizes_per_budget=4, spread=3.0, rule=tiny)
    assert len(points) >= 9
    for p in points:
        cfg = p.config
        actual = flops_per_token(cfg.model, cfg.data.seq_len) * cfg.total_steps * cfg.data.batch_size * cfg.data.seq_len
        assert actual == pytest.approx(p.coords["budget"], rel=0.02)
        assert actual == pytest.approx(p.coords["C"], rel=1e-9)
    sizes = [p.coords["N"] for p in points if p.coords["budget_index"] == 2]
    assert sizes == sorted(sizes) and sizes[-1] / sizes[0] > 4


def test_grid_sweep_crosses_every_size_with_every_token_budget():
    base = tiny_config(model={"vocab_size": 257, "max_seq_len": 64}, data={"seq_len": 64, "batch_size": 8})
    rule = ShapeRule(aspect=32, head_dim=16)
    sizes, tokens = (3e4, 1e5, 3e5), (2e5, 1e6)
    points = grid_sweep(base, sizes, tokens, rule=rule)
    assert [p.name for p in points] == [f"n{i}_d{j}" for i in range(3) for j in range(2)]
    tokens_per_step = base.data.batch_size * base.data.seq_len
    for p in points:
        i, j = p.coords["size_index"], p.coords["tokens_index"]
        assert p.config.model == ladder_model(base.model, sizes[i], rule) and p.config.name == p.name
        assert p.coords["N"] == param_counts(p.config.model)["non_embedding"]
        assert p.coords["D"] == p.config.total_steps * tokens_per_step
        assert abs(p.coords["D"] - tokens[j]) <= tokens_per_step / 2  # the nearest whole number of steps
        assert p.coords["C"] == flops_per_token(p.config.model, base.data.seq_len) * p.coords["D"]
    assert len({p.coords["N"] for p in points}) == 3


def test_budget_too_small_is_an_error():
    base = tiny_config(model={"vocab_size": 257})
    with pytest.raises(UserError, match="too small"):
        isoflop_sweep(base, (1e6,), sizes_per_budget=3)


@pytest.mark.parametrize("target", [1e5, 1e6, 1e7, 1e8])
def test_ladder_hits_target_size(target):
    rule = ShapeRule(aspect=64, head_dim=32)
    base = ModelConfig(vocab_size=1000)
    m = ladder_model(base, target, rule)
    assert m.d_model % 32 == 0 and m.n_layers == max(1, round(m.d_model / 64)) and m.n_heads == m.d_model // 32
    sizes = [param_counts(x)["non_embedding"] for x in ladder(base, rule, max_params=target * 10)]
    assert sizes == sorted(sizes)
    best = min(sizes, key=lambda n: abs(math.log(n / target)))
    assert param_counts(m)["non_embedding"] == best and best == pytest.approx(target, rel=0.6)


def test_points_csv_validation(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("params,flops,loss\n" + "\n".join(f"{n},{c},{3 + 1e3 / n ** 0.3}" for n in (1e6, 2e6, 4e6) for c in (1e18, 1e19)))
    pts = P.points_from_csv(good)
    assert np.allclose(pts.D, pts.C / (6 * pts.N)) and len(set(pts.group)) == 2
    cases = {
        "params,loss\n1,2\n": "needs columns",
        "params,tokens,loss\n1,-2,3\n": "positive numbers",
        "params,tokens,loss\n1,x,3\n": "non-numeric",
    }
    for i, (text, fragment) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.csv"
        path.write_text(text)
        with pytest.raises(UserError, match=fragment):
            P.points_from_csv(path)
    few = tmp_path / "few.csv"
    few.write_text("params,tokens,loss\n1e6,1e9,3.0\n2e6,1e9,2.9\n")
    with pytest.raises(UserError, match="too few points"):
        F.fit_points(P.points_from_csv(few), n_boot=0, approaches=(2,))
    with pytest.raises(UserError, match="needs at least 5 points"):
        F.fit_points(P.points_from_csv(few), n_boot=0, approaches=(3,))


# ---------------------------------------------------------------------------------------------
# Trustworthy fits: wide IsoFLOP curves, exact compute, convergence, intervals, multipliers

P_TRUE = {**TRUE, **PR.asymptotic_exponents(TRUE)}


def _wide_isoflop(seed, noise=0.005, compute=ComputeModel(), law=P_TRUE, budgets=np.geomspace(1e17, 1e23, 8)):
    """8 budgets, each 16 sizes over 1000x in N with the optimum moving from 15% to 85% of the span."""
    rng = np.random.default_rng(seed)
    rows = []
    for g, c in enumerate(budgets):
        n_star, _ = PR.optimal_size(law, compute, c)
        lo = n_star / 1000 ** (0.15 + 0.7 * g / (len(budgets) - 1))
        for n in np.geomspace(lo, lo * 1000, 16):
            d = float(compute.tokens(n, c))
            rows.append((n, d, c, _law(law, n, d) * math.exp(rng.normal(0, noise)), g))
    a = np.array(rows)
    return P.Points(a[:, 0], a[:, 1], a[:, 2], a[:, 3], group=a[:, 4].astype(int), compute=compute)


def test_windowed_isoflop_minima_recover_the_frontier_where_one_parabola_does_not():
    exact = I.approach2(_wide_isoflop(0, noise=0.0), ComputeModel())
    parabola = I.approach2(_wide_isoflop(0, noise=0.0), ComputeModel(), window=np.inf)  # every point
    assert abs(exact["a"] - P_TRUE["a"]) < 0.002 and abs(parabola["a"] - P_TRUE["a"]) > 0.025
    windowed, everything = [], []
    for seed in range(10):
        pts = _wide_isoflop(seed)
        windowed.append(I.approach2(pts, ComputeModel())["a"])
        everything.append(I.approach2(pts, ComputeModel(), window=np.inf)["a"])
    assert abs(np.mean(windowed) - P_TRUE["a"]) < 0.02 < abs(np.mean(everything) - P_TRUE["a"])


def test_budgets_without_an_interior_minimum_are_excluded_and_named():
    pts = _wide_isoflop(0, noise=0.0)
    keep = ~((pts.group == 7) & (pts.N < np.sort(pts.N[pts.group == 7])[13]))  # budget 7 loses its small sizes
    res = I.approach2(pts.subset(keep), ComputeModel())
    assert len(res["minima"]) == 7 and res["excluded"][0]["reason"] == "the lowest loss is at the smallest size"
    assert res["excluded"][0]["C"] == pytest.approx(1e23, rel=1e-6)
    boot = F.fit_points(_wide_isoflop(1), n_boot=30, approaches=(2,))["approach2"]
    assert boot["bootstrap_ok"][1] == 30 and 25 <= boot["bootstrap_ok"][0] <= 30  # counted, not silently dropped
    lo, hi = boot["ci"]["a"]
    assert lo < boot["a"] < hi


def test_exact_compute_model_sets_d_opt_and_the_frontier():
    sizes = np.geomspace(1e3, 1e12, 28)  # every 1/3 decade
    big_attention = measured(sizes, 6 * sizes + 6e4 * sizes**0.5)  # fpt / 6N = 1 + 1e4 / sqrt(N)
    assert big_attention.fpt(1e6) == pytest.approx(6e6 + 6e7, rel=1e-9)  # a measured size
    assert big_attention.fpt(1.5e6) == pytest.approx(9e6 + 6e4 * 1.5e6**0.5, rel=0.01)  # between two
    pts = _wide_isoflop(0, noise=0.0, compute=big_attention, budgets=np.geomspace(1e15, 1e21, 8))
    res = F.fit_points(pts, n_boot=0, approaches=(2, 3))
    minima = res["approach2"]["minima"]
    for m in minima:
        assert m["D_opt"] == pytest.approx(m["C"] / big_attention.fpt(m["N_opt"]), rel=1e-9)
        assert m["D_opt"] < m["C"] / (6 * m["N_opt"]) / 1.2  # not C / 6N (fpt / 6N >= 1.25 here)
    c = np.array([m["C"] for m in minima])
    true_opt = np.array([PR.optimal_size(P_TRUE, big_attention, x) for x in c])
    assert res["approach2"]["a"] == pytest.approx(I.power_law(c, true_opt[:, 0])[1], abs=0.02)
    assert res["approach2"]["b"] == pytest.approx(I.power_law(c, true_opt[:, 1])[1], abs=0.02)
    n_opt, d_opt = PR.optimal_size(res["approach3"], big_attention, 1e22)
    n_true, d_true = PR.optimal_size(P_TRUE, big_attention, 1e22)
    assert n_opt == pytest.approx(n_true, rel=0.02) and big_attention.fpt(n_opt) * d_opt == pytest.approx(1e22)
    local = PR.local_exponents(P_TRUE, big_attention, 1e16)
    assert local["a"] > P_TRUE["a"] + 0.02  # the attention term shifts the small-scale frontier


def test_approach3_converges_to_the_known_optimum_and_reports_a_capped_fit():
    pts = _noisy_grid(noise=0.0)
    res = PR.fit_parametric(pts.N, pts.D, pts.L)
    assert res["converged"] and res["converged_starts"] > 0
    theta_true = [math.log(TRUE["A"]), math.log(TRUE["B"]), math.log(TRUE["E"]), TRUE["alpha"], TRUE["beta"]]
    np.testing.assert_allclose(res["theta"], theta_true, atol=1e-6)
    capped = PR.fit_parametric(pts.N, pts.D, pts.L, top=4, options={"maxiter": 2}, use_vpnls=False)
    assert not capped["converged"] and capped["converged_starts"] == 0
    assert "NOT CONVERGED" in __import__("ar_lm.scaling.report", fromlist=["x"]).format_report(
        {"n_points": 49, "n_kind": "total", "compute": {"kind": "6nd"}, "approach3": {
            **capped, "starts": "4", "bootstrap_ok": [0, 0], "C_ref": 1.0, "local": None}})


def _coverage_draw(seed, n_sizes=5):
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.geomspace(1e6, 1e8, n_sizes), np.geomspace(1e8, 1e10, n_sizes))
    n, d = n.ravel(), d.ravel()
    pts = P.Points(n, d, 6 * n * d, _law(TRUE, n, d) * np.exp(rng.normal(0, 0.005, n.size)))
    fit = F.fit_points(pts, n_boot=20, seed=seed, approaches=(3,), top=4)
    n_t, d_t = 2e8, 2e10  # 2x beyond the sampled sizes and tokens
    truth = _law(TRUE, n_t, d_t) * math.exp(rng.normal(0, 0.005))
    return Q.predict_loss(fit, n_t, d_t), truth


def test_prediction_intervals_cover_at_about_the_stated_rate_and_shrink_with_more_points():
    draws = [_coverage_draw(s) for s in range(100)]
    covered = np.mean([p["interval"][0] <= t <= p["interval"][1] for p, t in draws])
    widths = np.array([p["interval"][1] - p["interval"][0] for p, _ in draws])
    errors = np.array([p["predicted_loss"] - t for p, t in draws])
    assert covered >= 0.85, covered
    # no blow-up: the median width is under twice the central 95% range of the actual errors
    assert np.median(widths) < 2 * np.subtract(*np.percentile(errors, [97.5, 2.5]))
    more = np.median([np.subtract(*_coverage_draw(s, n_sizes=9)[0]["interval"][::-1]) for s in range(10)])
    assert more < np.median(widths[:10])


def test_compute_multiplier_of_a_law_with_twice_the_effective_compute():
    a = _wide_isoflop(0, noise=0.002)
    b = _wide_isoflop(1, noise=0.002)
    s = math.sqrt(2.0)  # B(N, D) = L(sqrt2 N, sqrt2 D): under C = 6ND, B at C is A at 2C
    b = P.Points(b.N, b.D, b.C, _law(P_TRUE, s * b.N, s * b.D) * (b.L / _law(P_TRUE, b.N, b.D)), group=b.group)
    fa, fb = Q.fit_compared([a, b], n_boot=30)  # independent bootstraps (one seed for both is refused)
    res = Q.compute_multiplier(fa, fb)
    assert res["multiplier"] == pytest.approx(2.0, rel=0.1)
    lo, hi = res["interval"]
    assert lo < res["multiplier"] < hi
