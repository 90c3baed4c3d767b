"""Checkpoints with orbax `CheckpointManager`: train state + data-iterator state per step.

Layout: ``RUN_DIR/checkpoints/<step>/{state,data}``; ``data/`` holds one JSON iterator state per
process, ``process_<i>-of-<n>.json`` (grain's orbax handler's layout). Each process restores its
own; a run resumed on another process count accepts the states only when all n are equal (true
of ar_lm's pipeline, whose state counts global batches), and refuses otherwise. orbax writes each step into a temporary
directory and renames it when complete, so only fully committed steps are listed and restored.
Restoring takes abstract arrays with target shardings, so a checkpoint saved on one mesh loads
onto another (resharding on load).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ppolicy

from ar_lm.config import ExperimentConfig
from ar_lm.errors import UserError, require
from ar_lm.parallel.mesh import mesh_context
from ar_lm.training import rundir
from ar_lm.training.state import abstract_params


def _state_file(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"


def choose_data_state(saved: dict[str, dict], index: int, count: int) -> dict:
    """This process's iterator state from the per-process files `saved` (name -> state)."""
    if _state_file(index, count) in saved:
        return saved[_state_file(index, count)]
    require(len(saved) > 0, "the checkpoint holds no data-iterator state: use a new --run-dir")
    states = list(saved.values())
    require(
        all(s == states[0] for s in states),
        f"the checkpoint's data-iterator states differ between its {len(states)} processes: "
        f"resume with {len(states)} processes",
    )
    return states[0]


class DataStateHandler(ocp.CheckpointHandler):
    """orbax handler: every process writes and reads its own iterator state (see module docstring)."""

    def save(self, directory, args: "DataSave"):
        name = _state_file(jax.process_index(), jax.process_count())
        (directory / name).write_text(json.dumps(args.state, indent=1))

    def restore(self, directory, args: "DataRestore" = None) -> dict:
        saved = {f.name: json.loads(f.read_text()) for f in directory.iterdir() if f.name.startswith("process_")}
        return choose_data_state(saved, jax.process_index(), jax.process_count())

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 2, async_save: bool = True, read_only: bool = False,
                 keep_steps: tuple[int, ...] = ()):
        """`keep` latest checkpoints (0: all), and those at `keep_steps` always."""
        self.directory = Path(directory).absolute()
        self.keep_steps = frozenset(keep_steps)
        policies = [ppolicy.LatestN(n=keep if keep > 0 else None), ppolicy.CustomSteps(sorted(self.keep_steps))]
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ppolicy.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, force: bool = True) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataSave(data_state)),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore `step` into arrays shaped and sharded like `abstract_state`."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=DataRestore()
                ),
            )
        except (ValueError, KeyError) as e:
            raise UserError(
                f"checkpoint {self.directory}/{step} does not match this model ({str(e).splitlines()[0][:160]}): "
                "use a new --run-dir"
            ) from None
        return restored["state"], restored["data"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Restore only the parameters (for eval and generation)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args=jax.tree.map(
                        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
                        {"params": abstract_params},
                    ),
                    partial_restore=True,
                )
            ),
        )
        return restored["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_latest_params(run_dir: Path, cfg: ExperimentConfig, mesh, rules) -> tuple[int, Any]:
    """(step, params) of `run_dir`'s latest complete checkpoint, placed on `mesh` by `rules`."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / rundir.CHECKPOINTS
    require(ckpt_dir.is_dir(), f"run directory {run_dir} has no checkpoints yet: train it first")
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    try:
        step = ckpt.latest_step()
        require(step is not None, f"run directory {run_dir} has no complete checkpoint yet: train it first")
        with mesh_context(mesh, rules):
            return step, ckpt.restore_params(step, abstract_params(cfg, mesh, rules))
    finally:
        ckpt.close()
