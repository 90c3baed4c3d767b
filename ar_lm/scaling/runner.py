"""`ar-lm sweep`: run every point of an experiment's sweep, resumably, then fit and check.

    SWEEP_DIR/sweep.json         n_kind (which N the fits use) and the points (name, coordinates, config file)
    SWEEP_DIR/points/<name>.json each point's resolved config
    SWEEP_DIR/runs/<name>/       each point's run directory
    SWEEP_DIR/status.json        per point: done | failed (with the error) | pending
    SWEEP_DIR/summary.csv        N, D, C, final val loss (and its standard error), perplexity, bits per byte,
                                 epochs of the train split, wall time, MFU
    SWEEP_DIR/fit/               fit.json and plots (`ar-lm fit`), holdout.json

Each run is its own process (`python -m ar_lm train POINT.json --run-dir ...`), so one failing run
never stops the others. Re-running the command skips finished runs (their summary.json exists),
resumes interrupted ones from their checkpoints, and retries failed ones.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ar_lm.config import load_experiment_module, load_json, save_json
from ar_lm.data.prepare import make_dataset
from ar_lm.errors import require
from ar_lm.io import atomic_write_json, atomic_write_text
from ar_lm.parallel.launch import sweep_commands
from ar_lm.scaling.holdout import fit_and_check
from ar_lm.scaling.sweeps import DataSpec, Sweep, SweepPoint, wsd_compute
from ar_lm.training import rundir

SUMMARY_FIELDS = ("name", "status", "N", "D", "C", "val_loss", "val_loss_se", "val_perplexity", "val_bits_per_byte",
                  "epochs", "wall_time_s", "mfu")


def load_sweep(path: str | Path) -> Sweep:
    module = load_experiment_module(path)
    require(hasattr(module, "sweep"), f"experiment file {path} defines no sweep() function")
    sweep = module.sweep()
    require(isinstance(sweep, Sweep), f"sweep() in {path} must return an ar_lm.scaling.Sweep")
    require(len(sweep.points) >= 1, f"the sweep in {path} is empty: define at least two points")
    require(len(sweep.points) >= 2, f"the sweep in {path} has a single point: a scaling fit needs several")
    names = [p.name for p in sweep.points]
    require(len(set(names)) == len(names), f"the sweep in {path} has duplicate point names")
    return sweep


def ensure_data(sweep: Sweep, sweep_dir: Path, data_dir: Optional[str]) -> Path:
    """The dataset: --data if given, else SWEEP_DIR/data made once from the sweep's DataSpec."""
    if data_dir:
        return Path(data_dir).absolute()
    spec = sweep.data or DataSpec()
    out = sweep_dir / "data"
    if (out / "metadata.json").is_file():
        return out
    require(spec.source in ("stdlib", "synthetic"),
            f"DataSpec.source={spec.source!r} is unknown: use stdlib or synthetic (or pass --data)")
    print(f"[sweep] preparing the {spec.source} dataset in {out}", file=sys.stderr, flush=True)
    make_dataset(out, spec.source, spec.tokenizer, spec.vocab_size, max_mb=spec.max_mb,
                 synthetic_tokens=spec.synthetic_tokens)
    return out


def _point_config(point: SweepPoint, sweep: Sweep, sweep_dir: Path, data_dir: Path):
    """The point's config as it runs: the sweep's dataset and wandb group, and a branch's trunk (a point
    name in `train.branch_of`) as that point's run directory."""
    cfg = point.config
    coords = tuple(f"{k}={v}" for k, v in point.coords.items())
    logging = dataclasses.replace(cfg.logging, group=cfg.logging.group or sweep.name, coords=coords)
    train = cfg.train
    if train.branch_of in {p.name for p in sweep.points}:
        train = dataclasses.replace(train, branch_of=str(sweep_dir / "runs" / train.branch_of))
    return dataclasses.replace(cfg, name=point.name, data=dataclasses.replace(cfg.data, path=str(data_dir)),
                               logging=logging, train=train)


def train_command(config_path: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ar_lm", "train", str(config_path), "--run-dir", str(run_dir)]


class SweepRunner:
    def __init__(self, sweep: Sweep, sweep_dir: Path, data_dir: Path):
        self.sweep = sweep
        self.dir = sweep_dir
        self.data_dir = data_dir
        self.status_path = sweep_dir / "status.json"
        try:
            self.status = json.loads(self.status_path.read_text())
        except (OSError, json.JSONDecodeError):
            self.status = {}

    def run_dir(self, name: str) -> Path:
        return self.dir / "runs" / name

    def config_path(self, name: str) -> Path:
        return self.dir / "points" / f"{name}.json"

    def write_points(self, points) -> None:
        """Write each point's config and add (or update) it in sweep.json, keeping the others."""
        try:
            listing = json.loads((self.dir / "sweep.json").read_text())["points"]
        except (OSError, json.JSONDecodeError, KeyError):
            listing = []
        by_name = {entry["name"]: entry for entry in listing}
        for p in points:
            save_json(_point_config(p, self.sweep, self.dir, self.data_dir), self.config_path(p.name))
            by_name[p.name] = {"name": p.name, "coords": p.coords, "config": str(self.config_path(p.name))}
        atomic_write_json(self.dir / "sweep.json",
                          {"name": self.sweep.name, "n_kind": self.sweep.n_kind, "points": list(by_name.values())})

    def is_done(self, name: str) -> bool:
        """Finished, with the config the sweep asks for now (a point whose function changed since it ran is
        run again, and its run directory refuses, naming what differs)."""
        summary = rundir.read_summary(self.run_dir(name))
        if not (summary and summary.get("finished")):
            return False
        ran, wanted = rundir.load_run_config(self.run_dir(name)), load_json(self.config_path(name))
        return not rundir.function_differences(ran, wanted, trained=True)

    def _set_status(self, name: str, **fields) -> None:
        self.status[name] = {**self.status.get(name, {}), **fields}
        atomic_write_json(self.status_path, self.status)

    def run_point(self, point: SweepPoint) -> bool:
        cmd = train_command(self.config_path(point.name), self.run_dir(point.name))
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(self.dir / ".jax_cache"))
        self._set_status(point.name, state="running", started=time.time())
        log_path = self.dir / "logs" / f"{point.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode == 0 and self.is_done(point.name):
            self._set_status(point.name, state="done", error=None, finished=time.time())
            return True
        error = _last_error(log_path) or f"exit status {proc.returncode}"
        self._set_status(point.name, state="failed", error=error, exit_status=proc.returncode, finished=time.time())
        return False

    def run(self, points, show_progress: bool = True) -> dict:
        todo = []
        for p in points:  # is_done reads the run's summary and both configs: once per point
            if self.is_done(p.name):
                self._set_status(p.name, state="done", error=None)
            else:
                todo.append(p)
        done = len(points) - len(todo)
        failed = 0
        seconds_per_flop, t0, flops_run = None, time.time(), 0.0
        for p in todo:
            if show_progress:
                remaining = sum(_run_flops(q) for q in todo[todo.index(p):])
                eta = f"{remaining * seconds_per_flop / 60:.1f} min" if seconds_per_flop else "?"
                print(f"[sweep] {done}/{len(points)} done, 1 running ({p.name}: N={p.coords['N']:,} "
                      f"D={p.coords['D']:,} C={p.coords['C']:.3g}), {failed} failed, ETA {eta}", file=sys.stderr, flush=True)
            ok = self.run_point(p)
            flops_run += _run_flops(p)
            seconds_per_flop = (time.time() - t0) / flops_run
            done += ok
            failed += not ok
            if not ok:
                print(f"[sweep] {p.name} failed: {self.status[p.name]['error']}", file=sys.stderr, flush=True)
        if show_progress:
            print(f"[sweep] {done}/{len(points)} done, {failed} failed", file=sys.stderr, flush=True)
        return {"done": done, "failed": failed}

    def summary_rows(self, points) -> list[dict]:
        rows = []
        for p in points:
            s = rundir.read_summary(self.run_dir(p.name)) or {}
            row = {"name": p.name, "status": self.status.get(p.name, {}).get("state", "pending"),
                   "N": p.coords["N"], "D": p.coords["D"], "C": p.coords["C"]}
            for key in SUMMARY_FIELDS[5:]:
                row[key] = s.get(key)
            rows.append(row)
        return rows

    def write_summary(self, points) -> list[dict]:
        rows = self.summary_rows(points)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.dir / "summary.csv", buf.getvalue())
        return rows


def _run_flops(p: SweepPoint) -> float:
    """What running the point costs (a cooldown branch: its cooldown only; see `wsd_sweep`)."""
    return p.coords.get("C_run", p.coords["C"])


def _last_error(log_path: Path) -> str:
    lines = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    return (errors[-1] if errors else lines[-1] if lines else "")[:500]


def warn_repeats(rows: list[dict]) -> list[str]:
    """One stderr line per point that trained on more than one epoch of its train split (returned too)."""
    lines = [f"[sweep] warning: {r['name']} repeats its train split ({r['epochs']:.2f} epochs)"
             for r in rows if r.get("epochs") is not None and r["epochs"] > 1]
    for line in lines:
        print(line, file=sys.stderr)
    return lines


def format_table(rows: list[dict]) -> str:
    head = (f"{'name':<10} {'status':<8} {'N':>10} {'D':>12} {'C':>10} {'val loss':>9} {'ppl':>8} {'bpb':>7} "
            f"{'epochs':>7} {'time s':>7} {'MFU':>6}")
    out = [head, "-" * len(head)]
    fmt = lambda v, f: (f.format(v) if v is not None else "-")  # noqa: E731
    for r in rows:
        out.append(
            f"{r['name']:<10} {r['status']:<8} {r['N']:>10,} {r['D']:>12,} {r['C']:>10.3g} {fmt(r['val_loss'], '{:>9.4f}'):>9} "
            f"{fmt(r['val_perplexity'], '{:>8.3f}'):>8} {fmt(r['val_bits_per_byte'], '{:>7.4f}'):>7} "
            f"{fmt(r['epochs'], '{:>7.2f}'):>7} {fmt(r['wall_time_s'], '{:>7.1f}'):>7} {fmt(r['mfu'] and 100 * r['mfu'], '{:>5.1f}%'):>6}"
        )
    return "\n".join(out)


def run_sweep(experiment: str, sweep_dir: Optional[str] = None, data_dir: Optional[str] = None, launcher: str = "local",
              dry_run: bool = False, only: Optional[str] = None, fit: bool = True) -> int:
    sweep = load_sweep(experiment)
    out = Path(sweep_dir or Path("sweeps") / sweep.name).absolute()
    points = [p for p in sweep.points if not only or fnmatch.fnmatch(p.name, only)]
    require(points, f"--only {only!r} matches no point of the sweep ({', '.join(p.name for p in sweep.points[:5])}, ...)")
    if launcher != "local":
        return sweep_commands(launcher, experiment, out, dry_run)
    if dry_run:
        data = Path(data_dir).absolute() if data_dir else out / "data"
        for p in points:
            cmd = train_command(out / "points" / f"{p.name}.json", out / "runs" / p.name)
            print(f"# {p.name}: N={p.coords['N']:,} D={p.coords['D']:,} C={p.coords['C']:.4g} "
                  f"layers={p.config.model.n_layers} d_model={p.config.model.d_model} steps={p.config.total_steps}")
            print(shlex.join(cmd))
        print(f"# data: {data}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with rundir.RunLock(out):
        data = ensure_data(sweep, out, data_dir)
        runner = SweepRunner(sweep, out, data)
        runner.write_points(sweep.points)
        t0 = time.time()
        result = runner.run(points)
        rows = runner.write_summary(sweep.points)
        print(format_table(rows))
        warn_repeats(rows)
        if any(p.coords.get("role") == "trunk" for p in sweep.points):
            c = wsd_compute(sweep.points)
            print(f"[sweep] WSD ladder: trunks and cooldowns spent {c['spent']:.3g} FLOPs; the same points as "
                  f"independent runs: {c['independent']:.3g} ({100 * c['saved_frac']:.0f}% saved)")
        print(f"[sweep] summary written to {out / 'summary.csv'} ({time.time() - t0:.0f} s)", file=sys.stderr)
        if fit and not only:
            fit_and_check(sweep, runner, out)
    return 0 if result["failed"] == 0 else 1


def sweep_command(args) -> int:
    """`ar-lm sweep EXPERIMENT.py [...]`: exit status 1 when any point failed."""
    return run_sweep(args.experiment, args.sweep_dir, args.data, args.launcher, args.dry_run, args.only,
                     not args.no_fit)
