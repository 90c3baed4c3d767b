"""Variable projection (ar_lm/scaling/vpnls.py) beside L-BFGS-B in approach 3's fit (parametric.py)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import optimize

from ar_lm.scaling import fit as F
from ar_lm.scaling import parametric as PR
from ar_lm.scaling import points as P
from ar_lm.scaling import vpnls as V

HARD = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}  # Besiroglu et al. 2024's fit: off the grid
CAP = {"maxiter": 30}  # L-BFGS-B iterations per run, for both methods
KEYS = ("E", "A", "B", "alpha", "beta")


def _law(p, n, d):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _grid(law, k=6, noise=0.0, seed=0, n_range=(1e7, 1e10), d_range=(1e9, 1e12)):
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(*n_range, k), np.geomspace(*d_range, k)))
    return n, d, _law(law, n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.size))


def _worst(fit, law):
    return max(abs(fit[k] / law[k] - 1) for k in KEYS)


def _best_time(f, repeats=3):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t0)
    return min(times), out


@pytest.fixture(scope="module")
def hard():
    """The hard law's points, both methods timed (L-BFGS once, it is ~50x slower; VPNLS the min of 3 runs) and
    their fits."""
    n, d, loss = _grid(HARD)
    t_lbfgs, lbfgs = _best_time(lambda: PR.fit_parametric(n, d, loss, use_vpnls=False), repeats=1)
    t_vpnls, vp = _best_time(lambda: V.fit_vpnls(n, d, loss))
    return {"n": n, "d": d, "L": loss, "t_lbfgs": t_lbfgs, "lbfgs": lbfgs, "t_vpnls": t_vpnls, "vpnls": vp}


def test_batched_nnls_is_scipys_nnls():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 9, 3)), rng.normal(size=(500, 9))
    c = V.nnls3(x, y)
    ref = np.array([optimize.nnls(x[i], y[i])[0] for i in range(len(x))])
    np.testing.assert_allclose(c, ref, atol=1e-10)
    assert (ref == 0).any(axis=1).mean() > 0.3 and (ref > 0).all(axis=1).any()  # both kinds of solution occur


def test_the_objective_is_parametrics():
    n, d, loss = _grid(HARD, noise=0.01)
    log_n, log_d = np.log(n), np.log(d)
    x_n, x_d = log_n - log_n.mean(), log_d - log_d.mean()
    theta_c = np.array([4.0, 5.0, 0.4, 0.3, 0.25])
    pred = np.exp(theta_c[2]) + np.exp(theta_c[0] - theta_c[3] * x_n) + np.exp(theta_c[1] - theta_c[4] * x_d)
    assert V.huber_objective(np.log(pred), np.log(loss)) == pytest.approx(
        PR._objective(theta_c, x_n, x_d, np.log(loss))[0], rel=1e-12)


def test_vpnls_recovers_the_law_exactly(hard):
    vp = hard["vpnls"]  # the grid search and the two-parameter polish alone, no five-parameter L-BFGS-B
    assert _worst(vp, HARD) < 1e-8 and not vp["zero"] and not vp["grid_edge"] and vp["objective"] < 1e-20
    assert _worst(hard["lbfgs"], HARD) < 1e-4  # uncapped L-BFGS-B from the grid finds it too (slowly)


def test_within_the_same_iteration_cap_vpnls_recovers_the_law_and_lbfgs_from_the_grid_does_not(hard):
    both = PR.fit_parametric(hard["n"], hard["d"], hard["L"], options=CAP)
    lbfgs, vp = both["methods"]["lbfgs"], both["methods"]["vpnls"]
    assert not lbfgs["converged"] and lbfgs["objective"] > 1.0  # noiseless: the optimum's objective is 0
    assert both["method"] == "vpnls" and vp["converged"] and vp["objective"] < 1e-20 and both["converged"]
    assert _worst(both, HARD) < 1e-8
    np.testing.assert_allclose(both["theta"], [math.log(HARD["A"]), math.log(HARD["B"]), math.log(HARD["E"]),
                                               HARD["alpha"], HARD["beta"]], rtol=1e-8)


def test_vpnls_is_faster_than_lbfgs_from_the_grid(hard):
    assert hard["t_vpnls"] < hard["t_lbfgs"], (hard["t_vpnls"], hard["t_lbfgs"])


def test_with_noise_the_chosen_method_has_the_lowest_objective():
    n, d, loss = _grid({"E": 1.8, "A": 900.0, "B": 2000.0, "alpha": 0.4, "beta": 0.36}, k=5, noise=0.01, seed=3)
    res = PR.fit_parametric(n, d, loss, top=8)
    methods = res["methods"]
    assert set(methods) == {"lbfgs", "vpnls"} and res["method"] in methods
    assert all(res["objective"] <= m["objective"] for m in methods.values())
    assert res["objective"] == methods[res["method"]]["objective"] and res["objective"] > 1.0  # noise: not 0
    log_n, log_d = np.log(n), np.log(d)
    a, b, e, al, be = res["theta"]  # theta is in natural coordinates: the objective follows from it
    theta_c = [a - al * log_n.mean(), b - be * log_d.mean(), e, al, be]
    assert PR._objective(np.array(theta_c), log_n - log_n.mean(), log_d - log_d.mean(), np.log(loss))[0] == \
        pytest.approx(res["objective"], rel=1e-9)
    assert res["E"] == pytest.approx(math.exp(e)) and res["a"] == pytest.approx(be / (al + be))


def test_bootstrap_replicates_run_lbfgs_alone():
    n, d, loss = _grid(HARD, k=4, noise=0.005, seed=1)
    first = PR.fit_parametric(n, d, loss, top=4)
    rep = PR.fit_parametric(n, d, loss, starts=[first["theta"]])
    assert rep["method"] == "lbfgs" and set(rep["methods"]) == {"lbfgs"} and rep["n_starts"] == 1


def test_fit_points_keeps_working_with_the_result():
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e8, 5), np.geomspace(1e8, 1e10, 3)))
    loss = _law(HARD, n, d) * np.exp(np.random.default_rng(2).normal(0, 0.005, n.size))
    res = F.fit_points(P.Points(n, d, 6 * n * d, loss), n_boot=10, approaches=(3,), top=8)["approach3"]
    assert len(n) == 15 and res["method"] in ("lbfgs", "vpnls") and res["converged"]
    assert res["objective"] <= min(m["objective"] for m in res["methods"].values())
    assert res["bootstrap_ok"][1] == 10 and res["bootstrap_ok"][0] >= 5 and len(res["bootstrap"]) == res["bootstrap_ok"][0]
    assert res["alpha"] == pytest.approx(HARD["alpha"], abs=0.1)
    assert all(abs(b["alpha"] - res["alpha"]) < 0.2 and b["a"] is not None for b in res["bootstrap"])
    assert res["ci"]["alpha"] is None or res["ci"]["alpha"][0] <= res["alpha"] <= res["ci"]["alpha"][1]
