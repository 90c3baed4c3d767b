"""Scheduled sampling (two-pass step, schedules, logging) and exposure-bias evaluation (`ar-lm eval --exposure`)."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from ar_lm.cli import main
from ar_lm.data.dataset import NO_LOSS_BIT, TokenDataset
from ar_lm.data.pipeline import eval_batches
from ar_lm.model.transformer import apply, init_params
from ar_lm.parallel.mesh import logical_rules, logical_sharding, make_mesh, mesh_context
from ar_lm.training.exposure import exposure, make_exposure_step
from ar_lm.training.loop import train
from ar_lm.training.scheduled_sampling import mix_inputs, ss_inputs, ss_probability
from ar_lm.training.state import param_shardings
from ar_lm.training.step import _grads, loss_fn

L, B = 32, 8


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_records(run_dir):
    return [r for r in _records(run_dir) if r["split"] == "train"]


def _ss(cfg, **fields):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **fields))


def test_probability_zero_equals_plain_step_bit_for_bit(tmp_path, byte_data):
    """On 2 data-parallel devices, with gradient accumulation and document masking."""
    plain = tiny_config(byte_data, train={"steps": 3}, mesh={"devices": 2}, optim={"grad_accum": 2},
                        data={"document_mask": True})
    zero = _ss(plain, ss_schedule="linear", ss_start=0.0, ss_end=0.0, ss_k=10.0)
    a, b = train(plain, tmp_path / "plain"), train(zero, tmp_path / "zero")
    ra, rb = _train_records(tmp_path / "plain"), _train_records(tmp_path / "zero")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb] and len(ra) == 3
    assert [r["grad_norm"] for r in ra] == [r["grad_norm"] for r in rb]
    assert all(r["ss_prob"] == 0.0 and r["ss_replaced"] == 0.0 for r in rb)
    assert all("ss_prob" not in r for r in ra)
    pa, pb = jax.device_get(a.state["params"]), jax.device_get(b.state["params"])
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), pa, pb)


def test_mix_inputs_prob_one_takes_the_shifted_predictions_and_zero_keeps_the_truth():
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.integers(0, 50, (4, 16)), jnp.int32)
    preds = jnp.asarray(rng.integers(50, 100, (4, 16)), jnp.int32)  # disjoint from inputs: every swap shows
    mixed, replaced = mix_inputs(inputs, preds, jax.random.PRNGKey(1), jnp.float32(1.0))
    np.testing.assert_array_equal(mixed[:, 1:], preds[:, :-1])
    np.testing.assert_array_equal(mixed[:, 0], inputs[:, 0])
    assert not bool(replaced[:, 0].any()) and bool(replaced[:, 1:].all())
    kept, none = mix_inputs(inputs, preds, jax.random.PRNGKey(1), jnp.float32(0.0))
    np.testing.assert_array_equal(kept, inputs)
    assert not bool(none.any())


def test_prob_one_argmax_second_pass_inputs_are_first_pass_predictions(byte_data):
    cfg = _ss(tiny_config(byte_data, model={"vocab_size": 257}), ss_schedule="linear", ss_start=1.0, ss_end=1.0)
    params = init_params(cfg.model, jax.random.PRNGKey(0))
    batch = np.concatenate(eval_batches(TokenDataset(byte_data), L, B, B * L, 0))
    inputs = jnp.asarray(batch[:, :-1])
    fed, prob, replaced = jax.jit(lambda p, x: ss_inputs(cfg, p, x, jnp.int32(5), jnp.int32(0)))(params, inputs)
    preds = np.argmax(np.asarray(jax.jit(lambda p, x: apply(cfg.model, p, x))(params, inputs)), -1)
    np.testing.assert_array_equal(np.asarray(fed)[:, 1:], preds[:, :-1])
    np.testing.assert_array_equal(np.asarray(fed)[:, 0], batch[:, 0])
    assert float(prob) == 1.0 and float(replaced) == pytest.approx((L - 1) / L)


@pytest.mark.parametrize("schedule,start,end,k,formula", [
    ("linear", 0.0, 0.5, 8.0, lambda i: 0.5 * min(1.0, i / 8.0)),
    ("exponential", 0.1, 0.9, 0.7, lambda i: 0.9 - 0.8 * 0.7 ** i),
    ("inverse_sigmoid", 0.0, 1.0, 3.0, lambda i: 1.0 - 3.0 / (3.0 + math.exp(i / 3.0))),
])
def test_schedule_formula_and_mixed_fraction_within_binomial_error(schedule, start, end, k, formula):
    t = dataclasses.replace(tiny_config().train, ss_schedule=schedule, ss_start=start, ss_end=end, ss_k=k)
    shape = (64, 65)  # 64 * 64 replaceable positions
    for i in (0, 2, 5, 12):
        p = float(ss_probability(t, jnp.int32(i)))
        assert p == pytest.approx(formula(i), abs=1e-6), (schedule, i)
        _, replaced = mix_inputs(jnp.zeros(shape, jnp.int32), jnp.ones(shape, jnp.int32), jax.random.PRNGKey(i),
                                 jnp.float32(p))
        n = 64 * 64
        frac = float(replaced[:, 1:].sum()) / n
        assert abs(frac - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (schedule, i, frac, p)


def test_logged_ss_prob_follows_the_schedule_then_exposure_eval(tmp_path, byte_data, capsys):
    cfg = _ss(tiny_config(byte_data, train={"steps": 6}), ss_schedule="linear", ss_start=0.0, ss_end=0.8, ss_k=5.0,
              ss_token="sample")
    train(cfg, tmp_path / "run")
    records = _train_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        p = 0.8 * min(1.0, (r["step"] - 1) / 5.0)  # the step's own (0-based) optimizer step
        assert r["ss_prob"] == pytest.approx(p, abs=1e-6)
        n = B * (L - 1)
        expected = p * (L - 1) / L  # position 0 is never replaced
        assert abs(r["ss_replaced"] - expected) <= 4 * math.sqrt(p * (1 - p) / n) * (L - 1) / L + 1e-9, r
        assert math.isfinite(r["loss"])
    _exposure_zero_gap_and_bad_k(tmp_path / "run", capsys)  # on the same run, to train once


def test_gradient_equals_plain_loss_gradient_at_the_mixed_inputs_held_fixed(byte_data):
    plain = tiny_config(byte_data, model={"vocab_size": 257})
    cfg = _ss(plain, ss_schedule="linear", ss_start=0.5, ss_end=0.5, ss_token="argmax")
    params = init_params(cfg.model, jax.random.PRNGKey(3))
    batch = jnp.asarray(np.concatenate(eval_batches(TokenDataset(byte_data), L, B, B * L, 0)))
    step = jnp.int32(7)
    ce, grads, ss = jax.jit(lambda p, b: _grads(cfg, p, b, None, step))(params, batch)
    fed, _, replaced = jax.jit(lambda p, x: ss_inputs(cfg, p, x, step, jnp.int32(0)))(params, batch[:, :-1])
    fed = np.asarray(fed)  # held fixed: a constant of the loss below
    assert 0.3 < float(replaced) < 0.7 and float(ss["ss_replaced"]) == float(replaced)

    def hand_loss(p):  # cross-entropy of the model fed `fed` against the TRUE targets
        logp = jax.nn.log_softmax(apply(plain.model, p, jnp.asarray(fed)), -1)
        return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], -1))

    ref_ce, ref_grads = jax.jit(jax.value_and_grad(hand_loss))(params)
    assert float(ce) == pytest.approx(float(ref_ce), rel=1e-5)
    plain_ce = jax.jit(lambda p, b: loss_fn(p, b, plain)[1])(params, batch)
    assert float(ce) != pytest.approx(float(plain_ce), rel=1e-3)  # the mixing mattered
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6), grads, ref_grads)


def _exposure_zero_gap_and_bad_k(run, capsys):
    """`ar-lm eval --exposure`: K = 0 is a gap of exactly 0; K outside [0, L - 1) is a one-line error."""
    assert main(["eval", str(run), "--exposure", "0", "--tokens", str(2 * B * L), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["exposure_gap"] == 0.0 and r["exposure_gap_se"] == 0.0 and r["exposure_k"] == 0
    assert r["exposure_windows"] == 2 * B
    assert r["exposure_nll_own"] == r["exposure_nll_teacher"] > 0
    assert main(["eval", str(run), "--exposure", "4", "--batches", "1", "--json"]) == 0
    r4 = json.loads(capsys.readouterr().out)
    assert r4["exposure_windows"] == B and r4["exposure_tokens"] == B * (L - 1 - 4) and r4["exposure_gap"] != 0.0
    for bad in ("-1", str(L - 1)):
        assert main(["eval", str(run), "--exposure", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --exposure must be in [0, "), err


def _fixed_token_bigram(cfg, c: int, seed: int = 0):
    """Llama params whose blocks are zero, so logits at t depend on token t only (a bigram table), with an
    embedding direction that makes token `c` the argmax after every token."""
    params = jax.device_get(init_params(cfg.model, jax.random.PRNGKey(seed)))
    params = {**params, "layers": jax.tree.map(np.zeros_like, params["layers"])}
    rng = np.random.default_rng(seed)
    v, d = params["embed"].shape
    embed = rng.normal(size=(v, d)).astype(np.float32)
    embed[:, 0] = 3.0
    unembed = (0.3 * rng.normal(size=(d, v))).astype(np.float32)
    unembed[0, c] = 6.0
    return {**params, "embed": embed, "unembed": unembed}


@pytest.mark.parametrize("masked", [False, True])
def test_exposure_gap_of_a_fixed_token_model_equals_the_hand_computation(byte_data, masked):
    """`masked`: a chat dataset's loss mask (NO_LOSS_BIT on a third of the tokens) scores only the others."""
    cfg = tiny_config(byte_data, model={"family": "llama", "vocab_size": 257, "tie_embeddings": False})
    c, k = 101, 5
    params = _fixed_token_bigram(cfg, c)
    h = params["embed"].astype(np.float64)
    h = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + cfg.model.norm_eps) * params["final_norm"]["scale"]
    logits = h @ params["unembed"]
    logp_VxV = logits - logits.max(-1, keepdims=True)
    logp_VxV -= np.log(np.exp(logp_VxV).sum(-1, keepdims=True))
    assert (logp_VxV.argmax(-1) == c).all()  # the model always predicts c

    batches = eval_batches(TokenDataset(byte_data), L, B, 2 * B * L, cfg.train.seed)
    w = np.concatenate(batches)
    js = np.arange(k, L - 1)  # input positions scoring targets k+1 .. L-1
    teacher = -logp_VxV[w[:, js], w[:, js + 1]]
    own_inputs = w[:, js].copy()
    own_inputs[:, 0] = c  # the greedy prefix ends in c; a bigram sees only that one generated token
    own = -logp_VxV[own_inputs, w[:, js + 1]]
    keep = np.ones_like(teacher)
    if masked:
        no_loss = np.random.default_rng(0).random(w.shape) < 1 / 3
        keep = (~no_loss[:, js + 1]).astype(np.float64)  # the flag on token j drops the target predicting it
        batches = list((w | np.where(no_loss, NO_LOSS_BIT, 0).astype(w.dtype)).reshape(2, B, -1))
    count = keep.sum(1)
    hand_teacher, hand_own = (teacher * keep).sum() / count.sum(), (own * keep).sum() / count.sum()
    hand_gap = hand_own - hand_teacher
    assert abs(hand_gap) > 1e-3

    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    sharding = logical_sharding(mesh, rules, ("batch", "length"))
    step = make_exposure_step(cfg, k, param_shardings(cfg, mesh, rules), sharding)
    with mesh_context(mesh, rules):
        r = exposure(step, params, batches, sharding, k)
    assert r["exposure_windows"] == 2 * B and r["exposure_tokens"] == count.sum()
    assert (r["exposure_tokens"] < 2 * B * (L - 1 - k)) == masked
    assert r["exposure_nll_teacher"] == pytest.approx(hand_teacher, rel=1e-5)
    assert r["exposure_nll_own"] == pytest.approx(hand_own, rel=1e-5)
    assert r["exposure_gap"] == pytest.approx(hand_gap, abs=2e-5)
    if not masked:  # every window scores L - 1 - k targets: the standard error of the per-window mean gaps
        per_window = (own - teacher).mean(1)
        assert r["exposure_gap_se"] == pytest.approx(per_window.std(ddof=1) / np.sqrt(len(per_window)), rel=1e-3)
    else:  # the delta method for a ratio of sums: residuals d_w - gap c_w, scaled by the mean count
        residual = ((own - teacher) * keep).sum(1) - hand_gap * count
        n = len(count)
        se = np.sqrt((residual ** 2).sum() / (n * (n - 1))) / count.mean()
        assert r["exposure_gap_se"] == pytest.approx(se, rel=1e-3)
