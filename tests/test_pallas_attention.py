"""The Pallas (splash) attention kernel, run in Pallas interpret mode on CPU: same outputs and gradients as
the XLA attentions, at lengths it pads to a multiple of 128 too, and inside the model; `auto` picks it on TPU."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_lm.config import ExperimentConfig, ModelConfig
from ar_lm.model import attention as MA
from ar_lm.model import backend as MB
from ar_lm.model import transformer as M
from ar_lm.model.pallas_attention import pallas_causal_attention
from ar_lm.training.step import loss_fn

# float32 throughout. The kernel's online softmax sums key blocks in another order than the XLA softmax;
# the measured max abs differences over the cases below (outputs O(1), gradients up to ~7) are 4.8e-7 for
# outputs and 3.3e-6 for the gradients of q, k, v, so the tolerances sit 3-4x above them.
OUT_TOL = dict(rtol=1e-5, atol=2e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def _qkvw(b, l, h, kh, dh, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, l, h, dh), dtype)
    k, v = (jax.random.normal(kk, (b, l, kh, dh), dtype) for kk in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], (b, l, h, dh))  # w: a random projection of the output


def _masked(q, k, v):  # the general masked attention with a causal mask; keys and values heads-first
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return MA.xla_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), MA.attention_mask(pos, pos))


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(attn, q, k, v, w):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(w.astype(out.dtype))  # the gradient of sum(out * w) w.r.t. q, k, v


# L=384 runs three 128-blocks (the online softmax across key blocks, the skipped upper triangle), L=300 is
# padded to 384; GQA (4 query heads on 2 kv heads), MHA, MQA
@pytest.mark.parametrize("heads,kv_heads,length", [(4, 2, 384), (2, 2, 384), (4, 1, 300)])
def test_pallas_matches_xla_attention_outputs_and_gradients(heads, kv_heads, length):
    q, k, v, w = _qkvw(1, length, heads, kv_heads, 16)
    out, grads = _value_and_grads(pallas_causal_attention, q, k, v, w)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    for ref in (MA.causal_attention, _masked):
        out_ref, grads_ref = _value_and_grads(ref, q, k, v, w)
        np.testing.assert_allclose(out, out_ref, **OUT_TOL)
        for g, g_ref in zip(grads, grads_ref):
            np.testing.assert_allclose(g, g_ref, **GRAD_TOL)


def test_pallas_keeps_bfloat16_and_accumulates_in_float32():
    """bf16 in, bf16 out, as close to the float32 attention (of the same rounded inputs) as the bf16 rounding of
    the output allows: |out| <= ~2, bf16 spacing 2^-7 there, so 2e-2 (measured max difference 3.8e-3)."""
    q, k, v, _ = _qkvw(1, 128, 4, 2, 16)
    out = jax.jit(pallas_causal_attention)(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    ref = MA.causal_attention(*(x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)


def test_model_with_pallas_attention_matches_xla():
    """A tiny Llama (GQA) with attention=pallas: the same logits, loss and gradients as with attention=xla,
    at a length the kernel pads (100 -> 128; `init_params` runs 8 tokens, padded too)."""
    xla = ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=128, tie_embeddings=False, attention="xla")
    pallas = dataclasses.replace(xla, attention="pallas")
    params = M.init_params_jit(xla, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, M.init_params_jit(pallas, jax.random.key(0)), params)
    batch = jax.random.randint(jax.random.key(1), (2, 101), 0, xla.vocab_size)

    @functools.partial(jax.jit, static_argnums=0)
    def run(cfg, params, batch):
        logits = M.apply(cfg, params, batch[:, :-1])
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch, ExperimentConfig(model=cfg))[0])(params)
        return logits, loss, grads

    logits_ref, loss_ref, grads_ref = run(xla, params, batch)
    logits, loss, grads = run(pallas, params, batch)
    np.testing.assert_allclose(logits, logits_ref, **OUT_TOL)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_ref)


def test_auto_picks_pallas_on_tpu_and_keeps_masked_attention_for_decoding(monkeypatch):
    cfg = ModelConfig(n_heads=4, n_kv_heads=2)
    for backend, expected in (("cpu", "xla"), ("gpu", "cudnn"), ("tpu", "pallas")):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert MB.resolve_attention(cfg) == expected
    # positions of keys given (a KV-cache step): the masked XLA attention, also under pallas
    q, k, v, _ = _qkvw(1, 12, 4, 2, 8)
    pos = jnp.broadcast_to(jnp.arange(12), (1, 12))
    out, _ = MA.attend(dataclasses.replace(cfg, attention="pallas"), q, k, v, pos, None, 0, pos, None)
    np.testing.assert_array_equal(out, _masked(q, k, v))


@pytest.mark.parametrize("kv_heads,kv_len,kv_dh", [(3, 128, 8), (2, 64, 8), (2, 128, 16)])
def test_pallas_rejects_shapes_it_cannot_take_in_one_line(kv_heads, kv_len, kv_dh):
    from ar_lm.errors import UserError

    q = jnp.zeros((1, 128, 4, 8))
    kv = jnp.zeros((1, kv_len, kv_heads, kv_dh))
    with pytest.raises(UserError) as err:
        pallas_causal_attention(q, kv, kv)
    message = str(err.value)
    assert "\n" not in message and "model.attention=pallas cannot take" in message and "model.attention=xla" in message


@pytest.mark.parametrize("mesh_sizes,rules", [((1, 4, 2), "fsdp_tp"), ((2, 4, 1), "fsdp")])
def test_pallas_under_a_sharded_mesh_runs_per_device_and_matches_xla(mesh_sizes, rules):
    """On a mesh the kernel runs inside shard_map over the batch (data, fsdp) and the heads (tensor): same
    outputs and gradients as the masked softmax, with segment ids too, and the compiled program gathers no
    q/k/v (a Pallas kernel has no partitioning rule; unwrapped, XLA would replicate its operands)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ar_lm.config import MeshConfig
    from ar_lm.parallel.mesh import logical_rules, make_mesh, mesh_context

    data, fsdp, tensor = mesh_sizes
    mesh_cfg = MeshConfig(data=data, fsdp=fsdp, tensor=tensor, rules=rules)
    mesh, rules_t = make_mesh(mesh_cfg), logical_rules(mesh_cfg)
    q, k, v, w = _qkvw(8, 256, 4, 2, 16)
    seg = jnp.broadcast_to((jnp.arange(256) >= 100).astype(jnp.int32), (8, 256))
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor" if tensor > 1 else None, None))
    q, k, v, w = (jax.device_put(x, spec) for x in (q, k, v, w))
    with mesh_context(mesh, rules_t):
        out, grads = _value_and_grads(pallas_causal_attention, q, k, v, w)
        seg_out = jax.jit(functools.partial(pallas_causal_attention, segment_ids_BxL=seg))(q, k, v)
        text = jax.jit(pallas_causal_attention).lower(q, k, v).compile().as_text()
    ref, ref_grads = _value_and_grads(_masked, *(np.asarray(x) for x in (q, k, v, w)))
    np.testing.assert_allclose(out, ref, **OUT_TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **GRAD_TOL), grads, ref_grads)
    seg_ref = MA.causal_attention(*(np.asarray(x) for x in (q, k, v)), segment_ids_BxL=seg)
    np.testing.assert_allclose(seg_out, seg_ref, **OUT_TOL)
    assert "all-gather" not in text and "all-to-all" not in text
