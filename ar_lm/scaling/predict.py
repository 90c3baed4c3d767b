"""Predictions of a fit with 95% prediction intervals, backtests, and compute multipliers.

A prediction interval combines the fit's uncertainty with the scatter of single runs: every
Approach-3 bootstrap law b predicts log L_b(N, D); every fit residual r_j = log L_j - log L(N_j, D_j),
inflated by sqrt(n / (n - 5)) for the 5 fitted parameters, is a draw of one run's deviation; the
interval is the 2.5 and 97.5 percentiles of exp(log L_b + r_j) over all pairs (b, j).

Compute multiplier of B over A at compute C (Hoffmann et al.'s "effective compute"): the compute
that A's loss frontier needs to reach the loss B's frontier reaches with C, divided by C.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ar_lm.errors import UserError, require
from ar_lm.scaling.compute import ComputeModel
from ar_lm.scaling.fit import CI, fit_points, interval
from ar_lm.scaling.isoflop import FRONTIER_PARAMS, compute_for_loss, frontier_loss
from ar_lm.scaling.parametric import asymptotic_exponents, optimal_size, parametric_loss
from ar_lm.scaling.points import Points
from ar_lm.scaling.rollout import predict_laws, predict_optimum


def _law3(result: dict) -> dict:
    p3 = result.get("approach3")
    require(p3 is not None, "predictions need the parametric law (approach 3): fit with at least 5 points")
    return p3


def _laws(p3: dict) -> list[dict]:
    """The bootstrap laws (the fit itself when there are none)."""
    laws = [b for b in p3.get("bootstrap") or [] if b.get("alpha") is not None]
    return [{**b, **asymptotic_exponents(b)} for b in laws] or [p3]


def residuals(result: dict) -> np.ndarray:
    """Log residuals of the fit's own points, inflated for its 5 parameters."""
    p3 = _law3(result)
    pts = result["points"]
    r = np.array([math.log(p["loss"] / parametric_loss(p3, p["N"], p["D"])) for p in pts])
    return r * math.sqrt(len(r) / max(len(r) - 5, 1))


def _band(log_pred_b: np.ndarray, r: np.ndarray) -> list[float]:
    lo, hi = np.percentile((log_pred_b[:, None] + r[None, :]).ravel(), CI)
    return [float(math.exp(lo)), float(math.exp(hi))]


def predict_loss(result: dict, n: float, d: float, r: Optional[np.ndarray] = None) -> dict:
    """{predicted_loss, interval} at (N, D)."""
    p3 = _law3(result)
    r = residuals(result) if r is None else r
    log_b = np.log([parametric_loss(b, n, d) for b in _laws(p3)])
    return {"predicted_loss": float(parametric_loss(p3, n, d)), "interval": _band(log_b, r)}


def _by_laws(result: dict, rows: list[dict]) -> list[dict]:
    """The selected law form's prediction and interval for every row, and each form's prediction (`forms`)."""
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    per = predict_laws(result, col("N"), col("D"), col("C"))
    chosen = per["forms"][per["selected"]]
    return [{"predicted_loss": chosen["predicted_loss"][i], "interval": chosen["interval"][i], "law": per["selected"],
             "forms": {n: v["predicted_loss"][i] for n, v in per["forms"].items()}} for i in range(len(rows))]


def predict_rows(result: dict, rows: list[dict]) -> list[dict]:
    """`rows` ({N, D, C, loss}) with predicted_loss, interval and relative_error, in order: by the selected law
    form where the fit has forms (`rollout.fit_laws`), else by approach 3."""
    if (result.get("laws") or {}).get("selected") and rows:
        preds = _by_laws(result, rows)
    else:
        r = residuals(result)
        preds = [predict_loss(result, row["N"], row["D"], r) for row in rows]
    out = []
    for row, pred in zip(rows, preds):
        err = (pred["predicted_loss"] - row["loss"]) / row["loss"] if row.get("loss") else None
        out.append({**row, **pred, "relative_error": err})
    return out


def predict_compute(result: dict, c: float) -> dict:
    """Compute-optimal N, D and loss at compute C under the fit's compute model, with intervals: N and D
    by approach 3 (or the selected law form's optimum where approach 3 has none), the loss by the selected law
    form where the fit has forms."""
    laws = result.get("laws") or {}
    if laws.get("selected") and (laws["selected"] != "chinchilla" or "approach3" not in result):
        fitted = laws["forms"][laws["selected"]]
        opt = predict_optimum(fitted, ComputeModel.from_json(result["compute"]), c, fitted["inflation"])
        base = predict_compute({**result, "laws": None}, c) if "approach3" in result else {
            "N_opt": opt["N_opt"], "D_opt": opt["D_opt"], "N_interval": None, "D_interval": None}
        return {**base, "C": c, "predicted_loss": opt["predicted_loss"], "interval": opt["interval"],
                "law": laws["selected"]}
    p3 = _law3(result)
    compute = ComputeModel.from_json(result["compute"])
    require(p3.get("a") is not None, "the fitted law has a zero exponent: it has no compute-optimal frontier")
    n, d = optimal_size(p3, compute, c)
    laws = [b for b in _laws(p3) if b.get("a") is not None] or [p3]  # each law keeps its own optimum
    opt = [optimal_size(b, compute, c) for b in laws]
    log_b = np.log([parametric_loss(b, nb, db) for b, (nb, db) in zip(laws, opt)])
    return {"C": c, "N_opt": n, "D_opt": d, "N_interval": interval([o[0] for o in opt]),
            "D_interval": interval([o[1] for o in opt]), "predicted_loss": float(parametric_loss(p3, n, d)),
            "interval": _band(log_b, residuals(result))}


def parse_nd(text: str) -> tuple[float, float]:
    try:
        n, d = (float(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--predict takes N:D (e.g. 1e6:2e8), got {text!r}") from None
    require(n > 0 and d > 0, f"--predict needs positive N and D, got {text!r}")
    return n, d


def _frontier(result: dict, name: str) -> tuple[dict, list[dict]]:
    p2 = result.get("approach2") or {}
    minima = len(p2.get("minima") or [])
    require(minima > FRONTIER_PARAMS, f"a compute multiplier needs a loss frontier through more minima than its "
            f"{FRONTIER_PARAMS} parameters: {name} has {minima} IsoFLOP budgets with an interior minimum, add budgets")
    require(p2.get("frontier") is not None, f"the loss frontier of {name} did not fit: see its IsoFLOP minima")
    boots = [b for b in p2.get("bootstrap") or [] if b.get("alpha") is not None]
    return p2["frontier"], boots


def fit_compared(sweeps: Sequence[Points], n_boot: int = 100, seed: int = 0) -> list[dict]:
    """Approach 2 of each sweep, bootstrapped independently: sweep i draws from the stream [seed, i + 1]."""
    return [fit_points(p, n_boot=n_boot, seed=[seed, i + 1], approaches=(2,)) for i, p in enumerate(sweeps)]


def compute_multiplier(result_a: dict, result_b: dict) -> dict:
    """B's compute multiplier over A at the geometric mean of B's budgets; replicate i pairs A's i-th
    and B's i-th bootstrap, which must be independent draws (different seeds: `fit_compared`)."""
    fa, boots_a = _frontier(result_a, "A")
    fb, boots_b = _frontier(result_b, "B")
    shared = boots_a and boots_b and result_a.get("bootstrap_seed", "A") == result_b.get("bootstrap_seed", "B")
    require(not shared, "A and B were bootstrapped from the same seed, so their replicates share noise and the "
            "interval would be too narrow: fit them with different seeds (predict.fit_compared)")
    c = float(np.exp(np.mean(np.log([m["C"] for m in result_b["approach2"]["minima"]]))))
    mult = lambda a, b: float(compute_for_loss(a, frontier_loss(b, c)) / c)  # noqa: E731
    pairs = [mult(a, b) for a, b in zip(boots_a, boots_b)]
    return {"C": c, "multiplier": mult(fa, fb), "interval": interval(pairs),
            "bootstrap_ok": [len(pairs), len(pairs)], "frontier_A": {k: fa[k] for k in ("E", "A", "alpha")},
            "frontier_B": {k: fb[k] for k in ("E", "A", "alpha")}}
