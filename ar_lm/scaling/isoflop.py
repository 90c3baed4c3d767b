"""Approach 2 (Hoffmann et al. 2022): the loss-minimising size of each IsoFLOP budget, power laws
through those minima, and the loss frontier L*(C) = E + A · C^-alpha through their losses.

Published IsoFLOP curves span up to ~1000x in N and are far from parabolic away from the minimum
(the loss of too-large models rises steeply), so one parabola through every point misplaces the
vertex. Here a budget's minimum is the vertex of a parabola in x = ln N through the points within
|x - centre| <= WINDOW (ln 5: a factor of 5 each side; widened by half-steps until it holds >= 3
sizes), centred first on the lowest point, then on the vertex until the chosen points no longer
change (a noisy lowest point would otherwise place the window off-centre). A budget counts only if
the lowest point has a sampled neighbour on each side, the parabola opens upwards and its vertex
lies inside the window's sampled sizes; the others are excluded from the power law and named.
On curves spanning 1000x in N (tests/test_scaling.py) this is unbiased where one parabola through
every point is off by 0.03 in the N_opt exponent.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import optimize

from ar_lm.scaling.compute import ComputeModel
from ar_lm.scaling.points import Points

WINDOW = math.log(5.0)
FRONTIER_PARAMS = 3  # E, A, alpha of the loss frontier
RECENTRE = 4  # window placements: at the lowest point, then at the vertex until the window is unchanged
ADD = {"the lowest loss is at the smallest size": "smaller sizes",  # what an excluded budget needs to count
       "the lowest loss is at the largest size": "larger sizes", "fewer than 3 sizes": "sizes"}


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y = k x^e by least squares in log space; returns (k, e)."""
    e, logk = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(logk)), float(e)


def budget_minimum(log_n: np.ndarray, loss: np.ndarray, window: float = WINDOW) -> dict:
    """The minimum of one budget's curve (see module docstring); `{"reason": ...}` when it has none."""
    order = np.argsort(log_n)
    x, y = log_n[order], loss[order]
    best = int(np.argmin(y))
    if len(np.unique(x)) < 3:
        return {"reason": "fewer than 3 sizes"}
    if best == 0 or best == len(x) - 1 or x[best] in (x[0], x[-1]):
        return {"reason": "the lowest loss is at the " + ("smallest" if best == 0 else "largest") + " size"}
    centre, near = x[best], None
    for _ in range(RECENTRE):
        w = window
        while len(np.unique(x[np.abs(x - centre) <= w])) < 3:
            w += window / 2
        chosen = np.abs(x - centre) <= w
        if near is not None and np.array_equal(chosen, near):
            break
        near = chosen
        coef = np.polyfit(x[near], y[near], 2)
        if coef[0] <= 0:
            return {"reason": "the parabola near the lowest point opens downwards"}
        x_min = -coef[1] / (2 * coef[0])
        if not x[0] <= x_min <= x[-1]:
            break
        centre = x_min
    if not x[near].min() <= x_min <= x[near].max():
        return {"reason": "the parabola's vertex lies outside the sampled sizes"}
    return {"x_min": float(x_min), "loss_min": float(np.polyval(coef, x_min)), "parabola": coef.tolist(),
            "window_N": [float(math.exp(x[near].min())), float(math.exp(x[near].max()))],
            "window_points": int(near.sum())}


def isoflop_minima(pts: Points, compute: ComputeModel, window: float = WINDOW) -> tuple[list[dict], list[dict]]:
    """(minima, excluded budgets) over the IsoFLOP groups of `pts`; each minimum has N_opt, D_opt = C / fpt(N_opt)
    and tokens_per_param = D_opt / N_opt (Hoffmann et al. 2022: ~20)."""
    minima, excluded = [], []
    if pts.group is None:
        return minima, excluded
    for g in np.unique(pts.group):
        m = pts.group == g
        c = float(np.exp(np.mean(np.log(pts.C[m]))))
        found = budget_minimum(np.log(pts.N[m]), pts.L[m], window)
        if "reason" in found:
            excluded.append({"C": c, "reason": found["reason"],
                             "N_range": [float(pts.N[m].min()), float(pts.N[m].max())],
                             "add": ADD.get(found["reason"], "sizes around the lowest point")})
            continue
        n_opt = math.exp(found.pop("x_min"))
        d_opt = float(compute.tokens(n_opt, c))
        minima.append({"C": c, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt, **found,
                       "N_range": [float(pts.N[m].min()), float(pts.N[m].max())]})
    return minima, excluded


def fit_loss_frontier(c: np.ndarray, loss: np.ndarray) -> Optional[dict]:
    """L*(C) = E + A · C^-alpha by least squares in log L; None if it fails, or with <= 3 budgets
    (3 parameters through 3 minima fit exactly: no residual, nothing tested)."""
    if len(c) <= FRONTIER_PARAMS:
        return None
    x = np.log(c / np.exp(np.mean(np.log(c))))  # centred: A is the reducible loss at the geometric-mean C

    def resid(t):
        return np.log(np.exp(t[0]) + np.exp(t[1] - t[2] * x)) - np.log(loss)

    starts = [[math.log(max(loss.min() * f, 1e-9)), math.log(max(loss.min() * (1 - f), 1e-9)), al]
              for f in (0.2, 0.5, 0.8) for al in (0.05, 0.2, 0.5)]
    fits = [optimize.least_squares(resid, s, bounds=([-30, -30, 0], [10, 10, 5]), xtol=1e-12, ftol=1e-12)
            for s in starts]
    best = min(fits, key=lambda r: r.cost)
    if not best.success:
        return None
    e, a, alpha = best.x
    c_ref = float(np.exp(np.mean(np.log(c))))
    return {"E": float(math.exp(e)), "A": float(math.exp(a) * c_ref ** alpha), "alpha": float(alpha)}


def frontier_loss(f: dict, c):
    return f["E"] + f["A"] * np.power(np.asarray(c, float), -f["alpha"])


def compute_for_loss(f: dict, loss):
    """The compute at which frontier `f` reaches `loss` (inf at or below its E)."""
    loss = np.asarray(loss, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(loss > f["E"], ((loss - f["E"]) / f["A"]) ** (-1 / f["alpha"]), np.inf)


def approach2(pts: Points, compute: ComputeModel, window: float = WINDOW) -> Optional[dict]:
    """Power laws N_opt = k_N C^a and D_opt = k_D C^b (D_opt = C / fpt(N_opt)) through the interior
    minima, and the loss frontier through their losses."""
    minima, excluded = isoflop_minima(pts, compute, window)
    if len(minima) < 2:
        return None
    c = np.array([m["C"] for m in minima])
    k_n, a = power_law(c, np.array([m["N_opt"] for m in minima]))
    k_d, b = power_law(c, np.array([m["D_opt"] for m in minima]))
    frontier = fit_loss_frontier(c, np.array([m["loss_min"] for m in minima]))
    return {"a": a, "k_N": k_n, "b": b, "k_D": k_d, "minima": minima, "excluded": excluded, "frontier": frontier,
            "window": window}
