"""The train state and its shardings.

The state is ``{"params", "opt_state", "step", "skips", "bad_step", "n_skipped"}``, created directly
sharded (`jax.jit` with `out_shardings`, never a full copy on one device). Parameter shardings come
from the model's logical axes and the mesh's rule table; optimizer moments follow their parameters.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ar_lm.config import ExperimentConfig
from ar_lm.model.backend import cpu_compiler_options
from ar_lm.model.transformer import init_params
from ar_lm.parallel.mesh import replicated, tree_shardings


def param_shardings(cfg: ExperimentConfig, mesh, rules):
    boxed = jax.eval_shape(functools.partial(init_params, cfg.model, boxed=True), jax.random.key(0))
    return tree_shardings(mesh, rules, boxed)


def abstract_params(cfg: ExperimentConfig, mesh, rules):
    """ShapeDtypeStructs (with shardings) of the parameters."""
    shapes = jax.eval_shape(functools.partial(init_params, cfg.model), jax.random.key(0))
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, param_shardings(cfg, mesh, rules)
    )


def state_shardings(cfg: ExperimentConfig, tx: optax.GradientTransformation, mesh, rules):
    p_sh = param_shardings(cfg, mesh, rules)
    p_shapes = jax.eval_shape(functools.partial(init_params, cfg.model), jax.random.key(0))
    opt_shapes = jax.eval_shape(tx.init, p_shapes)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, opt_shapes, p_sh, transform_non_params=lambda _: replicated(mesh)
    )
    rep = replicated(mesh)
    return {"params": p_sh, "opt_state": opt_sh, "step": rep, "skips": rep, "bad_step": rep, "n_skipped": rep}


def _state_around(params, tx) -> dict:
    zero = jnp.zeros((), jnp.int32)
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": zero,
        "skips": zero,  # consecutive non-finite steps
        "bad_step": jnp.full((), -1, jnp.int32),  # first non-finite step (-1: none)
        "n_skipped": zero,  # non-finite steps skipped in total
    }


def _fresh_state(cfg: ExperimentConfig, tx, rng) -> dict:
    return _state_around(init_params(cfg.model, rng), tx)


def init_state(cfg: ExperimentConfig, tx, shardings, rng) -> dict:
    return jax.jit(functools.partial(_fresh_state, cfg, tx), out_shardings=shardings,
                   compiler_options=cpu_compiler_options())(rng)


def abstract_state(cfg: ExperimentConfig, tx, shardings) -> Any:
    shapes = jax.eval_shape(functools.partial(_fresh_state, cfg, tx), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def state_from_params(tx, shardings, params) -> dict:
    """A step-0 train state (fresh optimizer state) around given parameters, placed by `shardings`."""
    return jax.jit(functools.partial(_state_around, tx=tx), out_shardings=shardings)(params)
