"""The training loop: `train` = setup, the loop, the finish.

The loop dispatches step N before reading the metrics of step N-1, so the host never blocks on
the device; non-finite losses are caught on device and read only at log/eval/checkpoint points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ar_lm.config import ExperimentConfig, to_dict, validate
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.pipeline import TrainIterator, eval_batches, train_dataset
from ar_lm.errors import NonFiniteError, UserError, require
from ar_lm.model.counts import flops_per_token, param_counts
from ar_lm.parallel.mesh import data_parallel_size, logical_rules, logical_sharding, make_mesh, mesh_context
from ar_lm.training import rundir
from ar_lm.training.checkpoint import Checkpointer
from ar_lm.training.evaluate import evaluate, make_eval_step
from ar_lm.training.metrics import RunLogger, peak_flops_per_device
from ar_lm.training.optimizer import make_optimizer
from ar_lm.training.state import abstract_state, init_state, state_shardings
from ar_lm.training.step import make_train_step


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    state: dict
    summary: dict


def prepare_config(cfg: ExperimentConfig, dataset: TokenDataset) -> ExperimentConfig:
    """Fill model.vocab_size from the dataset (when 0) and check it matches."""
    if cfg.model.vocab_size in (0, dataset.vocab_size):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=dataset.vocab_size))
    else:
        raise UserError(
            f"model.vocab_size={cfg.model.vocab_size} does not match the dataset's tokenizer ({dataset.vocab_size} "
            f"tokens in {dataset.path}): set model.vocab_size=0 to take it from the data"
        )
    return validate(cfg)


def check_parallelism(cfg: ExperimentConfig):
    """Build the mesh and rules, checking that the batch splits over the data-parallel size."""
    mesh = make_mesh(cfg.mesh)
    rules = logical_rules(cfg.mesh)
    dp = data_parallel_size(mesh, rules)
    require(
        cfg.data.batch_size % dp == 0,
        f"data.batch_size={cfg.data.batch_size} is not divisible by the data-parallel size {dp}: use a multiple of {dp}",
    )
    require(
        (cfg.data.batch_size // cfg.optim.grad_accum) % dp == 0,
        f"the micro-batch data.batch_size/optim.grad_accum={cfg.data.batch_size // cfg.optim.grad_accum} "
        f"is not divisible by the data-parallel size {dp}",
    )
    return mesh, rules


def train(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    stop_after: Optional[int] = None,
    stop_requested: Optional[Callable[[int], bool]] = None,
) -> TrainResult:
    """Train (or resume) `cfg` in `run_dir`. `stop_after` ends the loop early after that many
    total steps (checkpointing there) without changing the schedule; `stop_requested(step)` is
    polled after each step (preemption, see `PreemptionGuard`) and stops the same way, with a
    synchronous checkpoint."""
    run_dir = Path(run_dir).absolute()
    dataset = TokenDataset(cfg.data.path)
    cfg = prepare_config(cfg, dataset)
    check_parallelism(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # process 0 holds the run directory's lock for the whole multi-process run
    with rundir.RunLock(run_dir) if jax.process_index() == 0 else contextlib.nullcontext():
        if rundir.is_run_dir(run_dir):
            rundir.check_resume_compatible(run_dir, cfg)
        return _train_locked(cfg, run_dir, dataset, stop_after, stop_requested)


def _check_finite(cfg: ExperimentConfig, bad_step: int, skips: int) -> None:
    if bad_step < 0:
        return
    if cfg.train.nonfinite_policy == "stop":
        raise NonFiniteError(
            f"non-finite loss or gradient at step {bad_step}: the update was not applied and the last "
            "good checkpoint is kept (lower optim.lr, or set train.nonfinite_policy=skip)"
        )
    if skips > cfg.train.max_skips:
        raise NonFiniteError(
            f"{skips} consecutive non-finite steps (first at step {bad_step}) exceed train.max_skips={cfg.train.max_skips}"
        )


@dataclasses.dataclass
class _Run:
    """Everything the loop needs, built once by `_setup`."""

    cfg: ExperimentConfig
    run_dir: Path
    mesh: Any
    rules: Any
    batch_sharding: Any
    ckpt: Checkpointer
    data_iter: TrainIterator
    logger: RunLogger
    state: dict
    start: int
    step_fn: Callable
    eval_fn: Callable
    val: list
    token_bytes: Any
    flops_per_token: float
    peak_flops: float  # all devices together

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.data.seq_len


def _train_locked(cfg, run_dir, dataset, stop_after, stop_requested) -> TrainResult:
    t_start = time.time()
    run = _setup(cfg, run_dir, dataset)
    if run is None:  # finished already: nothing to do
        return TrainResult(run_dir, None, rundir.read_summary(run_dir))
    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, stop_after)
    clock = _StepLog(run)
    try:
        state, last_eval, first_step_time = _loop(run, end, stop_requested, clock, t_start)
    finally:
        run.ckpt.close()
        run.logger.close()
    return _finish(run, state, end, last_eval, clock.train_time, first_step_time, t_start)


def _setup(cfg: ExperimentConfig, run_dir: Path, dataset: TokenDataset) -> Optional[_Run]:
    """Mesh, optimizer, shardings, data, the restored (or fresh) state, compiled steps; None if the run
    has finished already."""
    mesh, rules = check_parallelism(cfg)
    tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
    shardings = state_shardings(cfg, tx, mesh, rules)
    batch_sharding = logical_sharding(mesh, rules, ("batch", "length"))
    ckpt = Checkpointer(run_dir / rundir.CHECKPOINTS, cfg.train.keep_checkpoints, cfg.train.async_checkpoint)
    pidx, pcount = jax.process_index(), jax.process_count()
    data_iter = TrainIterator(
        train_dataset(dataset, cfg.data.seq_len, cfg.data.batch_size, cfg.data.shuffle_seed, pidx, pcount),
        cfg.data.prefetch,
    )
    with mesh_context(mesh, rules):
        start = ckpt.latest_step()
        if start is not None and start >= cfg.total_steps and rundir.read_summary(run_dir):
            ckpt.close()
            return None
        if start is not None:
            state, data_state = ckpt.restore(start, abstract_state(cfg, tx, shardings))
            data_iter.set_state(data_state)
        else:
            start = 0
            state = init_state(cfg, tx, shardings, jax.random.key(cfg.train.seed))
    if pidx == 0:
        rundir.write_config(run_dir, cfg)
        rundir.copy_tokenizer(run_dir, dataset.path, dataset.meta)
    return _Run(
        cfg, run_dir, mesh, rules, batch_sharding, ckpt, data_iter,
        RunLogger(run_dir, to_dict(cfg), cfg.logging, cfg.total_steps, resume_step=start), state, start,
        make_train_step(cfg, tx, schedule, shardings, batch_sharding),
        make_eval_step(cfg, shardings["params"], batch_sharding),
        eval_batches(dataset, cfg.data.seq_len, cfg.data.batch_size, cfg.train.eval_batches, "val", pidx, pcount),
        jnp.asarray(dataset.token_bytes()), flops_per_token(cfg.model, cfg.data.seq_len),
        peak_flops_per_device(cfg.logging.peak_flops) * jax.device_count(),
    )


class _StepLog:
    """Train records, read one step late: a log step's metrics are held on device and read (`flush`)
    only after the next step is dispatched, or before an eval or checkpoint."""

    def __init__(self, run: _Run):
        self.run = run
        self.pending = None  # (step, metrics on device) of the last dispatched log step
        self.t_log, self.steps_since_log, self.train_time = time.perf_counter(), 0, 0.0

    def hold(self, step: int, metrics) -> None:
        self.pending = (step, metrics)

    def pause(self) -> None:
        """Restart the interval clock (evaluation time is not training time)."""
        self.t_log = time.perf_counter()

    def flush(self) -> None:
        if self.pending is None:
            return
        (step, metrics), self.pending = self.pending, None
        m = jax.device_get(metrics)
        now = time.perf_counter()
        dt = now - self.t_log
        self.train_time += dt
        tps = self.steps_since_log * self.run.tokens_per_step / dt if dt > 0 else 0.0
        self.t_log, self.steps_since_log = now, 0
        self.run.logger.log({
            "step": step, "split": "train", "loss": float(m["loss"]), "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]), "tokens": step * self.run.tokens_per_step, "tokens_per_s": tps,
            "mfu": tps * self.run.flops_per_token / self.run.peak_flops, "skipped": not bool(m["finite"]),
            "skipped_total": int(m["n_skipped"]),
        })
        _check_finite(self.run.cfg, int(m["bad_step"]), int(m["skips"]))


def _loop(run: _Run, end: int, stop_requested, log: _StepLog, t_start: float):
    """Steps start..end-1 with logging, evaluation and checkpoints; returns (state, last eval, time to
    the first step)."""
    cfg, state, last_eval, first_step_time = run.cfg, run.state, {}, None
    for step in range(run.start, end):
        global_batch = jax.make_array_from_process_local_data(run.batch_sharding, next(run.data_iter))
        with mesh_context(run.mesh, run.rules):
            state, metrics = run.step_fn(state, global_batch)
        if first_step_time is None:
            first_step_time = time.time() - t_start
        done = step + 1
        log.steps_since_log += 1
        log.flush()  # step N is dispatched: now read step N-1's metrics
        if done % cfg.train.log_every == 0 or done == end:
            log.hold(done, metrics)
        if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.total_steps:
            log.flush()
            last_eval = _evaluate(run, state, done)
            log.pause()
        stopping = done == end or (stop_requested is not None and stop_requested(done))
        if (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0) or stopping:
            log.flush()
            _check_finite(cfg, *(int(x) for x in jax.device_get((state["bad_step"], state["skips"]))))
            run.ckpt.save(done, state, run.data_iter.get_state())
        if stopping:
            run.ckpt.wait()  # synchronous: the checkpoint is committed before we return
            break
    log.flush()
    run.ckpt.wait()
    return state, last_eval, first_step_time


def _evaluate(run: _Run, state: dict, step: int) -> dict:
    with mesh_context(run.mesh, run.rules):
        result = evaluate(run.eval_fn, state["params"], run.val, run.batch_sharding, run.token_bytes)
    run.logger.log({"step": step, "split": "val", **result})
    return result


def _finish(run: _Run, state: dict, end: int, last_eval: dict, train_time: float, first_step_time, t_start) -> TrainResult:
    """The summary (written when the run has finished all its steps)."""
    final_step = int(jax.device_get(state["step"]))
    counts, fpt, tokens_per_step = param_counts(run.cfg.model), run.flops_per_token, run.tokens_per_step
    summary = {
        "step": final_step,
        "total_steps": run.cfg.total_steps,
        "finished": final_step >= run.cfg.total_steps,
        "preempted": final_step < end,
        "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "flops_per_token": fpt,
        "tokens": final_step * tokens_per_step,
        "flops": fpt * final_step * tokens_per_step,
        "wall_time_s": time.time() - t_start,
        "time_to_first_step_s": first_step_time,
        "mfu": ((final_step - run.start) * tokens_per_step * fpt / run.peak_flops / train_time
                if train_time > 0 else None),
        **{f"val_{k}": v for k, v in last_eval.items()},
    }
    if jax.process_index() == 0 and summary["finished"]:
        rundir.write_summary(run.run_dir, summary)
    return TrainResult(run.run_dir, state, summary)
