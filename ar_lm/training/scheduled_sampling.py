"""Scheduled sampling (Bengio et al. 2015), the parallel two-pass form for transformers.

Bengio et al. decay the probability eps_i of feeding the TRUE token at step i: linear eps_i = max(eps, k - c i),
exponential eps_i = k^i (k < 1), inverse sigmoid eps_i = k / (k + exp(i / k)) (k >= 1). Here the schedule is
the probability of feeding the MODEL's token, p(i) = end + (start - end) * d(i), with the decay d(i):

- ``linear``: d(i) = max(0, 1 - i / k) (p reaches `ss_end` at step k),
- ``exponential``: d(i) = k^i,
- ``inverse_sigmoid``: d(i) = k / (k + exp(i / k)) (so p(0) = end + (start - end) k / (k + 1)).

The step: pass 1 applies the model to the true inputs under `stop_gradient` and takes its prediction at
every position (argmax, or a sample); input t >= 1 becomes the prediction made at t - 1 with probability
p(i), position 0 stays true (`mix_inputs`); pass 2 is the plain loss on the mixed inputs against the true
targets (document segments, under `data.document_mask`, stay those of the true inputs).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ar_lm.config import ExperimentConfig, TrainConfig
from ar_lm.model.transformer import apply

SS_METRICS = ("ss_prob", "ss_replaced")  # the step's metrics under scheduled sampling (metrics.jsonl train records)


def ss_probability(t: TrainConfig, step: jax.Array) -> jax.Array:
    """p(step): the probability of feeding the model's own token at optimizer step `step` (0-based)."""
    i, k = jnp.asarray(step, jnp.float32), jnp.float32(t.ss_k)
    if t.ss_schedule == "linear":
        decay = jnp.maximum(0.0, 1.0 - i / k)
    elif t.ss_schedule == "exponential":
        decay = k ** i
    elif t.ss_schedule == "inverse_sigmoid":
        decay = k / (k + jnp.exp(i / k))
    else:
        raise ValueError(f"no scheduled sampling under train.ss_schedule={t.ss_schedule!r}")
    return jnp.float32(t.ss_end) + jnp.float32(t.ss_start - t.ss_end) * decay


def mix_inputs(inputs_BxL: jax.Array, predictions_BxL: jax.Array, key: jax.Array, prob: jax.Array):
    """(mixed inputs, replaced mask): mixed[:, t] = predictions[:, t-1] where Bernoulli(prob) says so (t >= 1),
    else inputs[:, t]; position 0 is always the true token."""
    shifted_BxL = jnp.concatenate([inputs_BxL[:, :1], predictions_BxL[:, :-1].astype(inputs_BxL.dtype)], axis=1)
    coin_BxL = jax.random.bernoulli(key, prob, inputs_BxL.shape)
    replaced_BxL = coin_BxL & (jnp.arange(inputs_BxL.shape[1]) > 0)[None, :]
    return jnp.where(replaced_BxL, shifted_BxL, inputs_BxL), replaced_BxL


def ss_inputs(cfg: ExperimentConfig, params, inputs_BxL: jax.Array, step: jax.Array, micro: jax.Array,
              segment_ids_BxL: Optional[jax.Array] = None):
    """Pass 1 and the mixing for one micro-batch: (mixed inputs, p(step), fraction of inputs replaced). The
    randomness is keyed by (train.seed, step, micro-batch index), so a step is reproducible on resume."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed ^ 0x55AA), step), micro)
    k_token, k_mix = jax.random.split(key)
    logits_BxLxV = apply(cfg.model, jax.lax.stop_gradient(params), inputs_BxL, segment_ids_BxL=segment_ids_BxL)
    logits_BxLxV = jax.lax.stop_gradient(logits_BxLxV)
    if cfg.train.ss_token == "sample":
        predictions_BxL = jax.random.categorical(k_token, logits_BxLxV, axis=-1)
    else:
        predictions_BxL = jnp.argmax(logits_BxLxV, axis=-1)
    prob = ss_probability(cfg.train, step)
    mixed_BxL, replaced_BxL = mix_inputs(inputs_BxL, predictions_BxL, k_mix, prob)
    return jax.lax.stop_gradient(mixed_BxL), prob, jnp.mean(replaced_BxL.astype(jnp.float32))
