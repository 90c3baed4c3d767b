"""Document masking (`data.document_mask`): attention stops at end-of-document tokens and positions restart per
document, in every attention implementation (with GQA); a document's logits equal scoring it alone after an eos;
training and evaluation with it; a resume that changes it is refused."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from ar_lm.config import ExperimentConfig, ModelConfig
from ar_lm.errors import UserError
from ar_lm.model import attention as MA
from ar_lm.model import transformer as M
from ar_lm.model.gpu_attention import gpu_causal_attention
from ar_lm.model.pallas_attention import pallas_causal_attention
from ar_lm.training.evaluate import evaluate_run
from ar_lm.training.loop import train
from ar_lm.training.step import loss_fn

EOS, VOCAB, L = 1, 61, 128  # L=128: two 64-query blocks of the blocked attention, one 128-block of the kernel
# float32: a document scored inside a window and alone differ only by the order of the softmax sums (masked keys
# add exact zeros); the measured max abs difference of logits (|logit| <= 0.84) is 1.8e-7 over all cases
LOGIT_TOL = dict(rtol=1e-5, atol=2e-6)
# outputs O(1), gradients up to ~7: the tolerances of tests/test_pallas_attention.py
OUT_TOL, GRAD_TOL = dict(rtol=1e-5, atol=2e-6), dict(rtol=1e-5, atol=1e-5)


def test_segment_ids_and_positions_restart_at_each_eos():
    tokens = jnp.asarray([[5, 6, EOS, 7, 8, 9, EOS, EOS, 4], [EOS, 3, 3, 3, 3, 3, 3, 3, EOS]])
    seg = MA.document_segment_ids(tokens, EOS)
    np.testing.assert_array_equal(seg, [[0, 0, 1, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1, 1, 2]])
    np.testing.assert_array_equal(MA.segment_positions(seg), [[0, 1, 0, 1, 2, 3, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 0]])


def _windows():
    """Rows: doc A (30 tokens) | eos B...; doc A' (70) | eos B...; doc (5) | eos C (40) | eos B...; eos B...
    (B scored alone). Returns tokens [4, L] and where each row's B segment starts (its eos)."""
    rng = np.random.default_rng(0)
    doc = lambda n: rng.integers(2, VOCAB, n)  # noqa: E731  (no eos inside)
    b = doc(L)
    heads = [doc(30), doc(70), np.concatenate([doc(5), [EOS], doc(40)]), np.zeros(0, np.int64)]
    rows = [np.concatenate([h, [EOS], b[: L - len(h) - 1]]) for h in heads]
    return jnp.asarray(np.stack(rows), jnp.int32), [len(h) for h in heads]


# "xla": the blocked causal attention (two query blocks); "xla_masked": positions given, so the general masked
# path (`xla_attention` with the causal and segment masks); "dot_product": jax.nn.dot_product_attention with the
# segment mask; "pallas": the splash kernel with SegmentIds (interpret mode on CPU)
@pytest.mark.parametrize("impl", ["xla", "xla_masked", "dot_product", "pallas"])
@pytest.mark.parametrize("family,kv_heads", [("gpt2", 4), ("llama", 2)])  # learned positions + MHA, RoPE + GQA
def test_a_document_is_scored_as_if_alone(family, kv_heads, impl):
    cfg = ModelConfig(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads,
                      max_seq_len=L, attention=impl.removesuffix("_masked"), compute_dtype="float32")
    params = M.init_params_jit(cfg, jax.random.key(0))
    tokens, starts = _windows()
    seg = MA.document_segment_ids(tokens, EOS)
    given = {"positions_BxL": MA.segment_positions(seg)} if impl == "xla_masked" else {}
    masked = np.asarray(jax.jit(lambda p, t, s: M.apply(cfg, p, t, segment_ids_BxL=s, **given))(params, tokens, seg))
    plain = np.asarray(jax.jit(lambda p, t: M.apply(cfg, p, t))(params, tokens))
    alone = plain[3]  # [eos, B...] without any mask: B scored alone (no previous document)
    for row, start in enumerate(starts):
        # B's logits equal scoring B alone: unchanged by the previous documents, their tokens and lengths
        np.testing.assert_allclose(masked[row, start:], alone[: L - start], **LOGIT_TOL)
        # the tokens before the first eos (segment 0) see only each other: as without the mask
        first = int(np.argmax(np.asarray(tokens[row]) == EOS))
        np.testing.assert_allclose(masked[row, :first], plain[row, :first], **LOGIT_TOL)
        if start:  # without the mask the previous document does change B's logits
            assert np.abs(plain[row, start:] - alone[: L - start]).max() > 1e-2
    # two windows whose first documents differ (30 vs 70 tokens): B's shared positions agree with each other
    np.testing.assert_allclose(masked[0, 30 : 30 + L - 70], masked[1, 70:], **LOGIT_TOL)


def _qkv_segments(heads, kv_heads, length=L, dh=16):
    keys = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(keys[0], (2, length, heads, dh))
    k, v = (jax.random.normal(kk, (2, length, kv_heads, dh)) for kk in keys[1:3])
    w = jax.random.normal(keys[3], q.shape)  # a random projection of the output
    tokens = jax.random.randint(keys[4], (2, length), 0, 12)  # eos (1) about every 12 tokens
    return q, k, v, w, MA.document_segment_ids(tokens, EOS)


def _reference(q, k, v, seg):  # the general masked softmax: causal and same segment
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    mask = MA.attention_mask(pos, pos) & MA.segment_mask(seg)
    return MA.xla_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


IMPLS = {
    "blocked_default": MA.causal_attention,  # two 64-query blocks at L=128
    "blocked_uneven": functools.partial(MA.causal_attention, bounds=[0, 40, 90, 128]),
    "dot_product": MA.dot_product_attention,
    "pallas": pallas_causal_attention,
    "pallas_gpu": functools.partial(gpu_causal_attention, requested="pallas", interpret=True),  # Triton's, interpreted
}


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(attn, q, k, v, w, seg):
    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, segment_ids_BxL=seg), q, k, v)
    return out, vjp(w)  # the gradient of sum(out * w) w.r.t. q, k, v


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("name", list(IMPLS))
def test_every_causal_implementation_applies_the_segment_mask_with_gradients(name, heads, kv_heads):
    q, k, v, w, seg = _qkv_segments(heads, kv_heads)
    assert int(seg.max()) >= 5  # several documents per row
    out, grads = _value_and_grads(IMPLS[name], q, k, v, w, seg)
    ref, ref_grads = _value_and_grads(lambda q, k, v, segment_ids_BxL: _reference(q, k, v, segment_ids_BxL),
                                      q, k, v, w, seg)
    np.testing.assert_allclose(out, ref, **OUT_TOL)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, **GRAD_TOL)
    plain = IMPLS[name](q, k, v)  # without segments: plain causal, which differs
    assert np.abs(np.asarray(plain) - np.asarray(out)).max() > 1e-1


def test_pallas_pads_segments_at_lengths_it_pads():
    q, k, v, w, seg = _qkv_segments(4, 2, length=100)  # padded to 128 inside
    out = jax.jit(lambda q, k, v, s: pallas_causal_attention(q, k, v, segment_ids_BxL=s))(q, k, v, seg)
    np.testing.assert_allclose(out, _reference(q, k, v, seg), **OUT_TOL)


def test_loss_uses_the_mask_only_when_asked_for():
    model = ModelConfig(family="llama", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                        max_seq_len=L, compute_dtype="float32")
    on = ExperimentConfig(model=model, data=dataclasses.replace(ExperimentConfig().data, document_mask=True))
    off = ExperimentConfig(model=model)
    params = M.init_params_jit(model, jax.random.key(0))
    tokens, _ = _windows()
    batch = jnp.concatenate([tokens, tokens[:, :1]], axis=1)  # [4, L+1]
    logits = M.apply(model, params, batch[:, :-1], segment_ids_BxL=MA.document_segment_ids(batch[:, :-1], EOS))
    logp = jax.nn.log_softmax(logits, axis=-1)
    expected = -float(jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)))
    np.testing.assert_allclose(float(loss_fn(params, batch, on, EOS)[1]), expected, rtol=1e-6)
    assert abs(float(loss_fn(params, batch, off, EOS)[1]) - expected) > 1e-4  # measured 2.8e-4 (mean of 512)
    with pytest.raises(ValueError, match="eos_id"):
        loss_fn(params, batch, on)


def test_training_and_eval_with_document_mask_and_resume_refuses_a_change(tmp_path, byte_data):
    cfg = tiny_config(byte_data, model={"family": "llama", "n_kv_heads": 2, "max_seq_len": 64},
                      data={"document_mask": True, "seq_len": 64},
                      train={"steps": 12, "eval_every": 6, "checkpoint_every": 6})
    result = train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    vals = [r for r in records if r["split"] == "val"]
    assert len(train_losses) == 12 and all(np.isfinite(train_losses)) and train_losses[-1] < train_losses[0] - 0.5
    assert [r["step"] for r in vals] == [6, 12] and vals[-1]["loss"] < vals[0]["loss"]
    assert result.summary["val_loss"] == pytest.approx(vals[-1]["loss"])
    # `ar-lm eval --tokens` scores the windows training evaluated, with the same mask: the last evaluation again
    assert evaluate_run(tmp_path / "run", max_tokens=cfg.train.eval_tokens)["loss"] == pytest.approx(
        vals[-1]["loss"], rel=1e-5)
    off = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, document_mask=False),
                              train=dataclasses.replace(cfg.train, steps=18))
    with pytest.raises(UserError, match=r"was trained with data\.document_mask=True, not False"):
        train(off, tmp_path / "run")
