"""AdamW with global-norm clipping, a weight-decay mask, and the learning-rate schedules (warmup, then
cosine, linear, constant or warmup-stable-decay)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from ar_lm.config import ExperimentConfig, OptimConfig
from ar_lm.errors import require
from ar_lm.model.mup import lr_multipliers
from ar_lm.model.transformer import init_params

EMBEDDING_PARAMS = ("embed", "pos_embed", "unembed")


def warmup_steps(cfg: OptimConfig, total_steps: int, tokens_per_step: int) -> int:
    """W: `warmup_steps`, else `warmup_tokens / tokens_per_step` (rounded), else `warmup_frac * T`; at most T-1."""
    if cfg.warmup_steps:
        w = cfg.warmup_steps
    elif cfg.warmup_tokens:
        w = round(cfg.warmup_tokens / tokens_per_step)
    else:
        w = round(cfg.warmup_frac * total_steps)
    return max(0, min(w, total_steps - 1))


def cooldown_steps(cfg: OptimConfig, total_steps: int) -> int:
    """K, the wsd cooldown's length: `cooldown_steps`, else `cooldown_frac * T` (rounded); 1..T."""
    k = cfg.cooldown_steps or round(cfg.cooldown_frac * total_steps)
    return max(1, min(k, total_steps))


def check_schedule(cfg: ExperimentConfig) -> None:
    """A `wsd` run warms up before it cools down: W < T - K (W = 0 aside), or a UserError. Past that the
    warmup would cross into the cooldown, and the lr would jump back to its peak and end there."""
    o, t = cfg.optim, cfg.total_steps
    if o.schedule != "wsd":
        return
    w, k = warmup_steps(o, t, cfg.tokens_per_step), cooldown_steps(o, t)
    require(w == 0 or w < t - k, f"{cfg.name}: the warmup ({w} steps) does not end before the wsd cooldown starts "
            f"(step {t - k} of {t}): shorten optim.warmup_steps/warmup_tokens/warmup_frac or the cooldown")


COOLDOWN_SHAPES = {  # g(p), p in (0, 1] the cooldown's progress: 1 -> 0 (Hägele et al. 2024, Fig. 3)
    "linear": lambda p: 1 - p,
    "1-sqrt": lambda p: 1 - jnp.sqrt(p),
    "cosine": lambda p: 0.5 * (1 + jnp.cos(jnp.pi * p)),
}


def lr_schedule(cfg: OptimConfig, total_steps: int, tokens_per_step: int = 1) -> optax.Schedule:
    """lr(s), s = 0..T-1 the update index, f = final_lr_frac. Warmup lr*(s+1)/W for s < W, then:

    - cosine: lr * (f + (1-f) * (1 + cos(pi * (s-W)/(T-1-W))) / 2), f*lr exactly at s = T-1 (the
      cycle matches the run's own length, Hoffmann et al. 2022);
    - linear: lr * (f + (1-f) * (1 - (s-W)/(T-1-W)));
    - constant: lr;
    - wsd (warmup-stable-decay; Hägele et al. 2024): lr until the cooldown's first step T-K, then
      lr * (f + (1-f) * g(p)), p = (s - (T-K) + 1) / K, g the `cooldown_shape` (`COOLDOWN_SHAPES`),
      so f*lr exactly at s = T-1. Before T-K it equals a `constant` run's lr bit for bit, which is
      what makes a cooldown branched from a constant trunk (`ar_lm.training.branch`) exact.
    """
    w = warmup_steps(cfg, total_steps, tokens_per_step)
    decay_len = max(1, total_steps - 1 - w)
    k = cooldown_steps(cfg, total_steps)
    shape = COOLDOWN_SHAPES[cfg.cooldown_shape]
    f = cfg.final_lr_frac

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (s + 1) / max(w, 1)
        progress = jnp.clip((s - w) / decay_len, 0.0, 1.0)
        if cfg.schedule == "cosine":
            after = cfg.lr * (f + (1 - f) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
        elif cfg.schedule == "linear":
            after = cfg.lr * (f + (1 - f) * (1 - progress))
        elif cfg.schedule == "constant":
            after = jnp.full_like(s, cfg.lr)
        else:  # wsd
            p = jnp.clip((s - (total_steps - k) + 1) / k, 0.0, 1.0)
            after = jnp.where(s < total_steps - k, cfg.lr, cfg.lr * (f + (1 - f) * shape(p)))
        return jnp.where(s < w, warm, after)

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


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiplies each update leaf by its (static) multiplier: per-parameter learning rates (μP)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def run_optimizer(cfg: ExperimentConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`make_optimizer` for a run: its length, tokens per step and the model's per-parameter multipliers."""
    multipliers = None
    if cfg.model.parametrization != "sp":
        boxed = jax.eval_shape(functools.partial(init_params, cfg.model, boxed=True), jax.random.key(0))
        multipliers = lr_multipliers(cfg.model, boxed)
    return make_optimizer(cfg.optim, cfg.total_steps, cfg.tokens_per_step, multipliers)


def make_optimizer(cfg: OptimConfig, total_steps: int, tokens_per_step: int = 1, multipliers=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW with a unit learning rate, the schedule). The train step multiplies the updates by
    `schedule(step)` of its global step (AdamW's decoupled decay is scaled by the learning rate too), so
    a skipped step advances the schedule while the moments stay as they were."""
    schedule = lr_schedule(cfg, total_steps, tokens_per_step)
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
    if multipliers is not None:  # after AdamW, so decoupled weight decay scales with the group's lr too
        parts.append(scale_by_tree(multipliers))
    return optax.chain(*parts), schedule
