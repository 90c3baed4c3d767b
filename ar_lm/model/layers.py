"""Building blocks: parameters with logical axes, RMSNorm, LayerNorm, RoPE, and the MLP.

Shapes are in names: B batch, L length, D d_model, N heads, Dh head dim, F mlp width.
Every parameter carries logical axis names so that sharding is a rule table (`ar_lm.parallel.mesh`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_lm.config import ModelConfig
from ar_lm.model.backend import resolve_compute_dtype
from ar_lm.model.mup import hidden_init_std
from ar_lm.model.quantize import matmul

Array = jax.Array


def param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale (Zhang & Sennrich 2019), computed in float32."""

    eps: float
    param_dtype: Any
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias (Ba et al. 2016), computed in float32."""

    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (d,), ("norm",), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (d,), ("norm",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def hidden_initializers(cfg: ModelConfig):
    """(init of the hidden matrices, init of the residual-output projections: std / sqrt(2 n_layers), GPT-2),
    each scaled for the parametrization (`mup.hidden_init_std`)."""
    return (nn.initializers.normal(hidden_init_std(cfg, cfg.init_std)),
            nn.initializers.normal(hidden_init_std(cfg, cfg.init_std / (2 * cfg.n_layers) ** 0.5)))


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    param_dtype = jnp.dtype(cfg.param_dtype)
    if cfg.family == "gpt2":
        return LayerNorm(cfg.norm_eps, param_dtype, name=name)
    return RMSNorm(cfg.norm_eps, param_dtype, name=name)


def rope(x_BxLxNxDh: Array, positions_BxL: Array, theta: float) -> Array:
    """Rotary position embedding (Su et al. 2021), rotate-half layout as in HF Llama."""
    dh = x_BxLxNxDh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    angles_BxLxDh2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    angles_BxLxDh = jnp.concatenate([angles_BxLxDh2, angles_BxLxDh2], axis=-1)[:, :, None, :]
    x = x_BxLxNxDh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles_BxLxDh) + rotated * jnp.sin(angles_BxLxDh)).astype(x_BxLxNxDh.dtype)


class Mlp(nn.Module):
    """gpt2: W2 gelu(W1 x + b1) + b2 (tanh GELU). llama: W2 (silu(Wg x) * (Wu x)) (SwiGLU)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        dtype = resolve_compute_dtype(cfg)
        pdt = jnp.dtype(cfg.param_dtype)
        d, f = cfg.d_model, cfg.ff_dim
        init, out_init = hidden_initializers(cfg)

        def dense(name, shape, axes, kernel_init, x):
            return matmul(x, param(self, f"{name}_kernel", kernel_init, shape, axes, pdt), dtype)

        if cfg.family == "gpt2":
            h_BxLxF = dense("wi", (d, f), ("embed", "mlp"), init, x_BxLxD)
            h_BxLxF = h_BxLxF + param(self, "wi_bias", nn.initializers.zeros, (f,), ("mlp",), pdt).astype(dtype)
            h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)
        else:
            gate_BxLxF = dense("gate", (d, f), ("embed", "mlp"), init, x_BxLxD)
            up_BxLxF = dense("up", (d, f), ("embed", "mlp"), init, x_BxLxD)
            h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
        y_BxLxD = dense("wo", (f, d), ("mlp", "embed"), out_init, h_BxLxF)
        if cfg.family == "gpt2":
            y_BxLxD = y_BxLxD + param(self, "wo_bias", nn.initializers.zeros, (d,), ("norm",), pdt).astype(dtype)
        return y_BxLxD
