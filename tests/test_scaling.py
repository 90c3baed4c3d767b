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
from ar_lm.scaling import points as P

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
    p.update(F._frontier_exponents(p))
    assert p["a"] == pytest.approx(0.46, abs=0.01)
    # independently: minimise L(N, C / 6N) over N numerically at two budgets and take the slope
    n_opts = []
    for c in (1e21, 1e23):
        res = optimize.minimize_scalar(lambda logn: _law(p, math.exp(logn), c / (6 * math.exp(logn))),
                                       bounds=(10, 40), method="bounded", options={"xatol": 1e-10})
        n_opts.append(math.exp(res.x))
        n_formula, _ = F.parametric_optimal(p, c)
        assert n_formula == pytest.approx(n_opts[-1], rel=1e-4)
    slope = math.log(n_opts[1] / n_opts[0]) / math.log(100)
    assert slope == pytest.approx(p["a"], abs=1e-4)


def test_approach2_recovers_the_frontier():
    p = dict(TRUE)
    p.update(F._frontier_exponents(p))
    rows = []
    for g, c in enumerate((1e18, 1e19, 1e20, 1e21)):
        n_star, _ = F.parametric_optimal(p, c)
        for n in n_star * np.geomspace(1 / 4, 4, 7):
            rows.append((n, c / (6 * n), c, _law(p, n, c / (6 * n)), g))
    arr = np.array(rows)
    pts = P.Points(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], group=arr[:, 4].astype(int))
    res = F.fit_points(pts, n_boot=20, approaches=(2,))["approach2"]
    assert res["a"] == pytest.approx(p["a"], abs=0.02)
    assert res["b"] == pytest.approx(p["b"], abs=0.02)
    assert all(m["interior"] for m in res["minima"])


def test_approach1_envelope_picks_the_best_run():
    cs = np.geomspace(1e10, 1e12, 30)
    curves = [(1e5, cs, 3 + 1e3 / cs**0.3), (1e6, cs[10:], 2.9 + 1e3 / cs[10:] ** 0.3 - 0.05)]
    env = F.envelope(curves)
    assert set(env["N"][env["C"] < cs[10]]) == {1e5}
    assert set(env["N"][env["C"] > cs[11]]) == {1e6}


def test_isoflop_points_spend_their_budget():
    base = tiny_config(model={"vocab_size": 257, "max_seq_len": 64}, data={"seq_len": 64, "batch_size": 8})
    assert len(isoflop_sweep(base, (1e11,), sizes_per_budget=4, spread=3.0)) == 4  # distinct sizes
    budgets = (3e10, 1e11, 3e11)
    points = isoflop_sweep(base, budgets, sizes_per_budget=4, spread=3.0, rule=ShapeRule(aspect=32, head_dim=16))
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
