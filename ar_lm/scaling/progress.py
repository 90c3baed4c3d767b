"""The sweep's progress table: done / running (devices, step) / failed / pending, and an ETA.

ETA = FLOPs left / (throughput per device x devices): the throughput is measured on the points that
finished (their FLOPs over wall time x devices); FLOPs left are the pending points' and the unrun
fraction of the running ones'. Read from SWEEP_DIR only (sweep.json, status.json, each run's
metrics.jsonl and summary.json), so `ar-lm sweep EXP --status` can print it for a sweep that is
running elsewhere without touching it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ar_lm.config import load_json
from ar_lm.errors import require
from ar_lm.scaling.status import SweepStatus
from ar_lm.training import rundir

STATES = ("done", "running", "submitted", "failed", "pending")


def _last_step(run_dir: Path) -> Optional[int]:
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            continue
    return None


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """One row per point of SWEEP_DIR/sweep.json: name, state, devices, step, total_steps, flops, N, C,
    val_loss, wall_time_s."""
    listing = load_json_file(sweep_dir / "sweep.json")["points"]
    status = SweepStatus(sweep_dir / "status.json").read()
    rows = []
    for entry in listing:
        name, coords = entry["name"], entry["coords"]
        s, run = status.get(name, {}), sweep_dir / "runs" / name
        summary = rundir.read_summary(run) or {}
        state = s.get("state", "pending")
        row = {"name": name, "state": state, "devices": s.get("devices", ""), "attempts": s.get("attempts", 0),
               "N": coords.get("N"), "C": coords.get("C"), "flops": coords.get("C_run", coords.get("C", 0.0)),
               "step": None, "total_steps": None, "val_loss": summary.get("val_loss"),
               "wall_time_s": summary.get("wall_time_s"), "device_count": summary.get("devices", 1),
               "error": s.get("error", "")}
        if state == "running":
            row["step"] = _last_step(run)
            try:
                row["total_steps"] = load_json(sweep_dir / "points" / f"{name}.json").total_steps
            except Exception:  # a point file being rewritten: no total this tick
                pass
        rows.append(row)
    return rows


def load_json_file(path: Path) -> dict:
    require(path.is_file(), f"no sweep in {path.parent} (no sweep.json): run `ar-lm sweep EXPERIMENT` first")
    return json.loads(path.read_text())


def eta_seconds(rows: list[dict], capacity: int) -> Optional[float]:
    """Seconds left at the measured throughput per device (None before any point has finished)."""
    done = [r for r in rows if r["state"] == "done" and r["wall_time_s"]]
    device_seconds = sum(r["wall_time_s"] * (r["device_count"] or 1) for r in done)
    if not device_seconds:
        return None
    per_device = sum(r["flops"] for r in done) / device_seconds
    left = sum(r["flops"] for r in rows if r["state"] in ("pending", "submitted"))
    left += sum(r["flops"] * (1 - (r["step"] or 0) / r["total_steps"]) for r in rows
                if r["state"] == "running" and r["total_steps"])
    return left / (per_device * max(1, capacity))


def headline(rows: list[dict], capacity: int) -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    eta = eta_seconds(rows, capacity)
    return (f"{counts['done']}/{len(rows)} done, {counts['running']} running, {counts['submitted']} submitted, "
            f"{counts['failed']} failed, {counts['pending']} pending; "
            f"ETA {'?' if eta is None else f'{eta / 60:.1f} min'}")


def progress_table(rows: list[dict], capacity: int) -> Table:
    table = Table(title=headline(rows, capacity), title_justify="left")
    for col, justify in (("point", "left"), ("state", "left"), ("devices", "left"), ("step", "right"),
                         ("N", "right"), ("C", "right"), ("val loss", "right"), ("time s", "right")):
        table.add_column(col, justify=justify)
    order = {s: i for i, s in enumerate(("running", "submitted", "failed", "pending", "done"))}
    for r in sorted(rows, key=lambda r: order.get(r["state"], 9)):
        step = f"{r['step'] or 0}/{r['total_steps']}" if r["state"] == "running" and r["total_steps"] else ""
        state = r["state"] + (f" (try {r['attempts']})" if r["attempts"] > 1 else "")
        table.add_row(r["name"], state, r["devices"] if r["state"] == "running" else "", step,
                      f"{r['N']:,}" if r["N"] else "", f"{r['C']:.3g}" if r["C"] else "",
                      f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "",
                      f"{r['wall_time_s']:.0f}" if r["wall_time_s"] else "")
    return table


def print_status(sweep_dir: Path, capacity: int = 1) -> int:
    """`ar-lm sweep EXP --status`: the table, once, to stdout (reads only)."""
    rows = sweep_rows(sweep_dir)
    Console(file=sys.stdout, width=120).print(progress_table(rows, capacity))
    for r in rows:
        if r["state"] == "failed" and r["error"]:
            print(f"{r['name']}: {r['error']}")
    return 0


class LiveProgress:
    """Redraws the table on stderr while the sweep runs (a terminal), or prints the headline when it
    changes (a log file)."""

    def __init__(self, sweep_dir: Path, capacity: int, enabled: bool = True):
        self.dir, self.capacity, self.enabled = sweep_dir, capacity, enabled
        self.live, self.last, self.last_time = None, "", 0.0
        if enabled and sys.stderr.isatty():
            self.live = Live(console=Console(file=sys.stderr), auto_refresh=False)
            self.live.start()

    def tick(self, force: bool = False) -> None:
        if not self.enabled or (not force and time.time() - self.last_time < 1.0):
            return
        self.last_time = time.time()
        rows = sweep_rows(self.dir)
        if self.live is not None:
            self.live.update(progress_table(rows, self.capacity), refresh=True)
            return
        line = headline(rows, self.capacity)
        running = [f"{r['name']}@{r['devices']}" for r in rows if r["state"] == "running"]
        key = line.split(";")[0] + " ".join(running)
        if key != self.last:
            self.last = key
            print(f"[sweep] {line}" + (f" (running: {', '.join(running)})" if running else ""), file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
