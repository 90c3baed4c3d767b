"""Scaling-law fits (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models") under
one compute model (`compute.py`), with bootstrap intervals that say how many replicates succeeded.

- Approach 1: the minimum-loss envelope over loss curves gives, for each compute C, the model size
  N that reached the lowest loss; power laws N_opt = k_N C^a and D_opt = k_D C^b (D = C / fpt(N)).
  Curves of one horizon per size are indicative only (Hoffmann et al. used several per size).
- Approach 2: `isoflop.py` (windowed IsoFLOP minima, the loss frontier L*(C)). Its bootstrap is
  parametric: every replicate adds N(0, s_i²) to each loss and repeats the whole procedure; s_i² counts
  the eval noise once (`_noise_scale`: the point's squared standard error plus the window parabolas'
  pooled residual variance beyond the mean squared standard error). `noise` reports both and the dof.
- Approach 3: `parametric.py`; bootstrap by resampling points, or in a WSD ladder whole trunks (a
  trunk's branches share its run up to the branch point, so they are not independent draws).
- Conventions (`conventions`): what N and C count, recorded and compared; attention FLOPs causal-halved
  (default) or over the full L x L square as Hoffmann et al. count them (`with_attention`); tokens per
  parameter D_opt / N_opt at each budget (`tokens_per_parameter`; Chinchilla's ~20).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import numpy as np

from ar_lm.errors import require
from ar_lm.scaling import diagnose
from ar_lm.scaling.compute import ComputeModel, analytic
from ar_lm.scaling.forms import CI, get_form, resample
from ar_lm.scaling.isoflop import WINDOW, approach2, budget_minimum, power_law
from ar_lm.scaling.parametric import PARAMS, fit_parametric, local_exponents, optimal_size
from ar_lm.scaling.points import Points
from ar_lm.scaling.rollout import fit_laws



def interval(samples) -> Optional[list[float]]:
    samples = [s for s in samples if s is not None and np.isfinite(s)]
    if len(samples) < 10:
        return None
    lo, hi = np.percentile(samples, CI)
    return [float(lo), float(hi)]


def _bootstrap_summary(p: dict, boots: list[dict], keys, n_boot: int) -> None:
    p["ci"] = {k: interval([b.get(k) for b in boots]) for k in keys}
    p["bootstrap"] = [{k: b.get(k) for k in keys} for b in boots]
    p["bootstrap_ok"] = [len(boots), n_boot]


# ---------------------------------------------------------------------------------------------
# Approach 1


def envelope(curves: list, n_grid: int = 40, reach: float = 0.02) -> dict:
    """For log-spaced C, the lowest loss over all runs' curves (each interpolated in log C) and
    the N of the run that reached it. A curve counts up to `reach` (relative) past its last C, at its
    final loss: runs of one budget end a step apart, and the one that ends last must not be the
    frontier alone at the grid's end (a spike)."""
    lo = max(min(c[1][0] for c in curves), 1.0)
    hi = max(c[1][-1] for c in curves)
    grid = np.geomspace(lo, hi, n_grid)
    best_l = np.full(n_grid, np.inf)
    best_n = np.full(n_grid, np.nan)
    for n, c_t, l_t in curves:
        inside = (grid >= c_t[0]) & (grid <= c_t[-1] * (1 + reach))
        l = np.interp(np.log(grid[inside]), np.log(c_t), l_t)
        better = l < best_l[inside]
        idx = np.where(inside)[0][better]
        best_l[idx] = l[better]
        best_n[idx] = n
    keep = np.isfinite(best_l)
    return {"C": grid[keep], "L": best_l[keep], "N": best_n[keep]}


def approach1(curves: list, compute: ComputeModel) -> Optional[dict]:
    """Power laws through the frontier, fitted where every run is past a third of its own
    budget (early in training the frontier only reflects warmup, not model size)."""
    if len(curves) < 2:
        return None
    env = envelope(curves)
    fit = env["C"] >= min(c[1][-1] for c in curves) / 3
    if len(set(env["N"][fit].tolist())) < 2:
        return None
    k_n, a = power_law(env["C"][fit], env["N"][fit])
    k_d, b = power_law(env["C"][fit], compute.tokens(env["N"][fit], env["C"][fit]))
    return {"a": a, "k_N": k_n, "b": b, "k_D": k_d, "envelope": {k: v.tolist() for k, v in env.items()},
            "fit_range": [float(env["C"][fit].min()), float(env["C"][fit].max())]}


def approach1_skipped(curves: list) -> Optional[str]:
    """Why approach 1 has no fit and what to add (None when it has one)."""
    if not curves:
        return "no training curves (a CSV of final losses has none): fit a sweep directory"
    if len(curves) < 2:
        return f"needs the curves of >= 2 runs, has {len(curves)}: add sizes"
    env = envelope(curves)
    c_fit = min(c[1][-1] for c in curves) / 3
    reached = sorted(set(env["N"][env["C"] >= c_fit].tolist()))
    if len(reached) >= 2:
        return None
    ns = sorted({c[0] for c in curves})
    if not reached:
        return f"the frontier has no point past C = {c_fit:.3g} (a third of the shortest run): add budgets"
    n = reached[0]
    add = "smaller sizes" if n == ns[0] else "larger sizes" if n == ns[-1] else "sizes around it"
    where = "the smallest" if n == ns[0] else "the largest" if n == ns[-1] else "one"
    return (f"{where} size, N={n:,.0f}, reaches the lowest loss at every C >= {c_fit:.3g} (a third of the shortest "
            f"run), so N_opt has no slope: add {add}")


def _fit_approach1(pts: Points, n_boot: int, rng) -> Optional[dict]:
    p1 = approach1(pts.curves, pts.compute)
    if p1 is None:
        return None
    boots = []
    for _ in range(n_boot):
        b = approach1([pts.curves[i] for i in rng.integers(0, len(pts.curves), len(pts.curves))], pts.compute)
        if b is not None:
            boots.append(b)
    _bootstrap_summary(p1, boots, ("a", "b", "k_N", "k_D"), n_boot)
    sizes = [c[0] for c in pts.curves]
    horizons = len(sizes) > len(set(sizes))
    p1["source"] = pts.curve_source
    p1["indicative"] = not (horizons and pts.curve_source == "val")
    return p1


# ---------------------------------------------------------------------------------------------
# Approach 2


def _noise_scale(pts: Points, window: float) -> tuple[Optional[np.ndarray], dict]:
    """Per-point noise s_i of the parametric bootstrap, counted once: the window parabolas' pooled residual
    variance s² = RSS / dof already holds the eval noise, so s_i² = se_i² + max(0, s² - mean se²) (the
    scatter the eval noise leaves unexplained); s² alone without loss_se, se_i² alone with dof = 0.
    (None, info) if neither is known; info reports s², its dof and the mean se²."""
    ss, dof, se2 = 0.0, 0, []
    for g in np.unique(pts.group):
        m = pts.group == g
        found = budget_minimum(np.log(pts.N[m]), pts.L[m], window)
        if "parabola" in found:
            x = np.log(pts.N[m])
            near = (x >= math.log(found["window_N"][0]) - 1e-12) & (x <= math.log(found["window_N"][1]) + 1e-12)
            ss += float(np.sum((pts.L[m][near] - np.polyval(found["parabola"], x[near])) ** 2))
            dof += int(near.sum()) - 3
            se2 += [] if pts.se is None else (pts.se[m][near] ** 2).tolist()
    pooled = ss / dof if dof > 0 else None
    mean_se2 = float(np.mean(se2)) if se2 else (float(np.mean(pts.se**2)) if pts.se is not None else None)
    extra = None if pooled is None else max(0.0, pooled - (mean_se2 or 0.0))
    info = {"residual_variance": pooled, "dof": dof, "loss_se_variance": mean_se2, "extra_variance": extra}
    if pts.se is None and pooled is None:
        return None, info
    return np.sqrt((pts.se**2 if pts.se is not None else 0.0) + (extra or 0.0)) * np.ones_like(pts.L), info


def _fit_approach2(pts: Points, n_boot: int, rng, window: float) -> Optional[dict]:
    p2 = approach2(pts, pts.compute, window)
    if p2 is None:
        return None
    scale, p2["noise"] = _noise_scale(pts, window)
    boots = []
    if scale is None:
        p2["bootstrap_note"] = "no noise estimate (no loss_se, <= 3 points per window): no intervals"
        n_boot = 0
    for _ in range(n_boot):
        sub = Points(pts.N, pts.D, pts.C, pts.L + rng.normal(0.0, scale), group=pts.group)
        b = approach2(sub, pts.compute, window)
        if b is not None:
            boots.append({**{k: b[k] for k in ("a", "b", "k_N", "k_D")}, **(b["frontier"] or {}),
                          "budgets": len(b["minima"])})
    _bootstrap_summary(p2, boots, ("a", "b", "k_N", "k_D", "E", "A", "alpha", "budgets"), n_boot)
    if p2["frontier"]:
        p2["frontier"]["ci"] = {k: p2["ci"].pop(k) for k in ("E", "A", "alpha")}
    return p2


# ---------------------------------------------------------------------------------------------
# Approach 3


G_CONVENTION = {
    "6nd": "N_opt = G (C/6)^a, D_opt = (C/6)^b / G: the closed form under this fit's compute model C = 6ND "
           "(the local exponents equal a, b)",
    "exact": "G, a, b are the 6ND-equivalent closed form (C = 6ND), not this fit's exact compute model; under it "
             "the optimum is numerical (optimal_size): see local (exponents at C_ref) and optimum_at_C_ref",
}


def _fit_approach3(pts: Points, n_boot: int, rng, full_grid: bool, top: int, options: Optional[dict],
                   clusters: Optional[Sequence] = None) -> dict:
    """The fit from the grid; each bootstrap replicate (points, or whole `clusters`, resampled: `resample`)
    starts from its optimum."""
    require(len(pts.N) >= 5, f"approach 3 fits 5 parameters and needs at least 5 points, got {len(pts.N)}")
    p3 = fit_parametric(pts.N, pts.D, pts.L, top=None if full_grid else top, options=options)
    p3["starts"] = "every grid point" if full_grid else f"the best {top} grid points"
    c_ref = float(np.exp(np.mean(np.log(pts.C))))
    p3["C_ref"] = c_ref
    p3["local"] = local_exponents(p3, pts.compute, c_ref) if p3["a"] is not None else None
    p3["compute_model"], p3["G_convention"] = pts.compute.kind, G_CONVENTION[pts.compute.kind]
    if p3["a"] is not None:
        n_opt, d_opt = optimal_size(p3, pts.compute, c_ref)
        p3["optimum_at_C_ref"] = {"N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt}
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(pts.N), len(pts.N)) if clusters is None else resample(rng, clusters)
        if len(np.unique(idx)) < 5:
            continue
        b = fit_parametric(pts.N[idx], pts.D[idx], pts.L[idx], starts=[p3["theta"]], options=options)
        if b["converged"]:
            boots.append(b)
    _bootstrap_summary(p3, boots, (*PARAMS, "a", "b", "G"), n_boot)
    if pts.floor is not None:
        p3["floor"] = pts.floor
        p3["E_minus_floor"] = p3["E"] - pts.floor
    return p3


# ---------------------------------------------------------------------------------------------
# Conventions: what N and C count, attention counted as Chinchilla does, tokens per parameter

N_COUNTS = {"non_embedding": "non-embedding parameters (no token or position embeddings, no untied output "
                             "projection; Kaplan et al. 2020)",
            "total": "all parameters, embeddings included (Hoffmann et al. 2022)", "as given": "as the points give it"}
ATTENTION = {"causal": "causal-halved ((L+1)/2 keys per query)",
             "full": "over the full L x L square (Hoffmann et al. 2022, Appendix F)"}


def with_attention(pts: Points, attention: str = "causal") -> Points:
    """`pts` with attention FLOPs counted `attention`: ``causal`` as the runs recorded them (halved), ``full``
    recounted from the sweep's shapes (`ShapeFamily(attention="full")`): every C and approach 1's
    curves scaled by fpt_full(N) / fpt(N), the exact model through the shapes' full-attention fpt. The IsoFLOP
    groups stay the sweep's budgets (their points' C now differ by the change in the attention share)."""
    require(attention in ATTENTION, f"attention FLOPs are counted {' or '.join(ATTENTION)}, got {attention!r}")
    if attention == "causal":
        return pts
    shapes = pts.compute.shapes
    require(pts.compute.kind == "exact" and shapes is not None,
            "--attention-flops full recounts each run's FLOPs from the sweep's recorded shapes: it needs a sweep "
            "directory whose runs lie on its shape rule (6ND, a CSV's or hand-made runs' FLOPs cannot be "
            "recounted): use --attention-flops causal")
    full = analytic(dataclasses.replace(shapes, attention="full"))

    def ratio(n):
        return full.fpt(n) / pts.compute.fpt(n)

    return dataclasses.replace(pts, C=pts.C * ratio(pts.N), compute=full,
                               curves=[(n, c_t * ratio(n), l_t) for n, c_t, l_t in pts.curves])


def conventions(pts: Points, attention: str = "causal") -> dict:
    """What N and C count, and where they disagree: Kaplan et al. 2020 pair non-embedding N with C ≈ 6ND,
    which leaves out the output layer's 6 d V FLOPs per token that `flops_per_token` (the exact model) counts."""
    kind = pts.compute.kind
    if kind == "6nd":
        c = {"counts": "C = 6 N D (Kaplan et al. 2020): 6 FLOPs per parameter of N per token, no attention term",
             "attention": None, "output_layer": False}
    elif pts.compute.shapes is not None or attention == "full" or pts.n_kind != "as given":
        # a sweep's: the shapes' flops_per_token, or the one its runs recorded
        c = {"counts": "C = fpt(N) D, fpt = flops_per_token: 6 x matmul weights including the output layer's "
                       f"6 d V, plus attention {ATTENTION[attention]}", "attention": attention, "output_layer": True}
    else:
        c = {"counts": "C = fpt(N) D, fpt as measured at the points (their flops / tokens)",
             "attention": "as measured", "output_layer": None}
    mismatch = None
    if pts.n_kind == "non_embedding" and c["output_layer"]:
        mismatch = ("N is non-embedding but C counts the output layer's 6 d V FLOPs per token (Kaplan et al. 2020 "
                    "pair non-embedding N with C ≈ 6ND, without them)")
    return {"N": {"n_kind": pts.n_kind, "counts": N_COUNTS.get(pts.n_kind, pts.n_kind)},
            "C": {"compute_model": kind, **c}, "mismatch": mismatch}


def tokens_per_parameter(result: dict, compute: ComputeModel) -> list[dict]:
    """D_opt / N_opt (Hoffmann et al. 2022: ~20 at every budget), by C: at each approach-2 IsoFLOP minimum, and
    approach 3's optimum (`optimal_size` under `compute`, the fit's model) at those budgets and at its C_ref."""
    p2, p3 = result.get("approach2") or {}, result.get("approach3") or {}
    rows = [{"C": m["C"], "at": "IsoFLOP budget", "approach2": m["tokens_per_param"], "approach3": None}
            for m in p2.get("minima", [])]
    if p3.get("a") is not None:
        rows.append({"C": p3["C_ref"], "at": "C_ref", "approach2": None, "approach3": None})
        for r in rows:
            n_opt, d_opt = optimal_size(p3, compute, r["C"])
            r["approach3"] = d_opt / n_opt
    return sorted(rows, key=lambda r: r["C"])


# ---------------------------------------------------------------------------------------------
# All approaches


def _fit_laws(pts: Points, forms: Sequence[str], n_boot: int, result: dict, clusters, select: str,
              window: float) -> dict:
    """`rollout.fit_laws` with approach 3's law as the chinchilla form and one run's log scatter from the
    IsoFLOP windows (`_noise_scale`), where the points have budgets."""
    scale, _ = _noise_scale(pts, window) if pts.group is not None else (None, {})
    run_noise = float(np.sqrt(np.mean((scale / pts.L) ** 2))) if scale is not None else None
    p3 = result.get("approach3") or {}
    chinchilla = {k: p3[k] for k in (*PARAMS, "theta")} if p3 else None
    return fit_laws(pts, [get_form(f) for f in forms], n_boot, result["bootstrap_seed"], clusters, select,
                    chinchilla, run_noise)


def bootstrap_stream(seed: Union[int, Sequence[int]]) -> list[int]:
    """The seed as numpy's SeedSequence reads it (trailing zero words dropped: 0 and [0, 0] draw alike)."""
    words = [int(x) for x in np.atleast_1d(seed)]
    while len(words) > 1 and words[-1] == 0:
        words.pop()
    return words


def fit_points(pts: Points, n_boot: int = 100, seed: Union[int, Sequence[int]] = 0, approaches=(1, 2, 3),
               full_grid: bool = False, window: float = WINDOW, top: int = 64, options: Optional[dict] = None,
               clusters: Optional[Sequence] = None, attention: str = "causal", forms: Sequence[str] = (),
               select: str = "rollout") -> dict:
    """Every approach that the points allow, with bootstrap intervals; JSON-serialisable. `seed` (an int
    or a sequence of ints, e.g. [seed, sweep index]) is recorded as `bootstrap_seed`; `clusters` (default:
    the points' WSD trunks, `pts.trunk`, where they have them) resample together in approach 3. `attention`:
    how C counts attention FLOPs (`with_attention`); `conventions` says what N and C count, and
    `tokens_per_parameter` gives D_opt / N_opt at each budget. `forms` (`forms.py`) are fitted side by side
    into `laws`, one selected by rollout cross-validation (`select`, `rollout.fit_laws`)."""
    require(np.all(pts.N > 0) and np.all(pts.D > 0) and np.all(pts.L > 0), "params, tokens and loss must be positive")
    pts = with_attention(pts, attention)
    rng = np.random.default_rng(bootstrap_stream(seed))
    result: dict = {"n_points": int(len(pts.N)), "floor": pts.floor, "n_kind": pts.n_kind,
                    "conventions": conventions(pts, attention), "bootstrap_seed": bootstrap_stream(seed),
                    "compute": pts.compute.to_json(), "curve_source": pts.curve_source,
                    "points": [{"N": float(n), "D": float(d), "C": float(c), "loss": float(l)}
                               for n, d, c, l in zip(pts.N, pts.D, pts.C, pts.L)]}
    if pts.se is not None:
        for p, se in zip(result["points"], pts.se):
            p["loss_se"] = float(se)
    if pts.epochs is not None:
        for p, ep in zip(result["points"], pts.epochs):
            p["epochs"] = float(ep)
    skipped = {}
    clusters = getattr(pts, "trunk", None) if clusters is None else clusters
    require(clusters is None or len(clusters) == len(pts.N), "clusters must name one cluster per point")
    if 3 in approaches:
        if len(pts.N) >= 5:
            result["approach3"] = _fit_approach3(pts, n_boot, rng, full_grid, top, options, clusters)
        else:
            skipped[3] = diagnose.skipped_approach3(len(pts.N))
    if 2 in approaches:
        p2 = _fit_approach2(pts, n_boot, rng, window) if pts.group is not None else None
        if p2 is not None:
            result["approach2"] = p2
        else:
            skipped[2] = diagnose.skipped_approach2(pts, window)
    if 1 in approaches:
        p1 = _fit_approach1(pts, n_boot, rng) if pts.curves else None
        if p1 is not None:
            result["approach1"] = p1
        else:
            skipped[1] = approach1_skipped(pts.curves) or "no fit"
    result["approaches"] = diagnose.approaches_summary(result, skipped)
    require(any(f"approach{i}" in result for i in (1, 2, 3)), "too few points for any approach: " +
            "; ".join(f"approach {i}: {why}" for i, why in sorted(skipped.items())))
    if forms:
        result["laws"] = _fit_laws(pts, forms, n_boot, result, clusters, select, window)
    result["warnings"] = diagnose.warnings(result)
    result["tokens_per_parameter"] = tokens_per_parameter(result, pts.compute)
    return result

