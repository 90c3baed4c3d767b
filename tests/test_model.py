"""Model: causality, chain-rule loss, exact parameter counts, equivalent code paths."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_lm.config import ExperimentConfig, ModelConfig
from ar_lm.model import attention as MA
from ar_lm.model import counts as MC
from ar_lm.model import transformer as M
from ar_lm.training.step import loss_fn

CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=16),
    "llama_gqa": ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             max_seq_len=16, tie_embeddings=False),
    "llama_mqa_qknorm": ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=1,
                                    max_seq_len=16, qk_norm=True, d_ff=48),
}


@functools.partial(jax.jit, static_argnums=0)
def logits_of(cfg, params, tokens):
    return M.apply(cfg, params, tokens)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(cfg, params, tokens):
    return jax.value_and_grad(lambda p: loss_fn(p, tokens, ExperimentConfig(model=cfg))[0])(params)


def _tokens(cfg, b=2, l=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, l), 0, cfg.vocab_size)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_causality_logits_and_gradients(name):
    cfg = CONFIGS[name]
    params = M.init_params_jit(cfg, jax.random.key(0))
    tokens = _tokens(cfg)
    t = 5
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % cfg.vocab_size)
    a, b = logits_of(cfg, params, tokens), logits_of(cfg, params, changed)
    np.testing.assert_array_equal(np.asarray(a[:, : t + 1]), np.asarray(b[:, : t + 1]))
    assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the future does change later positions

    # gradient of the logits at position t w.r.t. the input embedding rows: zero for tokens that
    # occur only after t (untied, so the output projection does not feed the embedding gradient)
    cfg = dataclasses.replace(cfg, tie_embeddings=False)
    params = M.init_params_jit(cfg, jax.random.key(0))
    emb_grad = jax.jit(jax.grad(lambda e: M.apply(cfg, dict(params, embed=e), tokens)[0, t].sum()))(params["embed"])
    future_only = set(np.asarray(tokens[0, t + 1 :]).tolist()) - set(np.asarray(tokens[0, : t + 1]).tolist())
    assert future_only
    for tok in future_only:
        assert np.all(np.asarray(emb_grad[tok]) == 0), f"token {tok} only appears after t but has gradient"
    if "pos_embed" in params:
        pos_grad = jax.jit(jax.grad(lambda p: M.apply(cfg, dict(params, pos_embed=p), tokens)[0, t].sum()))(
            params["pos_embed"]
        )
        assert np.all(np.asarray(pos_grad[t + 1 :]) == 0) and np.any(np.asarray(pos_grad[: t + 1]) != 0)
    assert np.any(np.asarray(emb_grad) != 0)


@pytest.mark.parametrize("name", ["gpt2", "llama_mqa_qknorm"])
def test_loss_is_mean_chain_rule_nll(name):
    cfg = CONFIGS[name]
    params = M.init_params_jit(cfg, jax.random.key(0))
    seq = _tokens(cfg, b=2, l=7)
    loss, ce = jax.jit(lambda p, s: loss_fn(p, s, ExperimentConfig(model=cfg)))(params, seq)
    # position by position: log p(x_t | x_<t) from a forward pass on the prefix alone
    total, count = 0.0, 0
    for t in range(1, seq.shape[1]):
        logits_B = logits_of(cfg, params, seq[:, :t])[:, -1]
        for b in range(seq.shape[0]):
            total += -float(jax.nn.log_softmax(logits_B[b])[seq[b, t]])
            count += 1
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
    np.testing.assert_allclose(float(ce), float(loss))


@pytest.mark.parametrize("name", CONFIGS)
def test_param_count_formula_matches_init(name):
    cfg = CONFIGS[name]
    params = M.init_params_jit(cfg, jax.random.key(0))
    counted = sum(x.size for x in jax.tree.leaves(params))
    counts = MC.param_counts(cfg)
    assert counts["total"] == counted
    emb = params["embed"].size + params.get("pos_embed", np.zeros(0)).size + params.get("unembed", np.zeros(0)).size
    assert counts["non_embedding"] == counted - emb


def _stack_layers(params, n_layers):
    """Unscanned params (layer_0..) -> the scanned layout (layers with a leading axis)."""
    layers = [params[f"layer_{i}"] for i in range(n_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


@pytest.mark.parametrize("name,remat", [("gpt2", "none"), ("llama_gqa", "full"), ("llama_mqa_qknorm", "dots"),
                                        ("llama_gqa", "dots_no_batch"), ("gpt2", "auto")])
def test_scan_and_remat_match_unscanned(name, remat):
    base = dataclasses.replace(CONFIGS[name], scan_layers=False)
    params = M.init_params_jit(base, jax.random.key(0))
    tokens = _tokens(base)
    ref_loss, ref_grads = loss_and_grads(base, params, tokens)
    scanned = dataclasses.replace(base, scan_layers=True, remat=remat)
    sparams = _stack_layers(params, base.n_layers)
    loss, grads = loss_and_grads(scanned, sparams, tokens)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, _stack_layers(ref_grads, base.n_layers))


@pytest.mark.parametrize("name", CONFIGS)
def test_attention_implementations_agree(name):
    xla = dataclasses.replace(CONFIGS[name], attention="xla")
    dpa = dataclasses.replace(CONFIGS[name], attention="dot_product")
    params = M.init_params_jit(xla, jax.random.key(0))
    tokens = _tokens(xla)
    l1, g1 = loss_and_grads(xla, params, tokens)
    l2, g2 = loss_and_grads(dpa, params, tokens)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


@pytest.mark.parametrize("heads,kv_heads,bounds", [(4, 4, [0, 4, 8, 12]), (4, 2, [0, 5, 12]), (4, 1, [0, 1, 7, 12]),
                                                   (4, 2, None)])
def test_blocked_causal_attention_matches_masked_attention(heads, kv_heads, bounds):
    """The training path (query blocks that skip the upper triangle, heads-first layout) computes
    the same outputs and gradients as the general masked attention with a causal mask."""
    b, l, dh = 2, 12, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, l, heads, dh))
    k, v = (jax.random.normal(kk, (b, l, kv_heads, dh)) for kk in keys[1:3])
    cotangent = jax.random.normal(keys[3], (b, l, heads, dh))
    pos = jnp.broadcast_to(jnp.arange(l), (b, l))

    def masked(q, k, v):  # xla_attention takes keys and values heads-first, [B, K, S, Dh], as the cache holds them
        return MA.xla_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), MA.attention_mask(pos, pos))

    def blocked(q, k, v):
        return MA.causal_attention(q, k, v, bounds)

    out_ref, vjp_ref = jax.vjp(masked, q, k, v)
    out, vjp = jax.vjp(blocked, q, k, v)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(vjp(cotangent), vjp_ref(cotangent)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_causal_block_bounds_cover_the_sequence():
    for length in (1, 12, 64, 130, 256, 1000, 4096):
        bounds = MA.causal_block_bounds(length)
        assert bounds[0] == 0 and bounds[-1] == length and all(a < b for a, b in zip(bounds, bounds[1:]))
        assert len(bounds) - 1 == max(1, min(8, length // 64))


def test_model_blocked_causal_path_matches_masked_path():
    """Default positions take the blocked causal path, explicit positions the masked path: same loss."""
    cfg = dataclasses.replace(CONFIGS["llama_gqa"], max_seq_len=130)
    params = M.init_params_jit(cfg, jax.random.key(0))
    tokens = _tokens(cfg, b=2, l=130)
    positions = jnp.broadcast_to(jnp.arange(130), (2, 130))
    assert len(MA.causal_block_bounds(130)) == 3  # two query blocks
    blocked = logits_of(cfg, params, tokens)
    masked = jax.jit(lambda p, t: M.apply(cfg, p, t, positions_BxL=positions))(params, tokens)
    np.testing.assert_allclose(blocked, masked, rtol=1e-5, atol=1e-5)


def test_kv_cache_forward_matches_full_forward():
    cfg = CONFIGS["llama_gqa"]
    params = M.init_params_jit(cfg, jax.random.key(0))
    tokens = _tokens(cfg, b=2, l=10)
    full = logits_of(cfg, params, tokens)
    step = jax.jit(functools.partial(M.apply, cfg))
    cache = M.init_cache(cfg, batch=2, length=16)
    kv_pos = jnp.full((2, 16), -1, jnp.int32)
    # prefill 6 tokens, then feed the rest one at a time
    kv_pos = kv_pos.at[:, :6].set(jnp.arange(6))
    logits, cache = step(params, tokens[:, :6], positions_BxL=jnp.broadcast_to(jnp.arange(6), (2, 6)),
                            cache=cache, cache_index=0, kv_positions_BxS=kv_pos)
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
    for t in range(6, 10):
        kv_pos = kv_pos.at[:, t].set(t)
        logits, cache = step(params, tokens[:, t : t + 1], positions_BxL=jnp.full((2, 1), t),
                                cache=cache, cache_index=t, kv_positions_BxS=kv_pos)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_flops_formula_counts_causal_attention_once():
    cfg = CONFIGS["gpt2"]
    L = 16
    f = MC.flops_per_token(cfg, L)
    d, v = cfg.d_model, cfg.vocab_size
    matmul = cfg.n_layers * (4 * d * d + 2 * d * cfg.ff_dim) + d * v
    assert f == 6 * matmul + 6 * cfg.n_layers * d * (L + 1)
    # the attention term grows with context length, the rest does not
    assert MC.flops_per_token(cfg, 2 * L) - f == 6 * cfg.n_layers * d * L


def test_decode_attention_accumulates_scores_in_float32_under_bf16():
    """The KV-cache attention (`xla_attention`) with bfloat16 inputs against the same attention in float32:
    its scores are accumulated and scaled in float32, so what is left is the bf16 rounding of the
    inputs, the probabilities and the output (measured 0.047 here; scores rounded to bf16 gave 0.29)."""
    rng = np.random.default_rng(0)
    b, l, h, kh, dh = 2, 64, 4, 2, 32
    q, k, v = (jnp.asarray(rng.normal(0, 3, s), jnp.bfloat16) for s in [(b, l, h, dh), (b, l, kh, dh), (b, l, kh, dh)])
    pos = jnp.broadcast_to(jnp.arange(l), (b, l))
    mask = MA.attention_mask(pos, pos)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    ref = MA.xla_attention(*(x.astype(jnp.float32) for x in (q,)), *(heads_first(x.astype(jnp.float32)) for x in (k, v)),
                           mask)
    out = MA.xla_attention(q, heads_first(k), heads_first(v), mask)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.1


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])  # tied and untied unembedding
def test_cross_entropy_over_chunks_of_positions_equals_the_whole_with_gradients(name):
    """12 targets in chunks of 5 (the last one padded): the same loss and gradients as all at once, and the
    chunked program never holds float32 logits of all positions."""
    whole = dataclasses.replace(CONFIGS[name], logits_chunk=0)
    chunked = dataclasses.replace(whole, logits_chunk=5)
    params = M.init_params(whole, jax.random.key(0))
    tokens = _tokens(whole, l=13)
    loss, grads = loss_and_grads(whole, params, tokens)
    loss_c, grads_c = loss_and_grads(chunked, params, tokens)
    np.testing.assert_allclose(float(loss_c), float(loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_c, grads)

    def shapes(cfg):
        jaxpr = jax.make_jaxpr(lambda p: loss_and_grads.__wrapped__(cfg, p, tokens))(params)
        return {tuple(v.aval.shape) for eq in _all_eqns(jaxpr.jaxpr) for v in eq.outvars}

    assert (2, 12, whole.vocab_size) in shapes(whole)
    assert (2, 12, whole.vocab_size) not in shapes(chunked) and (2, 5, whole.vocab_size) in shapes(chunked)


def _all_eqns(jaxpr):  # every equation, in nested jaxprs too (pjit, scan, checkpoint, custom_vjp)
    for eq in jaxpr.eqns:
        yield eq
        for param in eq.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _all_eqns(inner)
