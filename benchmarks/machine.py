"""How much of the machine a benchmark had: the share of CPU time the hypervisor stole during it; and
`ar_lm_cli`, how a benchmark runs an `ar-lm` command; `write_result`, where its results file goes.

On a shared virtual machine the host may run other guests on our cores ("steal" in /proc/stat); a run
with a large steal share is slower for reasons outside the code, so every results file records it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def ar_lm_cli(*args: str) -> str:
    """`ar-lm ARGS` with wandb off; its stdout, or exit with its last error line."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "ar_lm", *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: ar-lm {' '.join(args)} exited {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout


def _cpu_jiffies() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot; (0, 0) where /proc/stat does not exist."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return 0, 0
    fields = [int(x) for x in stat.read_text().splitlines()[0].split()[1:]]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


class StealMeter:
    """`frac()`: stolen / all CPU time since the meter was made (None where it cannot be read)."""

    def __init__(self):
        self.start = _cpu_jiffies()

    def frac(self) -> float | None:
        steal, total = (now - then for now, then in zip(_cpu_jiffies(), self.start))
        return steal / total if total > 0 else None


def write_result(stem: str, result: dict) -> Path:
    """Write `result` (with its "date" and "cores") to benchmarks/results/<stem>_<date>_cpu<cores>.json,
    print it, and say where it went."""
    out = Path(__file__).resolve().parent / "results" / f"{stem}_{result['date']}_cpu{result['cores']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return out
