"""Cooldown branches (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
Training Durations"): one trunk at constant learning rate, and for each data budget D a branch that
starts from the trunk's checkpoint at the step where a `wsd` run of budget D begins its cooldown, and
decays to the end of D.

    ar-lm cooldown TRUNK_DIR --at-tokens D --run-dir OUT [--cooldown-frac F | --cooldown-steps K]

`branch_config` makes the branch's config; `train` seeds a new run directory from the trunk
(`start_branch`) when `train.branch_of` is set, so a sweep's branch points are ordinary runs. The
branch's config is the straight `wsd` run of budget D (T = D / tokens per step steps, cooldown K,
the trunk's resolved warmup W in steps), with its lineage in `train.branch_of` / `train.branch_step`.
For s < T - K a `wsd` schedule equals the trunk's constant one bit for bit (`lr_schedule`), and the
data order is a function of the step, so the branch equals the straight run exactly (tested bitwise).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional

from ar_lm.config import ExperimentConfig
from ar_lm.errors import require
from ar_lm.io import atomic_write_text
from ar_lm.training import rundir
from ar_lm.training.checkpoint import Checkpointer
from ar_lm.training.metrics import read_jsonl
from ar_lm.training.optimizer import cooldown_steps, warmup_steps

TRUNK_SCHEDULES = ("constant", "wsd")


def branch_config(trunk: ExperimentConfig, at_tokens: int, cooldown_frac: Optional[float] = None,
                  cooldown_steps_: Optional[int] = None, parent: str = "") -> ExperimentConfig:
    """The branch of `trunk` (run directory `parent`) for a budget of `at_tokens`: a `wsd` run that
    starts from the trunk's step T - K (`train.branch_step`). Raises UserError when the trunk cannot
    carry this branch (schedule, budget, its own cooldown)."""
    o, t_trunk = trunk.optim, trunk.total_steps
    require(o.schedule in TRUNK_SCHEDULES, f"the trunk was trained with optim.schedule={o.schedule!r}: a cooldown "
            "branches from a constant or wsd trunk (train it with --set optim.schedule=constant)")
    require(at_tokens >= trunk.tokens_per_step, f"--at-tokens {at_tokens:,} is less than one step "
            f"({trunk.tokens_per_step:,} tokens)")
    steps = at_tokens // trunk.tokens_per_step
    cooldown = dataclasses.replace(o, schedule="wsd", cooldown_steps=cooldown_steps_ or 0,
                                   cooldown_frac=cooldown_frac if cooldown_frac is not None else o.cooldown_frac)
    k = cooldown_steps(cooldown, steps)
    start = steps - k
    require(start >= 1, f"the cooldown ({k} steps) takes the whole branch ({steps} steps): shorten it")
    if o.schedule == "constant":
        require(start <= t_trunk, f"--at-tokens {at_tokens:,}: its cooldown starts at step {start}, past the trunk's "
                f"budget ({t_trunk} steps): branch at a smaller budget or train the trunk longer")
    else:
        stable = t_trunk - cooldown_steps(o, t_trunk)
        require(start <= stable, f"--at-tokens {at_tokens:,}: its cooldown starts at step {start}, after the trunk's "
                f"own cooldown began at step {stable}: branch at a smaller budget")
    warm = warmup_steps(o, t_trunk, trunk.tokens_per_step)  # a straight wsd run with this W warms up the same way
    require(warm == 0 or warm < start, f"--at-tokens {at_tokens:,}: its cooldown starts at step {start}, before the "
            f"trunk's warmup ({warm} steps) ends: branch at a larger budget or warm the trunk up for fewer steps")
    optim = dataclasses.replace(cooldown, warmup_steps=warm, warmup_tokens=0, warmup_frac=0.0, cooldown_steps=k)
    train = dataclasses.replace(trunk.train, steps=steps, tokens=0, checkpoint_at_tokens=(), branch_of=parent,
                                branch_step=start)
    name = f"{trunk.name}_cooldown{at_tokens}"
    return dataclasses.replace(trunk, name=name, optim=optim, train=train)


def check_branch_point(cfg: ExperimentConfig) -> None:
    """The trunk `cfg.train.branch_of` has a checkpoint at `cfg.train.branch_step`, or a UserError naming it."""
    trunk_dir, start = Path(cfg.train.branch_of).absolute(), cfg.train.branch_step
    require(rundir.is_run_dir(trunk_dir), f"the branch's trunk {trunk_dir} is not a run directory: train it first")
    ckpt = Checkpointer(trunk_dir / rundir.CHECKPOINTS, read_only=True)
    try:
        steps = ckpt.all_steps()
    finally:
        ckpt.close()
    require(start in steps, f"the trunk {trunk_dir} has no checkpoint at step {start} "
            f"({start * cfg.tokens_per_step:,} tokens; it has {steps or 'none'}): train it with "
            f"train.checkpoint_at_tokens including {start * cfg.tokens_per_step}")


def check_branch_dir(out: Path) -> None:
    """`out` is new, a run directory (the branch to resume) or an interrupted seed (no config.json yet)."""
    out = Path(out)
    if rundir.is_run_dir(out):
        return
    seeding = {".lock", rundir.CHECKPOINTS, rundir.METRICS}  # config.json, written last, marks a finished seed
    require(not any(p.name not in seeding for p in out.iterdir()) if out.is_dir() else not out.exists(),
            f"run directory {out} exists and is not a run directory: use a new one")


def start_branch(out: Path, cfg: ExperimentConfig) -> None:
    """Seed the new run directory `out` with the trunk's checkpoint at `cfg.train.branch_step` and its
    metrics up to it (so the branch's curves begin at step 0); `train` calls this for a config with
    `train.branch_of` and then resumes there. Checks before it writes."""
    check_branch_point(cfg)
    trunk_dir, out, start = Path(cfg.train.branch_of).absolute(), Path(out).absolute(), cfg.train.branch_step
    check_branch_dir(out)
    shutil.rmtree(out / rundir.CHECKPOINTS, ignore_errors=True)  # an interrupted seed starts over
    (out / rundir.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    shutil.copytree(trunk_dir / rundir.CHECKPOINTS / str(start), out / rundir.CHECKPOINTS / str(start))
    records = [r for r in read_jsonl(trunk_dir / rundir.METRICS) if r.get("step", 0) <= start]
    atomic_write_text(out / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in records))
    rundir.write_config(out, cfg)
