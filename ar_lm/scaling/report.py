"""`ar-lm fit`: fit a sweep directory or a CSV of points, write fit.json and the plots."""

from __future__ import annotations

import sys
from pathlib import Path

from ar_lm.errors import require
from ar_lm.io import atomic_write_json
from ar_lm.scaling.fit import fit_points, format_report
from ar_lm.scaling.plots import plot_fit
from ar_lm.scaling.points import Points, points_from_csv, points_from_sweep


def write_fit(pts: Points, out: Path, n_boot: int = 100, approaches=(1, 2, 3)) -> dict:
    """Fit `pts`, write OUT/fit.json and the plots; returns the fit."""
    result = fit_points(pts, n_boot=n_boot, approaches=approaches)
    atomic_write_json(Path(out) / "fit.json", result)
    plot_fit(result, Path(out), pts)
    return result


def fit_sweep_dir(sweep_dir: str | Path, n_boot: int = 100) -> dict:
    """Fit a sweep's finished runs into SWEEP_DIR/fit/."""
    return write_fit(points_from_sweep(sweep_dir), Path(sweep_dir) / "fit", n_boot)


def fit_command(args) -> int:
    """`ar-lm fit SWEEP_DIR | --points CSV [--out DIR] [--bootstrap N] [--approach K ...]`."""
    require(bool(args.sweep_dir) != bool(args.points), "give either a SWEEP_DIR or --points CSV")
    require(args.bootstrap >= 0, f"--bootstrap must be >= 0, got {args.bootstrap}")
    pts = points_from_sweep(args.sweep_dir) if args.sweep_dir else points_from_csv(args.points)
    approaches = tuple(args.approach or (1, 2, 3))
    if 3 in approaches and len(pts.N) < 5:
        require(not args.approach, f"approach 3 fits 5 parameters and needs at least 5 points, got {len(pts.N)}")
        approaches = tuple(a for a in approaches if a != 3)
    out = Path(args.out or (Path(args.sweep_dir) / "fit" if args.sweep_dir else Path(args.points).with_suffix("")))
    result = write_fit(pts, out, args.bootstrap, approaches)
    print(format_report(result))
    print(f"[fit] wrote {out / 'fit.json'} and plots", file=sys.stderr)
    return 0
