"""How well does the multi-power law (Luo et al. 2025; `ar_lm.scaling.curves`) predict a WSD ladder's later
cooldowns? On a finished sweep directory (e.g. the main job's sweeps/isoflop_cpu), per model size: fit the
law to the trunk's and the earliest branch's train-loss curves with their lr schedules, predict every later
branch's final loss, and compare with the measured one (train: the mean of its last logged batches; val:
the final val loss, the law shifted by the fitted branch's val - law gap), beside two naive baselines (the
trunk's loss at that step; the trunk's loss at the branch point minus the fitted branch's cooldown drop).

Writes benchmarks/results/curve_law_<date>_cpu<cores>.json: the table (predicted vs measured per branch),
each size's fitted parameters, and the fit's wall time.

    python benchmarks/curve_law.py SWEEP_DIR [--fit-branches 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import StealMeter, write_result  # noqa: E402

COLUMNS = ("trunk", "N", "name", "steps", "branch_step", "predicted_train", "measured_train", "rel_err_train",
           "rel_err_baseline_trunk", "rel_err_baseline_same_drop", "predicted_val_shifted", "measured_val",
           "rel_err_val_shifted", "rel_err_val_raw")


def table(result: dict) -> list[dict]:
    """One row per predicted branch: the size, the prediction and the measurement (COLUMNS)."""
    rows = []
    for size in result["sizes"]:
        for b in size.get("branches", []):
            row = {"trunk": size["trunk"], "N": size["N"], **b}
            rows.append({k: row.get(k) for k in COLUMNS})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a finished WSD sweep directory (`ar-lm sweep`)")
    parser.add_argument("--fit-branches", type=int, default=1, help="how many of the earliest branches to fit on")
    args = parser.parse_args()
    if not (args.sweep_dir / "sweep.json").is_file():
        sys.exit(f"error: {args.sweep_dir} is not a sweep directory (no sweep.json)")
    from ar_lm.scaling.curves import check_sweep_curves, format_curves

    meter, start = StealMeter(), time.perf_counter()
    result = check_sweep_curves(args.sweep_dir, fit_branches=args.fit_branches)
    seconds = time.perf_counter() - start
    print(format_curves(result), file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "commit": commit,
           "sweep": str(args.sweep_dir.resolve()), "fit_branches": args.fit_branches, "law": result["law"],
           "compared": result["compared"], "fit_seconds": round(seconds, 2), "steal_frac": meter.frac(),
           "abs_rel_err_train": result["abs_rel_err_train"],
           "abs_rel_err_val_shifted": result["abs_rel_err_val_shifted"], "table": table(result),
           "fits": [{"trunk": s["trunk"], "N": s["N"], "fit_on": s["fit_on"],
                     **({"skipped": s["skipped"]} if "skipped" in s else {"fit": s["fit"], "val_gap": s["val_gap"]})}
                    for s in result["sizes"]]}
    write_result("curve_law", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
