"""AdamW with global-norm clipping, a weight-decay mask, and warmup + cosine learning rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ar_lm.config import OptimConfig

EMBEDDING_PARAMS = ("embed", "pos_embed", "unembed")


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    w = cfg.warmup_steps or round(cfg.warmup_frac * total_steps)
    return max(0, min(w, total_steps - 1))


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr(s), s = 0..T-1 the update index: linear warmup lr*(s+1)/W for s < W, then cosine
    lr * (f + (1-f) * (1 + cos(pi * (s-W)/(T-1-W))) / 2), which equals f*lr exactly at the last
    step s = T-1 (Hoffmann et al. 2022: the cosine cycle matches the run's own length)."""
    w = warmup_steps(cfg, total_steps)
    decay_len = max(1, total_steps - 1 - w)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (s + 1) / max(w, 1)
        progress = jnp.clip((s - w) / decay_len, 0.0, 1.0)
        cosine = cfg.lr * (cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
        return jnp.where(s < w, warm, cosine)

    return schedule


def decay_mask(params, decay_embeddings: bool = False):
    """True for matrices that get weight decay: every `*_kernel`, and embeddings if asked.
    Norm scales and biases are never decayed."""

    def decide(path, _):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        if name.endswith("_kernel"):
            return True
        return decay_embeddings and name in EMBEDDING_PARAMS

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW with a unit learning rate, the schedule). The train step multiplies the updates by
    `schedule(step)` of its global step (AdamW's decoupled decay is scaled by the learning rate too), so
    a skipped step advances the schedule while the moments stay as they were."""
    schedule = lr_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            1.0,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: decay_mask(p, cfg.decay_embeddings),
        )
    )
    return optax.chain(*parts), schedule
