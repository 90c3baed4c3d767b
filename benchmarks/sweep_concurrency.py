"""Wall time of the main job's sweep (experiments/isoflop_cpu.py, its points only: `--no-fit`) run one
point at a time and with K points at once (`--max-concurrent K`, one CPU device each), on the same
prepared dataset, each in a fresh sweep directory; checks that both give the same losses and records
the hypervisor's steal share. Writes benchmarks/results/sweep_concurrency_<date>_cpu<cores>.json.

    python benchmarks/sweep_concurrency.py [--concurrent 2]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import StealMeter

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "isoflop_cpu.py"


def _sweep(sweep_dir: Path, data: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "ar_lm", "sweep", str(EXPERIMENT), "--sweep-dir", str(sweep_dir), "--data", str(data),
           "--no-fit", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    steal, t0 = StealMeter(), time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
    losses = {r["name"]: r["val_loss"] for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    return {"command": " ".join(cmd[1:]), "wall_time_s": wall, "steal_frac": steal.frac(), "val_loss": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrent", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from ar_lm.io import cpu_cores
    from ar_lm.scaling.runner import ensure_data, load_sweep

    with tempfile.TemporaryDirectory(prefix="ar_lm_sweep_bench_") as tmp:
        tmp = Path(tmp)
        data = ensure_data(load_sweep(EXPERIMENT), tmp / "prep", None)
        serial = _sweep(tmp / "serial", data)
        concurrent = _sweep(tmp / "concurrent", data, "--max-concurrent", str(args.concurrent))
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"benchmark": "sweep_concurrency", "date": datetime.date.today().isoformat(), "commit": commit,
              "cpu_cores": cpu_cores(), "points": len(serial["val_loss"]), "serial": serial,
              f"max_concurrent_{args.concurrent}": concurrent,
              "speedup": serial["wall_time_s"] / concurrent["wall_time_s"],
              "same_losses": serial["val_loss"] == concurrent["val_loss"]}
    out = ROOT / "benchmarks" / "results" / f"sweep_concurrency_{result['date']}_cpu{cpu_cores()}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"serial {serial['wall_time_s']:.0f} s, {args.concurrent} at once {concurrent['wall_time_s']:.0f} s "
          f"(x{result['speedup']:.2f}), same losses: {result['same_losses']}; wrote {out}")


if __name__ == "__main__":
    main()
