"""Times the README's quickstart exactly as written: the bash lines between its quickstart markers, run one
after another in a fresh directory holding a copy of experiments/ (so data/, runs/ and sweeps/ land there),
with this interpreter's `ar-lm` first on PATH and wandb offline. Writes
benchmarks/results/quickstart_<date>_cpu<cores>.json: the wall time of each command and of all of
them, the CPU time they used (user + system, every process), the CPU time the hypervisor stole, the load
average (other processes on the machine slow it down), the sweep's fitted approaches. The README quotes
the total from that file.

    python benchmarks/quickstart.py [--keep DIR]   # --keep: run in DIR (must not exist) and leave it there
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import resource
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "docs"))

from gen_reference import quickstart_script  # noqa: E402  (docs/gen_reference.py)
from machine import StealMeter, write_result  # noqa: E402


def commands(script: str) -> list[str]:
    """The script's commands, one per line (backslash continuations joined), comments and blanks left out."""
    out, cur = [], ""
    for line in script.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        line = cur + line
        cur = ""
        if line.strip() and not line.strip().startswith("#"):
            out.append(line)
    return out


def run(workdir: Path) -> dict:
    shutil.copytree(ROOT / "experiments", workdir / "experiments")
    env = {**os.environ, "WANDB_MODE": "offline", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    steps, start, meter, load = [], time.perf_counter(), StealMeter(), os.getloadavg()[0]
    for cmd in commands(quickstart_script()):
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=workdir, env=env, capture_output=True, text=True)
        steps.append({"command": cmd, "seconds": round(time.perf_counter() - t0, 1), "exit": proc.returncode})
        print(f"[quickstart] {steps[-1]['seconds']:6.1f} s  {cmd}", file=sys.stderr)
        if proc.returncode != 0:
            sys.exit(f"error: `{cmd}` exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    total = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    fit = json.loads((workdir / "sweeps" / "quickstart" / "fit" / "fit.json").read_text())
    return {"seconds": round(total, 1), "cpu_seconds": round(children.ru_utime + children.ru_stime, 1),
            "steal_frac": meter.frac(),
            "loadavg_1min": {"start": load, "end": os.getloadavg()[0]}, "commands": steps,
            "approaches": sorted(k for k in fit if re.fullmatch(r"approach\d", k) and fit[k])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="run in this directory (must not exist) and keep it")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    if args.keep:
        args.keep.mkdir(parents=True)
        measured = run(args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            measured = run(Path(tmp))
    result = {"date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "commit": commit,
              "uncommitted_changes": dirty, "python": sys.version.split()[0], **measured}
    write_result("quickstart", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
