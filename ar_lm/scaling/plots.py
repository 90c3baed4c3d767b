"""Plots of scaling fits (matplotlib, PNG), after Hoffmann et al. 2022 (Figs. 2-4) and Porian et al. 2024: the
data points with their standard errors, fitted curves solid over the fitted range and dashed beyond it, size as
a sequential colormap with a colorbar labelled N, the held-out runs marked (`holdout` or OUT/holdout.json), and
what the fit skipped in a footer. Each function returns the arrays it plotted (tests compare them with fit.json).
Run comparisons and loss frontiers: `plots_compare.py`; N_opt and D_opt against C: `plots_optimal.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ar_lm.scaling.parametric import parametric_loss
from ar_lm.scaling.plots_axes import (HOLDOUT_STYLE, load_holdout, log_ticks, plt, save, size_color, size_colorbar,
                                      size_norm, skipped_footer)
from ar_lm.scaling.plots_optimal import fitted_range, plot_optimal
from ar_lm.scaling.points import Points

LINESTYLES = ("-", "--", ":", "-.")  # a size's runs of different horizons


def plot_fit(result: dict, out: Path, pts: Points, holdout: Optional[list] = None) -> dict:
    """Every plot of a fit into OUT; {plot name: the arrays it plotted}."""
    out = Path(out)
    held = load_holdout(out, holdout)
    data = {}
    if pts.group is not None:
        data["isoflop"] = plot_isoflop(result, pts, out / "isoflop.png")
    data["loss_vs_flops"] = plot_loss_vs_flops(result, pts, out / "loss_vs_flops.png", held)
    data["optimal_vs_compute"] = plot_optimal(result, out / "optimal_vs_compute.png", held)
    if "approach3" in result:
        data["parametric_fit"] = plot_parametric(result, out, held, with_optimal=False)
    return data




def plot_isoflop(result: dict, pts: Points, path: Path) -> dict:
    """Each budget's points (±1 se) against N, the parabola through its window and its minimum (★); a budget
    without an interior minimum is drawn hollow and named in the legend with what it needs."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = plt.get_cmap("plasma")
    p2 = result.get("approach2") or {}
    minima, excluded = p2.get("minima", []), p2.get("excluded", [])
    groups = np.unique(pts.group)
    data = {"budgets": [], "minima": []}
    for i, g in enumerate(groups):
        m = pts.group == g
        color = cmap(0.85 * i / max(1, len(groups) - 1))
        c = float(np.exp(np.mean(np.log(pts.C[m]))))
        match = [mm for mm in minima if abs(np.log(mm["C"] / c)) < 0.05]
        why = [e for e in excluded if abs(np.log(e["C"] / c)) < 0.05]
        label = f"C = {c:.2g} FLOPs" + ("" if match else f" (no minimum: add {why[0]['add']})" if why
                                        else " (no minimum)")
        se = None if pts.se is None else pts.se[m]
        ax.errorbar(pts.N[m], pts.L[m], yerr=se, fmt="o", color=color, mfc=color if match else "none", mec=color,
                    ms=6, capsize=2, label=label, zorder=3)
        data["budgets"].append({"C": c, "N": pts.N[m].tolist(), "L": pts.L[m].tolist()})
        if match:
            mm = match[0]
            xs = np.geomspace(mm["window_N"][0] / 1.3, mm["window_N"][1] * 1.3, 100)
            ax.plot(xs, np.polyval(mm["parabola"], np.log(xs)), color=color, lw=1.5)
            ax.scatter([mm["N_opt"]], [mm["loss_min"]], marker="*", s=180, color=color, edgecolor="k", zorder=4)
            data["minima"].append([mm["N_opt"], mm["loss_min"]])
    ax.set_xscale("log")
    ax.set_yscale("log")
    log_ticks(ax, "x", sci=True)
    log_ticks(ax, "y")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("IsoFLOP curves: parabola near each minimum (★); hollow: no interior minimum", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="major")
    save(fig, path)
    return data


def _curve_styles(curves: list) -> list[str]:
    """A linestyle per curve: a size's runs of different horizons, shortest first, as -, --, :, -."""
    styles, seen = [], {}
    for k in np.argsort([c[1][-1] for c in curves], kind="stable"):
        n = curves[k][0]
        seen[n] = seen.get(n, -1) + 1
        styles.append((k, LINESTYLES[seen[n] % len(LINESTYLES)]))
    return [s for _, s in sorted(styles)]


def _frontier(ax, result: dict) -> Optional[tuple]:
    """Approach 1's minimum-loss frontier over its fitted range (every run past a third of its budget); the
    envelope's ends, where a single run covers C, are not drawn."""
    p1 = result.get("approach1")
    if not p1:
        return None
    env = {k: np.array(v) for k, v in p1["envelope"].items()}
    lo, hi = fitted_range(result, "approach1")
    keep = (env["C"] >= lo * (1 - 1e-9)) & (env["C"] <= hi * (1 + 1e-9))
    ax.plot(env["C"][keep], env["L"][keep], color="k", lw=2.2, label="minimum-loss frontier (approach 1, fitted range)",
            zorder=4)
    return env["C"][keep], env["L"][keep]


def plot_loss_vs_flops(result: dict, pts: Points, path: Path, holdout: Optional[list] = None) -> dict:
    """Every run's loss curve (colour: N; linestyle: its horizon among the size's runs), the final losses
    (±1 se), approach 1's frontier over its fitted range and the held-out runs."""
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    norm = size_norm([c[0] for c in pts.curves] + list(pts.N))
    for (n, c_t, l_t), ls in zip(pts.curves, _curve_styles(pts.curves)):
        ax.plot(c_t, l_t, color=size_color(norm, n), ls=ls, alpha=0.8, lw=1.2)
    se = None if pts.se is None else pts.se
    ax.errorbar(pts.C, pts.L, yerr=se, fmt="none", ecolor="0.3", elinewidth=1, capsize=2, zorder=4)
    ax.scatter(pts.C, pts.L, c=[size_color(norm, n) for n in pts.N], edgecolor="k", s=36, zorder=5,
               label="final validation loss (±1 se)")
    frontier = _frontier(ax, result)
    for h in holdout or []:
        ax.scatter([h["C"]], [h["measured_loss"]], label=f"held-out run N={h['N']:,.0f} C={h['C']:.2g}",
                   **HOLDOUT_STYLE)
    size_colorbar(fig, ax, norm)
    ax.set_xscale("log")
    ax.set_yscale("log")
    log_ticks(ax, "x", sci=True)
    log_ticks(ax, "y")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("loss (nats/token)")
    kind = pts.curve_source + " " if pts.curve_source else ""
    src = (f" ({kind}curves; a size's horizons: — -- ·· -·)" if pts.curves
           else " (no training curves: final losses only)")
    ax.set_title(f"Loss against compute{src}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="major")
    text, bottom = skipped_footer(fig, result, width=130)
    save(fig, path, bottom)
    return {"points": (pts.C.tolist(), pts.L.tolist()), "frontier": frontier, "curves": len(pts.curves),
            "holdout": [(h["C"], h["measured_loss"]) for h in holdout or []], "footer": text}


def plot_parametric(result: dict, out: Path, holdout: Optional[list] = None, with_optimal: bool = True) -> dict:
    """Approach 3's L(N, D) against the observed losses (±1 se), the held-out runs starred (and, `with_optimal`,
    optimal_vs_compute.png redrawn with them: the sweep's held-out check runs after its fit's plots)."""
    holdout = load_holdout(out, holdout or [])
    if holdout and with_optimal:
        plot_optimal(result, Path(out) / "optimal_vs_compute.png", holdout)
    p3 = result["approach3"]
    obs = np.array([p["loss"] for p in result["points"]])
    se = np.array([p.get("loss_se", 0.0) for p in result["points"]])
    ns = np.array([p["N"] for p in result["points"]])
    pred = parametric_loss(p3, ns, np.array([p["D"] for p in result["points"]]))
    fig, ax = plt.subplots(figsize=(7, 6))
    norm = size_norm(ns)
    ax.errorbar(obs, pred, xerr=se if se.any() else None, fmt="none", ecolor="0.4", capsize=2, zorder=2)
    ax.scatter(obs, pred, c=[size_color(norm, n) for n in ns], edgecolor="k", s=40, zorder=3,
               label="sweep runs (fitted; ±1 se)")
    vals = list(obs) + list(pred)
    for h in holdout or []:
        ax.scatter([h["measured_loss"]], [h["predicted_loss"]], **HOLDOUT_STYLE,
                   label=f"held-out run C={h['C']:.2g} ({100 * h['relative_error']:+.1f}%; bar: 95% interval)")
        if h.get("interval"):
            ax.plot([h["measured_loss"]] * 2, h["interval"], color="tab:red", lw=1.5, zorder=5)
        vals += [h["measured_loss"], h["predicted_loss"], *(h.get("interval") or [])]
    lo, hi = min(vals) * 0.97, max(vals) * 1.03
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = observed")
    if p3.get("floor") is not None:
        ax.axhline(p3["floor"], color="grey", ls=":", label=f"entropy-rate floor {p3['floor']:.3f}")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    size_colorbar(fig, ax, norm)
    ax.set_xlabel("observed validation loss (nats/token)")
    ax.set_ylabel("predicted L(N, D)")
    ax.set_title(f"L = {p3['E']:.2f} + {p3['A']:.3g}/N^{p3['alpha']:.2f} + {p3['B']:.3g}/D^{p3['beta']:.2f}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _, bottom = skipped_footer(fig, {"warnings": [w for w in result.get("warnings") or []
                                                  if w.startswith("approach 3")]}, width=95)
    save(fig, Path(out) / "parametric_fit.png", bottom)
    return {"observed": obs.tolist(), "predicted": pred.tolist()}
