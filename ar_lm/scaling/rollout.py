"""Law forms fitted side by side, chosen by rollout cross-validation, with intervals calibrated on it.

Rollout (expanding window over compute, as OLMo-core and marin select laws): with the IsoFLOP budgets
C_1 < ... < C_K, fold k fits every form to the runs of budgets <= C_k and predicts the compute-optimal
loss at C_{k+1}, scored against that budget's measured IsoFLOP minimum (`isoflop.budget_minimum`): the
out-of-sample error e = ln(predicted / measured), the quantity a held-out run checks. Forms that could fit at
least half as many folds as the best-covered one are compared on the folds all of them could fit (mean |e|);
the lowest wins, fewer parameters breaking ties.

Calibration (variance inflation): each fold's prediction carries its own 95% band (bootstrap laws x
residuals, `forms.band`) of log half-width h_k; z_k = e_k / (h_k / 1.96) says how far out of its own
band the truth fell. A form's intervals are widened about the prediction in log space by
s = max(1, sqrt(mean z_k²)): bands that were too narrow out of sample are stretched until they are not.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ar_lm.errors import require
from ar_lm.scaling.compute import ComputeModel
from ar_lm.scaling.forms import Data, Form, band, fit_with_bootstrap, get_form, min_points, optimum, resample
from ar_lm.scaling.isoflop import WINDOW, budget_minimum, isoflop_minima
from ar_lm.scaling.points import Points

Z95 = 1.959964
ROLLOUT_BOOT = 30  # bootstrap laws per fold (each fold's band only sets its z)


def _draw(rng, n: int, clusters: Optional[Sequence]):
    return (lambda: rng.integers(0, n, n)) if clusters is None else (lambda: resample(rng, clusters))


def form_data(form: Form, pts: Points, window: float = WINDOW) -> Data:
    """The rows `form` fits: the runs, or their IsoFLOP minima (C, L*) with N_opt, D_opt."""
    if form.on == "points":
        return Data(pts.N, pts.D, pts.C, pts.L, pts.epochs)
    minima, _ = isoflop_minima(pts, pts.compute, window)
    col = lambda k: np.array([m[k] for m in minima], float)  # noqa: E731
    return Data(col("N_opt"), col("D_opt"), col("C"), col("loss_min"))


def fit_one(form: Form, pts: Points, n_boot: int, rng, clusters: Optional[Sequence] = None,
            law: Optional[dict] = None, run_noise: Optional[float] = None) -> dict:
    """`forms.fit_with_bootstrap` on the rows `form` fits (trunk clusters only for runs)."""
    x = form_data(form, pts)
    require(len(x.L) >= min_points(form), f"{form.name} fits {len(form.params)} parameters to "
            f"{'IsoFLOP minima' if form.on == 'minima' else 'runs'} and needs >= {min_points(form)}, has {len(x.L)}")
    draw = _draw(rng, len(x.L), clusters if form.on == "points" else None)
    return fit_with_bootstrap(form, x, n_boot, draw, law, run_noise)


def predict_at(fitted: dict, compute: ComputeModel, n, d, c, epochs=None, inflation: float = 1.0) -> dict:
    """{predicted_loss, interval} at rows (N, D, C) (arrays or scalars); a frontier predicts L*(C). The
    interval is widened by `inflation` about the prediction in log space."""
    n, d, c = (np.atleast_1d(np.asarray(v, float)) for v in (n, d, c))
    ep = None if epochs is None else np.atleast_1d(np.asarray(epochs, float))
    pred, lo, hi = band(fitted, Data(n, d, c, np.ones_like(n), ep))
    lo, hi = pred * (lo / pred) ** inflation, pred * (hi / pred) ** inflation
    return {"predicted_loss": pred.tolist(), "interval": np.stack([lo, hi], 1).tolist()}


def predict_optimum(fitted: dict, compute: ComputeModel, c: float, inflation: float = 1.0) -> dict:
    """The compute-optimal (N, D, L*) at C with L*'s interval."""
    n, d, loss = optimum(get_form(fitted["form"]), fitted["law"], compute, c)
    p = predict_at(fitted, compute, n if n == n else 1.0, d if d == d else 1.0, c, inflation=inflation)
    return {"C": c, "N_opt": n, "D_opt": d, "predicted_loss": loss, "interval": p["interval"][0]}


def _budgets(pts: Points) -> list[tuple[float, np.ndarray]]:
    """(C, mask) per IsoFLOP budget, by C."""
    out = [(float(np.exp(np.mean(np.log(pts.C[pts.group == g])))), pts.group == g) for g in np.unique(pts.group)]
    return sorted(out, key=lambda b: b[0])


def _fold(forms, pts: Points, c_next: float, measured: float, rng, clusters, run_noise, n_boot: int) -> dict:
    """Every form fitted to `pts` and its error at c_next."""
    out = {}
    for form in forms:
        try:
            fitted = fit_one(form, pts, n_boot, rng, clusters, run_noise=run_noise)
        except Exception as e:  # noqa: BLE001 - a form that cannot fit this fold is skipped, and says why
            out[form.name] = {"skipped": str(e)}
            continue
        p = predict_optimum(fitted, pts.compute, c_next)
        err = math.log(p["predicted_loss"] / measured)
        half = math.log(p["interval"][1] / p["interval"][0]) / 2
        out[form.name] = {"predicted_loss": p["predicted_loss"], "error": err, "interval": p["interval"],
                          "z": err / (half / Z95) if half > 0 else math.inf}
    return out


def rollout(pts: Points, forms: Sequence[Form], seed=0, clusters: Optional[Sequence] = None,
            run_noise: Optional[float] = None, n_boot: int = ROLLOUT_BOOT) -> dict:
    """The rollout folds, each form's score and inflation, and the selected form (see module docstring)."""
    require(pts.group is not None, "rollout cross-validation needs IsoFLOP budgets (a sweep, or a CSV whose "
            "points share compute budgets)")
    budgets = _budgets(pts)
    rng = np.random.default_rng([*np.atleast_1d(seed), 7])
    folds = []
    for k in range(1, len(budgets)):
        c_next, m_next = budgets[k]
        found = budget_minimum(np.log(pts.N[m_next]), pts.L[m_next])
        if "reason" in found:
            folds.append({"fit_up_to": budgets[k - 1][0], "C": c_next, "skipped": found["reason"]})
            continue
        keep = np.zeros(len(pts.N), bool)
        for c, m in budgets[:k]:
            keep |= m
        part = pts.subset(keep)
        sub = None if clusters is None else [cl for cl, kept in zip(clusters, keep) if kept]
        folds.append({"fit_up_to": budgets[k - 1][0], "C": c_next, "measured": found["loss_min"],
                      "forms": _fold(forms, part, c_next, found["loss_min"], rng, sub, run_noise, n_boot)})
    return {"folds": folds, **_scores(forms, folds)}


def _scores(forms: Sequence[Form], folds: list[dict]) -> dict:
    """Each form's mean |error| and inflation; forms with at least half the folds of the best-covered one are
    compared on the folds all of them could fit (a form that needs more budgets is reported, not chosen)."""
    names = [f.name for f in forms]
    own = {n: [i for i, f in enumerate(folds) if "error" in f.get("forms", {}).get(n, {})] for n in names}
    most = max((len(v) for v in own.values()), default=0)
    eligible = [n for n in names if own[n] and 2 * len(own[n]) >= most]
    common = sorted(set.intersection(*(set(own[n]) for n in eligible))) if eligible else []
    scores = {}
    for n in names:
        on = common if n in eligible else own[n]
        errs = [folds[i]["forms"][n]["error"] for i in on]
        zs = [folds[i]["forms"][n]["z"] for i in own[n]]
        scores[n] = {"mean_abs_error": float(np.mean(np.abs(errs))) if errs else None, "folds": len(errs),
                     "compared": n in eligible and bool(common),
                     "inflation": max(1.0, float(np.sqrt(np.mean(np.square(zs))))) if zs else None}
    ranked = sorted((n for n in names if scores[n]["compared"]),
                    key=lambda n: (scores[n]["mean_abs_error"], len(get_form(n).params)))
    return {"scores": scores, "compared_on": [folds[i]["C"] for i in common], "selected": ranked[0] if ranked else None}


def fit_laws(pts: Points, forms: Sequence[Form], n_boot: int, seed=0, clusters: Optional[Sequence] = None,
             select: str = "rollout", chinchilla: Optional[dict] = None, run_noise: Optional[float] = None,
             rollout_boot: int = ROLLOUT_BOOT) -> dict:
    """Every form fitted to all of `pts` with `n_boot` bootstrap laws (forms that cannot fit say why), the
    rollout (when `select` is "rollout" and there are budgets) and the selected form: rollout's choice, else
    the first form that fitted (None when none did). `chinchilla`: Approach 3's law, reused instead of refitted;
    `run_noise`: one run's log scatter about its law (`forms.run_scatter`)."""
    require(select in ("rollout", "first"), f"--select takes rollout or first, got {select!r}")
    rng = np.random.default_rng([*np.atleast_1d(seed), 11])
    fitted, skipped = {}, {}
    for form in forms:
        law = chinchilla if form.name == "chinchilla" and chinchilla else None
        try:
            fitted[form.name] = fit_one(form, pts, n_boot, rng, clusters, law, run_noise)
        except Exception as e:  # noqa: BLE001 - one form that cannot fit leaves the others
            skipped[form.name] = str(e)
    roll = None
    if select == "rollout" and pts.group is not None:
        roll = rollout(pts, forms, seed, clusters, run_noise, rollout_boot)
    for name, f in fitted.items():
        f["inflation"] = ((roll or {}).get("scores", {}).get(name) or {}).get("inflation") or 1.0
    chosen = (roll or {}).get("selected")
    selected = chosen if chosen in fitted else next(iter(fitted), None)  # None: no form fitted (approach 3 predicts)
    why = ("rollout cross-validation" if chosen in fitted else "the first form that fitted" + (
        "" if select == "first" else " (no rollout: the points have no IsoFLOP budgets)" if roll is None else
        " (rollout could score none of them)"))
    return {"forms": fitted, "skipped": skipped, "rollout": roll, "selected": selected, "selection": why}


def predict_laws(result: dict, n, d, c, epochs=None) -> dict:
    """Each fitted form's prediction with its calibrated interval at rows (N, D, C), and the selected form."""
    laws = result["laws"]
    compute = ComputeModel.from_json(result["compute"])
    per = {name: predict_at(f, compute, n, d, c, epochs, f["inflation"]) for name, f in laws["forms"].items()}
    return {"selected": laws["selected"], "forms": per}


def format_laws(laws: dict) -> list[str]:
    """The report's lines: each form, the rollout table and the choice."""
    lines = []
    for name, f in laws["forms"].items():
        params = ", ".join(f"{k}={v:.4g}" for k, v in f["law"].items() if k != "theta")
        lines.append(f"[fit] form {name}: {f['formula']}: {params}; rms log residual {f['rms_log_residual']:.4f}; "
                     f"{f['bootstrap_ok'][0]}/{f['bootstrap_ok'][1]} bootstrap laws; interval x{f['inflation']:.2f}")
    lines += [f"[fit] form {name} skipped: {why}" for name, why in laws["skipped"].items()]
    roll = laws.get("rollout")
    if roll:
        for fold in roll["folds"]:
            head = f"[fit] rollout: fit C <= {fold['fit_up_to']:.3g}, predict C = {fold['C']:.3g}"
            if "skipped" in fold:
                lines.append(f"{head}: skipped ({fold['skipped']})")
                continue
            cells = [f"{n} {100 * math.expm1(v['error']):+.2f}%" if "error" in v else f"{n} -"
                     for n, v in fold["forms"].items()]
            lines.append(f"{head} (measured L* {fold['measured']:.4f}): " + ", ".join(cells))
        scored = {n: s for n, s in roll["scores"].items() if s["mean_abs_error"] is not None}
        lines.append("[fit] rollout mean |error|: " + ", ".join(
            f"{n} {100 * s['mean_abs_error']:.2f}% ({s['folds']} folds{'' if s['compared'] else ', not compared'})"
            for n, s in scored.items()))
    lines.append(f"[fit] selected law: {laws['selected']} ({laws['selection']})" if laws["selected"] else
                 "[fit] no law form fitted: predictions by approach 3")
    return lines
