"""Scaling-law fits (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models").

- Approach 1: the minimum-loss envelope over training curves gives, for each compute C, the
  model size N that reached the lowest loss; power laws N_opt = k_N C^a and D_opt = k_D C^b.
- Approach 2: for each IsoFLOP budget, a parabola in log N through the final losses; its minimum
  is N_opt(C); power laws through the minima (D_opt = C / (6 N_opt)).
- Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted as log L = LSE(a - alpha log N,
  b - beta log D, e) (A = e^a, B = e^b, E = e^e) by minimising the Huber loss (delta = 1e-3)
  between predicted and observed log loss with L-BFGS from a grid of initial points. With
  C = 6 N D its compute-optimal frontier is N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with
  G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta/(alpha+beta), b = alpha/(alpha+beta).

Bootstrap confidence intervals (resampling points, or runs for Approach 1) for every quantity.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
from scipy import optimize

from ar_lm.errors import UserError, require
from ar_lm.scaling.points import Points

HUBER_DELTA = 1e-3
CI = (2.5, 97.5)


# ---------------------------------------------------------------------------------------------
# Power laws


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y = k x^e by least squares in log space; returns (k, e)."""
    e, logk = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(logk)), float(e)


def _ci(samples: list[float]) -> Optional[list[float]]:
    samples = [s for s in samples if s is not None and np.isfinite(s)]
    if len(samples) < 10:
        return None
    lo, hi = np.percentile(samples, CI)
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------------------
# Approach 1


def envelope(curves: list, n_grid: int = 40) -> dict:
    """For log-spaced C, the lowest loss over all runs' curves (each interpolated in log C) and
    the N of the run that reached it."""
    lo = max(min(c[1][0] for c in curves), 1.0)
    hi = max(c[1][-1] for c in curves)
    grid = np.geomspace(lo, hi, n_grid)
    best_l = np.full(n_grid, np.inf)
    best_n = np.full(n_grid, np.nan)
    for n, c_t, l_t in curves:
        inside = (grid >= c_t[0]) & (grid <= c_t[-1])
        l = np.interp(np.log(grid[inside]), np.log(c_t), l_t)
        better = l < best_l[inside]
        idx = np.where(inside)[0][better]
        best_l[idx] = l[better]
        best_n[idx] = n
    keep = np.isfinite(best_l)
    return {"C": grid[keep], "L": best_l[keep], "N": best_n[keep]}


def approach1(curves: list) -> Optional[dict]:
    """Power laws through the frontier, fitted where every run is past a third of its own
    budget (early in training the frontier only reflects warmup, not model size)."""
    if len(curves) < 2:
        return None
    env = envelope(curves)
    start = min(c[1][-1] for c in curves) / 3
    fit = env["C"] >= start
    if len(set(env["N"][fit].tolist())) < 2:
        return None
    k_n, a = power_law(env["C"][fit], env["N"][fit])
    d = env["C"][fit] / (6 * env["N"][fit])
    k_d, b = power_law(env["C"][fit], d)
    return {"a": a, "k_N": k_n, "b": b, "k_D": k_d, "envelope": {k: v.tolist() for k, v in env.items()}}


# ---------------------------------------------------------------------------------------------
# Approach 2


def isoflop_minima(pts: Points) -> list[dict]:
    """Per budget group with >= 3 distinct N: the parabola L = p0 (log N)^2 + p1 log N + p2 and
    its minimum (only if it opens upwards)."""
    out = []
    if pts.group is None:
        return out
    for g in np.unique(pts.group):
        m = pts.group == g
        if len(np.unique(pts.N[m])) < 3:
            continue
        x = np.log(pts.N[m])
        coef = np.polyfit(x, pts.L[m], 2)
        if coef[0] <= 0:
            continue
        x_min = -coef[1] / (2 * coef[0])
        c = float(np.exp(np.mean(np.log(pts.C[m]))))
        n_opt = float(np.exp(x_min))
        out.append({"C": c, "N_opt": n_opt, "D_opt": c / (6 * n_opt), "loss_min": float(np.polyval(coef, x_min)),
                    "parabola": coef.tolist(), "N_range": [float(pts.N[m].min()), float(pts.N[m].max())],
                    "interior": bool(pts.N[m].min() <= n_opt <= pts.N[m].max())})
    return out


def approach2(pts: Points) -> Optional[dict]:
    minima = isoflop_minima(pts)
    if len(minima) < 2:
        return None
    c = np.array([m["C"] for m in minima])
    n = np.array([m["N_opt"] for m in minima])
    k_n, a = power_law(c, n)
    k_d, b = power_law(c, c / (6 * n))
    return {"a": a, "k_N": k_n, "b": b, "k_D": k_d, "minima": minima}


# ---------------------------------------------------------------------------------------------
# Approach 3


def _lse_terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])


def _objective(theta, log_n, log_d, log_l, delta=HUBER_DELTA):
    """Sum of Huber(delta) of (LSE(...) - log L) and its gradient."""
    t = _lse_terms(theta, log_n, log_d)
    tmax = t.max(axis=0)
    w = np.exp(t - tmax)
    z = w.sum(axis=0)
    r = tmax + np.log(z) - log_l
    w = w / z
    huber = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    h = np.clip(r, -delta, delta)
    grad = np.array([
        np.sum(h * w[0]), np.sum(h * w[1]), np.sum(h * w[2]),
        np.sum(h * w[0] * -log_n), np.sum(h * w[1] * -log_d),
    ])
    return float(huber.sum()), grad


INIT_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
BOUNDS = [(-50, 100), (-50, 100), (-10, 10), (0, 5), (0, 5)]


def _grid_starts(log_n, log_d, log_l, top: int) -> list[np.ndarray]:
    g = INIT_GRID
    grid = np.array([(a, b, e, al, be) for al, be, e, a, b in itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])])
    # vectorised objective over the whole grid, then L-BFGS from the best `top` starts
    a, b, e, al, be = (grid[:, i : i + 1] for i in range(5))
    t = np.stack([a - al * log_n, b - be * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    r = np.logaddexp.reduce(t, axis=0) - log_l
    huber = np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum(axis=1)
    return [grid[i] for i in np.argsort(huber)[:top]]


def fit_parametric(N, D, L, starts: Optional[list] = None, top: int = 64) -> dict:
    log_n, log_d, log_l = np.log(N), np.log(D), np.log(L)
    starts = starts if starts is not None else _grid_starts(log_n, log_d, log_l, top)
    best = None
    for x0 in starts:
        res = optimize.minimize(_objective, x0, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B", bounds=BOUNDS)
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    A, B, E = math.exp(a), math.exp(b), math.exp(e)
    out = {"E": E, "A": A, "B": B, "alpha": float(alpha), "beta": float(beta), "huber_loss": float(best.fun),
           "theta": best.x.tolist()}
    out.update(_frontier_exponents(out))
    return out


def _frontier_exponents(p: dict) -> dict:
    s = p["alpha"] + p["beta"]
    if s <= 0 or p["alpha"] <= 0 or p["beta"] <= 0:
        return {"a": None, "b": None, "G": None}
    g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s)
    return {"a": p["beta"] / s, "b": p["alpha"] / s, "G": g}


def parametric_loss(p: dict, n, d):
    return p["E"] + p["A"] / np.power(n, p["alpha"]) + p["B"] / np.power(d, p["beta"])


def parametric_optimal(p: dict, c):
    """N_opt, D_opt at compute C (C = 6 N D)."""
    if p.get("G") is None:
        return None, None
    return p["G"] * (c / 6) ** p["a"], (c / 6) ** p["b"] / p["G"]


# ---------------------------------------------------------------------------------------------
# All approaches with bootstrap


def fit_points(pts: Points, n_boot: int = 100, seed: int = 0, approaches=(1, 2, 3)) -> dict:
    require(np.all(pts.N > 0) and np.all(pts.D > 0) and np.all(pts.L > 0), "params, tokens and loss must be positive")
    rng = np.random.default_rng(seed)
    result: dict = {"n_points": int(len(pts.N)), "floor": pts.floor,
                    "points": [{"N": float(n), "D": float(d), "C": float(c), "loss": float(l)}
                               for n, d, c, l in zip(pts.N, pts.D, pts.C, pts.L)]}
    if 3 in approaches:
        require(len(pts.N) >= 5, f"approach 3 fits 5 parameters and needs at least 5 points, got {len(pts.N)}")
        p3 = fit_parametric(pts.N, pts.D, pts.L)
        boots = []
        for _ in range(n_boot):
            idx = rng.integers(0, len(pts.N), len(pts.N))
            if len(np.unique(idx)) < 5:
                continue
            log_n, log_d, log_l = np.log(pts.N[idx]), np.log(pts.D[idx]), np.log(pts.L[idx])
            starts = [np.array(p3["theta"])] + _grid_starts(log_n, log_d, log_l, top=4)
            boots.append(fit_parametric(pts.N[idx], pts.D[idx], pts.L[idx], starts=starts))
        p3["ci"] = {k: _ci([b[k] for b in boots]) for k in ("E", "A", "B", "alpha", "beta", "a", "b", "G")}
        p3["bootstrap"] = [{k: b[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b", "G")} for b in boots]
        if pts.floor is not None:
            p3["floor"] = pts.floor
            p3["E_minus_floor"] = p3["E"] - pts.floor
        result["approach3"] = p3
    if 2 in approaches:
        p2 = approach2(pts)
        if p2 is not None:
            boots = []
            for _ in range(n_boot):
                idx = np.concatenate([rng.choice(np.where(pts.group == g)[0], (pts.group == g).sum()) for g in np.unique(pts.group)])
                sub = Points(pts.N[idx], pts.D[idx], pts.C[idx], pts.L[idx], group=pts.group[idx])
                b = approach2(sub)
                if b is not None:
                    boots.append(b)
            p2["ci"] = {k: _ci([b[k] for b in boots]) for k in ("a", "b", "k_N", "k_D")}
            p2["bootstrap"] = [{k: b[k] for k in ("a", "b", "k_N", "k_D")} for b in boots]
            result["approach2"] = p2
    if 1 in approaches and pts.curves:
        p1 = approach1(pts.curves)
        if p1 is not None:
            boots = []
            for _ in range(n_boot):
                idx = rng.integers(0, len(pts.curves), len(pts.curves))
                b = approach1([pts.curves[i] for i in idx])
                if b is not None:
                    boots.append(b)
            p1["ci"] = {k: _ci([b[k] for b in boots]) for k in ("a", "b", "k_N", "k_D")}
            p1["bootstrap"] = [{k: b[k] for k in ("a", "b", "k_N", "k_D")} for b in boots]
            result["approach1"] = p1
    require(any(f"approach{i}" in result for i in (1, 2, 3)),
            "too few points for any approach: approach 2 needs >= 2 IsoFLOP budgets with >= 3 sizes each, "
            "approach 3 needs >= 5 points")
    return result


def predict_optimal(result: dict, c: float) -> dict:
    """N_opt, D_opt (and the parametric loss there) at compute C, from approach 3, else 2, else 1."""
    p3 = result.get("approach3")
    if p3 and p3.get("G"):
        n, d = parametric_optimal(p3, c)
        return {"N_opt": float(n), "D_opt": float(d), "loss": float(parametric_loss(p3, n, d)), "from": "approach3"}
    for key in ("approach2", "approach1"):
        p = result.get(key)
        if p:
            return {"N_opt": p["k_N"] * c ** p["a"], "D_opt": p["k_D"] * c ** p["b"], "loss": None, "from": key}
    raise UserError("the fit has no approach that predicts the compute-optimal size")


def predict_loss(result: dict, n: float, d: float) -> Optional[float]:
    p3 = result.get("approach3")
    return float(parametric_loss(p3, n, d)) if p3 else None


def format_report(result: dict) -> str:
    lines = [f"[fit] {result['n_points']} points"]
    ci = lambda p, k: (f" [{p['ci'][k][0]:.3g}, {p['ci'][k][1]:.3g}]" if p.get("ci", {}).get(k) else "")  # noqa: E731
    for i in (1, 2):
        p = result.get(f"approach{i}")
        if p:
            lines.append(f"[fit] approach {i}: N_opt ∝ C^{p['a']:.3f}{ci(p, 'a')}, D_opt ∝ C^{p['b']:.3f}{ci(p, 'b')}")
    p3 = result.get("approach3")
    if p3:
        lines.append(
            f"[fit] approach 3: L = {p3['E']:.3f}{ci(p3, 'E')} + {p3['A']:.4g}/N^{p3['alpha']:.3f}{ci(p3, 'alpha')}"
            f" + {p3['B']:.4g}/D^{p3['beta']:.3f}{ci(p3, 'beta')}"
        )
        if p3.get("a") is not None:
            lines.append(f"[fit] approach 3: N_opt ∝ C^{p3['a']:.3f}{ci(p3, 'a')}, D_opt ∝ C^{p3['b']:.3f}{ci(p3, 'b')}")
        if p3.get("floor") is not None:
            verdict = "above" if p3["E_minus_floor"] >= 0 else "BELOW"
            lines.append(f"[fit] entropy-rate floor {p3['floor']:.4f} nats: E is {verdict} it by {p3['E_minus_floor']:+.4f}")
    return "\n".join(lines)


