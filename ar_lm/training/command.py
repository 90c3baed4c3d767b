"""`ar-lm train` (host devices and multi-process start-up, then `train` under a preemption guard),
`ar-lm cooldown` (a branch from a trunk's checkpoint, `branch.py`) and `ar-lm config` (the resolved config)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ar_lm.config import load_experiment, to_dict, with_data_path
from ar_lm.errors import EXIT_PREEMPTED, require
from ar_lm.parallel.runtime import configure_cpu_devices, initialize, multi_process_requested
from ar_lm.training import rundir
from ar_lm.training.branch import branch_config, check_branch_dir, check_branch_point
from ar_lm.training.loop import train
from ar_lm.training.preemption import PreemptionGuard


def experiment_config(args):
    """The experiment (file or config.json) with `--set` overrides and `--data`."""
    cfg = load_experiment(args.experiment, args.set)
    return with_data_path(cfg, getattr(args, "data", None))


def train_command(args) -> int:
    """Prints the run's summary as JSON; exit status 3 when stopped by a signal with a checkpoint."""
    cfg = experiment_config(args)
    if not multi_process_requested(args.coordinator):
        configure_cpu_devices(cfg.mesh, cfg.data.batch_size // cfg.optim.grad_accum)
    initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
    return _train_guarded(cfg, Path(args.run_dir or Path("runs") / cfg.name))


def cooldown_command(args) -> int:
    """`ar-lm cooldown TRUNK_DIR --at-tokens D --run-dir OUT`: the branch trained to D (see `branch.py`)."""
    require(args.cooldown_steps is None or args.cooldown_steps >= 1, "--cooldown-steps must be >= 1")
    require(args.cooldown_frac is None or 0 < args.cooldown_frac <= 1, "--cooldown-frac must be in (0, 1]")
    trunk = rundir.load_run_config(args.trunk_dir)
    cfg = branch_config(trunk, args.at_tokens, args.cooldown_frac, args.cooldown_steps,
                        parent=str(Path(args.trunk_dir).absolute()))
    check_branch_dir(Path(args.run_dir))
    configure_cpu_devices(cfg.mesh, cfg.data.batch_size // cfg.optim.grad_accum)
    check_branch_point(cfg)
    return _train_guarded(cfg, Path(args.run_dir))


def _train_guarded(cfg, run_dir: Path) -> int:
    with PreemptionGuard(every=cfg.train.log_every) as guard:
        result = train(cfg, run_dir, stop_requested=guard)
    print(json.dumps({"run_dir": str(result.run_dir), **result.summary}))
    if result.summary.get("preempted"):
        print(f"[train] stopped at step {result.summary['step']} with a checkpoint: rerun the same command to resume",
              file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def config_command(args) -> int:
    """`ar-lm config EXPERIMENT [--set ...]`: prints the resolved config as JSON."""
    print(json.dumps(to_dict(experiment_config(args)), indent=2))
    return 0
