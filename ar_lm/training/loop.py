"""The training loop: `train` = setup, the loop, the finish.

The loop dispatches step N before reading the metrics of step N-1, so the host never blocks on
the device; non-finite losses are caught on device and read only at log/eval/checkpoint points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax

from ar_lm.config import ExperimentConfig, to_dict, validate
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.media import modality_metric_name
from ar_lm.data.pipeline import TrainIterator, eval_batches, open_eval_sets, split_windows, train_dataset
from ar_lm.errors import NonFiniteError, UserError, require
from ar_lm.model.counts import flops_per_token, param_counts
from ar_lm.model.transformer import relayout_layers
from ar_lm.parallel.mesh import data_parallel_size, logical_rules, logical_sharding, make_mesh, mesh_context
from ar_lm.parallel.runtime import backend_xla_flags
from ar_lm.training import lifecycle, rundir
from ar_lm.training.branch import start_branch
from ar_lm.training.checkpoint import Checkpointer
from ar_lm.training.evaluate import evaluate, make_eval_step, token_tables
from ar_lm.training.metrics import RunLogger, eval_set_records, peak_flops_per_device
from ar_lm.training.optimizer import check_schedule, run_optimizer
from ar_lm.training.scheduled_sampling import SS_METRICS
from ar_lm.training.state import abstract_state, init_state, state_shardings
from ar_lm.training.step import make_train_step, remat_for_device_memory


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
    cfg = validate(cfg)
    check_schedule(cfg)
    return cfg


def check_parallelism(cfg: ExperimentConfig, devices=None):
    """Build the mesh (over `devices`, default this process's) and rules, checking that the batch splits over
    the data-parallel size."""
    mesh = make_mesh(cfg.mesh, devices)
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
    mesh, _ = check_parallelism(cfg)
    identity = dataset.identity()
    finished = lifecycle.finished_summary(run_dir, cfg, dataset.path, identity)  # said so on stderr
    if finished is not None:
        return TrainResult(run_dir, None, finished)
    pipelines = _pipelines(cfg, dataset)  # every check passes before the first write
    lineage = lifecycle.check_init_from(cfg, run_dir, dataset.path, identity)
    if cfg.train.branch_of:
        rundir.check_same_data(Path(cfg.train.branch_of).absolute(), dataset.path, identity, "the branch's trunk")
    lifecycle.check_resume(run_dir, cfg, dataset.path, identity)  # read only (again under the lock)
    if cfg.logging.progress:  # before anything compiles (remat=auto's search, the first step)
        lifecycle.say(lifecycle.start_line(run_dir, cfg, mesh))
    cfg = remat_for_device_memory(cfg, dataset.eos_id)  # model.remat=auto on GPU/TPU: by compiled memory
    run_dir.mkdir(parents=True, exist_ok=True)
    # process 0 holds the run directory's lock for the whole multi-process run
    with rundir.RunLock(run_dir) if jax.process_index() == 0 else contextlib.nullcontext():
        if cfg.train.branch_of and not rundir.is_run_dir(run_dir) and jax.process_index() == 0:
            start_branch(run_dir, cfg)  # a cooldown branch starts from its trunk
        changed = lifecycle.check_resume(run_dir, cfg, dataset.path, identity)
        if changed and jax.process_index() == 0:
            print("[train] resuming with other speed settings (the same function): "
                  + ", ".join(f"{k} {was!r} -> {now!r}" for k, was, now in changed), file=sys.stderr)
        return _train_locked(cfg, run_dir, dataset, pipelines, stop_after, stop_requested, lineage)


def kept_steps(cfg: ExperimentConfig) -> tuple[int, ...]:
    """The steps of `train.checkpoint_at_tokens` (tokens // tokens per step), checkpointed and never deleted."""
    return tuple(sorted({t // cfg.tokens_per_step for t in cfg.train.checkpoint_at_tokens} - {0}))


def _pipelines(cfg: ExperimentConfig, dataset: TokenDataset):
    """This process's train batches, val batches and those of each `data.eval_sets` entry (name -> batches;
    every split and eval set's tokenizer is checked here)."""
    pidx, pcount = jax.process_index(), jax.process_count()
    train_ds = train_dataset(dataset, cfg.data.seq_len, cfg.data.batch_size, cfg.data.shuffle_seed, pidx, pcount)
    val = eval_batches(dataset, cfg.data.seq_len, cfg.data.batch_size, cfg.train.eval_tokens, cfg.data.eval_seed,
                       "val", pidx, pcount)  # the same windows at every evaluation
    eval_sets = {s.name: eval_batches(data, cfg.data.seq_len, cfg.data.batch_size, cfg.train.eval_tokens,
                                      cfg.data.eval_seed, s.split, pidx, pcount)
                 for s, data in open_eval_sets(cfg.data.eval_sets, dataset)}
    return train_ds, val, eval_sets


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
    token_tables: Any
    flops_per_token: float
    peak_flops: float  # all devices together
    train_split_tokens: int  # target tokens in the train split's windows (one epoch)
    eval_sets: dict = dataclasses.field(default_factory=dict)  # name -> batches of each `data.eval_sets` entry
    modality_metric: Optional[str] = None  # a media dataset's name for bits per byte (`modality_metric_name`)
    clock: Optional[lifecycle.WallClock] = None  # wall time over all of the run's segments

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.tokens_per_step


def _train_locked(cfg, run_dir, dataset, pipelines, stop_after, stop_requested, lineage) -> TrainResult:
    t_start = time.time()
    run = _setup(cfg, run_dir, dataset, *pipelines, lineage=lineage)
    if run is None:  # finished already: nothing to do
        lifecycle.say_finished(run_dir, rundir.read_summary(run_dir))
        return TrainResult(run_dir, None, rundir.read_summary(run_dir))
    run.clock = lifecycle.WallClock(run_dir, t_start)
    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, stop_after)
    log = _StepLog(run)
    try:
        state, last_eval, first_step_time = _loop(run, end, stop_requested, log, t_start)
    finally:
        run.ckpt.close()
        run.logger.close()
        run.clock.total()  # this segment counts even when it failed
    return _finish(run, state, end, last_eval, log, first_step_time, t_start)


def _setup(cfg: ExperimentConfig, run_dir: Path, dataset: TokenDataset, train_ds, val, eval_sets,
           lineage: Optional[dict] = None) -> Optional[_Run]:
    """Mesh, optimizer, shardings, data, the restored (or fresh, or `lineage`'s: `train.init_from`) state,
    compiled steps; None if the run has finished already."""
    mesh, rules = check_parallelism(cfg)
    tx, schedule = run_optimizer(cfg)
    shardings = state_shardings(cfg, tx, mesh, rules)
    batch_sharding = logical_sharding(mesh, rules, ("batch", "length"))
    ckpt = Checkpointer(run_dir / rundir.CHECKPOINTS, cfg.train.keep_checkpoints, cfg.train.async_checkpoint,
                        keep_steps=kept_steps(cfg))
    data_iter = TrainIterator(train_ds, cfg.data.prefetch)
    with mesh_context(mesh, rules):
        start = ckpt.latest_step()
        if start is not None and start >= cfg.total_steps and rundir.read_summary(run_dir):
            ckpt.close()
            return None
        if start is not None:
            state, data_state = _restore(cfg, run_dir, ckpt, start, tx, shardings, mesh, rules)
            data_iter.set_state(data_state)
            if jax.process_index() == 0:
                print(f"[train] resuming from the checkpoint at step {start}", file=sys.stderr, flush=True)
        elif lineage:
            start, state = 0, lifecycle.init_state_from(cfg, lineage, tx, shardings, mesh, rules)
            lifecycle.write_lineage(run_dir, lineage)
            lifecycle.say(f"starting from the parameters of {lineage['run_dir']} at step {lineage['step']} "
                          "(a fresh optimizer state, step 0)")
        else:
            start = 0
            state = init_state(cfg, tx, shardings, jax.random.key(cfg.train.seed))
    if jax.process_index() == 0:
        rundir.write_config(run_dir, cfg)
        rundir.copy_tokenizer(run_dir, dataset.path, dataset.meta)
        rundir.write_data(run_dir, dataset.path, dataset.identity())
    return _Run(
        cfg, run_dir, mesh, rules, batch_sharding, ckpt, data_iter,
        RunLogger(run_dir, to_dict(cfg), cfg.logging, cfg.total_steps, resume_step=start), state, start,
        make_train_step(cfg, tx, schedule, shardings, batch_sharding, dataset.eos_id),
        make_eval_step(cfg, shardings["params"], batch_sharding, dataset.eos_id), val,
        token_tables(dataset), flops_per_token(cfg.model, cfg.data.seq_len),
        peak_flops_per_device(cfg.logging.peak_flops) * jax.device_count(),
        split_windows(dataset, "train", cfg.data.seq_len) * cfg.data.seq_len, eval_sets,
        modality_metric_name(dataset.meta),
    )


def _restore(cfg: ExperimentConfig, run_dir: Path, ckpt: Checkpointer, step: int, tx, shardings, mesh, rules):
    """(state, data state) of checkpoint `step`, in the layer layout of `cfg` even if it was saved in the
    other one (`model.scan_layers` changed: a speed setting)."""
    saved_scan = rundir.load_run_config(run_dir).model.scan_layers
    if saved_scan == cfg.model.scan_layers:
        return ckpt.restore(step, abstract_state(cfg, tx, shardings))
    saved = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=saved_scan))
    state, data_state = ckpt.restore(step, abstract_state(saved, tx, state_shardings(saved, tx, mesh, rules)))
    return jax.device_put(relayout_layers(state, cfg.model.n_layers, cfg.model.scan_layers), shardings), data_state


class _StepLog:
    """Train records, read one step late: a log step's metrics are held on device and read (`flush`)
    only after the next step is dispatched, or before an eval or checkpoint.

    Throughput is timed from the end of the first step (its compilation is `first_step_s`), over
    intervals that evaluation pauses: `pause` restarts the clock and the step count together."""

    def __init__(self, run: _Run):
        self.run = run
        self.pending = None  # (step, metrics on device) of the last dispatched log step
        self.clock, self.steps = None, 0  # start of the current interval (None before the first step), its steps
        self.train_time, self.timed_steps, self.first_step_s = 0.0, 0, None

    def first_step(self, metrics, t_dispatch: float) -> None:
        """Wait once for the first step (compilation included); training time starts when it is done."""
        jax.block_until_ready(metrics)
        self.clock = time.perf_counter()
        self.first_step_s = self.clock - t_dispatch

    def hold(self, step: int, metrics) -> None:
        self.pending = (step, metrics)

    def pause(self) -> None:
        """Restart the interval (evaluation time is not training time)."""
        self.clock, self.steps = time.perf_counter(), 0

    def flush(self) -> None:
        if self.pending is None:
            return
        (step, metrics), self.pending = self.pending, None
        m = jax.device_get(metrics)
        record = {"step": step, "split": "train", "loss": float(m["loss"]), "lr": float(m["lr"]),
                  "grad_norm": float(m["grad_norm"]), "tokens": step * self.run.tokens_per_step,
                  "skipped": not bool(m["finite"]), "skipped_total": int(m["n_skipped"]),
                  **{k: float(m[k]) for k in SS_METRICS if k in m}}
        now = time.perf_counter()
        if self.clock is not None and self.steps > 0 and now > self.clock:
            tps = self.steps * self.run.tokens_per_step / (now - self.clock)
            record |= {"tokens_per_s": tps, "mfu": tps * self.run.flops_per_token / self.run.peak_flops}
            self.train_time += now - self.clock
            self.timed_steps += self.steps
        if self.clock is not None:
            self.clock, self.steps = now, 0
        self.run.logger.log(record)
        _check_finite(self.run.cfg, int(m["bad_step"]), int(m["skips"]))


def _loop(run: _Run, end: int, stop_requested, log: _StepLog, t_start: float):
    """Steps start..end-1 with logging, evaluation and checkpoints; returns (state, last eval, time to
    the first step)."""
    cfg, state, last_eval, first_step_time = run.cfg, run.state, {}, None
    for step in range(run.start, end):
        global_batch = jax.make_array_from_process_local_data(run.batch_sharding, next(run.data_iter))
        t_dispatch = time.perf_counter()
        with mesh_context(run.mesh, run.rules):
            state, metrics = run.step_fn(state, global_batch)
        if first_step_time is None:
            log.first_step(metrics, t_dispatch)
            first_step_time = time.time() - t_start
            if cfg.logging.progress:
                lifecycle.say(f"step {step + 1} took {log.first_step_s:.1f} s (compiling included): training to step {end}")
        else:
            log.steps += 1
        done = step + 1
        log.flush()  # step N is dispatched: now read step N-1's metrics
        if done % cfg.train.log_every == 0 or done == end:
            log.hold(done, metrics)
        if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.total_steps:
            log.flush()
            last_eval = _evaluate(run, state, done)
            log.pause()
        stopping = done == end or (stop_requested is not None and stop_requested(done))
        periodic = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0
        if periodic or stopping or done in run.ckpt.keep_steps:
            log.flush()
            _check_finite(cfg, *(int(x) for x in jax.device_get((state["bad_step"], state["skips"]))))
            run.ckpt.save(done, state, run.data_iter.get_state())
            run.clock.total()
        if stopping:
            run.ckpt.wait()  # synchronous: the checkpoint is committed before we return
            break
    log.flush()
    run.ckpt.wait()
    if not last_eval and run.start >= cfg.total_steps:
        # resumed from the final checkpoint of a run that stopped before its summary was written: the final
        # evaluation was logged before that checkpoint, so compute its values again for the summary only
        last_eval = _evaluate(run, state, run.start, log=False)
    return state, last_eval, first_step_time


def _evaluate(run: _Run, state: dict, step: int, log: bool = True) -> dict:
    """The val scores, with {name: {loss, bpb}} of the eval sets and their macro average under "sets"."""
    with mesh_context(run.mesh, run.rules):
        sets = [evaluate(run.eval_fn, state["params"], batches, run.batch_sharding, run.token_tables)
                for batches in (run.val, *run.eval_sets.values())]
    records = eval_set_records(step, dict(zip(run.eval_sets, sets[1:])))
    if run.modality_metric:  # bits per dimension (sub-pixel) or per sample: the same number
        sets[0][run.modality_metric] = sets[0]["bits_per_byte"]
    if log:
        for record in [{"step": step, "split": "val", **sets[0]}, *records]:
            run.logger.log(record)
    if not records:
        return sets[0]
    return {**sets[0], "sets": {r["split"].removeprefix("val/"): {"loss": r["loss"], "bpb": r["bpb"]} for r in records}}


def _finish(run: _Run, state: dict, end: int, last_eval: dict, log: _StepLog, first_step_time, t_start) -> TrainResult:
    """The summary (written when the run has finished all its steps). MFU counts the timed steps (all
    but the first, which compiles, and those an evaluation interrupted) over their time."""
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
        "epochs": final_step * tokens_per_step / run.train_split_tokens,  # tokens / train split tokens
        "flops": fpt * final_step * tokens_per_step,
        "wall_time_s": run.clock.total(),  # all segments (resumes) together; this one's: segment_wall_time_s
        "segment_wall_time_s": time.time() - t_start,
        "devices": jax.device_count(),
        "xla_flags": backend_xla_flags(),
        "time_to_first_step_s": first_step_time,
        "first_step_s": log.first_step_s,
        "mfu": (log.timed_steps * tokens_per_step * fpt / run.peak_flops / log.train_time
                if log.train_time > 0 else None),
        **{f"val_{k}": v for k, v in last_eval.items()},
    }
    if run.cfg.train.branch_of:  # a cooldown branch: its lineage (`ar-lm cooldown`)
        summary |= {"branch_of": run.cfg.train.branch_of, "branch_step": run.cfg.train.branch_step}
    lineage = lifecycle.read_lineage(run.run_dir)
    if lineage:  # started from another run's parameters (`train.init_from`)
        summary["init_from"] = lineage
    if jax.process_index() == 0 and summary["finished"]:
        rundir.write_summary(run.run_dir, summary)
    return TrainResult(run.run_dir, state, summary)
