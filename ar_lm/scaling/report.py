"""`ar-lm fit`: fit a sweep directory or a CSV of points, write fit.json and the plots, print the
report; predictions with intervals (`--test`, `--predict`, `--predict-compute`), backtests
(`--holdout-above`) and compute multipliers (`--compare`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ar_lm.errors import require
from ar_lm.scaling import tasklaw
from ar_lm.io import atomic_write_json
from ar_lm.scaling.compute import ComputeModel
from ar_lm.scaling.diagnose import excluded_line
from ar_lm.scaling.fit import fit_points, with_attention
from ar_lm.scaling.plots import plot_fit
from ar_lm.scaling.plots_compare import plot_frontiers
from ar_lm.scaling.points import Points, points_from_csv, points_from_sweep, without_repeated_data
from ar_lm.scaling.curves import check_sweep_curves, format_curves
from ar_lm.scaling.forms import DEFAULT_FORMS, parse_forms
from ar_lm.scaling.predict import compute_multiplier, fit_compared, parse_nd, predict_compute, predict_rows
from ar_lm.scaling.rollout import format_laws
from ar_lm.scaling.sweep_data import check_same_scoring


def write_fit(pts: Points, out: Path, n_boot: int = 100, approaches=(1, 2, 3), full_grid: bool = False,
              include_repeated: bool = False, top: int = 64, forms=DEFAULT_FORMS) -> dict:
    """Fit `pts` (without the points that repeat their data unless `include_repeated`) with the law `forms`
    chosen by rollout, write OUT/fit.json and the plots; returns the fit."""
    pts, repeated = (pts, []) if include_repeated else without_repeated_data(pts)
    result = fit_points(pts, n_boot=n_boot, approaches=approaches, full_grid=full_grid, top=top, forms=forms)
    result |= {"stale_runs": list(pts.stale), "repeated_excluded": repeated}
    atomic_write_json(Path(out) / "fit.json", result)
    plot_fit(result, Path(out), pts)
    return result


def fit_sweep_dir(sweep_dir: str | Path, n_boot: int = 100) -> dict:
    """Fit a sweep's finished runs into SWEEP_DIR/fit/."""
    return write_fit(points_from_sweep(sweep_dir), Path(sweep_dir) / "fit", n_boot)


def _ci(p: dict, k: str) -> str:
    c = (p.get("ci") or {}).get(k)
    return f" [{c[0]:.3g}, {c[1]:.3g}]" if c else ""


def _conventions_line(result: dict) -> list[str]:
    """What N and C count (fit.json's `conventions`), with their mismatch where there is one."""
    conv = result.get("conventions")
    if not conv:
        return []
    mismatch = f"; MISMATCH: {conv['mismatch']}" if conv.get("mismatch") else ""
    return [f"[fit] conventions: N = {conv['N']['counts']}; {conv['C']['counts']}{mismatch}"]


def _tokens_line(result: dict) -> list[str]:
    """D_opt / N_opt at each budget (fit.json's `tokens_per_parameter`)."""
    parts = []
    for r in result.get("tokens_per_parameter") or []:
        vals = ", ".join(f"{r[k]:.3g} (approach {k[-1]})" for k in ("approach2", "approach3") if r.get(k) is not None)
        parts.append(f"C={r['C']:.3g}{' (C_ref)' if r['at'] == 'C_ref' else ''}: {vals}")
    head = "[fit] tokens per parameter at the optimum (D_opt / N_opt; Chinchilla ~20): "
    return [head + "; ".join(parts)] if parts else []


def _g_line(p3: dict) -> list[str]:
    """Approach 3's G (`parametric.asymptotic_exponents`) and the compute model it holds under."""
    if p3.get("G") is None:
        return []
    exact = p3.get("compute_model") == "exact"
    return [f"[fit] approach 3: G = {p3['G']:.4g}{_ci(p3, 'G')} (N_opt = G (C/6)^a under C = 6ND" +
            ("; the 6ND-equivalent: this fit's compute model is exact, see the local exponents)" if exact else ")")]


def format_report(result: dict) -> str:
    lines = [f"[fit] {result['n_points']} points; N = {result['n_kind']} parameters; "
             f"compute model {result['compute']['kind']} (C = fpt(N) · D)"] + _conventions_line(result)
    for i in (1, 2):
        p = result.get(f"approach{i}")
        if p:
            ok = p.get("bootstrap_ok", [0, 0])
            note = " (indicative: " + p["source"] + " curves, one horizon per size)" if p.get("indicative") else ""
            lines.append(f"[fit] approach {i}: N_opt ∝ C^{p['a']:.3f}{_ci(p, 'a')}, D_opt ∝ C^{p['b']:.3f}{_ci(p, 'b')}"
                         f"; {ok[0]}/{ok[1]} bootstrap replicates{note}")
    p2 = result.get("approach2") or {}
    lines += [f"[fit] approach 2 excludes {line}" for line in excluded_line(p2.get("excluded", []))]
    for i, a in sorted((result.get("approaches") or {}).items()):
        if "skipped" in a:
            lines.append(f"[fit] approach {i} skipped: {a['skipped']}")
    if p2.get("frontier"):
        f = p2["frontier"]
        lines.append(f"[fit] loss frontier: L*(C) = {f['E']:.3f}{_ci(f, 'E')} + {f['A']:.4g} C^-{f['alpha']:.3f}"
                     f"{_ci(f, 'alpha')}")
    p3 = result.get("approach3")
    if p3:
        lines.append(f"[fit] approach 3: L = {p3['E']:.3f}{_ci(p3, 'E')} + {p3['A']:.4g}/N^{p3['alpha']:.3f}"
                     f"{_ci(p3, 'alpha')} + {p3['B']:.4g}/D^{p3['beta']:.3f}{_ci(p3, 'beta')}")
        lines.append(f"[fit] approach 3: {'converged' if p3['converged'] else 'NOT CONVERGED (' + p3['message'] + ')'}"
                     f"; {p3['converged_starts']}/{p3['n_starts']} starts converged ({p3['starts']}); "
                     f"{p3['bootstrap_ok'][0]}/{p3['bootstrap_ok'][1]} bootstrap replicates")
        spread = p3.get("spread_of_best") or {}
        if spread.get("alpha") is not None:
            lines.append("[fit] approach 3: spread of the best converged optima: " +
                         ", ".join(f"{k} {spread[k]:.2g}" for k in ("E", "alpha", "beta")))
        if p3.get("a") is not None:
            loc = p3.get("local") or {}
            lines.append(f"[fit] approach 3: N_opt ∝ C^{p3['a']:.3f}{_ci(p3, 'a')}, D_opt ∝ C^{p3['b']:.3f}{_ci(p3, 'b')}"
                         f" asymptotically; locally at C={p3['C_ref']:.3g}: C^{loc.get('a', float('nan')):.3f}, "
                         f"C^{loc.get('b', float('nan')):.3f}")
        lines += _g_line(p3)
        if p3.get("floor") is not None:
            verdict = "above" if p3["E_minus_floor"] >= 0 else "BELOW"
            lines.append(f"[fit] entropy-rate floor {p3['floor']:.4f} nats: E is {verdict} it by {p3['E_minus_floor']:+.4f}")
    lines += _tokens_line(result)
    lines += format_laws(result["laws"]) if result.get("laws") else []
    lines += [f"[fit] WARNING: {w}" for w in result.get("warnings") or []]
    if result.get("repeated_excluded"):
        rep = result["repeated_excluded"]
        lines.append(f"[fit] not fitted: {len(rep)} points past one epoch of their train split (" + ", ".join(
            f"N={r['N']:,.0f} D={r['D']:,.0f} {r['epochs']:.2f} epochs" for r in rep) + "): --include-repeated fits them")
    if result.get("stale_runs"):
        lines.append(f"[fit] not fitted: {len(result['stale_runs'])} finished runs the sweep no longer defines "
                     f"({', '.join(result['stale_runs'])})")
    return "\n".join(lines)


def _iv(iv: Optional[list], fmt: str) -> str:
    """' [lo, hi]', or ' [no interval: --bootstrap >= 10]'."""
    return f" [{iv[0]:{fmt}}, {iv[1]:{fmt}}]" if iv else " [no interval: --bootstrap >= 10]"


def format_predictions(rows: list[dict]) -> str:
    head = f"{'N':>12} {'D':>14} {'C':>10} {'loss':>8} {'predicted':>9} {'95% interval':>17} {'error':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        loss = f"{r['loss']:8.4f}" if r.get("loss") else f"{'-':>8}"
        err = f"{100 * r['relative_error']:+6.2f}%" if r.get("relative_error") is not None else f"{'-':>7}"
        lo, hi = r["interval"]
        lines.append(f"{r['N']:>12,.0f} {r['D']:>14,.0f} {r['C']:>10.3g} {loss} {r['predicted_loss']:>9.4f} "
                     f"[{lo:.4f}, {hi:.4f}] {err}")
    return "\n".join(lines)


def _rows(pts: Points) -> list[dict]:
    return [{"N": float(n), "D": float(d), "C": float(c), "loss": float(l)} for n, d, c, l in zip(pts.N, pts.D, pts.C, pts.L)]


def _load(source: str, flops_model: str) -> Points:
    return points_from_sweep(source) if (Path(source) / "sweep.json").is_file() else points_from_csv(source, flops_model)


def _compare(args, out: Path) -> int:
    if all((Path(s) / "sweep.json").is_file() for s in args.compare):
        check_same_scoring(*map(Path, args.compare))
    a, b = fit_compared([_load(s, args.flops_model) for s in args.compare], n_boot=args.bootstrap)
    result = compute_multiplier(a, b)
    atomic_write_json(out / "compare.json", result)
    plot_frontiers({"A": (a["approach2"]["frontier"], a["approach2"]["minima"]),
                    "B": (b["approach2"]["frontier"], b["approach2"]["minima"])}, out / "compare.png")
    ci = result["interval"]
    print(f"[fit] B reaches at C={result['C']:.3g} the loss A reaches with {result['multiplier']:.3g}x the compute"
          + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""))
    return 0


def _extras(args, result: dict, out: Path, nd: list) -> None:
    """--task: downstream-task laws (`tasklaw.py`) with their predictions at --predict's N:D; --curves: the
    multi-power law of each size's loss curves (`curves.py`, OUT/curves.json)."""
    for metric in args.task or []:
        fit = tasklaw.fit_sweep_task(args.sweep_dir or args.points, metric, args.task_loss, n_boot=args.bootstrap)
        preds = [tasklaw.predict_accuracy(fit, n, d) for n, d in nd]
        result.setdefault("tasks", {})[fit["metric"]] = {**fit, "predictions": preds}
        print(tasklaw.format_task_law(fit, fit["metric"], fit["task_loss"], preds))
    if args.curves:
        curves = check_sweep_curves(args.sweep_dir)
        atomic_write_json(out / "curves.json", curves)
        print(format_curves(curves))


def fit_command(args) -> int:
    """`ar-lm fit SWEEP_DIR | --points CSV | --compare A B [options]` (see the parser's help)."""
    require(args.bootstrap >= 0, f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.compare:
        require(not (args.sweep_dir or args.points), "--compare takes its two inputs itself: drop SWEEP_DIR/--points")
        require(args.attention_flops == "causal", "--compare fits with the runs' own (causal) attention FLOPs: "
                "drop --attention-flops full")
        return _compare(args, Path(args.out or "compare"))
    require(bool(args.sweep_dir) != bool(args.points), "give either a SWEEP_DIR or --points CSV")
    pts = points_from_sweep(args.sweep_dir) if args.sweep_dir else points_from_csv(args.points, args.flops_model)
    test = _rows(points_from_csv(args.test, args.flops_model)) if args.test else []
    nd = [parse_nd(x) for x in args.predict or []]
    require(all(c > 0 for c in args.predict_compute or []), "--predict-compute needs positive FLOPs")
    pts, repeated = (pts, []) if args.include_repeated else without_repeated_data(pts)
    counted = with_attention(pts, args.attention_flops)  # C as the fit counts it (fit_points recounts `pts` alike)
    if args.holdout_above is not None:
        above = counted.C > args.holdout_above
        require(above.any() and (~above).sum() >= 5, f"--holdout-above {args.holdout_above:g} must leave >= 5 points "
                "below and some above")
        test = _rows(counted.subset(above)) + test
        pts, counted = pts.subset(~above), counted.subset(~above)
    approaches = tuple(args.approach or (1, 2, 3))
    if 3 in approaches and len(pts.N) < 5:  # fit_points names approach 3 as skipped, with what to add
        require(not args.approach and not (test or nd or args.predict_compute),
                f"approach 3 fits 5 parameters and needs at least 5 points, got {len(pts.N)}")
    out = Path(args.out or (Path(args.sweep_dir) / "fit" if args.sweep_dir else Path(args.points).with_suffix("")))
    require(not args.curves or args.sweep_dir, "--curves fits the loss curves of a sweep's runs: give a SWEEP_DIR")
    require(not args.task or args.sweep_dir, "--task fits columns of a sweep's summary.csv: give a SWEEP_DIR")
    forms = tuple(f.name for f in parse_forms(args.forms))
    result = fit_points(pts, n_boot=args.bootstrap, approaches=approaches, full_grid=args.full_grid,
                        attention=args.attention_flops, forms=forms, select=args.select)
    result |= {"stale_runs": list(pts.stale), "repeated_excluded": repeated}
    print(format_report(result))
    _extras(args, result, out, nd)
    if test:
        result["test"] = predict_rows(result, test)
        print(format_predictions(result["test"]))
    if nd:
        compute = ComputeModel.from_json(result["compute"])
        rows = [{"N": n, "D": d, "C": float(compute.fpt(n) * d)} for n, d in nd]
        print(format_predictions(predict_rows(result, rows)))
    for c in args.predict_compute or []:
        p = predict_compute(result, c)
        print(f"[predict] C={c:.3g}: N_opt={p['N_opt']:,.0f}{_iv(p['N_interval'], '.3g')}, D_opt={p['D_opt']:,.0f}"
              f"{_iv(p['D_interval'], '.3g')}, loss {p['predicted_loss']:.4f}{_iv(p['interval'], '.4f')}")
    atomic_write_json(out / "fit.json", result)
    plot_fit(result, out, counted)
    print(f"[fit] wrote {out / 'fit.json'} and plots", file=sys.stderr)
    return 0
