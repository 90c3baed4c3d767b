"""Int8 weight-only decoding (`ar_lm.model.quantize`, `ar-lm generate --quantize int8`)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ar_lm import decoding as D
from ar_lm.cli import main
from ar_lm.config import ExperimentConfig, MeshConfig, ModelConfig
from ar_lm.data.synthetic import MarkovSource
from ar_lm.errors import UserError
from ar_lm.model import quantize as MQ
from ar_lm.model import transformer as M
from ar_lm.model.quantize import QuantizedArray, dequantize, quantize_params

CFG = ModelConfig(family="llama", vocab_size=32, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                  tie_embeddings=False)
SOURCE = MarkovSource(vocab=32, order=1, branching=2, seed=0)


def _xent(cfg, params, batch_BxL1):
    logits = M.apply(cfg, params, batch_BxL1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_BxL1[:, 1:]).mean()


@pytest.fixture(scope="module")
def trained():
    """CFG trained 40 AdamW steps on an order-1 Markov source: weights with structure, not an init."""
    params = M.init_params_jit(CFG, jax.random.key(0))
    tx = optax.adamw(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        loss, grads = jax.value_and_grad(lambda p: _xent(CFG, p, batch))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    data = SOURCE.sample(40 * 16 * 33, seed=1).reshape(40, 16, 33).astype(np.int32)
    for batch in data:
        params, opt, _ = step(params, opt, batch)
    return params


def _quantized_leaves(qparams):
    return [x for x in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QuantizedArray))
            if isinstance(x, QuantizedArray)]


@pytest.mark.parametrize("scan", [False, True])
def test_every_weight_within_half_a_step(trained, scan):
    """|W - q * scale| <= scale / 2 elementwise, for every matmul weight (and the stacked layout of scan_layers)."""
    cfg = dataclasses.replace(CFG, scan_layers=scan)
    params = M.relayout_layers(trained, CFG.n_layers, scanned=scan)
    qparams = quantize_params(cfg, params)
    flat_f = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    n_quantized = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, QuantizedArray))[0]:
        if not isinstance(leaf, QuantizedArray):
            continue
        n_quantized += 1
        w = np.asarray(flat_f[path])
        err = np.abs(w - np.asarray(dequantize(leaf)))
        assert leaf.q.dtype == jnp.int8 and leaf.q.shape == w.shape
        # float32 rounding of w / scale and of q * scale adds at most 127 * 2^-24 * scale each (a tie such as
        # w / scale = -85.5 rounds to -86 and lands just past scale / 2)
        assert np.all(err <= np.asarray(leaf.scale) * (0.5 + 2 * 127 * 2.0**-24)), path
    # per layer q, k, v, o, gate, up, wo; plus embed and unembed (stacked: one leaf per kind)
    assert n_quantized == (7 if scan else 7 * CFG.n_layers) + 2


def test_output_projection_error_within_hoelder_bound(trained):
    """Only `unembed` quantised: logits change by h @ (Uq - U), so |dlogit_j| <= ||h||_1 * scale_j / 2 exactly."""
    tokens = jnp.asarray(SOURCE.sample(4 * 32, seed=2).reshape(4, 32), jnp.int32)
    logits_f, inter = M.make_model(CFG).apply({"params": trained}, tokens, capture_intermediates=True,
                                              mutable=["intermediates"])
    h_BxLxD = inter["intermediates"]["final_norm"]["__call__"][0]
    q = MQ.quantize_array(trained["unembed"], MQ.CONTRACT_AXES["unembed"])
    logits_q = M.apply(CFG, {**trained, "unembed": q}, tokens)
    bound = jnp.sum(jnp.abs(h_BxLxD), -1, keepdims=True) * q.scale[0] / 2
    assert bool(jnp.all(jnp.abs(logits_q - logits_f) <= bound * (1 + 1e-5) + 1e-6))
    assert float(jnp.max(jnp.abs(logits_q - logits_f))) > 0  # the quantisation did change something


def test_whole_model_logits_within_rounding_noise(trained):
    """Each quantised matrix W_k errs by a relative Frobenius norm e_k = ||W_k - q_k s_k|| / ||W_k|| (rounding:
    at most half a step per weight, about s / sqrt(12) rms); errors of independent matrices on a residual path of
    gain <= 1 add in quadrature, so the stated tolerance is rms(dlogits) / rms(logits - their mean) <= sqrt(sum
    e_k^2), with no further factor."""
    qparams = quantize_params(CFG, trained)
    floats = dict(jax.tree_util.tree_flatten_with_path(trained)[0])
    sum_e2 = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, QuantizedArray))[0]:
        if isinstance(leaf, QuantizedArray):
            w = np.asarray(floats[path])
            sum_e2 += float(np.sum((w - np.asarray(dequantize(leaf))) ** 2) / np.sum(w * w))
    tokens = jnp.asarray(SOURCE.sample(4 * 48, seed=3).reshape(4, 48), jnp.int32)
    logits_f, logits_q = M.apply(CFG, trained, tokens), M.apply(CFG, qparams, tokens)
    centred = logits_f - logits_f.mean(-1, keepdims=True)
    rel = float(jnp.sqrt(jnp.mean((logits_q - logits_f) ** 2)) / jnp.sqrt(jnp.mean(centred**2)))
    assert 0 < rel <= sum_e2**0.5, (rel, sum_e2**0.5)


def test_greedy_tokens_and_loss_match_float(trained):
    """On the trained model: teacher-forced argmax equal at >= 98% of val positions, greedy generations equal at
    >= 90% of positions, and the val loss (perplexity) at most 1% higher."""
    val = jnp.asarray(SOURCE.sample(8 * 49, seed=4).reshape(8, 49), jnp.int32)
    qparams = quantize_params(CFG, trained)
    arg_f = jnp.argmax(M.apply(CFG, trained, val[:, :-1]), -1)
    arg_q = jnp.argmax(M.apply(CFG, qparams, val[:, :-1]), -1)
    assert float(jnp.mean(arg_f == arg_q)) >= 0.98
    loss_f, loss_q = float(_xent(CFG, trained, val)), float(_xent(CFG, qparams, val))
    assert np.exp(loss_q) <= 1.01 * np.exp(loss_f), (loss_f, loss_q)
    prompts = np.asarray(val[:4, :8])
    gen_f, gen_q = D.generate(CFG, trained, prompts, 16), D.generate(CFG, qparams, prompts, 16)
    assert np.mean(gen_f.tokens == gen_q.tokens) >= 0.90


def test_quantised_weights_take_under_30_percent_of_float32_bytes(trained):
    qparams = quantize_params(CFG, trained)
    assert MQ.param_bytes(trained) == 4 * sum(x.size for x in jax.tree.leaves(trained))
    assert MQ.param_bytes(qparams) <= 0.30 * MQ.param_bytes(trained)
    assert all(leaf.scale.dtype == jnp.float32 for leaf in _quantized_leaves(qparams))


def test_quantise_refuses_bad_input(trained):
    with pytest.raises(UserError, match="unknown quantisation 'int4'"):
        quantize_params(CFG, trained, "int4")
    with pytest.raises(UserError, match="already quantised"):
        quantize_params(CFG, quantize_params(CFG, trained))
    with pytest.raises(UserError, match="does not know the weights layers/attn/x_kernel"):
        quantize_params(CFG, {**trained, "layers": {**trained["layers"], "attn": {"x_kernel": jnp.ones((2, 2))}}})
    with pytest.raises(UserError, match="not 'mamba': drop --quantize"):
        MQ.check_quantizable(dataclasses.replace(CFG, family="mamba"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory (config, byte tokenizer, one checkpoint) of a small gpt2 model."""
    from ar_lm.data.tokenizers import ByteTokenizer
    from ar_lm.io import atomic_write_json, sha256_file
    from ar_lm.training import rundir
    from ar_lm.training.checkpoint import Checkpointer

    cfg = ModelConfig(family="gpt2", vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=48, init_std=0.3)
    path = tmp_path_factory.mktemp("quant_run") / "run"
    path.mkdir()
    rundir.write_config(path, ExperimentConfig(model=cfg, mesh=MeshConfig(devices=1)))
    params = M.init_params_jit(cfg, jax.random.key(5))
    ckpt = Checkpointer(path / rundir.CHECKPOINTS, async_save=False)
    ckpt.save(1, {"params": params}, {})
    ckpt.close()
    tok = ByteTokenizer()
    (path / rundir.TOKENIZER).mkdir()
    tok_file = tok.save(path / rundir.TOKENIZER)
    atomic_write_json(path / rundir.TOKENIZER / "metadata.json", {"tokenizer": {
        "kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "file": tok_file.name,
        "sha256": sha256_file(tok_file)}})
    return path, cfg, jax.device_get(params), tok


def test_cli_generate_quantize_int8_end_to_end(run_dir, capsys):
    """`--quantize int8` prints the tokens the Python API's quantised model generates (also with a draft)."""
    path, cfg, params, tok = run_dir
    args = ["generate", str(path), "--prompt", "the cat", "--max-new-tokens", "10", "--temperature", "0", "--json"]
    prompt = [tok.eos_id] + list(tok.encode("the cat"))
    gen = D.generate(cfg, quantize_params(cfg, params), [prompt], 10, eos_id=tok.eos_id)
    expected = gen.tokens[0, : gen.lengths[0]].tolist()
    assert main([*args, "--quantize", "int8"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"][0]["tokens"] == expected
    assert main([*args, "--quantize", "int8", "--draft", str(path)]) == 0  # speculative: greedy = plain greedy
    assert json.loads(capsys.readouterr().out)["samples"][0]["tokens"] == expected


def test_cli_generate_quantize_bad_value_is_one_line(run_dir, capsys):
    path = run_dir[0]
    assert main(["generate", str(path), "--prompt", "a", "--quantize", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "invalid choice: 'int4'" in err[0], err


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_int8_kernel_equals_dequantised_matmul(m, transposed):
    """The XLA:CPU int8 kernel (vector and tail columns: N = 200, K = 72) equals x @ (q * scale) in float32."""
    from ar_lm.model import cpu_kernels

    assert cpu_kernels.available()  # CI has a C++ compiler: the kernel must build
    rng = np.random.default_rng(m)
    w = jnp.asarray(rng.normal(size=(200, 72) if transposed else (72, 200)).astype(np.float32))
    qa = MQ.quantize_array(w, (1,) if transposed else (0,))
    x = jnp.asarray(rng.normal(size=(m, 72)).astype(np.float32))
    ref = x @ (dequantize(qa).T if transposed else dequantize(qa))
    out = jax.jit(cpu_kernels.int8_matmul, static_argnums=3)(x, qa.q, qa.scale.reshape(-1), transposed)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_decode_step_reads_int8_weights(trained):
    """The compiled decode program multiplies through the int8 kernel, and decodes as the dequantised model does."""
    from ar_lm.decoding.decoder import for_decoding

    cfg, qparams = for_decoding(CFG, quantize_params(CFG, trained))
    prompt = jnp.asarray(SOURCE.sample(8, seed=5).reshape(1, 8), jnp.int32)
    hlo = jax.jit(lambda p: M.apply(cfg, p, prompt[:, :1])).lower(qparams).compile().as_text()
    assert "ar_lm_int8_matmul" in hlo
    dequantised = jax.tree.map(dequantize, qparams, is_leaf=lambda x: isinstance(x, QuantizedArray))
    gen_q, gen_f = D.generate(cfg, qparams, np.asarray(prompt), 16), D.generate(cfg, dequantised, np.asarray(prompt), 16)
    assert np.mean(gen_q.tokens == gen_f.tokens) >= 0.9
    np.testing.assert_allclose(gen_q.logprobs[:, :4], gen_f.logprobs[:, :4], atol=1e-4)


def test_cpu_kernels_without_a_compiler_warn_once_and_xla_ops_run(tmp_path):
    """No C++ compiler: `available()` is False with one warning line, int8 matmuls are dequantised and decoding
    attends through XLA's ops."""
    import os
    import subprocess
    import sys

    code = ("import jax, numpy as np\n"
            "from ar_lm.model import cpu_kernels, quantize as MQ\n"
            "w = jax.numpy.asarray(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))\n"
            "qa = MQ.quantize_array(w, (0,))\n"
            "y = MQ.matmul(jax.numpy.ones((1, 8)), qa, jax.numpy.float32)\n"
            "assert not cpu_kernels.available() and not cpu_kernels.available()\n"
            "np.testing.assert_allclose(y, jax.numpy.ones((1, 8)) @ MQ.dequantize(qa), rtol=1e-6)\n"
            "from ar_lm.config import ModelConfig\n"
            "from ar_lm.decoding import generate\n"
            "from ar_lm.model import transformer as M\n"
            "cfg = ModelConfig(family='gpt2', vocab_size=11, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)\n"
            "assert generate(cfg, M.init_params_jit(cfg, jax.random.key(0)), [[1, 2]], 3).tokens.shape == (1, 3)\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "AR_LM_KERNEL_CACHE": str(tmp_path / "k")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: CPU decode kernels")]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0], out.stderr
    assert not (tmp_path / "k").exists()  # nothing built, nothing written
