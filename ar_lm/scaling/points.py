"""The points a scaling fit reads: final losses (and training curves) from a sweep directory or a CSV."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ar_lm.errors import UserError, require
from ar_lm.training import rundir
from ar_lm.training.metrics import read_jsonl


@dataclass
class Points:
    """Final losses of runs: N params, D tokens, C FLOPs, L loss (nats/token); optional IsoFLOP
    group per point and training curves [(N, C_t array, L_t array)] for Approach 1."""

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    L: np.ndarray
    group: Optional[np.ndarray] = None
    curves: list = field(default_factory=list)
    floor: Optional[float] = None  # known loss floor (entropy rate), nats


def points_from_csv(path: str | Path) -> Points:
    """`params,tokens,loss` or `params,flops,loss` (then D = C / 6N); an optional `flops`
    column with `tokens` defines the IsoFLOP groups."""
    path = Path(path)
    require(path.is_file(), f"points file {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        rows = list(reader)
    require("params" in cols and "loss" in cols and ({"tokens", "flops"} & cols),
            f"{path} needs columns params,tokens,loss or params,flops,loss (has {', '.join(sorted(cols)) or 'none'})")
    try:
        n = np.array([float(r["params"]) for r in rows])
        l = np.array([float(r["loss"]) for r in rows])
        c = np.array([float(r["flops"]) for r in rows]) if "flops" in cols else None
        d = np.array([float(r["tokens"]) for r in rows]) if "tokens" in cols else None
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has a non-numeric value ({e})") from None
    require(len(rows) > 0, f"{path} has no rows")
    for name, arr in (("params", n), ("loss", l), ("flops", c), ("tokens", d)):
        if arr is not None:
            require(np.all(np.isfinite(arr)) and np.all(arr > 0), f"{path}: column {name} must hold positive numbers")
    if d is None:
        d = c / (6 * n)
    if c is None:
        c = 6 * n * d
    return Points(n, d, c, l, group=_group_by_flops(c) if "flops" in cols else None)


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


def points_from_sweep(sweep_dir: str | Path) -> Points:
    sweep_dir = Path(sweep_dir)
    listing_path = sweep_dir / "sweep.json"
    require(listing_path.is_file(), f"{sweep_dir} is not a sweep directory (no sweep.json): run `ar-lm sweep` first")
    listing = json.loads(listing_path.read_text())
    rows, curves, floor = [], [], None
    for p in listing["points"]:
        if p["name"].startswith("holdout"):
            continue
        run = sweep_dir / "runs" / p["name"]
        summary = rundir.read_summary(run)
        if not summary or summary.get("val_loss") is None:
            continue
        c = p["coords"]
        rows.append((c["N"], c["D"], c["C"], summary["val_loss"], c.get("budget", c["C"])))
        tokens_per_step = summary["tokens"] / max(1, summary["step"])
        train = [r for r in read_jsonl(run / rundir.METRICS) if r.get("split") == "train"]
        if len(train) >= 3:
            steps = np.array([r["step"] for r in train], float)
            losses = _smooth(np.array([r["loss"] for r in train], float))
            curves.append((c["N"], c["flops_per_token"] * tokens_per_step * steps, losses))
        if floor is None:
            floor = _data_floor(rundir.load_run_config(run).data.path)
    require(len(rows) >= 2, f"{sweep_dir} has {len(rows)} finished runs: a fit needs at least 2")
    arr = np.array(rows, float)
    return Points(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], group=_group_by_flops(arr[:, 4], 0.01),
                  curves=curves, floor=floor)


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
