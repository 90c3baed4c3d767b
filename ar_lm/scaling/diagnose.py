"""What a fit left out and what in it not to trust: every approach either reports or says why not and what
to add to the sweep (`skipped_approach2`, `skipped_approach3`; approach 1's in fit.py), and `warnings` for
parameters at their box edges and bootstrap replicates that mostly failed (fit.json's `approaches` and
`warnings`, the report's `[fit] WARNING` lines).

A budget's IsoFLOP minimum at the smallest sampled size says the optimum lies below the sweep's sizes (add
smaller ones), at the largest above them (add larger ones) (Hoffmann et al. 2022, Approach 2). Approach 3's
E pinned at its lower bound (e = -10, E ≈ 0) or an exponent at the edge of [0, 5] is the optimiser's box,
not a measurement (Besiroglu et al. 2024 on unconstrained Chinchilla fits).
"""

from __future__ import annotations

from typing import Optional

from ar_lm.scaling.isoflop import WINDOW, isoflop_minima
from ar_lm.scaling.parametric import BOUNDS
from ar_lm.scaling.points import Points

BOOTSTRAP_YIELD = 0.8  # below this share of converged replicates an interval rests on the lucky ones
AT_BOUND = 1e-3  # a parameter this close (in its fitted coordinate) to a bound of its box sits at it


def budgets(cs) -> str:
    return ", ".join(f"{c:.3g}" for c in cs)


def sizes(ns) -> str:
    return ", ".join(f"{n:,.0f}" for n in sorted(set(ns)))


def excluded_line(excluded: list[dict]) -> list[str]:
    """One clause per reason over approach 2's excluded budgets, with what to add."""
    by_reason: dict = {}
    for e in excluded:
        by_reason.setdefault(e["reason"], []).append(e)
    out = []
    for reason, es in by_reason.items():
        where = ""
        if "smallest" in reason or "largest" in reason:
            where = ", " + sizes(e["N_range"][0 if "smallest" in reason else 1] for e in es if e.get("N_range"))
        add = es[0].get("add", "sizes around the lowest point")
        out.append(f"budget{'s' if len(es) > 1 else ''} {budgets(e['C'] for e in es)}: {reason}{where}: add {add}")
    return out


def skipped_approach2(pts: Points, window: float = WINDOW) -> str:
    """Why approach 2 has no fit, and what to add."""
    if pts.group is None:
        return ("no IsoFLOP budgets: the points carry no groups (a CSV needs a flops column with tokens; a sweep's "
                "runs come with their budgets): add budgets")
    minima, excluded = isoflop_minima(pts, pts.compute, window)
    n_budgets = len(minima) + len(excluded)
    head = f"needs interior minima at >= 2 IsoFLOP budgets, has {len(minima)} of {n_budgets}"
    parts = excluded_line(excluded)
    if n_budgets < 2:
        parts.append("add budgets")
    return head + ("; " + "; ".join(parts) if parts else "")


def skipped_approach3(n_points: int) -> str:
    return f"fits 5 parameters and needs at least 5 points, got {n_points}: add sizes or budgets"


def _bound_warnings(p3: dict) -> list[str]:
    """Approach 3's parameters at the edges of their box (BOUNDS, in the fitted coordinates e, alpha, beta)."""
    out = []
    theta = p3.get("theta") or []
    names = {2: ("E", "e = ln E"), 3: ("alpha", "alpha"), 4: ("beta", "beta")}
    for i, (name, coord) in names.items():
        if i >= len(theta):
            continue
        lo, hi = BOUNDS[i]
        for edge, side in ((lo, "lower"), (hi, "upper")):
            if edge is not None and abs(theta[i] - edge) <= AT_BOUND:
                value = p3[name]
                what = ("the points do not pin the irreducible loss: add larger sizes and budgets" if name == "E"
                        else "the points do not pin this exponent: widen the sizes (alpha) or tokens (beta)")
                out.append(f"approach 3: {name} = {value:.3g} sits at its {side} bound ({coord} = {edge:g}): {what}")
    return out


def _yield_warning(key: str, p: dict) -> Optional[str]:
    ok, n = (p.get("bootstrap_ok") or [0, 0])[:2]
    if n and ok < BOOTSTRAP_YIELD * n:
        return (f"approach {key[-1]}: only {ok} of {n} bootstrap replicates gave a fit ({100 * ok / n:.0f}% < "
                f"{100 * BOOTSTRAP_YIELD:.0f}%): its intervals rest on the replicates that did and are too narrow")
    return None


def warnings(result: dict) -> list[str]:
    """What in a fit not to trust (see module docstring)."""
    out = []
    p3 = result.get("approach3")
    if p3:
        if not p3.get("converged", True):
            out.append(f"approach 3: the best optimum did not converge ({p3.get('message', '')})")
        out += _bound_warnings(p3)
    for key in ("approach1", "approach2", "approach3"):
        w = _yield_warning(key, result.get(key) or {})
        if w:
            out.append(w)
    p2 = result.get("approach2")
    if p2 and not p2.get("frontier"):
        out.append(f"approach 2: no loss frontier L*(C) = E + A C^-alpha: {len(p2['minima'])} IsoFLOP minima cannot "
                   "test its 3 parameters (it needs >= 4): add budgets")
    return out


def approaches_summary(result: dict, skipped: dict) -> dict:
    """fit.json's `approaches`: {"1": {"fitted": true} | {"skipped": why and what to add}, ...}."""
    return {str(i): {"fitted": True} if f"approach{i}" in result else
            {"skipped": skipped.get(i, "not requested (--approach)")} for i in (1, 2, 3)}
