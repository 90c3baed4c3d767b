"""The loss and the jitted train step (gradient accumulation, clipping, non-finite handling)."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ar_lm.config import ExperimentConfig
from ar_lm.model.attention import document_segment_ids
from ar_lm.model.backend import cpu_compiler_options
from ar_lm.model.transformer import apply
from ar_lm.parallel.mesh import logical_rules, logical_sharding, make_mesh, mesh_context
from ar_lm.training.optimizer import run_optimizer
from ar_lm.training.state import abstract_state, state_shardings


def window_segment_ids(cfg: ExperimentConfig, inputs_BxL: jax.Array, eos_id: Optional[int]) -> Optional[jax.Array]:
    """The segment ids of training windows under `data.document_mask` (None when it is off): derived from
    the window's own tokens in the jitted step (`document_segment_ids`, one cumsum), so a batch stays one
    int array; `eos_id` is the dataset's end-of-document id (`TokenDataset.eos_id`)."""
    if not cfg.data.document_mask:
        return None
    if eos_id is None:
        raise ValueError("data.document_mask needs the dataset's eos_id")
    return document_segment_ids(inputs_BxL, eos_id)


def loss_fn(params, batch_BxL1: jax.Array, cfg: ExperimentConfig, eos_id: Optional[int] = None):
    """Mean next-token cross-entropy over the batch, plus `z_loss * mean(logsumexp^2)`; attention stays
    inside documents under `data.document_mask` (see `window_segment_ids`)."""
    inputs_BxL, targets_BxL = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
    logits_BxLxV = apply(cfg.model, params, inputs_BxL, segment_ids_BxL=window_segment_ids(cfg, inputs_BxL, eos_id))
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    ce = jnp.mean(lse_BxL - target_logit_BxL)
    total = ce
    if cfg.optim.z_loss:
        total = total + cfg.optim.z_loss * jnp.mean(jnp.square(lse_BxL))
    return total, ce


def micro_batches(batch_BxL1: jax.Array, accum: int) -> jax.Array:
    """[accum, B/accum, L+1], micro-batch i = rows i, i + accum, i + 2*accum, ...: strided, so every
    data-parallel device holds its share of every micro-batch (contiguous slices would put each micro-batch
    on a subset of the devices and reshard it every micro-step)."""
    return batch_BxL1.reshape(-1, accum, batch_BxL1.shape[-1]).swapaxes(0, 1)


def _grads(cfg: ExperimentConfig, params, batch_BxL1, eos_id: Optional[int]):
    """(mean cross-entropy, gradients) over the batch, accumulated over `optim.grad_accum` micro-batches."""
    accum = cfg.optim.grad_accum
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (_, ce), grads = grad_fn(params, batch_BxL1, cfg, eos_id)
        return ce, grads

    def body(carry, mb):
        (_, ce_i), g_i = grad_fn(params, mb, cfg, eos_id)
        return jax.tree.map(jnp.add, carry, (g_i, ce_i)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
    (grads, ce), _ = jax.lax.scan(body, zeros, micro_batches(batch_BxL1, accum))
    return ce / accum, jax.tree.map(lambda g: g / accum, grads)


def make_train_step(cfg: ExperimentConfig, tx, schedule, shardings, batch_sharding,
                    eos_id: Optional[int] = None) -> Callable:
    """The jitted step. `tx` is the optimizer with a unit learning rate: the step scales its updates by
    `schedule(step)` of the global step, so the applied and the logged learning rate are one, and a
    skipped (non-finite) step still advances the schedule: it ends at the last step. `eos_id`: the
    dataset's end-of-document id (needed by `data.document_mask`)."""
    nan_steps = np.asarray(cfg.train.debug_nan_steps, np.int32)

    def step_fn(state, batch_BxL1):
        params = state["params"]
        ce, grads = _grads(cfg, params, batch_BxL1, eos_id)
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
                   **{k: new_state[k] for k in ("bad_step", "skips", "n_skipped")}}
        return new_state, metrics

    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
        compiler_options=cpu_compiler_options(),
    )


def compile_train_step(cfg: ExperimentConfig, eos_id: Optional[int] = None):
    """Compile the train step for `cfg` without creating any arrays (for memory and cost
    analysis): returns (compiled step, abstract state with its shardings)."""
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    tx, schedule = run_optimizer(cfg)
    shardings = state_shardings(cfg, tx, mesh, rules)
    state = abstract_state(cfg, tx, shardings)
    batch_sh = logical_sharding(mesh, rules, ("batch", "length"))
    batch = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), np.int32, sharding=batch_sh)
    with mesh_context(mesh, rules):
        return make_train_step(cfg, tx, schedule, shardings, batch_sh, eos_id).lower(state, batch).compile(), state
