"""Variable projection (VPNLS) fit of Approach 3's law L(N, D) = E + A / N^alpha + B / D^beta
(Czech et al. 2026, arXiv 2603.22339; after Golub & Pereyra 1973).

For fixed exponents (alpha, beta) the law is linear in (E, A, B) >= 0: they are solved by non-negative
least squares, so the search is over the two exponents only. The objective is parametric.py's: the Huber
loss (delta = 1e-3) of the log residuals r = log L_hat - log L, summed and divided by n · delta². The
inner solve minimises it by iteratively reweighted Gauss-Newton: linearised, r_i + (x_i·(c - c0)) / L_hat_i,
so each step is a weighted NNLS with rows scaled by sqrt(w_i) / L_hat_i (w_i the Huber weight
min(1, delta / |r_i|)) and target L_hat_i (1 - r_i). Then the exact objective is evaluated at the solution.

The exponents are searched exhaustively on a grid (every pair solved at once: for three columns NNLS is
the best feasible least-squares solution over the 7 non-empty active sets, done batched through the
normal equations), then on finer grids around the best pair; the best pair's coefficients are solved once
more with scipy.optimize.nnls. Sizes are centred (x = log N - mean log N) as in parametric.py, so the
columns are 1, exp(-alpha x_n), exp(-beta x_d) and A = A_c exp(alpha mu_n).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Optional

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3
GRID_STEP = 0.02
GRID = (0.02, 2.5)  # alpha and beta: 125 values each, 15,625 pairs
ZOOMS = 3  # finer grids around the best pair, each ZOOM_FACTOR times finer, +-ZOOM_HALF fine steps wide
ZOOM_FACTOR = 4
ZOOM_HALF = 8
EXPONENT_BOUNDS = (0.0, 5.0)  # parametric.BOUNDS for alpha and beta
IRLS_STEPS = 4
COARSE_STEPS = 2  # on the coarse grid, which only ranks the pairs
CHUNK = 400_000  # pairs x points solved at once (memory: ~40 bytes each per array)
ACTIVE_SETS = np.array([m for m in itertools.product((0.0, 1.0), repeat=3) if any(m)])  # (7, 3)
TINY = 1e-300
POLISH_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 500}


def huber_objective(log_pred: np.ndarray, log_l: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """parametric.py's objective over the last axis: sum of Huber(r) / (n delta²), r = log_pred - log_l."""
    r = np.abs(log_pred - log_l)
    h = np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta))
    return h.sum(axis=-1) / (log_l.shape[-1] * delta**2)


def columns(alphas: np.ndarray, betas: np.ndarray, x_n: np.ndarray, x_d: np.ndarray) -> np.ndarray:
    """The design matrices (k, n, 3) of pairs (alphas[i], betas[i]): 1, exp(-alpha x_n), exp(-beta x_d)."""
    ones = np.ones((len(alphas), len(x_n)))
    return np.stack([ones, np.exp(-np.outer(alphas, x_n)), np.exp(-np.outer(betas, x_d))], axis=-1)


def _solve3(g: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched solutions of symmetric 3 x 3 systems g (k, 3, 3) c = h (k, 3) by cofactors, and det."""
    g00, g01, g02, g11, g12, g22 = g[:, 0, 0], g[:, 0, 1], g[:, 0, 2], g[:, 1, 1], g[:, 1, 2], g[:, 2, 2]
    c00, c01, c02 = g11 * g22 - g12 * g12, g02 * g12 - g01 * g22, g01 * g12 - g02 * g11
    c11, c12, c22 = g00 * g22 - g02 * g02, g01 * g02 - g00 * g12, g00 * g11 - g01 * g01
    det = g00 * c00 + g01 * c01 + g02 * c02
    safe = np.where(np.abs(det) > 0, det, 1.0)
    h0, h1, h2 = h[:, 0], h[:, 1], h[:, 2]
    c = np.stack([c00 * h0 + c01 * h1 + c02 * h2, c01 * h0 + c11 * h1 + c12 * h2,
                  c02 * h0 + c12 * h1 + c22 * h2], axis=1) / safe[:, None]
    return c, det


def nnls3(xw: np.ndarray, yw: np.ndarray) -> np.ndarray:
    """Batched NNLS of yw (k, n) on three columns xw (k, n, 3): of the least-squares solutions on each
    non-empty active set, the feasible (>= 0) one with the smallest residual (all zeros if none is).
    Columns are scaled to unit norm; a set whose normal equations are singular to 1e-12 is skipped."""
    scale = np.linalg.norm(xw, axis=1)  # (k, 3)
    scale = np.where(scale > 0, scale, 1.0)
    xs = xw / scale[:, None, :]
    g = np.matmul(xs.transpose(0, 2, 1), xs)
    h = np.matmul(xs.transpose(0, 2, 1), yw[..., None])[..., 0]
    yy = np.sum(yw * yw, axis=1)
    best_c, best_ss = np.zeros_like(h), yy.copy()  # the empty set: c = 0
    eye = np.eye(3)
    for m in ACTIVE_SETS:
        mm = np.outer(m, m)
        c, det = _solve3(g * mm + eye * (1.0 - mm), h * m)
        ss = yy - np.sum(c * h * m, axis=1)
        take = np.all(c >= 0, axis=1) & (ss < best_ss) & (det > 1e-12)
        best_c[take], best_ss[take] = c[take], ss[take]
    return best_c / scale


def _predict(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum(np.matmul(x, c[..., None])[..., 0], TINY)


def irls(x: np.ndarray, log_l: np.ndarray, delta: float = HUBER_DELTA, steps: int = IRLS_STEPS):
    """(E, A_c, B_c) per design matrix x (k, n, 3) minimising the Huber objective of the log residuals
    (reweighted Gauss-Newton from the relative-residual least-squares solution), and that objective."""
    target = np.broadcast_to(np.exp(log_l), x.shape[:2])
    pred, r = target, np.zeros(x.shape[:2])
    c = None
    for _ in range(steps):
        w = np.sqrt(np.minimum(1.0, delta / np.maximum(np.abs(r), TINY))) / pred
        c = nnls3(x * w[..., None], pred * (1.0 - r) * w)
        pred = _predict(x, c)
        r = np.log(pred) - log_l
    return c, huber_objective(np.log(pred), log_l, delta)


def profile(alphas, betas, x_n, x_d, log_l, delta: float = HUBER_DELTA, steps: int = IRLS_STEPS):
    """The coefficients (k, 3) and objective (k,) of every pair (alphas[i], betas[i]), in chunks."""
    step = max(1, CHUNK // len(x_n))
    out_c, out_f = [], []
    for i in range(0, len(alphas), step):
        c, f = irls(columns(alphas[i : i + step], betas[i : i + step], x_n, x_d), log_l, delta, steps)
        out_c.append(c)
        out_f.append(f)
    return np.concatenate(out_c), np.concatenate(out_f)


def _pairs(al: np.ndarray, be: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    aa, bb = np.meshgrid(al, be, indexing="ij")
    return aa.ravel(), bb.ravel()


def search(x_n, x_d, log_l, delta: float = HUBER_DELTA) -> dict:
    """The best (alpha, beta) on the grid, then on ZOOMS finer grids around it (within EXPONENT_BOUNDS)."""
    lo, hi = GRID
    axis = np.arange(lo, hi + GRID_STEP / 2, GRID_STEP)
    al, be = _pairs(axis, axis)
    _, f = profile(al, be, x_n, x_d, log_l, delta, COARSE_STEPS)
    i = int(np.argmin(f))
    alpha, beta, best_f, n_pairs = al[i], be[i], f[i], len(al)
    edge = bool(alpha in (axis[0], axis[-1]) or beta in (axis[0], axis[-1]))
    step = GRID_STEP
    for _ in range(ZOOMS):
        step /= ZOOM_FACTOR
        offsets = step * np.arange(-ZOOM_HALF, ZOOM_HALF + 1)
        a_ax = np.unique(np.clip(alpha + offsets, step, EXPONENT_BOUNDS[1]))
        b_ax = np.unique(np.clip(beta + offsets, step, EXPONENT_BOUNDS[1]))
        al, be = _pairs(a_ax, b_ax)
        _, fz = profile(al, be, x_n, x_d, log_l, delta)
        j = int(np.argmin(fz))
        n_pairs += len(al)
        if fz[j] <= best_f:
            alpha, beta, best_f = al[j], be[j], fz[j]
    return {"alpha": float(alpha), "beta": float(beta), "objective": float(best_f), "pairs": n_pairs,
            "grid_edge": edge}


def solve_pair(alpha: float, beta: float, x_n, x_d, log_l, delta: float = HUBER_DELTA,
               steps: int = 2 * IRLS_STEPS) -> tuple[np.ndarray, float]:
    """(E, A_c, B_c) at one pair by the same reweighted Gauss-Newton, each step scipy.optimize.nnls."""
    x = columns(np.array([alpha]), np.array([beta]), x_n, x_d)[0]
    scale = np.linalg.norm(x, axis=0)
    pred, r = np.exp(log_l), np.zeros_like(log_l)
    for _ in range(steps):
        w = np.sqrt(np.minimum(1.0, delta / np.maximum(np.abs(r), TINY))) / pred
        c = optimize.nnls((x / scale) * w[:, None], pred * (1.0 - r) * w)[0] / scale
        pred = np.maximum(x @ c, TINY)
        r = np.log(pred) - log_l
    return c, float(huber_objective(np.log(pred), log_l, delta))


def _profiled(ab, x_n, x_d, log_l, delta):
    """The objective at the inner optimum of (alpha, beta) and its gradient there (the envelope theorem:
    the partial derivatives with the coefficients held)."""
    c, f = solve_pair(ab[0], ab[1], x_n, x_d, log_l, delta)
    tn, td = c[1] * np.exp(-ab[0] * x_n), c[2] * np.exp(-ab[1] * x_d)
    pred = np.maximum(c[0] + tn + td, TINY)
    h = np.clip(np.log(pred) - log_l, -delta, delta) / (len(log_l) * delta**2 * pred)
    return f, np.array([-np.sum(h * tn * x_n), -np.sum(h * td * x_d)])


def polish(alpha: float, beta: float, x_n, x_d, log_l, delta: float = HUBER_DELTA, options=None):
    """L-BFGS-B over (alpha, beta) alone on the profiled objective, from the grid's best pair (`options`
    override POLISH_OPTIONS, e.g. a caller's iteration cap)."""
    lo = GRID_STEP / ZOOM_FACTOR**ZOOMS
    res = optimize.minimize(_profiled, np.array([alpha, beta]), args=(x_n, x_d, log_l, delta), jac=True,
                            method="L-BFGS-B", bounds=[(lo, EXPONENT_BOUNDS[1])] * 2,
                            options={**POLISH_OPTIONS, **(options or {})})
    return float(res.x[0]), float(res.x[1]), res


def centred_theta(c: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """(a_c, b_c, e, alpha, beta) of coefficients (E, A_c, B_c), a coefficient NNLS set to zero at
    parametric.py's lower bound for e (-10) or, for A_c and B_c, at 1e-300."""
    e = math.log(c[0]) if c[0] > math.exp(-10) else -10.0
    return np.array([math.log(max(c[1], TINY)), math.log(max(c[2], TINY)), e, alpha, beta])


def fit_vpnls(N, D, L, delta: float = HUBER_DELTA, options: Optional[dict] = None) -> dict:
    """The VPNLS fit: E, A, B, alpha, beta, theta = (log A, log B, log E, alpha, beta), the objective
    (parametric.py's scaling), `theta_c` (centred a, b) with mu_n, mu_d, and seconds, pairs, grid_edge,
    `zero` (the coefficients NNLS set to zero)."""
    t0 = time.perf_counter()
    log_n, log_d, log_l = np.log(N), np.log(D), np.log(L)
    mu_n, mu_d = float(log_n.mean()), float(log_d.mean())
    x_n, x_d = log_n - mu_n, log_d - mu_d
    s = search(x_n, x_d, log_l, delta)
    alpha, beta, res = polish(s["alpha"], s["beta"], x_n, x_d, log_l, delta, options)
    c, f = solve_pair(alpha, beta, x_n, x_d, log_l, delta)
    if f > s["objective"]:  # the polish is a descent method: only float noise can make it worse
        alpha, beta = s["alpha"], s["beta"]
        c, f = solve_pair(alpha, beta, x_n, x_d, log_l, delta)
    theta_c = centred_theta(c, alpha, beta)
    a, b = theta_c[0] + alpha * mu_n, theta_c[1] + beta * mu_d
    return {"E": math.exp(theta_c[2]), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta,
            "theta": [float(a), float(b), float(theta_c[2]), alpha, beta], "objective": f,
            "polish": str(res.message),
            "theta_c": theta_c.tolist(), "mu_n": mu_n, "mu_d": mu_d, "seconds": time.perf_counter() - t0,
            "pairs": s["pairs"], "grid_edge": s["grid_edge"],
            "zero": [k for k, v in zip("EAB", c) if v <= 0]}
