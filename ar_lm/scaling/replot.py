"""Re-render a fit's plots from its committed files alone: FIT_DIR/fit.json (its points, laws and bootstrap
replicates) and, where present, FIT_DIR/holdout.json; no run directories (so no training curves), no refit.
Fits written before fit.json said what they skipped get their `approaches` and `warnings` computed here.

    python -m ar_lm.scaling.replot docs/isoflop_cpu --out /tmp/plots_new
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ar_lm.errors import require
from ar_lm.scaling import diagnose
from ar_lm.scaling.compute import ComputeModel
from ar_lm.scaling.plots import plot_fit
from ar_lm.scaling.points import Points, _group_by_flops


def points_of(result: dict) -> Points:
    """fit.json's points as `Points`: IsoFLOP groups by C (within 10%), loss_se where recorded."""
    rows = result["points"]
    col = lambda k: np.array([p[k] for p in rows], float)  # noqa: E731
    se = col("loss_se") if all("loss_se" in p for p in rows) else None
    return Points(col("N"), col("D"), col("C"), col("loss"), group=_group_by_flops(col("C")), se=se,
                  compute=ComputeModel.from_json(result["compute"]), n_kind=result.get("n_kind", "as given"),
                  floor=result.get("floor"), curve_source=result.get("curve_source", ""))


def replot(fit_dir: Path, out: Path) -> dict:
    """FIT_DIR's plots into OUT; {plot: the arrays it plotted}."""
    fit_dir = Path(fit_dir)
    require((fit_dir / "fit.json").is_file(), f"{fit_dir} has no fit.json")
    result = json.loads((fit_dir / "fit.json").read_text())
    pts = points_of(result)
    if "approaches" not in result:
        skipped = {} if "approach2" in result else {2: diagnose.skipped_approach2(pts)}
        result["approaches"] = diagnose.approaches_summary(result, skipped)
    result.setdefault("warnings", diagnose.warnings(result))
    holdout = json.loads((fit_dir / "holdout.json").read_text()) if (fit_dir / "holdout.json").is_file() else []
    return plot_fit(result, Path(out), pts, holdout=holdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fit_dir", help="a directory with fit.json (and holdout.json)")
    ap.add_argument("--out", required=True, help="where the PNGs go")
    args = ap.parse_args(argv)
    replot(Path(args.fit_dir), Path(args.out))
    print(f"[replot] wrote {args.out}/*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
