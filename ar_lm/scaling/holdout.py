"""The held-out check of a sweep's fitted law: one run per `Sweep.holdout_budgets` entry at the fitted
compute-optimal size, its measured loss against the law's prediction (SWEEP_DIR/fit/holdout.json)."""

from __future__ import annotations

import sys
from pathlib import Path

from ar_lm.errors import UserError
from ar_lm.io import atomic_write_json
from ar_lm.scaling.plots import plot_fit
from ar_lm.scaling.points import points_from_sweep, without_repeated_data
from ar_lm.scaling.predict import predict_compute, predict_loss
from ar_lm.scaling.report import fit_sweep_dir, format_report
from ar_lm.scaling.rollout import predict_laws
from ar_lm.scaling.sweeps import Sweep, compute_optimal_point
from ar_lm.training import rundir


def fit_and_check(sweep: Sweep, runner, out: Path) -> None:
    """Fit the sweep in OUT (printing the report), then run and check its held-out points with `runner`
    (a `SweepRunner`)."""
    try:
        result = fit_sweep_dir(out)
    except UserError as e:
        print(f"[sweep] no fit: {e}", file=sys.stderr)
        return
    print(format_report(result))
    if not sweep.holdout_budgets:
        return
    if "approach3" not in result:
        print("[holdout] skipped: the fit has no parametric law (approach 3) to check", file=sys.stderr)
        return
    checks = []
    for i, budget in enumerate(sweep.holdout_budgets):
        try:
            checks.append(holdout_check(sweep, runner, result, i, budget))
        except UserError as e:  # the law cannot place this budget: the sweep's runs and fit stand
            print(f"[holdout] holdout{i} at C={budget:.3g} skipped: {e}", file=sys.stderr)
            checks.append({"name": f"holdout{i}", "budget": budget, "skipped": str(e)})
    atomic_write_json(out / "fit" / "holdout.json", checks)
    fitted, _ = without_repeated_data(points_from_sweep(out))  # the points the fit saw
    plot_fit(result, out / "fit", fitted, holdout=[c for c in checks if "skipped" not in c])  # held-out marked


def holdout_check(sweep: Sweep, runner, result: dict, index: int, budget: float) -> dict:
    """Run `holdout{index}` at `budget` with the ladder shape nearest approach 3's N_opt (no clamp to
    the sweep's sizes) and compare its final val loss with the selected law's prediction and 95% interval
    (approach 3's without law forms), and with every fitted form's (`forms`)."""
    optimal = predict_compute(result, budget)
    point = compute_optimal_point(sweep.base, budget, optimal["N_opt"], f"holdout{index}", sweep.rule, sweep.n_kind,
                                  sweep.hparams, sweep.points)
    runner.write_points([point])
    runner.run([point])
    measured = (rundir.read_summary(runner.run_dir(point.name)) or {}).get("val_loss")
    pred = predict_loss(result, point.coords["N"], point.coords["D"])
    forms = {}
    if (result.get("laws") or {}).get("selected"):  # every fitted form's prediction; the selected one's checks
        per = predict_laws(result, point.coords["N"], point.coords["D"], point.coords["C"])
        forms = {name: {"predicted_loss": v["predicted_loss"][0], "interval": v["interval"][0],
                        "relative_error": (v["predicted_loss"][0] - measured) / measured if measured else None}
                 for name, v in per["forms"].items()}
        pred = forms[per["selected"]]
    predicted = pred["predicted_loss"]
    largest = max(p.coords["C"] for p in sweep.points)
    check = {"name": point.name, "budget": budget, "beyond_largest_budget": point.coords["C"] / largest,
             "N_opt_fitted": optimal["N_opt"], "N_opt_interval": optimal["N_interval"],
             "N": point.coords["N"], "D": point.coords["D"], "C": point.coords["C"], "predicted_loss": predicted,
             "interval": pred["interval"], "measured_loss": measured,
             "relative_error": (predicted - measured) / measured if measured else None,
             "inside_interval": bool(pred["interval"][0] <= measured <= pred["interval"][1]) if measured else None,
             "law": (result.get("laws") or {}).get("selected") or "chinchilla", "forms": forms}
    if measured is None:
        print(f"[holdout] {point.name} did not finish: {runner.status.get(point.name, {}).get('error')}")
    else:
        lo, hi = pred["interval"]
        print(f"[holdout] C={point.coords['C']:.3g} ({check['beyond_largest_budget']:.1f}x the largest budget) "
              f"N={point.coords['N']:,} D={point.coords['D']:,}: {check['law']} predicts loss {predicted:.4f} "
              f"[{lo:.4f}, {hi:.4f}], measured {measured:.4f} ({100 * check['relative_error']:+.2f}%)")
        for name, f in forms.items():
            print(f"[holdout]   {name}: {f['predicted_loss']:.4f} [{f['interval'][0]:.4f}, {f['interval'][1]:.4f}] "
                  f"({100 * f['relative_error']:+.2f}%)")
    return check
