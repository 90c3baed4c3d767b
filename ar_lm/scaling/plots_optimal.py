"""N_opt and D_opt against compute (Hoffmann et al. 2022, Fig. 1 and 3): each approach's law solid over the
compute it was fitted on, dashed beyond (to the held-out run's compute, else 4x the largest budget, and half the
smallest), its 95% bootstrap band on both sides, the data it was fitted to (approach 2's IsoFLOP minima, approach
1's frontier sizes) and the sweep's runs; the y range follows the data and the laws, not the bands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ar_lm.scaling.compute import ComputeModel
from ar_lm.scaling.fit import CI
from ar_lm.scaling.parametric import asymptotic_exponents, optimal_size
from ar_lm.scaling.plots_axes import HOLDOUT_STYLE, log_ticks, plt, save, skipped_footer

COLORS = {"approach1": "tab:blue", "approach2": "tab:orange", "approach3": "tab:green"}
EXTRAPOLATE = 4.0  # beyond the largest budget without a held-out run
Y_MARGIN = 2.5  # the y range: the data and the laws, times and over this


def _curve(p: dict, key: str, compute: ComputeModel, cs: np.ndarray) -> Optional[tuple]:
    """(N_opt, D_opt) of one fit (or bootstrap replicate) at each C; None without a closed form."""
    if key == "approach3":
        p = {**p, **asymptotic_exponents(p)} if "G" not in p else p
        if p.get("G") is None:
            return None
        n, d = zip(*(optimal_size(p, compute, c) for c in cs))
        return np.array(n), np.array(d)
    return p["k_N"] * cs ** p["a"], p["k_D"] * cs ** p["b"]


def fitted_range(result: dict, key: str) -> tuple[float, float]:
    """The compute an approach was fitted on: approach 1's frontier range, approach 2's budgets, approach 3's points."""
    p = result[key]
    if key == "approach1":  # a fit.json from before fit_range: past a third of the smallest final C, as fitted
        lo = min(q["C"] for q in result["points"]) / 3
        return tuple(p.get("fit_range") or (min(c for c in p["envelope"]["C"] if c >= lo), max(p["envelope"]["C"])))
    cs = [m["C"] for m in p["minima"]] if key == "approach2" else [q["C"] for q in result["points"]]
    return min(cs), max(cs)


def _band(result: dict, key: str, compute: ComputeModel, cs: np.ndarray) -> Optional[np.ndarray]:
    """Per-C 2.5 and 97.5 percentiles of (N_opt, D_opt) over the bootstrap fits of `key`: shape (2, 2, len(cs))."""
    curves = [c for c in (_curve(b, key, compute, cs) for b in result[key].get("bootstrap") or []) if c is not None]
    if len(curves) < 10:
        return None
    return np.percentile(np.array(curves), CI, axis=0)


def _data(result: dict, key: str, compute: ComputeModel) -> tuple[list, list, list]:
    """(C, N_opt, D_opt) of the points an approach's law was fitted to."""
    p = result[key]
    if key == "approach2":
        return [m["C"] for m in p["minima"]], [m["N_opt"] for m in p["minima"]], [m["D_opt"] for m in p["minima"]]
    if key == "approach1":
        lo, hi = fitted_range(result, key)
        env = [(c, n) for c, n in zip(p["envelope"]["C"], p["envelope"]["N"])
               if lo * (1 - 1e-9) <= c <= hi * (1 + 1e-9)]
        return [c for c, _ in env], [n for _, n in env], [float(compute.tokens(n, c)) for c, n in env]
    return [], [], []


def _draw(axes, result: dict, key: str, compute: ComputeModel, cs: np.ndarray) -> dict:
    """One approach on both panels; the arrays it drew (None when it has no compute-optimal curve)."""
    p, color = result[key], COLORS[key]
    lo, hi = fitted_range(result, key)
    inside = np.geomspace(lo, hi, 16)
    below, above = np.append(cs[cs < lo], lo), np.insert(cs[cs > hi], 0, hi)
    segs = {k: _curve(p, key, compute, x) for k, x in (("fit", inside), ("below", below), ("above", above))
            if len(x) > 1}
    segs = {k: v for k, v in segs.items() if v is not None}
    if "fit" not in segs:  # the law places no compute-optimal N (e.g. an exponent of 0): nothing to draw
        return None
    band = _band(result, key, compute, cs)
    data_c, data_n, data_d = _data(result, key, compute)
    drawn = {"fit_C": inside.tolist(), "extrapolated_C": [x.tolist() for x in (below, above) if len(x) > 1],
             "band": band is not None}
    for j, ax in enumerate(axes):
        exp = (p.get("a") if j == 0 else p.get("b")) or 0.0
        ax.plot(inside, segs["fit"][j], color=color, lw=2,
                label=f"{key.replace('approach', 'approach ')}: ∝ C^{exp:.2f}")
        for k, x in (("below", below), ("above", above)):
            if k in segs:
                ax.plot(x, segs[k][j], color=color, lw=1.5, ls="--")
        if band is not None:
            ax.fill_between(cs, band[0][j], band[1][j], color=color, alpha=0.13, lw=0)
        if data_c:
            big = key == "approach2"
            ax.scatter(data_c, data_n if j == 0 else data_d, color=color, edgecolor="k", s=36 if big else 9,
                       lw=0.8 if big else 0.3, zorder=4, marker="o" if big else "s")
    drawn["y"] = [np.concatenate([s[j] for s in segs.values()]).tolist() + (data_n if j == 0 else data_d)
                  for j in (0, 1)]
    drawn["data_C"] = data_c
    return drawn


def plot_optimal(result: dict, path: Path, holdout: Optional[list] = None) -> dict:
    """Both panels (see module docstring); {approach: what it drew}, the runs and the held-out runs."""
    compute = ComputeModel.from_json(result["compute"])
    pts_c = np.array([p["C"] for p in result["points"]])
    hi = max([pts_c.max() * EXTRAPOLATE] + [h["C"] * 1.3 for h in holdout or []])
    cs = np.geomspace(pts_c.min() / 2, hi, 32)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    drawn = {k: _draw(axes, result, k, compute, cs) for k in COLORS if result.get(k)}
    drawn = {k: v for k, v in drawn.items() if v is not None}
    runs = ([p["N"] for p in result["points"]], [p["D"] for p in result["points"]])
    for j, ax in enumerate(axes):
        ax.scatter(pts_c, runs[j], color="0.7", s=12, zorder=2, label="sweep runs")
        ys = np.array([y for d in drawn.values() for y in d["y"][j]] + list(runs[j]))
        for h in holdout or []:
            ax.scatter([h["C"]], [h["N"] if j == 0 else h["D"]], **HOLDOUT_STYLE, label=f"held-out run C={h['C']:.2g}")
            ys = np.append(ys, h["N"] if j == 0 else h["D"])
        ax.axvspan(pts_c.max(), cs.max(), color="grey", alpha=0.06, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(cs.min(), cs.max())
        ax.set_ylim(ys.min() / Y_MARGIN, ys.max() * Y_MARGIN)
        log_ticks(ax, "x", sci=True)
        log_ticks(ax, "y", sci=True)
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel("compute-optimal parameters N_opt" if j == 0 else "compute-optimal tokens D_opt")
        ax.set_title(f"{'N' if j == 0 else 'D'}_opt: solid fitted, dashed extrapolated (shaded: 95% bootstrap)",
                     fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3, which="major")
    text, bottom = skipped_footer(fig, result)
    save(fig, path, bottom)
    return {**drawn, "runs_C": pts_c.tolist(), "footer": text, "holdout": [h["C"] for h in holdout or []]}
