"""Runs the README's main-job command on a fresh clone of the committed code and copies its results
into docs/isoflop_cpu/ (the files the README's results section names), with run.json: the command,
date, machine, exit status, wall time (setup included), hypervisor steal and commit.

    python benchmarks/main_job.py            # from the repository root, on a clean commit
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import StealMeter

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "isoflop_cpu"
SWEEP = Path("sweeps") / "isoflop_cpu"
FILES = {SWEEP / "summary.csv": "summary.csv", SWEEP / "fit" / "fit.json": "fit.json",
         SWEEP / "fit" / "holdout.json": "holdout.json"}


def readme_command() -> str:
    """The one README line that runs the main job."""
    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if "ar-lm sweep experiments/isoflop_cpu.py" in l
             and l.startswith("python3 -m venv")]
    if len(lines) != 1:
        sys.exit(f"error: README.md has {len(lines)} main-job command lines, expected 1: fix the README")
    return lines[0]


def main() -> int:
    command = readme_command()
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip():
        sys.exit("error: the working tree has uncommitted changes: commit them so run.json names the code that ran")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ar_lm_main_job_") as tmp:
        clone = Path(tmp) / "ar_lm"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        steal, t0 = StealMeter(), time.time()
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
        rc = subprocess.run(["bash", "-c", command], cwd=clone, env=env).returncode
        wall = time.time() - t0
        if rc != 0:
            sys.exit(f"error: the main job exited {rc}: see its output above; docs/isoflop_cpu/ left as it was")
        DOCS.mkdir(parents=True, exist_ok=True)
        for src, dst in FILES.items():
            shutil.copy2(clone / src, DOCS / dst)
        for png in sorted((clone / SWEEP / "fit").glob("*.png")):
            shutil.copy2(png, DOCS / png.name)
    run = {"command": command, "date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "exit_status": rc,
           "wall_time_s": round(wall, 1), "cpu_steal_frac": round(steal.frac() or 0.0, 3), "commit": commit}
    (DOCS / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(f"[main_job] {wall:.0f} s; results in {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
