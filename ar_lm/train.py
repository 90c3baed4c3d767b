"""Training: sharded state, the jitted train step, and the loop.

The state is ``{"params", "opt_state", "step", "skips", "bad_step"}``, created directly sharded
(`jax.jit` with `out_shardings`, no full copy on one device). The step is jitted with
`in_shardings`/`out_shardings` over the (data, fsdp, tensor) mesh and donates the old state.
The loop dispatches step N before reading the metrics of step N-1, so the host never blocks on
the device; non-finite losses are caught on device and read only at log/eval/checkpoint points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ar_lm import model as model_lib
from ar_lm import rundir
from ar_lm.checkpoint import Checkpointer
from ar_lm.config import ExperimentConfig, to_dict, validate
from ar_lm.data import TokenDataset
from ar_lm.errors import UserError, require
from ar_lm.evaluate import evaluate, make_eval_step
from ar_lm.metrics import RunLogger, peak_flops_per_device
from ar_lm.optimizer import make_optimizer
from ar_lm.pipeline import TrainIterator, eval_batches, train_dataset
from ar_lm.sharding import data_parallel_size, logical_rules, logical_sharding, make_mesh, replicated, tree_shardings


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/Inf (policy `stop`, or too many skips)."""


class PreemptionGuard:
    """On SIGTERM (what preemptible TPU VMs and Slurm send) or SIGINT: finish the current step,
    checkpoint, and stop; a second signal exits at once (status 128 + signal). All processes of a
    multi-host run stop at the same step: the flag is all-gathered before it is acted on."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signal is not None:
            os._exit(128 + signum)
        self.signal = signum
        print(f"\n[train] received {signal.Signals(signum).name}: checkpointing after this step "
              "(send it again to abort at once)", file=sys.stderr, flush=True)

    def __call__(self, step: int) -> bool:
        flag = self.signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def mesh_context(mesh, rules):
    """Mesh and logical-axis rules for tracing (activation sharding constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


# ---------------------------------------------------------------------------------------------
# State


def param_shardings(cfg: ExperimentConfig, mesh, rules):
    boxed = jax.eval_shape(functools.partial(model_lib.init_params, cfg.model, boxed=True), jax.random.key(0))
    return tree_shardings(mesh, rules, boxed)


def abstract_params(cfg: ExperimentConfig, mesh, rules):
    """ShapeDtypeStructs (with shardings) of the parameters."""
    shapes = jax.eval_shape(functools.partial(model_lib.init_params, cfg.model), jax.random.key(0))
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, param_shardings(cfg, mesh, rules)
    )


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


def state_shardings(cfg: ExperimentConfig, tx: optax.GradientTransformation, mesh, rules):
    p_sh = param_shardings(cfg, mesh, rules)
    p_shapes = jax.eval_shape(functools.partial(model_lib.init_params, cfg.model), jax.random.key(0))
    opt_shapes = jax.eval_shape(tx.init, p_shapes)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, opt_shapes, p_sh, transform_non_params=lambda _: replicated(mesh)
    )
    rep = replicated(mesh)
    return {"params": p_sh, "opt_state": opt_sh, "step": rep, "skips": rep, "bad_step": rep, "n_skipped": rep}


def _fresh_state(cfg: ExperimentConfig, tx, rng) -> dict:
    params = model_lib.init_params(cfg.model, rng)
    zero = jnp.zeros((), jnp.int32)
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": zero,
        "skips": zero,  # consecutive non-finite steps
        "bad_step": jnp.full((), -1, jnp.int32),  # first non-finite step (-1: none)
        "n_skipped": zero,  # non-finite steps skipped in total
    }


def init_state(cfg: ExperimentConfig, tx, shardings, rng) -> dict:
    return jax.jit(functools.partial(_fresh_state, cfg, tx), out_shardings=shardings,
                   compiler_options=model_lib.cpu_compiler_options())(rng)


def abstract_state(cfg: ExperimentConfig, tx, shardings) -> Any:
    shapes = jax.eval_shape(functools.partial(_fresh_state, cfg, tx), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


# ---------------------------------------------------------------------------------------------
# Loss and step


def loss_fn(params, batch_BxL1: jax.Array, cfg: ExperimentConfig):
    """Mean next-token cross-entropy over the batch, plus `z_loss * mean(logsumexp^2)`."""
    inputs_BxL, targets_BxL = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
    logits_BxLxV = model_lib.apply(cfg.model, params, inputs_BxL)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    ce = jnp.mean(lse_BxL - target_logit_BxL)
    total = ce
    if cfg.optim.z_loss:
        total = total + cfg.optim.z_loss * jnp.mean(jnp.square(lse_BxL))
    return total, ce


def make_train_step(cfg: ExperimentConfig, tx, schedule, shardings, batch_sharding) -> Callable:
    accum = cfg.optim.grad_accum
    nan_steps = jnp.asarray(cfg.train.debug_nan_steps or (-2,), jnp.int32)

    def step_fn(state, batch_BxL1):
        params = state["params"]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (_, ce), grads = grad_fn(params, batch_BxL1, cfg)
        else:
            micro = batch_BxL1.reshape(accum, -1, batch_BxL1.shape[-1])

            def body(carry, mb):
                (_, ce_i), g_i = grad_fn(params, mb, cfg)
                return jax.tree.map(jnp.add, carry, (g_i, ce_i)), None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
            (grads, ce), _ = jax.lax.scan(body, zeros, micro)
            grads, ce = jax.tree.map(lambda g: g / accum, grads), ce / accum
        # fault injection for tests: a NaN loss at the configured (1-based) steps
        poison = jnp.where(jnp.isin(state["step"] + 1, nan_steps), jnp.nan, 1.0)
        ce = ce * poison
        grads = jax.tree.map(lambda g: g * poison, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(ce) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        step = state["step"] + 1
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": step,
            "skips": jnp.where(finite, 0, state["skips"] + 1),
            "bad_step": jnp.where((state["bad_step"] < 0) & ~finite, step, state["bad_step"]),
            "n_skipped": state["n_skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = {"loss": ce, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite,
                   **{k: new_state[k] for k in ("bad_step", "skips", "n_skipped")}}
        return new_state, metrics

    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
        compiler_options=model_lib.cpu_compiler_options(),
    )


def compile_train_step(cfg: ExperimentConfig):
    """Compile the train step for `cfg` without creating any arrays (for memory and cost
    analysis): returns (compiled step, abstract state with its shardings)."""
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    tx, schedule = make_optimizer(cfg.optim, cfg.total_steps)
    shardings = state_shardings(cfg, tx, mesh, rules)
    state = abstract_state(cfg, tx, shardings)
    batch_sh = logical_sharding(mesh, rules, ("batch", "length"))
    batch = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), np.int32, sharding=batch_sh)
    with mesh_context(mesh, rules):
        return make_train_step(cfg, tx, schedule, shardings, batch_sh).lower(state, batch).compile(), state


# ---------------------------------------------------------------------------------------------
# The loop


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


def _train_locked(cfg, run_dir, dataset, stop_after, stop_requested) -> TrainResult:
    t_start = time.time()
    mesh, rules = check_parallelism(cfg)
    total = cfg.total_steps
    tx, schedule = make_optimizer(cfg.optim, total)
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
        if start is not None and start >= total and rundir.read_summary(run_dir):
            ckpt.close()  # finished already: nothing to do
            return TrainResult(run_dir, None, rundir.read_summary(run_dir))
        if start is not None:
            state, data_state = ckpt.restore(start, abstract_state(cfg, tx, shardings))
            data_iter.set_state(data_state)
        else:
            start = 0
            state = init_state(cfg, tx, shardings, jax.random.key(cfg.train.seed))
    if pidx == 0:
        rundir.write_config(run_dir, cfg)
        rundir.copy_tokenizer(run_dir, dataset.path, dataset.meta)

    step_fn = make_train_step(cfg, tx, schedule, shardings, batch_sharding)
    eval_fn = make_eval_step(cfg, shardings["params"], batch_sharding)
    val = eval_batches(dataset, cfg.data.seq_len, cfg.data.batch_size, cfg.train.eval_batches, "val", pidx, pcount)
    token_bytes = jnp.asarray(dataset.token_bytes())
    counts = model_lib.param_counts(cfg.model)
    fpt = model_lib.flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops_per_device(cfg.logging.peak_flops) * jax.device_count()
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    logger = RunLogger(run_dir, to_dict(cfg), cfg.logging, total, resume_step=start)

    end = total if stop_after is None else min(total, stop_after)
    last_eval: dict = {}
    pending = None  # (step, metrics on device) of the last dispatched log step
    t_log, steps_since_log, train_time = time.perf_counter(), 0, 0.0
    first_step_time = None

    def flush_pending():
        nonlocal pending, t_log, steps_since_log, train_time
        if pending is None:
            return
        step, metrics = pending
        pending = None
        m = jax.device_get(metrics)
        now = time.perf_counter()
        dt = now - t_log
        train_time += dt
        tps = steps_since_log * tokens_per_step / dt if dt > 0 else 0.0
        t_log, steps_since_log = now, 0
        record = {
            "step": step, "split": "train", "loss": float(m["loss"]), "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]), "tokens": step * tokens_per_step,
            "tokens_per_s": tps, "mfu": tps * fpt / peak, "skipped": not bool(m["finite"]), "skipped_total": int(m["n_skipped"]),
        }
        logger.log(record)
        _check_finite(cfg, int(m["bad_step"]), int(m["skips"]))

    try:
        for step in range(start, end):
            batch = next(data_iter)
            global_batch = jax.make_array_from_process_local_data(batch_sharding, batch)
            with mesh_context(mesh, rules):
                state, metrics = step_fn(state, global_batch)
            if first_step_time is None:
                first_step_time = time.time() - t_start
            done = step + 1
            steps_since_log += 1
            flush_pending()  # step N is dispatched: now read step N-1's metrics
            if done % cfg.train.log_every == 0 or done == end:
                pending = (done, metrics)
            is_last = done == total
            if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or is_last:
                flush_pending()
                with mesh_context(mesh, rules):
                    last_eval = evaluate(eval_fn, state["params"], val, batch_sharding, token_bytes)
                logger.log({"step": done, "split": "val", **last_eval})
                t_log = time.perf_counter()  # eval time is not training time
            stopping = done == end or (stop_requested is not None and stop_requested(done))
            if (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0) or stopping:
                flush_pending()
                _check_finite(cfg, *(int(x) for x in jax.device_get((state["bad_step"], state["skips"]))))
                ckpt.save(done, state, data_iter.get_state())
            if stopping:
                ckpt.wait()  # synchronous: the checkpoint is committed before we return
                break
        flush_pending()
        ckpt.wait()
    finally:
        ckpt.close()
        logger.close()

    final_step = int(jax.device_get(state["step"]))
    summary = {
        "step": final_step,
        "total_steps": total,
        "finished": final_step >= total,
        "preempted": final_step < end,
        "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "flops_per_token": fpt,
        "tokens": final_step * tokens_per_step,
        "flops": fpt * final_step * tokens_per_step,
        "wall_time_s": time.time() - t_start,
        "time_to_first_step_s": first_step_time,
        "mfu": (final_step - start) * tokens_per_step * fpt / peak / train_time if train_time > 0 else None,
        **{f"val_{k}": v for k, v in last_eval.items()},
    }
    if pidx == 0 and summary["finished"]:
        rundir.write_summary(run_dir, summary)
    return TrainResult(run_dir, state, summary)


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
