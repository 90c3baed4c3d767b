"""The output layer: final hidden states -> float32 logits, and cross-entropy over chunks of positions.

Logits come from a matmul in the compute dtype with float32 accumulation (`preferred_element_type`), so a
bf16 model's logits keep float32 precision without a float32 copy of the unembedding. `logit_stats` gives
each target's logsumexp and logit over `ModelConfig.logits_chunk` positions at a time (a `lax.scan` of
rematerialised chunks), so [B, L, V] float32 logits never exist whole: per device at most
[B, logits_chunk, V] in the forward pass and again in the backward (Wijmans et al. 2024, "Cut your losses").
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_lm.config import ModelConfig
from ar_lm.model.backend import resolve_compute_dtype
from ar_lm.model.mup import output_multiplier
from ar_lm.model.quantize import matmul

Array = jax.Array


def project(cfg: ModelConfig, x_BxLxD: Array, w, transposed: bool) -> Array:
    """logits [B, L, V] float32 = x @ w (w [D, V], or the tied embedding [V, D] when `transposed`), times the
    muP output multiplier."""
    logits_BxLxV = matmul(x_BxLxD, w, resolve_compute_dtype(cfg), transposed=transposed, out_dtype=jnp.float32)
    if output_multiplier(cfg) != 1.0:  # muP: logits scaled by base_width / width
        logits_BxLxV = logits_BxLxV * output_multiplier(cfg)
    return nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "vocab"))


def unembedding(cfg: ModelConfig, params) -> tuple:
    """(the output weight, whether it is the tied embedding [V, D] rather than an unembedding [D, V])."""
    return (params["embed"], True) if cfg.tie_embeddings else (params["unembed"], False)


def logits(cfg: ModelConfig, params, x_BxLxD: Array) -> Array:
    """Float32 logits of final hidden states (`apply(..., hidden=True)`) with the model's unembedding."""
    return project(cfg, x_BxLxD, *unembedding(cfg, params))


def _stats(cfg: ModelConfig, w, transposed: bool, x_BxLxD: Array, targets_BxL: Array) -> tuple[Array, Array]:
    logits_BxLxV = project(cfg, x_BxLxD, w, transposed)
    target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BxLxV, axis=-1), target_BxL


def logit_stats(cfg: ModelConfig, params, x_BxLxD: Array, targets_BxL: Array) -> tuple[Array, Array]:
    """(logsumexp of the logits [B, L], the target's logit [B, L]); the cross-entropy is their difference.

    Over chunks of `cfg.logits_chunk` positions (0, or L at most one chunk: all at once); the last chunk is
    padded. Each chunk is rematerialised in the backward pass, so only x and the [B, L] results are kept. The
    weight is gathered whole along d_model once, before the chunks (left to the partitioner, an fsdp-sharded
    weight would be gathered again in every chunk, forward and backward, and its gradient reduced as often)."""
    b, l, d = x_BxLxD.shape
    c = cfg.logits_chunk
    w, transposed = unembedding(cfg, params)
    if not c or l <= c:
        return _stats(cfg, w, transposed, x_BxLxD, targets_BxL)
    if isinstance(w, jax.Array):  # not an int8 `QuantizedArray`
        w = nn.with_logical_constraint(w, ("vocab", None) if transposed else (None, "vocab"))
    n = -(-l // c)
    pad = n * c - l
    x_NxBxCxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)
    t_NxBxC = jnp.pad(targets_BxL, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(_, xs):
        return None, _stats(cfg, w, transposed, *xs)

    _, (lse_NxBxC, target_NxBxC) = jax.lax.scan(chunk, None, (x_NxBxCxD, t_NxBxC))
    unchunk = lambda a_NxBxC: a_NxBxC.swapaxes(0, 1).reshape(b, n * c)[:, :l]  # noqa: E731
    return unchunk(lse_NxBxC), unchunk(target_NxBxC)
