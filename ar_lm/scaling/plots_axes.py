"""What every scaling plot shares: readable log ticks, model size as a sequential colormap (viridis, LogNorm)
with a colorbar labelled N, the held-out runs, a footer for what a fit skipped, and saving."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import (FuncFormatter, LogFormatterSciNotation, LogLocator, MaxNLocator,  # noqa: E402
                               NullFormatter)

SIZE_CMAP = "viridis"
HOLDOUT_STYLE = {"marker": "*", "s": 260, "color": "tab:red", "edgecolor": "k", "zorder": 6}


def save(fig, path: Path, bottom: float = 0.0) -> None:
    """Write `fig` as a PNG, leaving the figure's lowest `bottom` fraction to a footer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_ticks(ax, axis: str = "y", sci: bool = False) -> None:
    """Labelled ticks on a log axis that do not overlap and are never fewer than three: decades only over more
    than 2.5 decades, x1 and x3 over 1.3 to 2.5, x1, x2, x5 over 0.7 to 1.3, and evenly spaced (MaxNLocator)
    below; scientific notation (LogFormatterSciNotation) for FLOPs and sizes (`sci`), plain numbers for
    losses; unlabelled minor ticks."""
    a = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    if decades < 0.7:
        a.set_major_locator(MaxNLocator(nbins=4 if sci and axis == "x" else 6))
        a.set_major_formatter(FuncFormatter(sci_label if sci else lambda v, _: f"{v:.3g}"))
    else:
        subs = (1.0,) if decades > 2.5 else (1.0, 3.0) if decades > 1.3 else (1.0, 2.0, 5.0)
        a.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
        a.set_major_formatter(FuncFormatter(sci_label if sci else lambda v, _: f"{v:.3g}"))
    a.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10), numticks=12))
    a.set_minor_formatter(NullFormatter())


def sci_label(v: float, _=None) -> str:
    """3e11 as 3×10¹¹ (mathtext), 1e11 as 10¹¹."""
    if v <= 0:
        return ""
    e = math.floor(math.log10(v) + 1e-9)
    m = v / 10**e
    return f"$10^{{{e}}}$" if abs(m - 1) < 1e-6 else f"${m:.2g}\\times10^{{{e}}}$"


def size_norm(ns) -> LogNorm:
    ns = np.asarray(list(ns), float)
    lo, hi = float(ns.min()), float(ns.max())
    return LogNorm(lo, hi if hi > lo else lo * 1.01)


def size_colorbar(fig, ax, norm: LogNorm) -> None:
    sm = plt.cm.ScalarMappable(cmap=SIZE_CMAP, norm=norm)
    cb = fig.colorbar(sm, ax=ax, label="parameters N")
    cb.ax.yaxis.set_major_formatter(LogFormatterSciNotation())


def size_color(norm: LogNorm, n: float):
    return plt.get_cmap(SIZE_CMAP)(float(norm(n)))


def load_holdout(out: Path, holdout: Optional[list]) -> list[dict]:
    """The held-out runs with a measured loss: `holdout`, else OUT/holdout.json where there is one."""
    if holdout is None:
        try:
            holdout = json.loads((Path(out) / "holdout.json").read_text())
        except (OSError, json.JSONDecodeError):
            holdout = []
    return [h for h in holdout if h.get("measured_loss") is not None and "skipped" not in h]


def skipped_footer(fig, result: dict, width: int = 150) -> tuple[Optional[str], float]:
    """A footer naming the approaches the fit skipped and its warnings (fit.json's `approaches`, `warnings`);
    (its text, the fraction of the figure's height it takes)."""
    lines = [f"approach {i} skipped: {a['skipped']}" for i, a in sorted((result.get("approaches") or {}).items())
             if "skipped" in a and not a["skipped"].startswith("not requested")]
    lines += [f"warning: {w}" for w in result.get("warnings") or []]
    if not lines:
        return None, 0.0
    text = "\n".join(textwrap.fill(line, width) for line in lines)
    fig.text(0.01, 0.005, text, fontsize=7, va="bottom", ha="left", color="firebrick")
    inches = 0.14 * (text.count("\n") + 1) + 0.05
    return text, min(0.5, inches / fig.get_figheight())
