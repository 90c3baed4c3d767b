"""Run comparisons (`ar-lm compare`: train and val loss, val bits per byte, against tokens and FLOPs) and loss
frontiers of compared fits (`ar-lm fit --compare`). Every run keeps its own colour, marker, linestyle and line
width (later runs thinner, on top), so identical runs stay visible; each function returns the arrays it plotted."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ar_lm.scaling.plots_axes import log_ticks, plt, save

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
VAL_LINESTYLES = ("-", "--", "-.", ":")


def run_label(r: dict) -> str:
    """A run's name with its N and final C where known."""
    bits = [f"N={r['N']:,.0f}" if r.get("N") else "", f"C={r['flops'][-1]:.2g}" if r.get("flops") else ""]
    return f"{r['name']} ({', '.join(b for b in bits if b)})" if any(bits) else r["name"]


def plot_compare(runs: list[dict], path: Path) -> dict:
    """Loss (train thin, val with markers) and val bits per byte against tokens and training FLOPs."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    lines = []
    for i, r in enumerate(runs):
        color, marker = plt.get_cmap("tab10")(i % 10), MARKERS[i % len(MARKERS)]
        style = {"color": color, "marker": marker, "ms": 9 - 2 * (i % 3), "ls": VAL_LINESTYLES[i % 4], "mfc": "none",
                 "lw": 2.6 - 0.6 * (i % 3), "markevery": (i % 3, 3) if len(r["tokens"]) > 6 else 1}
        for col, x in enumerate(("tokens", "flops")):
            if r.get("train_tokens"):
                tx = r["train_tokens"] if x == "tokens" else r["train_flops"]
                axes[0, col].plot(tx, r["train_loss"], color=color, lw=0.9, alpha=0.55, ls="-")
                lines.append({"run": r["name"], "split": "train", "x": x, "y": r["train_loss"]})
            axes[0, col].plot(r[x], r["loss"], **style, label=run_label(r) if col == 0 else None)
            axes[1, col].plot(r[x], r["bits_per_byte"], **style)
            lines.append({"run": r["name"], "split": "val", "x": x, "y": r["loss"]})
    for row, metric in enumerate(("loss (nats/token): train thin, val marked", "validation bits per byte")):
        for col, x in enumerate(("tokens seen", "training FLOPs")):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            log_ticks(ax, "x", sci=True)
            log_ticks(ax, "y")
            ax.set_xlabel(x)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3, which="major")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Run comparison")
    save(fig, path)
    return {"lines": lines, "yticks": [len([t for t in ax.get_yticks() if _inside(ax, t)]) for ax in axes.ravel()]}


def _inside(ax, t) -> bool:
    lo, hi = ax.get_ylim()
    return lo <= t <= hi


def plot_frontiers(frontiers: dict, path: Path) -> dict:
    """Loss frontiers L*(C) = E + A C^-alpha of several fits ({label: (frontier, minima)}): solid over each fit's
    budgets, dashed to a factor 2 either side, its IsoFLOP minima as points."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    drawn = {}
    for i, (label, (f, minima)) in enumerate(frontiers.items()):
        cs = np.array([m["C"] for m in minima])
        inside = np.geomspace(cs.min(), cs.max(), 60)
        color = plt.get_cmap("tab10")(i % 10)

        def law(x):
            return f["E"] + f["A"] * x ** -f["alpha"]

        ax.plot(inside, law(inside), color=color, lw=2,
                label=f"{label}: {f['E']:.3f} + {f['A']:.3g} C^-{f['alpha']:.3f}")
        for x in (np.geomspace(cs.min() / 2, cs.min(), 20), np.geomspace(cs.max(), cs.max() * 2, 20)):
            ax.plot(x, law(x), color=color, lw=1.2, ls="--")
        ax.scatter(cs, [m["loss_min"] for m in minima], color=color, edgecolor="k", zorder=3,
                   marker=MARKERS[i % len(MARKERS)])
        drawn[label] = {"fit_C": inside.tolist(), "minima_C": cs.tolist()}
    ax.set_xscale("log")
    ax.set_yscale("log")
    log_ticks(ax, "x", sci=True)
    log_ticks(ax, "y")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("IsoFLOP minimum loss (nats/token)")
    ax.set_title("Loss frontiers (solid: fitted budgets; dashed: extrapolated)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="major")
    save(fig, path)
    return drawn
