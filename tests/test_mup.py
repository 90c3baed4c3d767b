"""μP (Yang et al. 2022): parameter kinds from logical axes, the coordinate check, and lr transfer across widths."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from ar_lm.cli import main
from ar_lm.config import ExperimentConfig, ModelConfig, OptimConfig, save_json
from ar_lm.errors import UserError
from ar_lm.model.mup import lr_multipliers, param_kind
from ar_lm.model.transformer import init_params, make_model
from ar_lm.training.optimizer import make_optimizer
from ar_lm.training.step import loss_fn

V, L, B = 64, 32, 8
WIDTHS = (64, 128, 256, 512)
LRS = np.geomspace(3e-4, 3e-2, 5)
_PERM = np.random.default_rng(0).permutation(V)


def _batch(seed):
    """A learnable synthetic task: the next token is a fixed permutation of this one, 30% of the time random."""
    r = np.random.default_rng(seed)
    x = np.zeros((B, L + 1), np.int32)
    x[:, 0] = r.integers(0, V, B)
    for t in range(L):
        x[:, t + 1] = np.where(r.random(B) < 0.3, r.integers(0, V, B), _PERM[x[:, t]])
    return jnp.asarray(x)


def _cfg(width, parametrization):
    return ExperimentConfig(model=ModelConfig(
        family="gpt2", vocab_size=V, d_model=width, n_heads=width // 16, n_layers=2, max_seq_len=L,
        parametrization=parametrization, mup_base_width=64, tie_embeddings=False, scan_layers=False, remat="none"))


def _multipliers(model):
    return lr_multipliers(model, jax.eval_shape(functools.partial(init_params, model, boxed=True), jax.random.key(0)))


def _compiled(cfg):
    """(optimizer, jitted step taking the lr as an argument, jitted per-module activations)."""
    plain = OptimConfig(lr=1.0, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
    tx, _ = make_optimizer(plain, 100, 1, _multipliers(cfg.model))

    @jax.jit
    def step(params, opt, batch, lr):
        (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, cfg)
        updates, opt = tx.update(grads, opt, params)
        return jax.tree.map(lambda p, u: p + lr * u, params, updates), opt, ce

    @jax.jit
    def activations(params, batch):
        _, state = make_model(cfg.model).apply({"params": params}, batch[:, :-1], capture_intermediates=True,
                                               mutable=["intermediates"])
        inter = state["intermediates"]
        return {"block_0": inter["layer_0"]["__call__"][0][0][0], "block_1": inter["layer_1"]["__call__"][0][0][0],
                "logits": inter["__call__"][0]}

    return tx, step, activations


def _train(cfg, compiled, lr, steps):
    tx, step, _ = compiled
    params = init_params(cfg.model, jax.random.key(0))
    opt = tx.init(params)
    for s in range(steps):
        params, opt, _ = step(params, opt, _batch(s), lr)
    return params


def test_parameter_kinds_come_from_logical_axes():
    assert param_kind(("embed", "mlp")) == param_kind(("layers", "embed", "heads", "head_dim")) == "hidden"
    assert param_kind(("heads", "head_dim", "embed")) == "hidden"
    for vector in (("vocab", "embed"), ("embed", "vocab"), ("positions", "embed"), ("heads", "head_dim"), ("norm",)):
        assert param_kind(vector) == "vector", vector
    m = _multipliers(_cfg(256, "mup").model)
    assert m["layer_0"]["mlp"]["wi_kernel"] == m["layer_1"]["attn"]["q_kernel"] == 0.25
    assert m["embed"] == m["unembed"] == m["layer_0"]["attn"]["q_bias"] == m["final_norm"]["scale"] == 1.0
    assert _multipliers(_cfg(256, "sp").model) is None


def test_coordinate_check_and_lr_transfer_across_widths():
    # coordinate check: how far each layer's output moves in 5 Adam steps at lr 1e-2, across widths 64 -> 512
    moved = {}
    compiled = {}
    for parametrization in ("sp", "mup"):
        for w in WIDTHS:
            cfg = _cfg(w, parametrization)
            compiled[parametrization, w] = _compiled(cfg)
            acts = compiled[parametrization, w][2]
            before = acts(init_params(cfg.model, jax.random.key(0)), _batch(99))
            after = acts(_train(cfg, compiled[parametrization, w], 1e-2, 5), _batch(99))
            moved[parametrization, w] = {k: float(jnp.sqrt(jnp.mean(jnp.square(after[k] - before[k])))) for k in before}
    for layer in ("block_0", "block_1", "logits"):
        mup = [moved["mup", w][layer] for w in WIDTHS]
        assert max(mup) / min(mup) < 2.5, (layer, mup)  # width-independent under muP (measured at most 2.4x)
    sp = [moved["sp", w]["block_1"] for w in WIDTHS]
    assert sp[-1] / sp[0] > 10, sp  # grows with width under SP (measured ~100x)

    # lr transfer: the best lr of a short sweep moves across widths 64 -> 256 under SP, not under muP
    best = {}
    for parametrization in ("sp", "mup"):
        for w in WIDTHS[:3]:
            cfg = _cfg(w, parametrization)
            losses = []
            for lr in LRS:
                params = _train(cfg, compiled[parametrization, w], float(lr), 30)
                losses.append(float(loss_fn(params, _batch(1000), cfg)[1]))
            best[parametrization, w] = int(np.argmin(losses))
    mup_shift = max(best["mup", w] for w in WIDTHS[:3]) - min(best["mup", w] for w in WIDTHS[:3])
    sp_shift = best["sp", WIDTHS[0]] - best["sp", WIDTHS[2]]  # SP: wider wants a smaller lr
    assert mup_shift <= 1 and sp_shift >= mup_shift + 2, best  # grid steps of 10^0.5 (measured: 0 and 2)


def test_mup_needs_a_base_shape_and_does_not_export(tmp_path, byte_data, capsys):
    with pytest.raises(UserError, match="needs a base shape: set model.mup_base_width"):
        from ar_lm.config import validate
        validate(dataclasses.replace(_cfg(128, "mup"), model=dataclasses.replace(_cfg(128, "mup").model, mup_base_width=0)))
    exp = tmp_path / "mup.json"
    save_json(tiny_config(byte_data, model={"parametrization": "mup"}), exp)
    assert main(["train", str(exp), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.mup_base_width" in err[0] and not (tmp_path / "run").exists()
