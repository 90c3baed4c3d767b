"""Plots of scaling fits and run comparisons (matplotlib, PNG, readable without explanation)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ar_lm.scaling.compute import ComputeModel  # noqa: E402
from ar_lm.scaling.fit import CI  # noqa: E402
from ar_lm.scaling.parametric import asymptotic_exponents, optimal_size, parametric_loss  # noqa: E402
from ar_lm.scaling.points import Points  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fit(result: dict, out: Path, pts: Points) -> None:
    out = Path(out)
    if "approach2" in result:
        plot_isoflop(result, pts, out / "isoflop.png")
    plot_loss_vs_flops(result, pts, out / "loss_vs_flops.png")
    plot_optimal(result, out / "optimal_vs_compute.png")
    if "approach3" in result:
        plot_parametric(result, out)


def plot_isoflop(result: dict, pts: Points, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = plt.get_cmap("viridis")
    minima = result["approach2"]["minima"]
    groups = np.unique(pts.group)
    for i, g in enumerate(groups):
        m = pts.group == g
        color = cmap(i / max(1, len(groups) - 1))
        c = float(np.exp(np.mean(np.log(pts.C[m]))))
        ax.scatter(pts.N[m], pts.L[m], color=color, label=f"C = {c:.2g} FLOPs", zorder=3)
        match = [mm for mm in minima if abs(np.log(mm["C"] / c)) < 0.05]
        if match:
            mm = match[0]
            xs = np.geomspace(mm["window_N"][0] / 1.3, mm["window_N"][1] * 1.3, 100)
            ax.plot(xs, np.polyval(mm["parabola"], np.log(xs)), color=color, lw=1.5)
            ax.scatter([mm["N_opt"]], [mm["loss_min"]], marker="*", s=160, color=color, edgecolor="k", zorder=4)
        elif m.any():
            ax.scatter(pts.N[m], pts.L[m], color=color, marker="x", zorder=3)  # excluded: no interior minimum
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("IsoFLOP curves, parabolas near each minimum (★; × = no interior minimum)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def plot_loss_vs_flops(result: dict, pts: Points, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    if pts.curves:
        ns = sorted({c[0] for c in pts.curves})
        cmap = plt.get_cmap("plasma")
        for n, c_t, l_t in pts.curves:
            ax.plot(c_t, l_t, color=cmap(ns.index(n) / max(1, len(ns) - 1)), alpha=0.6, lw=1)
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.LogNorm(min(ns), max(ns)))
        fig.colorbar(sm, ax=ax, label="parameters N")
    if "approach1" in result:
        env = result["approach1"]["envelope"]
        ax.plot(env["C"], env["L"], "k--", lw=2, label="minimum-loss frontier (approach 1)")
    ax.scatter(pts.C, pts.L, color="k", s=14, zorder=3, label="final validation loss")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss against compute")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def _optimal_curve(p: dict, compute: ComputeModel, cs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, d = zip(*(optimal_size(p, compute, c) for c in cs))
    return np.array(n), np.array(d)


def _band(result: dict, key: str, which: str, cs: np.ndarray):
    """Per-C percentiles of N_opt (which='N') or D_opt from the bootstrap fits of `key`."""
    compute = ComputeModel.from_json(result["compute"])
    curves = []
    for b in result[key].get("bootstrap") or []:
        if key == "approach3":
            b = {**b, **asymptotic_exponents(b)}
            if b.get("G") is None:
                continue
            n, d = _optimal_curve(b, compute, cs)
        else:
            n, d = b["k_N"] * cs ** b["a"], b["k_D"] * cs ** b["b"]
        curves.append(n if which == "N" else d)
    if len(curves) < 10:
        return None
    return np.percentile(np.array(curves), CI, axis=0)


def plot_optimal(result: dict, path: Path) -> None:
    cs_data = np.array([p["C"] for p in result["points"]])
    cs = np.geomspace(cs_data.min() / 2, cs_data.max() * 30, 24)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    colors = {"approach1": "tab:blue", "approach2": "tab:orange", "approach3": "tab:green"}
    for which, ax in zip(("N", "D"), axes):
        for key, color in colors.items():
            p = result.get(key)
            if not p:
                continue
            if key == "approach3":
                if p.get("G") is None:
                    continue
                n, d = _optimal_curve(p, ComputeModel.from_json(result["compute"]), cs)
                exp = p["a"] if which == "N" else p["b"]
            else:
                n, d = p["k_N"] * cs ** p["a"], p["k_D"] * cs ** p["b"]
                exp = p["a"] if which == "N" else p["b"]
            y = n if which == "N" else d
            ax.plot(cs, y, color=color, label=f"{key.replace('approach', 'approach ')}: ∝ C^{exp:.2f}")
            band = _band(result, key, which, cs)
            if band is not None:
                ax.fill_between(cs, band[0], band[1], color=color, alpha=0.15)
            if key == "approach2":
                ms = p["minima"]
                ax.scatter([m["C"] for m in ms], [m["N_opt"] if which == "N" else m["D_opt"] for m in ms],
                           color=color, edgecolor="k", zorder=3)
        ax.axvspan(cs_data.max(), cs.max(), color="grey", alpha=0.08, label="extrapolation")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel("compute-optimal parameters N_opt" if which == "N" else "compute-optimal tokens D_opt")
        ax.set_title(f"{'N' if which == 'N' else 'D'}_opt against compute (95% bootstrap bands)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def plot_parametric(result: dict, out: Path, holdout: Optional[list] = None) -> None:
    p3 = result["approach3"]
    obs = np.array([p["loss"] for p in result["points"]])
    pred = parametric_loss(p3, np.array([p["N"] for p in result["points"]]),
                                   np.array([p["D"] for p in result["points"]]))
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(obs, pred, label="sweep runs (fitted)")
    vals = list(obs) + list(pred)
    for h in holdout or []:
        if h.get("measured_loss") is not None:
            ax.scatter([h["measured_loss"]], [h["predicted_loss"]], marker="*", s=220, color="tab:red",
                       edgecolor="k", zorder=4, label=f"held-out run C={h['C']:.2g} ({100 * h['relative_error']:+.1f}%)")
            vals += [h["measured_loss"], h["predicted_loss"]]
    lo, hi = min(vals) * 0.98, max(vals) * 1.02
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = observed")
    if p3.get("floor") is not None:
        ax.axhline(p3["floor"], color="grey", ls=":", label=f"entropy-rate floor {p3['floor']:.3f}")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("observed validation loss (nats/token)")
    ax.set_ylabel("predicted L(N, D)")
    ax.set_title(f"L = {p3['E']:.2f} + {p3['A']:.3g}/N^{p3['alpha']:.2f} + {p3['B']:.3g}/D^{p3['beta']:.2f}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, Path(out) / "parametric_fit.png")


def plot_compare(runs: list[dict], path: Path) -> None:
    """Val perplexity and bits per byte against tokens and FLOPs for several runs."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for r in runs:
        for row, metric in enumerate(("perplexity", "bits_per_byte")):
            for col, x in enumerate(("tokens", "flops")):
                axes[row, col].plot(r[x], r[metric], marker="o", ms=3, label=r["name"])
    for row, metric in enumerate(("validation perplexity", "validation bits per byte")):
        for col, x in enumerate(("tokens seen", "training FLOPs")):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Run comparison")
    _save(fig, path)


def plot_frontiers(frontiers: dict, path: Path) -> None:
    """Loss frontiers L*(C) = E + A C^-alpha of several fits ({label: (frontier, minima)})."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, (f, minima) in frontiers.items():
        cs = np.array([m["C"] for m in minima])
        xs = np.geomspace(cs.min() / 2, cs.max() * 2, 100)
        line = ax.plot(xs, f["E"] + f["A"] * xs ** -f["alpha"], label=f"{label}: {f['E']:.3f} + {f['A']:.3g} C^-{f['alpha']:.3f}")
        ax.scatter(cs, [m["loss_min"] for m in minima], color=line[0].get_color(), edgecolor="k", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("IsoFLOP minimum loss (nats/token)")
    ax.set_title("Loss frontiers")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)
