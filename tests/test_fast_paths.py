"""Fast paths against the reference path, and the FLOP formula against XLA's own count.

(Attention implementations, scan/unrolled layers and remat policies are compared in test_model.py.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from ar_lm.config import ExperimentConfig, ModelConfig
from ar_lm.model import attention as MA
from ar_lm.model import backend as MB
from ar_lm.model import counts as MC
from ar_lm.model import transformer as M
from ar_lm.training.step import loss_fn


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_flop_formula_matches_compiled_hlo_count(family):
    cfg = ModelConfig(family=family, vocab_size=512, d_model=128, n_layers=2, n_heads=4,
                      n_kv_heads=2 if family == "llama" else 0, max_seq_len=128, scan_layers=False)
    b, l = 4, 128
    params = M.init_params_jit(cfg, jax.random.key(0))
    step = jax.jit(jax.value_and_grad(lambda p, x: loss_fn(p, x, ExperimentConfig(model=cfg))[0]))
    cost = step.lower(params, jnp.zeros((b, l + 1), jnp.int32)).compile().cost_analysis()
    hlo = (cost if isinstance(cost, dict) else cost[0])["flops"]
    ours = MC.flops_per_token(cfg, l) * b * l
    # The formula counts the l(l+1)/2 causal (query, key) pairs at 12 * H * Dh FLOPs each per layer;
    # the blocked attention computes (hi - lo) * hi pairs per query block, the masked part of the
    # diagonal blocks included: add those back, then the rest is elementwise work: within 0-6%
    bounds = MA.causal_block_bounds(l)
    assert len(bounds) == 3  # two query blocks: a quarter of the square is skipped
    computed_pairs = sum((hi - lo) * hi for lo, hi in zip(bounds[:-1], bounds[1:]))
    extra = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * b * (computed_pairs - l * (l + 1) // 2)
    assert 1.0 <= hlo / (ours + extra) <= 1.06, hlo / (ours + extra)


def test_bf16_compute_matches_f32_within_bf16_precision():
    f32 = ModelConfig(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=32,
                      compute_dtype="float32")
    bf16 = dataclasses.replace(f32, compute_dtype="bfloat16")
    params = M.init_params_jit(f32, jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (4, 33), 0, 128)
    grad = lambda c: jax.jit(jax.value_and_grad(lambda p: loss_fn(p, x, ExperimentConfig(model=c))[0]))(params)  # noqa: E731
    (l32, g32), (l16, g16) = grad(f32), grad(bf16)
    assert float(l16) == pytest.approx(float(l32), rel=1e-2)  # bf16 has an 8-bit mantissa
    cos = lambda a, b: float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))  # noqa: E731
    flat32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(g32)])
    flat16 = jnp.concatenate([g.astype(jnp.float32).ravel() for g in jax.tree.leaves(g16)])
    assert cos(flat16, flat32) > 0.99
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # params (and grads) stay float32


def test_auto_policies_pick_the_cpu_fast_path():
    cfg = ModelConfig()
    assert jax.default_backend() == "cpu"
    assert MB.resolve_compute_dtype(cfg) == jnp.float32 and MB.resolve_attention(cfg) == "xla"
    # remat: save matmul outputs under scan on CPU (measured faster), nothing to recompute unrolled
    assert MB.resolve_remat(cfg) == "dots_no_batch"
    assert MB.resolve_remat(dataclasses.replace(cfg, scan_layers=False)) == "none"
    assert MB.cpu_compiler_options() == {"xla_backend_optimization_level": 1}
