"""The points a scaling fit reads: final losses (and training curves) from a sweep directory or a CSV."""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ar_lm.errors import UserError, require
from ar_lm.scaling.compute import KINDS, ComputeModel, ShapeFamily, measured
from ar_lm.training import rundir
from ar_lm.training.metrics import read_jsonl


@dataclass
class Points:
    """Final losses of runs: N params, D tokens, C FLOPs, L loss (nats/token); optional IsoFLOP
    group per point, standard error of each loss, epochs over the train split, and training
    curves [(N, C_t array, L_t array)] for Approach 1 (`curve_source` says which loss they hold)."""

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    L: np.ndarray
    group: Optional[np.ndarray] = None
    curves: list = field(default_factory=list)
    floor: Optional[float] = None  # known loss floor (entropy rate), nats
    se: Optional[np.ndarray] = None
    epochs: Optional[np.ndarray] = None
    compute: ComputeModel = ComputeModel()
    n_kind: str = "as given"
    curve_source: str = ""
    stale: tuple = ()  # finished runs of a sweep directory that its sweep no longer defines (not fitted)
    trunk: Optional[np.ndarray] = None  # per point, the WSD trunk its branch grew from (bootstrap clusters)

    def subset(self, keep: np.ndarray) -> "Points":
        """The points where boolean `keep` is true (curves and model kept)."""
        part = lambda a: None if a is None else a[keep]  # noqa: E731
        return dataclasses.replace(self, N=self.N[keep], D=self.D[keep], C=self.C[keep], L=self.L[keep],
                                   group=part(self.group), se=part(self.se), epochs=part(self.epochs),
                                   trunk=part(self.trunk))


def without_repeated_data(pts: Points) -> tuple[Points, list[dict]]:
    """(the points that saw each training token at most once (epochs <= 1), the others as {N, D, epochs}).
    Repeated tokens are worth less than fresh ones (Muennighoff et al. 2023), so a point past one epoch sits
    above the law of fresh data and biases N_opt; fits leave such points out unless asked to keep them. Points
    without an epoch count (a CSV without the column) are kept."""
    if pts.epochs is None:
        return pts, []
    repeated = pts.epochs > 1.0 + 1e-9
    dropped = [{"N": float(n), "D": float(d), "epochs": float(e)}
               for n, d, e in zip(pts.N[repeated], pts.D[repeated], pts.epochs[repeated])]
    return pts.subset(~repeated), dropped


def points_from_csv(path: str | Path, flops_model: str = "6nd") -> Points:
    """`params,tokens,loss` or `params,flops,loss` (then D = C / 6N); an optional `flops` column
    with `tokens` defines the IsoFLOP groups; optional `loss_se` and `epochs` columns.
    `flops_model` says how the CSV's flops were counted: ``6nd`` (published data) or ``exact``
    (fpt = flops / tokens per row; needs both columns)."""
    path = Path(path)
    require(path.is_file(), f"points file {path} does not exist")
    require(flops_model in KINDS, f"--flops-model must be one of {', '.join(KINDS)}, got {flops_model!r}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        rows = list(reader)
    require("params" in cols and "loss" in cols and ({"tokens", "flops"} & cols),
            f"{path} needs columns params,tokens,loss or params,flops,loss (has {', '.join(sorted(cols)) or 'none'})")
    require(flops_model == "6nd" or {"tokens", "flops"} <= cols,
            f"{path}: --flops-model exact needs both tokens and flops columns: add them or use --flops-model 6nd")
    require(len(rows) > 0, f"{path} has no rows")
    col = {name: _column(path, rows, name) if name in cols else None
           for name in ("params", "loss", "flops", "tokens", "loss_se", "epochs")}
    n, l, c, d = col["params"], col["loss"], col["flops"], col["tokens"]
    if d is None:
        d = c / (6 * n)
    if c is None:
        c = 6 * n * d
    compute = measured(n, c / d) if flops_model == "exact" else ComputeModel()
    return Points(n, d, c, l, group=_group_by_flops(c) if "flops" in cols else None, se=col["loss_se"],
                  epochs=col["epochs"], compute=compute)


def _column(path: Path, rows: list[dict], name: str) -> np.ndarray:
    try:
        arr = np.array([float(r[name]) for r in rows])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has a non-numeric value in column {name} ({e}): fix the CSV") from None
    ok = arr >= 0 if name in ("loss_se", "epochs") else arr > 0
    require(np.all(np.isfinite(arr)) and np.all(ok), f"{path}: column {name} must hold positive numbers")
    return arr


def _group_by_flops(c: np.ndarray, tol: float = 0.1) -> np.ndarray:
    """Cluster points whose C lie within `tol` (relative) of each other."""
    order = np.argsort(c)
    group = np.zeros(len(c), int)
    g, anchor = 0, c[order[0]]
    for i in order:
        if c[i] > anchor * (1 + tol):
            g, anchor = g + 1, c[i]
        group[i] = g
    return group


def replicate_mean(losses, ses) -> tuple[float, float]:
    """(L, se) of one point's k seed replicates: L = mean(L_i) and se² = mean(se_i²) / k + var(L_i) / k (var with
    ddof=1: the eval noise of the mean plus the seed-to-seed spread). k = 1: (L_1, se_1) as they are; with
    k >= 2 a missing se_i (NaN) counts 0."""
    losses, ses = np.asarray(losses, float), np.asarray(ses, float)
    k = len(losses)
    require(k >= 1 and len(ses) == k, f"replicate_mean needs one se per loss, got {k} losses and {len(ses)} se")
    if k == 1:
        return float(losses[0]), float(ses[0])
    within = float(np.mean(np.nan_to_num(ses) ** 2))
    return float(losses.mean()), float(np.sqrt((within + losses.var(ddof=1)) / k))


def _merge_replicates(rows: list[tuple], keys: list, trunks: list) -> tuple[list[tuple], list]:
    """One row (N, D, C, L, budget, fpt, se, epochs) per key: L and se by `replicate_mean`, epochs averaged,
    the rest (equal across seeds) from the first replicate; and each key's trunk."""
    groups: dict = {}
    for row, key, trunk in zip(rows, keys, trunks):
        groups.setdefault(key, ([], trunk))[0].append(row)
    merged = []
    for reps, _ in groups.values():
        loss, se = replicate_mean([r[3] for r in reps], [r[6] for r in reps])
        merged.append(reps[0][:3] + (loss,) + reps[0][4:6] + (se, float(np.mean([r[7] for r in reps]))))
    return merged, [trunk for _, trunk in groups.values()]


def _unseeded(trunk: Optional[str], coords: dict) -> Optional[str]:
    """A seed replicate's trunk name without its `_s<seed>` suffix (the replicates of a size share one cluster)."""
    suffix = f"_s{coords['seed']}" if "seed" in coords else None
    return trunk[: -len(suffix)] if trunk and suffix and trunk.endswith(suffix) else trunk


def points_from_sweep(sweep_dir: str | Path) -> Points:
    """Every finished run of the sweep as defined now (sweep.json's `current`; the names of runs it no longer
    defines go to `stale`): its final val loss (its standard error, epochs), the exact compute model
    through the runs' FLOPs per token, and Approach 1's curves: periodic val evals where every run
    has >= 3, else the smoothed train loss (indicative only). A point's seed replicates (coords
    `replicate_of`) are one point: mean loss, se from `replicate_mean`; every replicate's curve is kept."""
    sweep_dir = Path(sweep_dir)
    listing_path = sweep_dir / "sweep.json"
    require(listing_path.is_file(), f"{sweep_dir} is not a sweep directory (no sweep.json): run `ar-lm sweep` first")
    listing = json.loads(listing_path.read_text())
    rows, val_curves, train_curves, floor, stale, trunks = [], [], [], None, [], []
    shapes = ShapeFamily.from_json(listing["shapes"]) if listing.get("shapes") else None
    current = set(listing.get("current", [p["name"] for p in listing["points"]]))
    keys = []  # per run, the point it measures: a point's seed replicates (coords replicate_of) share one
    for p in listing["points"]:
        if p["name"].startswith("holdout") or p["coords"].get("role") == "trunk":  # a trunk is no budget's run
            continue
        run = sweep_dir / "runs" / p["name"]
        summary = rundir.read_summary(run)
        if not summary or summary.get("val_loss") is None:
            continue
        if p["name"] not in current:  # dropped from the sweep since it ran: listed, not fitted
            stale.append(p["name"])
            continue
        c = p["coords"]
        rows.append((c["N"], c["D"], c["C"], summary["val_loss"], c.get("budget", c["C"]), c["flops_per_token"],
                     summary.get("val_loss_se", np.nan), summary.get("epochs", np.nan)))
        trunks.append(_unseeded(c.get("trunk"), c))
        keys.append(c.get("replicate_of", p["name"]))
        flops_per_step = c["flops_per_token"] * summary["tokens"] / max(1, summary["step"])
        records = read_jsonl(run / rundir.METRICS)
        for split, curves, smooth in (("val", val_curves, False), ("train", train_curves, True)):
            recs = [r for r in records if r.get("split") == split and r.get("loss") is not None]
            if len(recs) >= 3:
                losses = np.array([r["loss"] for r in recs], float)
                curves.append((c["N"], flops_per_step * np.array([r["step"] for r in recs], float),
                               _smooth(losses) if smooth else losses))
        if floor is None:
            floor = _data_floor(rundir.load_run_config(run).data.path)
    use_val = len(val_curves) == len(rows)
    rows, trunks = _merge_replicates(rows, keys, trunks)
    require(len(rows) >= 2, f"{sweep_dir} has {len(rows)} finished runs (a point's seed replicates as one): "
            "a fit needs at least 2")
    arr = np.array(rows, float)
    column = lambda i: None if np.isnan(arr[:, i]).any() else arr[:, i]  # noqa: E731
    return Points(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], group=_group_by_flops(arr[:, 4], 0.01),
                  curves=val_curves if use_val else train_curves, floor=floor, se=column(6), epochs=column(7),
                  compute=measured(arr[:, 0], arr[:, 5], shapes), n_kind=listing.get("n_kind", "non_embedding"),
                  curve_source="val" if use_val else "train (smoothed; indicative only)", stale=tuple(stale),
                  trunk=np.array(trunks, object) if any(trunks) else None)


def _smooth(x: np.ndarray, window: int = 5) -> np.ndarray:
    if len(x) < window:
        return x
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, x[0]), x])
    return np.convolve(padded, kernel, mode="valid")


def _data_floor(data_path: str) -> Optional[float]:
    try:
        meta = json.loads((Path(data_path) / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta.get("source", {}).get("entropy_rate_nats")
