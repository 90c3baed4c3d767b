"""Scaling-law forms behind one interface (`ar-lm fit --forms`), each fitted by the Huber loss on log L
(delta 1e-3, as Approach 3) with bootstrap laws, and each predicting the loss at (N, D, C):

- ``chinchilla`` (Hoffmann et al. 2022): L(N, D) = E + A / N^alpha + B / D^beta (Approach 3, `parametric.py`).
- ``kaplan`` (Kaplan et al. 2020, eq. 1.5): L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D
  (no irreducible term: a pure power law in each resource).
- ``frontier`` (the loss frontier through the IsoFLOP minima, Approach 2): L*(C) = E + A C^-alpha;
  ``frontier:E=<value>`` pins E (``frontier:E=0`` is Kaplan et al.'s L(C) = (C_c / C)^alpha_C). It predicts
  the compute-optimal loss at C, whatever N and D.
- ``gadre`` (Gadre et al. 2024, eq. 4, over-training): L(C, M) = E + (a M^eta + b M^-eta) C^-eta with
  M = D / N tokens per parameter.
- ``muennighoff`` (Muennighoff et al. 2023, data-constrained): L = E + A / N^alpha + B / D'^beta,
  D' = U + U R* (1 - exp(-R / R*)), U = D / epochs unique tokens, R = epochs - 1 repetitions; fitted only
  on points that include repeated data (`--include-repeated`).

Bootstrap laws resample points (a WSD ladder's trunks together, `resample`) or IsoFLOP minima and refit
from the fit's optimum; `band` gives a 95% prediction interval from them and the fit's own residuals.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import optimize, stats

from ar_lm.errors import UserError, require
from ar_lm.scaling.compute import ComputeModel
from ar_lm.scaling.parametric import HUBER_DELTA, _huber, fit_parametric, parametric_loss

CI = (2.5, 97.5)


@dataclasses.dataclass(frozen=True)
class Data:
    """What a form fits: runs (N, D, C, L, epochs), or IsoFLOP minima (C, L*) with N, D at the optimum."""

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    L: np.ndarray
    epochs: Optional[np.ndarray] = None

    def take(self, idx) -> "Data":
        return Data(self.N[idx], self.D[idx], self.C[idx], self.L[idx],
                    None if self.epochs is None else self.epochs[idx])


@dataclasses.dataclass(frozen=True)
class Form:
    """A law: `log_loss(theta, data)` over parameters `theta` (log-scale where positive), `starts(data)`
    for the fit, `unpack(theta)` into named parameters; `on` "points" or "minima"."""

    name: str
    formula: str
    params: tuple[str, ...]
    on: str
    log_loss: Callable
    starts: Callable
    unpack: Callable
    bounds: tuple
    jac: Optional[Callable] = None  # d log L / d theta, rows x parameters (finite differences without it)


def resample(rng, clusters: Sequence) -> np.ndarray:
    """Indices of one bootstrap replicate: as many clusters as there are, drawn with replacement, each
    with all its points. `clusters[i]` names point i's cluster (a WSD ladder's trunk: its branches share
    one run); None or "" makes the point a cluster of its own (plain resampling of points)."""
    labels = [c if c not in (None, "") else ("\0point", i) for i, c in enumerate(clusters)]
    _, which = np.unique([str(c) for c in labels], return_inverse=True)
    members = [np.flatnonzero(which == k) for k in range(which.max() + 1)]
    return np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])


def _lse(*terms):
    return np.logaddexp.reduce(np.stack(np.broadcast_arrays(*terms)), axis=0)


# --- kaplan: theta = (ln N_c, ln D_c, alpha_N, alpha_D)
def _kaplan(t, x: Data):
    return t[3] * _lse((t[2] / t[3]) * (t[0] - np.log(x.N)), t[1] - np.log(x.D))


def _kaplan_jac(t, x: Data):
    u, v = (t[2] / t[3]) * (t[0] - np.log(x.N)), t[1] - np.log(x.D)
    lse = np.logaddexp(u, v)
    wu, wv = np.exp(u - lse), np.exp(v - lse)
    return np.stack([t[2] * wu, t[3] * wv, wu * (t[0] - np.log(x.N)), lse - wu * u], 1)


def _kaplan_starts(x: Data):
    ln, ld = np.log(x.N).mean(), np.log(x.D).mean()
    return [(ln + dn, ld + dd, an, ad) for dn, dd, an, ad in
            itertools.product((5, 15, 40), (5, 15, 40), (0.05, 0.2, 0.6), (0.05, 0.2, 0.6))]


# --- gadre: theta = (ln E, ln a, ln b, eta), M = D / N
def _gadre(t, x: Data):
    lm, lc = np.log(x.D / x.N), np.log(x.C)
    return _lse(t[0], t[1] + t[3] * lm - t[3] * lc, t[2] - t[3] * lm - t[3] * lc)


def _gadre_jac(t, x: Data):
    lm, lc = np.log(x.D / x.N), np.log(x.C)
    terms = np.stack(np.broadcast_arrays(t[0], t[1] + t[3] * (lm - lc), t[2] - t[3] * (lm + lc)))
    w = np.exp(terms - np.logaddexp.reduce(terms, axis=0))
    return np.stack([w[0], w[1], w[2], w[1] * (lm - lc) - w[2] * (lm + lc)], 1)


def _gadre_starts(x: Data):
    lc = np.log(x.C).mean()
    return [(e, eta * lc + a, eta * lc + b, eta) for e, a, b, eta in
            itertools.product((-1.0, 0.0, 0.5), (-3.0, 0.0, 3.0), (-3.0, 0.0, 3.0), (0.05, 0.15, 0.3))]


# --- muennighoff: theta = (ln A, ln B, ln E, alpha, beta, ln R*)
def _effective_tokens(d, epochs, log_rstar):
    ep = np.ones_like(d) if epochs is None else np.maximum(epochs, 1.0)
    u, r, rs = d / ep, ep - 1.0, math.exp(log_rstar)
    return u + u * rs * (1.0 - np.exp(-r / rs))


def _muennighoff(t, x: Data):
    d_eff = _effective_tokens(x.D, x.epochs, t[5])
    return _lse(t[0] - t[3] * np.log(x.N), t[1] - t[4] * np.log(d_eff), t[2])


def _muennighoff_starts(x: Data):
    base = fit_parametric(x.N, x.D, x.L, top=16)["theta"]
    return [(*base, math.log(rs)) for rs in (1.0, 5.0, 15.0, 50.0)]


# --- frontier: theta = (ln E, ln A, alpha), or (ln A, alpha) with E pinned
def _frontier(t, x: Data, e: Optional[float] = None):
    lc = np.log(x.C)
    if e is None:
        return _lse(t[0], t[1] - t[2] * lc)
    return np.log(e + np.exp(t[0] - t[1] * lc)) if e > 0 else t[0] - t[1] * lc


def _frontier_jac(t, x: Data, e: Optional[float] = None):
    lc = np.log(x.C)
    if e is None:
        w = 1.0 / (1.0 + np.exp(t[0] - (t[1] - t[2] * lc)))  # share of the reducible term
        return np.stack([1 - w, w, -w * lc], 1)
    w = np.exp(t[0] - t[1] * lc) / (e + np.exp(t[0] - t[1] * lc)) if e > 0 else np.ones_like(lc)
    return np.stack([w, -w * lc], 1)


def _frontier_starts(x: Data, e: Optional[float] = None):
    lc, lmin = np.log(x.C).mean(), float(np.log(x.L.min()))
    if e is not None:
        return [(math.log(max(x.L.min() - e, 1e-6)) + al * lc, al) for al in (0.02, 0.05, 0.1, 0.2, 0.5)]
    return [(lmin + math.log(f), lmin + math.log(1 - f) + al * lc, al) for f in (0.2, 0.5, 0.8)
            for al in (0.05, 0.2, 0.5)]


def frontier_form(e: Optional[float] = None) -> Form:
    if e is None:
        return Form("frontier", "L*(C) = E + A C^-alpha", ("E", "A", "alpha"), "minima", _frontier, _frontier_starts,
                    lambda t: {"E": math.exp(t[0]), "A": math.exp(t[1]), "alpha": t[2]},
                    ((-30, 10), (-30, 200), (0, 5)), _frontier_jac)
    return Form(f"frontier:E={e:g}", f"L*(C) = {e:g} + A C^-alpha", ("A", "alpha"), "minima",
                lambda t, x: _frontier(t, x, e), lambda x: _frontier_starts(x, e),
                lambda t: {"E": e, "A": math.exp(t[0]), "alpha": t[1]}, ((-30, 200), (0, 5)),
                lambda t, x: _frontier_jac(t, x, e))


FORMS = {
    "chinchilla": Form("chinchilla", "L(N, D) = E + A / N^alpha + B / D^beta", ("E", "A", "B", "alpha", "beta"),
                       "points", None, None, None, ()),
    "kaplan": Form("kaplan", "L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D",
                   ("N_c", "D_c", "alpha_N", "alpha_D"), "points", _kaplan, _kaplan_starts,
                   lambda t: {"N_c": math.exp(t[0]), "D_c": math.exp(t[1]), "alpha_N": t[2], "alpha_D": t[3]},
                   ((-50, 200), (-50, 200), (1e-3, 3), (1e-3, 3)), _kaplan_jac),
    "gadre": Form("gadre", "L(C, M) = E + (a M^eta + b M^-eta) C^-eta, M = D / N", ("E", "a", "b", "eta"), "points",
                  _gadre, _gadre_starts, lambda t: {"E": math.exp(t[0]), "a": math.exp(t[1]), "b": math.exp(t[2]),
                                                    "eta": t[3]}, ((-30, 10), (-60, 200), (-60, 200), (1e-3, 3)),
                  _gadre_jac),
    "muennighoff": Form("muennighoff", "L = E + A / N^alpha + B / D'^beta, D' = U + U R* (1 - exp(-R / R*))",
                        ("E", "A", "B", "alpha", "beta", "R_star"), "points", _muennighoff, _muennighoff_starts,
                        lambda t: {"E": math.exp(t[2]), "A": math.exp(t[0]), "B": math.exp(t[1]), "alpha": t[3],
                                   "beta": t[4], "R_star": math.exp(t[5])},
                        ((-30, 200), (-30, 200), (-10, 10), (0, 5), (0, 5), (-5, 10))),
}
DEFAULT_FORMS = ("chinchilla", "kaplan", "frontier", "frontier:E=0", "gadre")


def get_form(spec: str) -> Form:
    """A form by name; ``frontier:E=<value>`` pins the frontier's E."""
    spec = spec.strip()
    if spec.startswith("frontier:"):
        key, _, value = spec[len("frontier:"):].partition("=")
        try:
            e = float(value)
        except ValueError:
            e = -1.0
        require(key == "E" and e >= 0, f"--forms {spec!r}: pin the frontier's E as frontier:E=VALUE (VALUE >= 0)")
        return frontier_form(e)
    if spec == "frontier":
        return frontier_form()
    if spec not in FORMS:
        raise UserError(f"unknown law form {spec!r}: use {', '.join([*FORMS, 'frontier', 'frontier:E=VALUE'])}")
    return FORMS[spec]


def parse_forms(text: str) -> tuple[Form, ...]:
    forms = tuple(get_form(s) for s in text.split(",") if s.strip())
    require(forms, f"--forms takes law forms separated by commas, got {text!r}")
    return forms


# ---------------------------------------------------------------------------------------------
# Fitting


def _residuals(theta, form: Form, x: Data, log_l: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        r = form.log_loss(np.asarray(theta), x) - log_l
    return np.where(np.isfinite(r), r, 1e3)


def _objective(theta, form: Form, x: Data, log_l: np.ndarray):
    """The scaled Huber loss of the log residuals (as `parametric._objective`), with its gradient where the form
    has a Jacobian."""
    r = _residuals(theta, form, x, log_l)
    scale = 1.0 / (len(log_l) * HUBER_DELTA**2)
    f = float(_huber(r).sum() * scale)
    if form.jac is None:
        return f
    return f, form.jac(np.asarray(theta), x).T @ np.clip(r, -HUBER_DELTA, HUBER_DELTA) * scale


def _value(theta, form: Form, x: Data, log_l: np.ndarray) -> float:
    out = _objective(theta, form, x, log_l)
    return out[0] if isinstance(out, tuple) else out


def _minimise(form: Form, x: Data, starts, keep: int = 6) -> Optional[np.ndarray]:
    """The best L-BFGS-B optimum (analytic gradients where the form has them) from the `keep` starts of lowest
    objective."""
    log_l = np.log(x.L)
    lo, hi = np.array(form.bounds, float).T
    scored = sorted((np.clip(s, lo, hi) for s in starts), key=lambda s: _value(s, form, x, log_l))
    runs = [optimize.minimize(_objective, s, args=(form, x, log_l), jac=form.jac is not None, method="L-BFGS-B",
                              bounds=form.bounds, options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000})
            for s in scored[:keep]]
    best = min(runs, key=lambda r: r.fun)
    return best.x if best.fun < 1e5 else None


def _chinchilla(x: Data, starts=None) -> Optional[dict]:
    p = fit_parametric(x.N, x.D, x.L, starts=starts) if starts else fit_parametric(x.N, x.D, x.L)
    if starts and not p["converged"]:
        return None
    return {**{k: p[k] for k in ("E", "A", "B", "alpha", "beta")}, "theta": p["theta"]}


def fit_form(form: Form, x: Data, starts=None) -> Optional[dict]:
    """The law's parameters and `theta` (None where no start gives a finite fit)."""
    if form.name == "chinchilla":
        return _chinchilla(x, starts)
    theta = _minimise(form, x, starts or form.starts(x), keep=1 if starts else 6)
    return None if theta is None else {**form.unpack(theta), "theta": [float(v) for v in theta]}


def log_predict(form: Form, law: dict, x: Data) -> np.ndarray:
    if form.name == "chinchilla":
        return np.log(parametric_loss(law, x.N, x.D))
    return form.log_loss(np.asarray(law["theta"]), x)


def min_points(form: Form) -> int:
    """Points (or minima) a fit needs: one more than its parameters, so something is tested."""
    return len(form.params) + 1


def fit_with_bootstrap(form: Form, x: Data, n_boot: int, draw: Callable[[], np.ndarray],
                       law: Optional[dict] = None, run_noise: Optional[float] = None) -> dict:
    """The fit (or `law`, when it is given) and its bootstrap laws, each refitted from the fit's optimum to the
    rows `draw()` picks; residuals inflated by sqrt(n / (n - parameters))."""
    law = law or fit_form(form, x)
    require(law is not None, f"the {form.name} law did not fit")
    boots = []
    for _ in range(n_boot):
        idx = draw()
        if len(np.unique(idx)) < min_points(form) - 1:
            continue
        b = fit_form(form, x.take(idx), starts=[law["theta"]])
        if b is not None:
            boots.append(b)
    r = np.log(x.L) - log_predict(form, law, x)
    dof = max(len(r) - len(form.params), 1)
    return {"form": form.name, "formula": form.formula, "on": form.on, "law": law, "bootstrap": boots,
            "bootstrap_ok": [len(boots), n_boot], "residuals": (r * math.sqrt(len(r) / dof)).tolist(),
            "rms_log_residual": float(np.sqrt(np.mean(r**2))), "run_noise": run_noise}


def run_scatter(fitted: dict, m: int = 40) -> np.ndarray:
    """Draws of one run's log deviation from its law: m normal quantiles of sd `run_noise` (the sweep's eval
    and run-to-run noise, `fit._noise_scale`) where it is known, else the fit's inflated residuals (which also
    hold the form's misfit far from the optimum)."""
    if fitted.get("run_noise") is None:
        return np.asarray(fitted["residuals"])
    return fitted["run_noise"] * stats.norm.ppf((np.arange(m) + 0.5) / m)


def band(fitted: dict, x: Data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prediction, lower, upper) at every row of `x`: percentiles of exp(log L_b + r_j) over bootstrap laws b
    and one run's scatter r_j (`run_scatter`; the fit's own law alone when there are fewer than 10 laws)."""
    form = get_form(fitted["form"])
    pred = log_predict(form, fitted["law"], x)
    laws = fitted["bootstrap"] if len(fitted["bootstrap"]) >= 10 else [fitted["law"]]
    log_b = np.stack([log_predict(form, b, x) for b in laws])  # laws x rows
    r = run_scatter(fitted)
    draws = (log_b[:, None, :] + r[None, :, None]).reshape(-1, len(x.L))
    lo, hi = np.percentile(draws, CI, axis=0)
    return np.exp(pred), np.exp(lo), np.exp(hi)


def optimum(form: Form, law: dict, compute: ComputeModel, c: float) -> tuple[float, float, float]:
    """(N_opt, D_opt, L*) at compute C: a log-spaced scan of N then Brent (frontiers: L*(C), N and D nan)."""
    if form.on == "minima":
        one = np.array([c])
        return math.nan, math.nan, float(np.exp(log_predict(form, law, Data(one, one, one, one)))[0])

    def loss(xn):
        n = np.exp(np.atleast_1d(xn))
        d = compute.tokens(n, c)
        return np.exp(log_predict(form, law, Data(n, d, np.full_like(n, c), np.ones_like(n))))

    xs = np.linspace(0.0, 0.6 * math.log(c), 600)
    i = int(np.argmin(loss(xs)))
    lo, hi = xs[max(i - 1, 0)], xs[min(i + 1, len(xs) - 1)]
    xn = optimize.minimize_scalar(lambda v: float(loss(v)[0]), bounds=(lo, hi), method="bounded",
                                  options={"xatol": 1e-10}).x
    return math.exp(xn), float(compute.tokens(math.exp(xn), c)), float(loss(xn)[0])
