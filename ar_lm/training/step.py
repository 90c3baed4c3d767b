"""The loss and the jitted train step (gradient accumulation, clipping, non-finite handling)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ar_lm.config import ExperimentConfig
from ar_lm.data.dataset import NO_LOSS_BIT
from ar_lm.model import head
from ar_lm.model.attention import document_segment_ids
from ar_lm.model.backend import cpu_compiler_options, platform
from ar_lm.model.transformer import apply
from ar_lm.parallel.mesh import logical_rules, logical_sharding, make_mesh, mesh_context
from ar_lm.training.optimizer import run_optimizer
from ar_lm.training.scheduled_sampling import SS_METRICS, ss_inputs
from ar_lm.training.state import abstract_state, state_shardings

MEMORY_HEADROOM = 0.9  # of a device's memory a step may plan for (the allocator and other buffers take the rest)


def window_segment_ids(cfg: ExperimentConfig, inputs_BxL: jax.Array, eos_id: Optional[int]) -> Optional[jax.Array]:
    """The segment ids of training windows under `data.document_mask` (None when it is off): derived from
    the window's own tokens in the jitted step (`document_segment_ids`, one cumsum), so a batch stays one
    int array; `eos_id` is the dataset's end-of-document id (`TokenDataset.eos_id`)."""
    if not cfg.data.document_mask:
        return None
    if eos_id is None:
        raise ValueError("data.document_mask needs the dataset's eos_id")
    return document_segment_ids(inputs_BxL, eos_id)


def split_loss_mask(batch_BxL1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(tokens [B, L+1], target weights [B, L] float32) of a batch whose tokens may carry `NO_LOSS_BIT` (a chat
    dataset's loss mask, packed by the pipeline): weight 0 on targets without loss. Without a mask: the batch
    itself and all ones."""
    no_loss_BxL1 = (batch_BxL1 & NO_LOSS_BIT) != 0
    return batch_BxL1 & (NO_LOSS_BIT - 1), (~no_loss_BxL1[:, 1:]).astype(jnp.float32)


def masked_mean(x_BxL: jax.Array, weight_BxL: jax.Array) -> jax.Array:
    """sum(w x) / max(sum w, 1), the mean over the targets with loss; exactly mean(x) when every weight is 1."""
    masked = jnp.sum(x_BxL * weight_BxL) / jnp.maximum(jnp.sum(weight_BxL), 1.0)
    return jnp.where(jnp.all(weight_BxL > 0), jnp.mean(x_BxL), masked)


def loss_fn(params, batch_BxL1: jax.Array, cfg: ExperimentConfig, eos_id: Optional[int] = None,
            fed_BxL: Optional[jax.Array] = None):
    """Mean next-token cross-entropy (over chunks of positions: `head.logit_stats`) over the batch's targets
    with loss (all but a chat dataset's masked ones, `split_loss_mask`), plus `z_loss * mean(logsumexp^2)`
    over the same; attention stays inside documents under `data.document_mask` (see `window_segment_ids`).
    `fed_BxL`: inputs fed instead of the true ones (scheduled sampling's mixed inputs; targets and segments
    stay the true ones)."""
    batch_BxL1, weight_BxL = split_loss_mask(batch_BxL1)
    inputs_BxL, targets_BxL = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
    segment_ids_BxL = window_segment_ids(cfg, inputs_BxL, eos_id)
    fed_BxL = inputs_BxL if fed_BxL is None else fed_BxL
    x_BxLxD = apply(cfg.model, params, fed_BxL, segment_ids_BxL=segment_ids_BxL, hidden=True)
    lse_BxL, target_logit_BxL = head.logit_stats(cfg.model, params, x_BxLxD, targets_BxL)
    ce = masked_mean(lse_BxL - target_logit_BxL, weight_BxL)
    total = ce
    if cfg.optim.z_loss:
        total = total + cfg.optim.z_loss * masked_mean(jnp.square(lse_BxL), weight_BxL)
    return total, ce


def micro_batches(batch_BxL1: jax.Array, accum: int) -> jax.Array:
    """[accum, B/accum, L+1], micro-batch i = rows i, i + accum, i + 2*accum, ...: strided, so every
    data-parallel device holds its share of every micro-batch (contiguous slices would put each micro-batch
    on a subset of the devices and reshard it every micro-step)."""
    return batch_BxL1.reshape(-1, accum, batch_BxL1.shape[-1]).swapaxes(0, 1)


def _micro_grads(cfg: ExperimentConfig, params, mb_BxL1, eos_id: Optional[int], step, micro):
    """(cross-entropy, gradients, scheduled-sampling metrics) of one micro-batch: the plain loss, or under
    `train.ss_schedule` the two-pass step (`scheduled_sampling.ss_inputs`, then the loss on its mixed inputs)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if cfg.train.ss_schedule == "none":
        (_, ce), grads = grad_fn(params, mb_BxL1, cfg, eos_id)
        return ce, grads, {}
    inputs_BxL = split_loss_mask(mb_BxL1)[0][:, :-1]
    segment_ids_BxL = window_segment_ids(cfg, inputs_BxL, eos_id)
    fed_BxL, prob, replaced = ss_inputs(cfg, params, inputs_BxL, step, micro, segment_ids_BxL)
    (_, ce), grads = grad_fn(params, mb_BxL1, cfg, eos_id, fed_BxL)
    return ce, grads, dict(zip(SS_METRICS, (prob, replaced)))


def loss_shares(mbs_AxBxL1: jax.Array) -> jax.Array:
    """[A] micro-batch weights n_i / mean(n) (n_i: its targets with loss), so that accumulating the weighted
    micro-batch means gives the mean over the whole batch's targets with loss; all exactly 1 without a mask."""
    n_A = jax.vmap(lambda mb: jnp.sum(split_loss_mask(mb)[1]))(mbs_AxBxL1)
    return n_A / jnp.maximum(jnp.sum(n_A) / n_A.shape[0], 1.0)


def _grads(cfg: ExperimentConfig, params, batch_BxL1, eos_id: Optional[int], step=0):
    """(mean cross-entropy, gradients, mean scheduled-sampling metrics) over the batch, accumulated over
    `optim.grad_accum` micro-batches."""
    accum = cfg.optim.grad_accum
    if accum == 1:
        return _micro_grads(cfg, params, batch_BxL1, eos_id, step, 0)

    mbs = micro_batches(batch_BxL1, accum)
    share_A = loss_shares(mbs)

    def body(carry, xs):
        ce_i, g_i, ss_i = _micro_grads(cfg, params, xs[0], eos_id, step, xs[1])
        ce_i, g_i = ce_i * xs[2], jax.tree.map(lambda g: g * xs[2], g_i)  # each micro-batch by its targets
        return jax.tree.map(jnp.add, carry, (g_i, ce_i, ss_i)), None

    ss_zeros = {} if cfg.train.ss_schedule == "none" else {k: jnp.zeros((), jnp.float32) for k in SS_METRICS}
    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), ss_zeros)
    (grads, ce, ss), _ = jax.lax.scan(body, zeros, (mbs, jnp.arange(accum), share_A))
    return ce / accum, jax.tree.map(lambda g: g / accum, grads), jax.tree.map(lambda m: m / accum, ss)


def make_train_step(cfg: ExperimentConfig, tx, schedule, shardings, batch_sharding,
                    eos_id: Optional[int] = None) -> Callable:
    """The jitted step. `tx` is the optimizer with a unit learning rate: the step scales its updates by
    `schedule(step)` of the global step, so the applied and the logged learning rate are one, and a
    skipped (non-finite) step still advances the schedule: it ends at the last step. `eos_id`: the
    dataset's end-of-document id (needed by `data.document_mask`)."""
    nan_steps = np.asarray(cfg.train.debug_nan_steps, np.int32)

    def step_fn(state, batch_BxL1):
        params = state["params"]
        ce, grads, ss_metrics = _grads(cfg, params, batch_BxL1, eos_id, state["step"])
        if nan_steps.size:  # fault injection for tests only: a NaN loss at the configured (1-based) steps
            poison = jnp.where(jnp.isin(state["step"] + 1, nan_steps), jnp.nan, 1.0)
            ce, grads = ce * poison, jax.tree.map(lambda g: g * poison, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(ce) & jnp.isfinite(grad_norm)
        lr = schedule(state["step"])
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
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
        metrics = {"loss": ce, "grad_norm": grad_norm, "lr": lr, "finite": finite,
                   **{k: new_state[k] for k in ("bad_step", "skips", "n_skipped")}, **ss_metrics}
        return new_state, metrics

    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
        compiler_options=cpu_compiler_options(),
    )


def lower_train_step(cfg: ExperimentConfig, mesh, rules, eos_id: Optional[int] = None):
    """Lower the train step for `cfg` on `mesh` from abstract arrays only (for ahead-of-time compilation,
    memory and cost analysis): returns (lowered, abstract params, abstract arguments (state, batch))."""
    tx, schedule = run_optimizer(cfg)
    shardings = state_shardings(cfg, tx, mesh, rules)
    state = abstract_state(cfg, tx, shardings)
    batch_sh = logical_sharding(mesh, rules, ("batch", "length"))
    batch = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), np.int32, sharding=batch_sh)
    with mesh_context(mesh, rules):
        lowered = make_train_step(cfg, tx, schedule, shardings, batch_sh, eos_id).lower(state, batch)
    return lowered, state["params"], (state, batch)


def compiled_memory(compiled) -> dict:
    """Bytes per device of a compiled program (`memory_analysis`): arguments, temporaries, outputs, aliased
    (outputs that reuse donated arguments), code, and their total = arguments + outputs - aliased +
    temporaries + code."""
    mem = compiled.memory_analysis()
    memory = {"arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
              "outputs": mem.output_size_in_bytes, "aliased": mem.alias_size_in_bytes,
              "code": mem.generated_code_size_in_bytes}
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                       + memory["code"])
    return memory


def compile_train_step(cfg: ExperimentConfig, eos_id: Optional[int] = None):
    """Compile the train step for `cfg` on this machine's devices without creating any arrays: returns
    (compiled step, abstract state with its shardings)."""
    lowered, _, (state, _) = lower_train_step(cfg, make_mesh(cfg.mesh), logical_rules(cfg.mesh), eos_id)
    return lowered.compile(), state


REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # most saved first (fastest), least memory last


def fitting_remat(cfg: ExperimentConfig, compile_fn: Callable, capacity: float):
    """`model.remat=auto` resolved by compiling: (cfg with the first policy of REMAT_ORDER whose step needs at
    most `capacity` bytes per device, `compile_fn`'s result for it). `compile_fn(cfg)` -> (bytes per device,
    or None where the compiler refused the program for lack of memory; its result). A config with its remat
    set is compiled as it is; where no policy fits, the last (`full`) is returned."""
    candidates = [cfg] if cfg.model.remat != "auto" else [
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=r)) for r in REMAT_ORDER]
    for candidate in candidates:
        need, result = compile_fn(candidate)
        if need is not None and need <= capacity:
            break
    return candidate, result


def remat_for_device_memory(cfg: ExperimentConfig, eos_id: Optional[int] = None) -> ExperimentConfig:
    """On a GPU/TPU, `model.remat=auto` becomes the fastest policy whose compiled train step fits in
    MEMORY_HEADROOM of the device's memory (`memory_stats()["bytes_limit"]`); unchanged on CPU (see
    `backend.resolve_remat`) and for a remat that is set."""
    if cfg.model.remat != "auto" or platform() == "cpu":
        return cfg
    capacity = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if not capacity:
        return cfg
    chosen, _ = fitting_remat(cfg, lambda c: (compiled_memory(compile_train_step(c, eos_id)[0])["total"], None),
                              MEMORY_HEADROOM * capacity)
    return chosen
