"""A run's life around the loop: the start line, a run that has finished already, wall time summed over
resumes, and `train.init_from` (a new run that starts from another run's parameters).

    RUN_DIR/wall_time.json  {"segments_s": [...]}: the seconds of every `train` that trained the run
    RUN_DIR/init_from.json  the lineage of a run started with `train.init_from`: {"run_dir", "step", "data"}

`train.init_from=SOURCE` loads the parameters of SOURCE's latest checkpoint into the new run at step 0
with a fresh optimizer state; the new run's own schedule and data order start from the beginning.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import jax

from ar_lm.config import ExperimentConfig
from ar_lm.errors import require
from ar_lm.io import atomic_write_json
from ar_lm.model.counts import param_counts
from ar_lm.model.transformer import relayout_layers
from ar_lm.parallel.mesh import mesh_context
from ar_lm.training import rundir
from ar_lm.training.checkpoint import Checkpointer
from ar_lm.training.state import abstract_params, state_from_params

WALL_TIME = "wall_time.json"
LINEAGE = "init_from.json"


def say(message: str) -> None:
    """A lifecycle line on stderr (stdout holds the summary's JSON), from process 0 only."""
    if jax.process_index() == 0:
        print(f"[train] {message}", file=sys.stderr, flush=True)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def start_line(run_dir: Path, cfg: ExperimentConfig, mesh) -> str:
    """What runs where, printed before anything compiles."""
    devices = list(mesh.devices.flat)  # those the run uses (mesh.devices may pick fewer than there are)
    kinds = "/".join(sorted({d.device_kind for d in devices}))
    shape = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return (f"{run_dir}: {_count(param_counts(cfg.model)['total'])} parameters, {len(devices)} {kinds} "
            f"device{'s' if len(devices) > 1 else ''}, mesh {shape}, {cfg.total_steps} steps: compiling...")


def finished_summary(run_dir: Path, cfg: ExperimentConfig, data_path: Path, identity: dict) -> Optional[dict]:
    """`run_dir`'s summary if it has trained all of `cfg`'s steps already (said so on stderr; a UserError
    when `cfg` or the data is another run's), else None. It only reads: no lock."""
    summary = rundir.read_summary(run_dir) if rundir.is_run_dir(run_dir) else None
    if not summary or not summary.get("finished") or summary.get("step", 0) < cfg.total_steps:
        return None
    check_resume(run_dir, cfg, data_path, identity)
    say_finished(run_dir, summary)
    return summary


def check_resume(run_dir: Path, cfg: ExperimentConfig, data_path: Path, identity: dict) -> list[tuple]:
    """A run directory that exists holds this data and function (else a UserError); the speed settings
    that changed, (field, saved, new)."""
    if not rundir.is_run_dir(run_dir):
        return []
    rundir.check_same_data(run_dir, data_path, identity)
    return rundir.check_resume_compatible(run_dir, cfg, trained=(latest_step(run_dir) or 0) > 0)


def say_finished(run_dir: Path, summary: dict) -> None:
    say(f"{run_dir} already finished ({summary.get('step')} steps): its summary is {run_dir / rundir.SUMMARY}; "
        f"to train on from it, use a new --run-dir with --set train.init_from={run_dir}")


class WallClock:
    """Wall time summed over the segments of a run (each `train` call that trains it): `total()` records this
    segment's seconds so far in RUN_DIR/wall_time.json (at checkpoints and the end) and returns the sum."""

    def __init__(self, run_dir: Path, t_start: float):
        self.path, self.t_start = Path(run_dir) / WALL_TIME, t_start
        try:
            self.before = [float(s) for s in json.loads(self.path.read_text())["segments_s"]]
        except (OSError, ValueError, KeyError, TypeError):
            self.before = []

    def total(self) -> float:
        segments = [*self.before, time.time() - self.t_start]
        if jax.process_index() == 0:
            atomic_write_json(self.path, {"segments_s": segments})
        return sum(segments)


def check_init_from(cfg: ExperimentConfig, run_dir: Path, data_path: Path, identity: dict) -> Optional[dict]:
    """The lineage {"run_dir", "step", "data"} of `train.init_from` (None when unset), checked before anything
    is written: a run directory with a checkpoint, of this architecture, on this tokenizer. None too once
    `run_dir` has a checkpoint of its own (it resumes from that)."""
    if not cfg.train.init_from or latest_step(Path(run_dir)) is not None:
        return None
    source = Path(cfg.train.init_from).absolute()
    require(not cfg.train.branch_of, "train.init_from and train.branch_of both set: a run starts from one of them")
    require(source != Path(run_dir).absolute(), f"train.init_from={source} is the run directory itself: "
            "use a new --run-dir (rerunning the same command resumes a run)")
    require(rundir.is_run_dir(source), f"train.init_from={source} is not a run directory (no {rundir.CONFIG}): "
            "point it at a trained run")
    differ = rundir.architecture_differences(rundir.load_run_config(source), cfg)
    if differ:
        (key, was, now), more = differ[0], [k for k, _, _ in differ[1:]]
        require(False, f"train.init_from={source} has {key}={was!r}, not {now!r}"
                + (f" (and {', '.join(more)} differ)" if more else "") + ": start from a run of the same architecture")
    rundir.check_same_data(source, data_path, identity, "train.init_from's run", tokenizer_only=True)
    step = latest_step(source)
    require(step is not None, f"train.init_from={source} has no checkpoint yet: train it first")
    return {"run_dir": str(source), "step": step, "data": rundir.recorded_data(source)}


def latest_step(run_dir: Path) -> Optional[int]:
    """The step of `run_dir`'s latest complete checkpoint (None: none)."""
    if not (run_dir / rundir.CHECKPOINTS).is_dir():
        return None
    ckpt = Checkpointer(run_dir / rundir.CHECKPOINTS, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def init_state_from(cfg: ExperimentConfig, lineage: dict, tx, shardings, mesh, rules) -> dict:
    """A step-0 train state holding the parameters of `lineage`'s checkpoint and a fresh optimizer state,
    in the layer layout of `cfg` (the source may have saved the other one)."""
    source = Path(lineage["run_dir"])
    scanned = rundir.load_run_config(source).model.scan_layers
    saved = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=scanned))
    ckpt = Checkpointer(source / rundir.CHECKPOINTS, read_only=True)
    try:
        with mesh_context(mesh, rules):
            params = ckpt.restore_params(lineage["step"], abstract_params(saved, mesh, rules))
    finally:
        ckpt.close()
    if scanned != cfg.model.scan_layers:
        params = relayout_layers(params, cfg.model.n_layers, cfg.model.scan_layers)
    with mesh_context(mesh, rules):
        return state_from_params(tx, shardings, params)


def write_lineage(run_dir: Path, lineage: dict) -> None:
    if jax.process_index() == 0:
        atomic_write_json(Path(run_dir) / LINEAGE, lineage)


def read_lineage(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(run_dir) / LINEAGE).read_text())
    except (OSError, ValueError):
        return None
