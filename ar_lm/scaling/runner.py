"""`ar-lm sweep`: run every point of an experiment's sweep, resumably, then fit and check.

    SWEEP_DIR/sweep.json         n_kind (which N the fits use) and the points (name, coordinates, config file)
    SWEEP_DIR/points/<name>.json each point's resolved config
    SWEEP_DIR/runs/<name>/       each point's run directory (runs/.replaced/: runs whose config changed)
    SWEEP_DIR/logs/<name>.log    each point's output, every attempt appended
    SWEEP_DIR/status.json        per point: pending | submitted | running | done | failed (`scaling/status.py`)
    SWEEP_DIR/summary.csv        N, D, C, final val loss (and its standard error), perplexity, bits per byte,
                                 epochs of the train split, wall time, MFU; with --lm-eval-tasks also
                                 lm_eval/<task>/<metric> columns (`scaling/downstream.py`)
    SWEEP_DIR/fit/               fit.json and plots (`ar-lm fit`), holdout.json

Each run is its own process (`python -m ar_lm train POINT.json --run-dir ...`), so one failing run
never stops the others; `--executor` says where the processes run (`scaling/executors.py`: this
machine, one at a time or packed side by side; Ray tasks; Slurm arrays). Re-running the command skips
finished runs (their summary.json exists and their config is the point's), runs again those whose
config changed, resumes interrupted ones from their checkpoints, and retries failed ones.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import functools
import io
import os
import sys
import time
from pathlib import Path
from typing import Optional

from ar_lm.config import load_experiment_module, load_json, save_json
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.media import METRIC_LABELS
from ar_lm.errors import UserError, require, run_experiment_code
from ar_lm.io import atomic_write_text, locked_json_update
from ar_lm.parallel.placement import check_fits
from ar_lm.scaling import downstream
from ar_lm.scaling.compute import ShapeFamily
from ar_lm.scaling.dispatch import (
    ExecOptions,
    check_options,
    command_for,
    device_pool,
    devices_for,
    preflight,
    prepare_workers,
    print_plan,
)
from ar_lm.scaling.executors import PointTask, run_local
from ar_lm.scaling.holdout import fit_and_check
from ar_lm.scaling.progress import LiveProgress, print_status
from ar_lm.scaling.status import SweepStatus, config_sha
from ar_lm.scaling.sweep_data import ensure_data, record_data
from ar_lm.scaling.sweeps import Sweep, SweepPoint, wsd_compute
from ar_lm.scaling.wandb_sweep import log_sweep_run
from ar_lm.training import rundir

STOP_WAIT_S = 120.0  # after Ctrl-C, how long to wait for a running point to checkpoint and exit
SUMMARY_FIELDS = ("name", "status", "N", "D", "C", "val_loss", "val_loss_se", "val_perplexity", "val_bits_per_byte",
                  "epochs", "wall_time_s", "mfu")


def load_sweep(path: str | Path) -> Sweep:
    module = load_experiment_module(path)
    require(hasattr(module, "sweep"), f"experiment file {path} defines no sweep() function")
    sweep = run_experiment_code(path, module.sweep)
    require(isinstance(sweep, Sweep), f"sweep() in {path} must return an ar_lm.scaling.Sweep")
    require(len(sweep.points) >= 1, f"the sweep in {path} is empty: define at least two points")
    require(len(sweep.points) >= 2, f"the sweep in {path} has a single point: a scaling fit needs several")
    names = [p.name for p in sweep.points]
    require(len(set(names)) == len(names), f"the sweep in {path} has duplicate point names")
    return sweep


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


class SweepRunner:
    """A sweep directory's points: their configs, which are done, and running the rest with an executor."""

    def __init__(self, sweep: Sweep, sweep_dir: Path, data_dir: Path, opts: Optional[ExecOptions] = None):
        self.sweep = sweep
        self.dir = sweep_dir
        self.data_dir = data_dir
        self.opts = opts or ExecOptions()
        self.store = SweepStatus(sweep_dir / "status.json")

    @property
    def status(self) -> dict:
        return self.store.read()

    @functools.cached_property
    def data_id(self) -> str:
        return TokenDataset(self.data_dir).identity()["id"]

    def run_dir(self, name: str) -> Path:
        return self.dir / "runs" / name

    def config_path(self, name: str) -> Path:
        return self.dir / "points" / f"{name}.json"

    def write_points(self, points) -> None:
        """Write each point's config and add (or update) it in sweep.json, keeping the others; sweep.json's
        `current` names the sweep's points as defined now (a fit reads those, not points dropped since)."""
        for p in points:
            save_json(_point_config(p, self.sweep, self.dir, self.data_dir), self.config_path(p.name))

        def add(listing: dict) -> None:
            by_name = {entry["name"]: entry for entry in listing.get("points", [])}
            for p in points:
                by_name[p.name] = {"name": p.name, "coords": p.coords, "config": str(self.config_path(p.name))}
            base = self.sweep.base  # the shape rule, and the exact compute model's shapes beyond the points
            shapes = ShapeFamily(base.model, self.sweep.rule, base.data.seq_len, self.sweep.n_kind)
            listing.update(name=self.sweep.name, n_kind=self.sweep.n_kind, points=list(by_name.values()),
                           current=[p.name for p in self.sweep.points],  # what a fit reads: the sweep as defined now
                           shapes=shapes.to_json())

        locked_json_update(self.dir / "sweep.json", add)

    def is_done(self, name: str) -> bool:
        """Finished with the config the sweep asks for now: the same config file (by hash), or one that
        differs only in what does not change the function (logging, speed settings)."""
        summary = rundir.read_summary(self.run_dir(name))
        if not (summary and summary.get("finished")):
            return False
        ran_on = (rundir.recorded_data(self.run_dir(name)) or {}).get("id")
        if ran_on is not None and ran_on != self.data_id:  # trained on other data: not this sweep's point
            return False
        sha = config_sha(self.config_path(name))
        if self.store.get(name).get("config_sha") == sha:
            return True
        ran, wanted = rundir.load_run_config(self.run_dir(name)), load_json(self.config_path(name))
        if rundir.function_differences(ran, wanted, trained=True, measured=True):
            return False
        self.store.update(name, config_sha=sha)
        return True

    def _replace_changed(self, points) -> None:
        """Points that finished with a config the sweep no longer asks for (and the branches of such a
        trunk) are run again: one line each, the old run kept in runs/.replaced/."""
        changed = set()
        for p in points:
            run = self.run_dir(p.name)
            summary = rundir.read_summary(run)
            trunk = p.config.train.branch_of
            if not (summary and summary.get("finished")) or (self.is_done(p.name) and trunk not in changed):
                continue
            differ = rundir.function_differences(rundir.load_run_config(run), load_json(self.config_path(p.name)),
                                                 trained=True, measured=True)
            ran_on = (rundir.recorded_data(run) or {}).get("id", self.data_id)
            what = ", ".join(f"{k} {was!r} -> {now!r}" for k, was, now in differ[:3]) or (
                f"data {ran_on} -> {self.data_id}" if ran_on != self.data_id else f"its trunk {trunk} changed")
            old = self.dir / "runs" / ".replaced" / f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            old.parent.mkdir(parents=True, exist_ok=True)
            os.replace(run, old)
            changed.add(p.name)
            print(f"[sweep] {p.name}: its config changed since it finished ({what}): running it again "
                  f"(the old run is in {old})", file=sys.stderr, flush=True)

    def cache_env(self) -> dict:
        """One compilation cache for the sweep's runs, unless the caller's $JAX_COMPILATION_CACHE_DIR is set."""
        return {"JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(self.dir / ".jax_cache")}

    def tasks(self, points, pool) -> list[PointTask]:
        env = tuple(self.cache_env().items())
        names = {p.name for p in self.sweep.points}
        return [PointTask(p.name, str(self.config_path(p.name)), str(self.run_dir(p.name)),
                          str(self.dir / "logs" / f"{p.name}.log"), str(self.store.path),
                          config_sha(self.config_path(p.name)), devices_for(p.config, _run_flops(p), self.opts, pool),
                          _run_flops(p), tuple(a for a in (p.config.train.branch_of,) if a in names), env)
                for p in points]

    def run(self, points, show_progress: bool = True) -> dict:
        """Run the points that are not done with the sweep's executor; {"done": k, "failed": k}."""
        self._replace_changed(points)
        todo = []
        for p in points:  # is_done reads the run's summary and both configs: once per point
            if self.is_done(p.name):
                self.store.update(p.name, state="done", error=None)
            else:
                self.store.update(p.name, state="pending")
                todo.append(p)
        pool = device_pool(self.opts)
        tasks = self.tasks(todo, pool)
        done_before = frozenset(p.name for p in points if p not in todo) | frozenset(
            n for n, s in self.status.items() if s.get("state") == "done")
        progress = LiveProgress(self.dir, pool.total, enabled=show_progress and self.opts.progress)
        try:
            result = self._execute(tasks, pool, done_before, progress.tick)
        except KeyboardInterrupt:
            self.interrupted(tasks)
            raise
        finally:
            progress.tick(force=True)
            progress.close()
        for t in tasks:
            s = self.store.get(t.name)
            if s.get("state") == "failed":
                print(f"[sweep] {t.name} failed: {s.get('error')}", file=sys.stderr, flush=True)
        return {"done": len(points) - len(todo) + result["done"], "failed": result["failed"]}

    def interrupted(self, tasks) -> None:
        """After Ctrl-C: running points go back to pending (a Slurm job runs on), locally once their trainers
        have checkpointed and let go of their run directories (a second Ctrl-C stops the wait)."""
        for t in [t for t in tasks if self.opts.executor != "slurm" and self.store.get(t.name).get("state") == "running"]:
            if self.opts.executor == "local" and not _wait_for_lock(Path(t.run_dir), STOP_WAIT_S):
                print(f"[sweep] {t.name} still runs (its pid is in {t.run_dir}/.lock)", file=sys.stderr)
            self.store.update(t.name, state="pending", pid=None, interrupted=time.time())
        print("[sweep] interrupted: rerun the same command to resume (finished points are kept, interrupted ones "
              "resume from their checkpoints)", file=sys.stderr, flush=True)

    def _execute(self, tasks, pool, done_before, tick) -> dict:
        if not tasks:
            return {"done": 0, "failed": 0}
        if self.opts.executor == "ray":
            from ar_lm.scaling.ray_executor import run_ray

            return run_ray(tasks, self.opts.ray_address, self.opts.max_concurrent, self.opts.max_retries, tick)
        if self.opts.executor == "slurm":
            from ar_lm.scaling.slurm_executor import run_slurm

            return run_slurm(tasks, self.dir / "slurm", self.sweep.name, self.opts.slurm_cluster,
                             self.opts.slurm_partition, self.opts.slurm_time_min, self.opts.max_concurrent,
                             self.opts.slurm_gpu, tick)
        prepare_workers(self.opts, dry_run=False)
        return run_local(tasks, pool, self.opts.max_concurrent, command_for(self.opts, pool), tick, done_before)

    def summary_rows(self, points) -> list[dict]:
        rows = []
        for p in points:
            s = rundir.read_summary(self.run_dir(p.name)) or {}
            row = {"name": p.name, "status": self.status.get(p.name, {}).get("state", "pending"),
                   "N": p.coords["N"], "D": p.coords["D"], "C": p.coords["C"]}
            for key in SUMMARY_FIELDS[5:]:
                row[key] = s.get(key)
            row |= {f"val_{k}": s[f"val_{k}"] for k in METRIC_LABELS if f"val_{k}" in s}  # media: bits per dim/sample
            rows.append(row | downstream.columns(self.run_dir(p.name)))
        return rows

    def write_summary(self, points) -> list[dict]:
        rows = self.summary_rows(points)
        buf = io.StringIO()
        extra = sorted({k for r in rows for k in r} - set(SUMMARY_FIELDS))  # lm_eval/<task>/<metric> columns
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS + tuple(extra))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.dir / "summary.csv", buf.getvalue())
        return rows


def _wait_for_lock(run_dir: Path, timeout_s: float) -> bool:
    """Wait until no trainer holds `run_dir` (a trainer stopping on SIGINT checkpoints first); False on timeout."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with rundir.RunLock(run_dir):
                return True
        except UserError:
            if time.time() > deadline:
                return False
            time.sleep(0.2)


def _run_flops(p: SweepPoint) -> float:
    """What running the point costs (a cooldown branch: its cooldown only; see `wsd_sweep`)."""
    return p.coords.get("C_run", p.coords["C"])


def warn_repeats(rows: list[dict]) -> list[str]:
    """One stderr line per point that trained on more than one epoch of its train split (returned too)."""
    lines = [f"[sweep] warning: {r['name']} repeats its train split ({r['epochs']:.2f} epochs): the fit leaves it "
             "out (`ar-lm fit --include-repeated` keeps it)"
             for r in rows if r.get("epochs") is not None and r["epochs"] > 1]
    for line in lines:
        print(line, file=sys.stderr)
    return lines


def format_table(rows: list[dict]) -> str:
    head = (f"{'name':<10} {'status':<8} {'N':>10} {'D':>12} {'C':>10} {'val loss':>9} {'ppl':>8} {'bpb':>7} "
            f"{'epochs':>7} {'time s':>7} {'MFU':>6}")
    media = [k for k in METRIC_LABELS if any(f"val_{k}" in r for r in rows)]  # bits per dim/sample of media data
    head += "".join(f" {METRIC_LABELS[k]:>11}" for k in media)
    out = [head, "-" * len(head)]
    fmt = lambda v, f: (f.format(v) if v is not None else "-")  # noqa: E731
    for r in rows:
        out.append(
            f"{r['name']:<10} {r['status']:<8} {r['N']:>10,} {r['D']:>12,} {r['C']:>10.3g} {fmt(r['val_loss'], '{:>9.4f}'):>9} "
            f"{fmt(r['val_perplexity'], '{:>8.3f}'):>8} {fmt(r['val_bits_per_byte'], '{:>7.4f}'):>7} "
            f"{fmt(r['epochs'], '{:>7.2f}'):>7} {fmt(r['wall_time_s'], '{:>7.1f}'):>7} {fmt(r['mfu'] and 100 * r['mfu'], '{:>5.1f}%'):>6}"
            + "".join(f" {fmt(r.get(f'val_{k}'), '{:>11.4f}'):>11}" for k in media)
        )
    return "\n".join(out)


def run_sweep(experiment: str, sweep_dir: Optional[str] = None, data_dir: Optional[str] = None,
              opts: Optional[ExecOptions] = None, dry_run: bool = False, only: Optional[str] = None,
              fit: bool = True, lm_eval: Optional[downstream.LmEvalSpec] = None, plan_target=None) -> int:
    opts = opts or ExecOptions()
    check_options(opts)
    sweep = load_sweep(experiment)
    out = Path(sweep_dir or Path("sweeps") / sweep.name).absolute()
    points = [p for p in sweep.points if not only or fnmatch.fnmatch(p.name, only)]
    require(points, f"--only {only!r} matches no point of the sweep ({', '.join(p.name for p in sweep.points[:5])}, ...)")
    if dry_run:
        return _dry_run(sweep, points, out, data_dir, opts)
    if plan_target is not None:
        return _plan(points, plan_target, out, data_dir)
    preflight(opts)
    pool = device_pool(opts)
    if opts.executor == "local":  # a point that needs more devices than there are: an error before anything runs
        check_fits({p.name: devices_for(p.config, _run_flops(p), opts, pool) or pool.largest for p in points}, pool)
    out.mkdir(parents=True, exist_ok=True)
    with rundir.RunLock(out):  # the coordinator's; each point's run holds its own run directory's lock
        data = ensure_data(sweep, out, data_dir)
        runner = SweepRunner(sweep, out, data, opts)
        runner.write_points(sweep.points)
        record_data(out, data)
        t0 = time.time()
        result = runner.run(points)
        if lm_eval is not None:  # downstream tasks on the finished points (each once)
            done = [p.name for p in points if runner.status.get(p.name, {}).get("state") == "done"]
            downstream.run_points(lm_eval, {n: runner.run_dir(n) for n in done}, out / "logs", runner.cache_env())
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
            log_sweep_run(sweep, out, rows)
    return 0 if result["failed"] == 0 else 1


def _dry_run(sweep: Sweep, points, out: Path, data_dir: Optional[str], opts: ExecOptions) -> int:
    """The points and, for the executor, what would run where (nothing is written)."""
    pool = device_pool(opts)
    runner = SweepRunner(sweep, out, Path(data_dir).absolute() if data_dir else out / "data", opts)
    for p in points:
        print(f"# {p.name}: N={p.coords['N']:,} D={p.coords['D']:,} C={p.coords['C']:.4g} "
              f"layers={p.config.model.n_layers} d_model={p.config.model.d_model} steps={p.config.total_steps}")
    names = {p.name for p in sweep.points}
    tasks = [PointTask(p.name, str(runner.config_path(p.name)), str(runner.run_dir(p.name)), "", "", "",
                       devices_for(p.config, _run_flops(p), opts, pool), _run_flops(p),
                       tuple(a for a in (p.config.train.branch_of,) if a in names)) for p in points]
    print_plan(tasks, opts, pool, out)
    print(f"# data: {runner.data_dir}")
    return 0


def _plan(points, target, out: Path, data_dir: Optional[str]) -> int:
    """`--plan TOPOLOGY`: every point compiled for the TPU slice (`ar_lm.plan.sweep`); the vocabulary of
    points that take the dataset's from --data, else from SWEEP_DIR/data once prepared."""
    from ar_lm.plan.sweep import plan_points

    vocab = None
    if any(p.config.model.vocab_size == 0 for p in points):
        path = Path(data_dir) if data_dir else out / "data"
        require((path / "metadata.json").is_file(), f"the points take the dataset's vocabulary and {path} is no "
                "dataset yet: pass --data DATA_DIR (or set model.vocab_size in the sweep)")
        vocab = TokenDataset(path, verify=False).vocab_size
    return plan_points([(p.name, p.config) for p in points], target, vocab, out)


def sweep_command(args) -> int:
    """`ar-lm sweep EXPERIMENT.py [...]`: exit status 1 when any point failed."""
    if args.status:
        sweep = load_sweep(args.experiment)
        return print_status(Path(args.sweep_dir or Path("sweeps") / sweep.name).absolute())
    tpu = {"name": args.tpu_name, "zone": args.tpu_zone, "accelerator": args.tpu_accelerator,
           "project": args.tpu_project}
    opts = ExecOptions(executor=args.executor, launcher=args.launcher, max_concurrent=args.max_concurrent,
                       max_retries=args.max_retries, ray_address=args.ray_address, devices=args.devices,
                       flops_per_device=args.flops_per_device, slurm_cluster=args.slurm_cluster,
                       slurm_partition=args.slurm_partition or "", slurm_time_min=args.slurm_time,
                       slurm_gpu=not args.slurm_cpu, tpu=tpu)
    lm_eval = (downstream.LmEvalSpec.create(args.lm_eval_tasks, args.lm_eval_include_path, args.lm_eval_limit)
               if args.lm_eval_tasks else None)
    plan_target = None
    if args.plan:
        from ar_lm.plan.targets import parse_target

        plan_target = parse_target(args.plan, args.plan_slices)
    return run_sweep(args.experiment, args.sweep_dir, args.data, opts, args.dry_run, args.only, not args.no_fit,
                     lm_eval, plan_target)
