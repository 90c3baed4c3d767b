"""GPU attention: which kernel runs (cuDNN for bf16/fp16 causal attention, JAX's Pallas GPU flash kernel for
document masks and the shapes cuDNN cannot take), the Pallas kernel's outputs and gradients (interpret mode on
CPU) against the XLA attention, and prefill through the training kernels."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_lm.config import ModelConfig
from ar_lm.decoding.decoder import prefill
from ar_lm.errors import UserError
from ar_lm.model import attention as MA
from ar_lm.model import backend as MB
from ar_lm.model import transformer as M
from ar_lm.model.gpu_attention import gpu_causal_attention, gpu_kernel

# float32, the tolerances of tests/test_pallas_attention.py (an online softmax sums key blocks in another order)
OUT_TOL = dict(rtol=1e-5, atol=2e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def test_cudnn_is_chosen_for_bf16_causal_attention_and_pallas_for_the_rest(monkeypatch):
    assert gpu_kernel(jnp.bfloat16, 128, segments=False) == "cudnn"
    assert gpu_kernel(jnp.float16, 64, segments=False) == "cudnn"
    for dtype, dh, seg in ((jnp.bfloat16, 64, True),  # document masks: cuDNN would take a dense [B,1,L,L] mask
                           (jnp.float32, 64, False),  # cuDNN's fused kernel takes half precision only
                           (jnp.bfloat16, 256, False), (jnp.bfloat16, 12, False)):  # head dims it cannot take
        assert gpu_kernel(dtype, dh, segments=seg) == "pallas"
    assert gpu_kernel(jnp.bfloat16, 128, segments=False, requested="pallas") == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cfg = ModelConfig(n_heads=4)
    assert MB.resolve_attention(cfg) == "cudnn"
    for impl in ("cudnn", "pallas"):  # both GPU requests go through the GPU module, which picks the kernel
        assert MA.causal_kernel(impl).func is gpu_causal_attention


def test_cudnn_is_refused_off_gpu_in_one_line():
    q = jnp.zeros((1, 128, 4, 16), jnp.bfloat16)
    with pytest.raises(UserError) as err:
        gpu_causal_attention(q, q, q)
    assert "\n" not in str(err.value) and "model.attention=cudnn runs on a GPU only" in str(err.value)


def _qkvw(b, l, h, kh, dh):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, l, h, dh))
    k, v = (jax.random.normal(kk, (b, l, kh, dh)) for kk in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], (b, l, h, dh))


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(attn, q, k, v, w):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(w)


# GQA at a length padded to 256 (two 128-row blocks); MQA at one block
@pytest.mark.parametrize("heads,kv_heads,length", [(4, 2, 200), (2, 1, 128)])
def test_pallas_gpu_kernel_matches_xla_attention_outputs_and_gradients(heads, kv_heads, length):
    q, k, v, w = _qkvw(1, length, heads, kv_heads, 16)
    kernel = functools.partial(gpu_causal_attention, requested="pallas", interpret=True)
    out, grads = _value_and_grads(kernel, q, k, v, w)
    out_ref, grads_ref = _value_and_grads(MA.causal_attention, q, k, v, w)
    assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    np.testing.assert_allclose(out, out_ref, **OUT_TOL)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, **GRAD_TOL)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_prefill_attends_within_the_prompt_as_a_forward_pass_of_each_prompt_alone(attention):
    """Left-padded prompts of 7 and 12 tokens: prefill (the chunk attends within itself by the training kernel,
    padding in its own segment) gives each row's last logits and cache as the prompt's own forward pass;
    splash attention (interpret mode) and the blocked XLA attention alike."""
    cfg = ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=32, attention=attention)
    params = M.init_params_jit(dataclasses.replace(cfg, attention="xla"), jax.random.key(0))
    prompts = [np.arange(3, 10) % 61, (np.arange(12) * 7 + 2) % 61]
    padded = np.zeros((2, 12), np.int32)
    for row, p in enumerate(prompts):
        padded[row, 12 - len(p):] = p
    logits_BxV, cache, kv_pos_BxS = jax.jit(prefill, static_argnums=(0, 4))(cfg, params, jnp.asarray(padded),
                                                                            jnp.asarray([7, 12]), 16)
    for row, p in enumerate(prompts):
        kv_pos_1xS = jnp.where(jnp.arange(16) < len(p), jnp.arange(16), -1)[None]
        alone_1xLxV, alone_cache = M.apply(dataclasses.replace(cfg, attention="xla"), params, jnp.asarray(p)[None],
                                           cache=M.init_cache(cfg, 1, 16), cache_index=0, kv_positions_BxS=kv_pos_1xS)
        np.testing.assert_allclose(logits_BxV[row], alone_1xLxV[0, -1], rtol=1e-5, atol=2e-6)
        slots = np.asarray(kv_pos_BxS[row]) >= 0
        assert slots.sum() == len(p)
        for name in ("k", "v"):  # [layers, K, slots, Dh]: the prompt's keys and values, in order
            np.testing.assert_allclose(np.asarray(cache[name])[:, row][:, :, slots],
                                       alone_cache[name][:, 0, :, : len(p)], rtol=1e-5, atol=2e-6)


def test_gpu_check_script_runs_end_to_end_in_smoke_mode(tmp_path):
    """benchmarks/gpu_check.py (run on an H100 when one is lent) on a tiny model here: every figure present."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--smoke", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    train = result["train"]["smoke"]
    assert train["ms_per_step"] > 0 and train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1
    assert train["cudnn_attention_in_hlo"] is False and train["attention"] == "xla"  # CPU: no cuDNN
    assert [d["batch"] for d in result["decode"]["smoke"]] == [1, 32]
    assert all(d["tokens_per_s"] > 0 for d in result["decode"]["smoke"])
