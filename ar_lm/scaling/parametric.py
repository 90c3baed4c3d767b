"""Approach 3 (Hoffmann et al. 2022; Besiroglu et al. 2024): L(N, D) = E + A / N^alpha + B / D^beta.

Fitted as log L = LSE(a - alpha log N, b - beta log D, e) (A = e^a, B = e^b, E = e^e) by minimising
the Huber loss (delta = 1e-3) between predicted and observed log loss with L-BFGS-B. The objective
is divided by n · delta² (so it is O(1) however small the residuals) and log N, log D are centred
(a and alpha decouple); tolerances are tight and every start's termination is read: converged is
`res.success`, or a line search that can no longer lower the objective at a stationary point
(projected gradient <= STATIONARY_GTOL); iteration and evaluation limits never count. Starts: the
best `top` points of the initialisation grid by objective, or every grid point (`full_grid`, the
procedure of Hoffmann et al.). Beside them runs variable projection (`vpnls`, Czech et al. 2026: the
exponents by grid search, E, A, B by non-negative least squares, then one L-BFGS-B run from there); the
fit is whichever of the two reaches the lower objective (`method`, both under `methods`). Bootstrap
replicates (`starts` given) run L-BFGS-B from the fit's optimum alone.

The compute-optimal frontier at C minimises L(N, D(N, C)) over N numerically under the fit's
compute model (closed form only under C = 6ND: N_opt = G (C/6)^a, a = beta / (alpha + beta),
G = (alpha A / (beta B))^(1/(alpha+beta))). The asymptotic exponents are a, b = alpha/(alpha+beta);
the local ones d ln N_opt / d ln C at a given C.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Optional

import numpy as np
from scipy import optimize

from ar_lm.scaling import vpnls
from ar_lm.scaling.compute import ComputeModel

HUBER_DELTA = 1e-3
INIT_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
BOUNDS = [(None, None), (None, None), (-10, 10), (0, 5), (0, 5)]  # centred a, b; e; alpha; beta
OPTIONS = {"ftol": 1e-15, "gtol": 1e-10, "maxiter": 20000, "maxfun": 40000, "maxls": 50}
PARAMS = ("E", "A", "B", "alpha", "beta")
STATIONARY_GTOL = 1e-5  # on the O(1)-scaled objective; status-0 optima here reach 1e-9 to 1e-5


def _huber(r: np.ndarray) -> np.ndarray:
    return np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))


def _objective(theta, x_n, x_d, log_l):
    """Scaled Huber sum over centred log sizes, and its gradient."""
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * x_n, b - beta * x_d, np.full_like(x_n, e)])
    tmax = t.max(axis=0)
    w = np.exp(t - tmax)
    z = w.sum(axis=0)
    r = tmax + np.log(z) - log_l
    w = w / z
    h = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
    scale = 1.0 / (len(r) * HUBER_DELTA**2)
    grad = np.array([np.sum(h * w[0]), np.sum(h * w[1]), np.sum(h * w[2]),
                     np.sum(h * w[0] * -x_n), np.sum(h * w[1] * -x_d)])
    return float(_huber(r).sum() * scale), grad * scale


def _grid(mu_n: float, mu_d: float) -> np.ndarray:
    """The initialisation grid in centred coordinates (a_c = a - alpha mu_n, b_c = b - beta mu_d)."""
    g = INIT_GRID
    rows = [(a - al * mu_n, b - be * mu_d, e, al, be)
            for al, be, e, a, b in itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])]
    return np.array(rows)


def _starts(x_n, x_d, log_l, mu_n, mu_d, top: Optional[int]) -> np.ndarray:
    grid = _grid(mu_n, mu_d)
    if top is None:
        return grid
    a, b, e, al, be = (grid[:, i : i + 1] for i in range(5))
    t = np.stack([a - al * x_n, b - be * x_d, np.broadcast_to(e, (len(grid), len(x_n)))])
    loss = _huber(np.logaddexp.reduce(t, axis=0) - log_l).sum(axis=1)
    return grid[np.argsort(loss)[:top]]


def _converged(res) -> bool:
    """res.success, or L-BFGS-B's status 2 (the line search found no lower f: float precision at an
    optimum) where the gradient projected onto the bounds is below STATIONARY_GTOL."""
    if res.success:
        return True
    if res.status != 2:
        return False
    g = np.array(res.jac, dtype=float)
    for i, (lo, hi) in enumerate(BOUNDS):
        if (lo is not None and res.x[i] <= lo and g[i] > 0) or (hi is not None and res.x[i] >= hi and g[i] < 0):
            g[i] = 0.0
    return bool(np.abs(g).max() <= STATIONARY_GTOL)


def _law(theta_c: np.ndarray, mu_n: float, mu_d: float) -> dict:
    a_c, b_c, e, alpha, beta = theta_c
    a, b = a_c + alpha * mu_n, b_c + beta * mu_d
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta),
            "theta": [float(a), float(b), float(e), float(alpha), float(beta)]}


def _lbfgs(x0s, x_n, x_d, log_l, options: Optional[dict]) -> list:
    return [optimize.minimize(_objective, x0, args=(x_n, x_d, log_l), jac=True, method="L-BFGS-B", bounds=BOUNDS,
                              options={**OPTIONS, **(options or {})}) for x0 in x0s]


def _vpnls(N, D, L, x_n, x_d, log_l, options: Optional[dict]):
    """VPNLS (`vpnls.fit_vpnls`: exponents by grid search and a polish, E, A, B by NNLS), then one L-BFGS-B
    run of all five parameters from its solution on this objective; (that run, the VPNLS fit). `options`
    (L-BFGS-B's) go to both of its L-BFGS-B runs."""
    v = vpnls.fit_vpnls(N, D, L, HUBER_DELTA, options)
    x0 = np.clip(v["theta_c"], [lo if lo is not None else -np.inf for lo, _ in BOUNDS],
                 [hi if hi is not None else np.inf for _, hi in BOUNDS])
    return _lbfgs([x0], x_n, x_d, log_l, options)[0], v


def _spread(runs: list, ok: dict, mu_n: float, mu_d: float, spread_of: int) -> dict:
    good = sorted((r for r in runs if ok[id(r)]), key=lambda r: r.fun)[:spread_of]
    laws = [_law(r.x, mu_n, mu_d) for r in good]
    return {k: float(max(l[k] for l in laws) - min(l[k] for l in laws)) if laws else None for k in PARAMS}


def fit_parametric(N, D, L, top: Optional[int] = 64, starts: Optional[list] = None, options: Optional[dict] = None,
                   spread_of: int = 5, use_vpnls: Optional[bool] = None) -> dict:
    """The best optimum of two methods: L-BFGS-B from each start, and VPNLS (`_vpnls`; by default only
    with the grid's starts, not from given `starts`, the bootstrap's). `method` names the one with the lower
    objective, `methods` both (objective, seconds, converged). `converged` (see `_converged`) is the chosen
    optimum's; `converged_starts` of `n_starts` and the spread (max - min) of each parameter over the best
    `spread_of` converged optima are the L-BFGS starts'."""
    log_n, log_d, log_l = np.log(N), np.log(D), np.log(L)
    mu_n, mu_d = float(log_n.mean()), float(log_d.mean())
    x_n, x_d = log_n - mu_n, log_d - mu_d
    if starts is None:
        x0s = _starts(x_n, x_d, log_l, mu_n, mu_d, top)
    else:  # natural coordinates (a, b, e, alpha, beta), e.g. a previous fit's theta
        x0s = np.array([[s[0] - s[3] * mu_n, s[1] - s[4] * mu_d, s[2], s[3], s[4]] for s in starts])
    t0 = time.perf_counter()
    runs = _lbfgs(x0s, x_n, x_d, log_l, options)
    best = min(runs, key=lambda r: r.fun)
    ok = {id(r): _converged(r) for r in runs}
    methods = {"lbfgs": {"objective": float(best.fun), "seconds": time.perf_counter() - t0,
                         "converged": ok[id(best)]}}
    method = "lbfgs"
    if use_vpnls if use_vpnls is not None else starts is None:
        t0 = time.perf_counter()
        vp, v = _vpnls(N, D, L, x_n, x_d, log_l, options)
        methods["vpnls"] = {"objective": float(vp.fun), "seconds": time.perf_counter() - t0,
                            "converged": _converged(vp), "vpnls_objective": v["objective"], "pairs": v["pairs"],
                            "grid_edge": v["grid_edge"], "zero": v["zero"]}
        if vp.fun < best.fun:
            best, method = vp, "vpnls"
    out = _law(best.x, mu_n, mu_d)
    out.update({"objective": float(best.fun), "converged": methods[method]["converged"], "message": str(best.message),
                "n_starts": len(runs), "converged_starts": sum(ok.values()), "method": method, "methods": methods,
                "spread_of_best": _spread(runs, ok, mu_n, mu_d, spread_of)})
    out.update(asymptotic_exponents(out))
    return out


def asymptotic_exponents(p: dict) -> dict:
    """Closed form of the optimum under C = 6ND (Hoffmann et al. 2022, eq. 4): N_opt = G (C/6)^a,
    D_opt = G^-1 (C/6)^b, a = beta / (alpha + beta), b = alpha / (alpha + beta),
    G = (alpha A / (beta B))^(1/(alpha+beta)). Under an ``exact`` compute model this is the 6ND-equivalent
    law; the optimum there is `optimal_size` and its exponents `local_exponents`."""
    s = p["alpha"] + p["beta"]
    absent = min(p["A"], p["B"]) < 1e-250  # a term variable projection set to zero (vpnls.TINY, un-centred)
    if s <= 0 or p["alpha"] <= 0 or p["beta"] <= 0 or absent:
        return {"a": None, "b": None, "G": None}
    g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s)
    return {"a": p["beta"] / s, "b": p["alpha"] / s, "G": g}


def parametric_loss(p: dict, n, d):
    return p["E"] + p["A"] / np.power(n, p["alpha"]) + p["B"] / np.power(d, p["beta"])


def optimal_size(p: dict, compute: ComputeModel, c: float) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L(N, C / fpt(N)) at compute C: a log-spaced scan, then Brent."""
    if compute.kind == "6nd" and p.get("G"):
        return p["G"] * (c / 6) ** p["a"], (c / 6) ** p["b"] / p["G"]

    def loss(x):
        return float(parametric_loss(p, math.exp(x), compute.tokens(math.exp(x), c)))

    xs = np.linspace(0.0, 0.6 * math.log(c), 600)  # 1 <= N <= C^0.6
    i = int(np.argmin(parametric_loss(p, np.exp(xs), compute.tokens(np.exp(xs), c))))
    lo, hi = xs[max(i - 1, 0)], xs[min(i + 1, len(xs) - 1)]
    x = optimize.minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}).x
    return math.exp(x), float(compute.tokens(math.exp(x), c))


def local_exponents(p: dict, compute: ComputeModel, c: float, h: float = 0.05) -> dict:
    """a = d ln N_opt / d ln C and b = d ln D_opt / d ln C at C (central differences in ln C)."""
    (n0, d0), (n1, d1) = optimal_size(p, compute, c * math.exp(-h)), optimal_size(p, compute, c * math.exp(h))
    return {"a": math.log(n1 / n0) / (2 * h), "b": math.log(d1 / d0) / (2 * h)}
