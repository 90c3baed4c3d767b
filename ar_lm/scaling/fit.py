"""Scaling-law fits (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models") under
one compute model (`compute.py`), with bootstrap intervals that say how many replicates succeeded.

- Approach 1: the minimum-loss envelope over loss curves gives, for each compute C, the model size
  N that reached the lowest loss; power laws N_opt = k_N C^a and D_opt = k_D C^b (D = C / fpt(N)).
  Curves of one horizon per size are indicative only (Hoffmann et al. used several per size).
- Approach 2: `isoflop.py` (windowed IsoFLOP minima, the loss frontier L*(C)). Its bootstrap is
  parametric: every replicate adds N(0, s_i²) to each loss, s_i² = the point's squared standard
  error plus the window parabolas' pooled residual variance, and repeats the whole procedure.
- Approach 3: `parametric.py`; bootstrap by resampling points.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ar_lm.errors import require
from ar_lm.scaling.compute import ComputeModel
from ar_lm.scaling.isoflop import WINDOW, approach2, budget_minimum, power_law
from ar_lm.scaling.parametric import PARAMS, fit_parametric, local_exponents
from ar_lm.scaling.points import Points

CI = (2.5, 97.5)


def interval(samples) -> Optional[list[float]]:
    samples = [s for s in samples if s is not None and np.isfinite(s)]
    if len(samples) < 10:
        return None
    lo, hi = np.percentile(samples, CI)
    return [float(lo), float(hi)]


def _bootstrap_summary(p: dict, boots: list[dict], keys, n_boot: int) -> None:
    p["ci"] = {k: interval([b.get(k) for b in boots]) for k in keys}
    p["bootstrap"] = [{k: b.get(k) for k in keys} for b in boots]
    p["bootstrap_ok"] = [len(boots), n_boot]


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


def approach1(curves: list, compute: ComputeModel) -> Optional[dict]:
    """Power laws through the frontier, fitted where every run is past a third of its own
    budget (early in training the frontier only reflects warmup, not model size)."""
    if len(curves) < 2:
        return None
    env = envelope(curves)
    fit = env["C"] >= min(c[1][-1] for c in curves) / 3
    if len(set(env["N"][fit].tolist())) < 2:
        return None
    k_n, a = power_law(env["C"][fit], env["N"][fit])
    k_d, b = power_law(env["C"][fit], compute.tokens(env["N"][fit], env["C"][fit]))
    return {"a": a, "k_N": k_n, "b": b, "k_D": k_d, "envelope": {k: v.tolist() for k, v in env.items()}}


def _fit_approach1(pts: Points, n_boot: int, rng) -> Optional[dict]:
    p1 = approach1(pts.curves, pts.compute)
    if p1 is None:
        return None
    boots = []
    for _ in range(n_boot):
        b = approach1([pts.curves[i] for i in rng.integers(0, len(pts.curves), len(pts.curves))], pts.compute)
        if b is not None:
            boots.append(b)
    _bootstrap_summary(p1, boots, ("a", "b", "k_N", "k_D"), n_boot)
    sizes = [c[0] for c in pts.curves]
    horizons = len(sizes) > len(set(sizes))
    p1["source"] = pts.curve_source
    p1["indicative"] = not (horizons and pts.curve_source == "val")
    return p1


# ---------------------------------------------------------------------------------------------
# Approach 2


def _noise_scale(pts: Points, window: float) -> Optional[np.ndarray]:
    """Per-point noise s_i of the parametric bootstrap (see module docstring); None if unknown."""
    ss, dof = 0.0, 0
    for g in np.unique(pts.group):
        m = pts.group == g
        found = budget_minimum(np.log(pts.N[m]), pts.L[m], window)
        if "parabola" in found:
            x = np.log(pts.N[m])
            near = (x >= math.log(found["window_N"][0]) - 1e-12) & (x <= math.log(found["window_N"][1]) + 1e-12)
            ss += float(np.sum((pts.L[m][near] - np.polyval(found["parabola"], x[near])) ** 2))
            dof += int(near.sum()) - 3
    pooled = ss / dof if dof > 0 else None
    if pts.se is None and pooled is None:
        return None
    return np.sqrt((pts.se**2 if pts.se is not None else 0.0) + (pooled or 0.0)) * np.ones_like(pts.L)


def _fit_approach2(pts: Points, n_boot: int, rng, window: float) -> Optional[dict]:
    p2 = approach2(pts, pts.compute, window)
    if p2 is None:
        return None
    scale = _noise_scale(pts, window)
    boots = []
    if scale is None:
        p2["bootstrap_note"] = "no noise estimate (no loss_se, <= 3 points per window): no intervals"
        n_boot = 0
    for _ in range(n_boot):
        sub = Points(pts.N, pts.D, pts.C, pts.L + rng.normal(0.0, scale), group=pts.group)
        b = approach2(sub, pts.compute, window)
        if b is not None:
            boots.append({**{k: b[k] for k in ("a", "b", "k_N", "k_D")}, **(b["frontier"] or {}),
                          "budgets": len(b["minima"])})
    _bootstrap_summary(p2, boots, ("a", "b", "k_N", "k_D", "E", "A", "alpha", "budgets"), n_boot)
    if p2["frontier"]:
        p2["frontier"]["ci"] = {k: p2["ci"].pop(k) for k in ("E", "A", "alpha")}
    return p2


# ---------------------------------------------------------------------------------------------
# Approach 3


def _fit_approach3(pts: Points, n_boot: int, rng, full_grid: bool, top: int, options: Optional[dict]) -> dict:
    """The fit from the grid; each bootstrap replicate (points resampled) starts from its optimum."""
    require(len(pts.N) >= 5, f"approach 3 fits 5 parameters and needs at least 5 points, got {len(pts.N)}")
    p3 = fit_parametric(pts.N, pts.D, pts.L, top=None if full_grid else top, options=options)
    p3["starts"] = "every grid point" if full_grid else f"the best {top} grid points"
    c_ref = float(np.exp(np.mean(np.log(pts.C))))
    p3["C_ref"] = c_ref
    p3["local"] = local_exponents(p3, pts.compute, c_ref) if p3["a"] is not None else None
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(pts.N), len(pts.N))
        if len(np.unique(idx)) < 5:
            continue
        b = fit_parametric(pts.N[idx], pts.D[idx], pts.L[idx], starts=[p3["theta"]], options=options)
        if b["converged"]:
            boots.append(b)
    _bootstrap_summary(p3, boots, (*PARAMS, "a", "b", "G"), n_boot)
    if pts.floor is not None:
        p3["floor"] = pts.floor
        p3["E_minus_floor"] = p3["E"] - pts.floor
    return p3


# ---------------------------------------------------------------------------------------------
# All approaches


def fit_points(pts: Points, n_boot: int = 100, seed: int = 0, approaches=(1, 2, 3), full_grid: bool = False,
               window: float = WINDOW, top: int = 64, options: Optional[dict] = None) -> dict:
    """Every approach that the points allow, with bootstrap intervals; JSON-serialisable."""
    require(np.all(pts.N > 0) and np.all(pts.D > 0) and np.all(pts.L > 0), "params, tokens and loss must be positive")
    rng = np.random.default_rng(seed)
    result: dict = {"n_points": int(len(pts.N)), "floor": pts.floor, "n_kind": pts.n_kind,
                    "compute": pts.compute.to_json(), "curve_source": pts.curve_source,
                    "points": [{"N": float(n), "D": float(d), "C": float(c), "loss": float(l)}
                               for n, d, c, l in zip(pts.N, pts.D, pts.C, pts.L)]}
    if pts.se is not None:
        for p, se in zip(result["points"], pts.se):
            p["loss_se"] = float(se)
    if pts.epochs is not None:
        for p, ep in zip(result["points"], pts.epochs):
            p["epochs"] = float(ep)
    if 3 in approaches:
        result["approach3"] = _fit_approach3(pts, n_boot, rng, full_grid, top, options)
    if 2 in approaches and pts.group is not None:
        p2 = _fit_approach2(pts, n_boot, rng, window)
        if p2 is not None:
            result["approach2"] = p2
    if 1 in approaches and pts.curves:
        p1 = _fit_approach1(pts, n_boot, rng)
        if p1 is not None:
            result["approach1"] = p1
    require(any(f"approach{i}" in result for i in (1, 2, 3)),
            "too few points for any approach: approach 2 needs >= 2 IsoFLOP budgets with an interior minimum, "
            "approach 3 needs >= 5 points")
    return result

