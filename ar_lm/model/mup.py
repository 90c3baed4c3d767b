"""Parametrizations: standard (`sp`) and the maximal-update parametrization (`mup`; Yang et al. 2022,
"Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer", Table 3,
Adam), defined against a base shape of width `mup_base_width` where μP equals SP.

With width multiplier m = d_model / mup_base_width, μP changes, relative to SP:

- hidden weights (matrix-like: two width dimensions, e.g. embed x mlp): init std / sqrt(m) and Adam
  learning rate / m;
- the output logits: multiplied by 1/m (the output layer's learning rate and init stay);
- attention: scores scaled by sqrt(base_dh) / dh instead of 1/sqrt(dh), base_dh = `mup_base_head_dim`
  (0: this model's head dim, so a ladder that widens by adding heads keeps 1/sqrt(dh));
- input weights (token and position embeddings), biases and norm gains: unchanged (vector-like).

A parameter's kind comes from its logical axes (`param_kind`), not its name: the width dimensions
are `embed`, `mlp` and the attention width (`heads`/`kv_heads` with `head_dim`, one dimension).
Only width is covered: depth keeps SP's 1/sqrt(2 n_layers) residual-output init, and no transfer
across depth is claimed.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from ar_lm.config import ModelConfig

WIDTH_GROUPS = ({"embed"}, {"mlp"}, {"heads", "kv_heads", "head_dim"})


def width_mult(cfg: ModelConfig) -> float:
    return cfg.d_model / cfg.mup_base_width if cfg.parametrization == "mup" else 1.0


def hidden_init_std(cfg: ModelConfig, std: float) -> float:
    """Init std of a hidden (matrix-like) weight whose SP std is `std`."""
    return std / math.sqrt(width_mult(cfg))


def output_multiplier(cfg: ModelConfig) -> float:
    return 1.0 / width_mult(cfg)


def query_multiplier(cfg: ModelConfig) -> float:
    """What queries are multiplied by before the usual 1/sqrt(dh): sqrt(base_dh / dh) under μP."""
    if cfg.parametrization != "mup" or not cfg.mup_base_head_dim:
        return 1.0
    return math.sqrt(cfg.mup_base_head_dim / cfg.head_dim)


def param_kind(axes: tuple) -> str:
    """"hidden" (two width dimensions), "vector" (at most one; embeddings, readout, biases, norms)."""
    names = set(a for a in axes if a is not None)
    return "hidden" if sum(bool(names & g) for g in WIDTH_GROUPS) >= 2 else "vector"


def lr_multipliers(cfg: ModelConfig, boxed_params):
    """Per-parameter Adam learning-rate multipliers (a pytree like the params) from the parameters'
    logical axes (`boxed_params`: flax `LogicallyPartitioned` leaves, shapes suffice): 1/m for hidden
    weights under μP, 1 otherwise; None under SP (no scaling at all)."""
    if cfg.parametrization != "mup":
        return None
    m = width_mult(cfg)
    return jax.tree.map(lambda p: 1.0 / m if param_kind(p.names) == "hidden" else 1.0, boxed_params,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
