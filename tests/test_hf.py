"""Against Hugging Face transformers (the reference implementation): import, export, greedy
generation and per-token log-probabilities. Models are built from configs (no download)."""

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ar_lm import model as M  # noqa: E402
from ar_lm.cli import main  # noqa: E402
from ar_lm.errors import UserError  # noqa: E402
from ar_lm.hf import export_hf, import_hf, load_run_params  # noqa: E402
from ar_lm.train import train  # noqa: E402
from conftest import tiny_config  # noqa: E402

TOL = 1e-4  # max abs logit difference, float32


def _perturb(model):
    """Non-trivial biases and norm scales, so a mapping bug cannot hide behind zeros and ones."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return {
        "gpt2_tied": GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
        "gpt2_untied": GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                  tie_word_embeddings=False)),
        "llama_gqa_untied": LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=80,
                                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                         max_position_embeddings=64, rope_theta=5e4, rms_norm_eps=1e-5)),
        "llama_tied": LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, max_position_embeddings=64,
                                                   tie_word_embeddings=True)),
    }


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens):
    return M.apply(cfg, params, tokens)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


def _import(tmp_path, name, model):
    hf_dir = tmp_path / f"hf_{name}"
    _perturb(model).eval().save_pretrained(hf_dir, safe_serialization=True)
    import_hf(hf_dir, tmp_path / f"run_{name}")
    return load_run_params(tmp_path / f"run_{name}")


@pytest.mark.parametrize("name", ["gpt2_tied", "gpt2_untied", "llama_gqa_untied", "llama_tied"])
def test_import_matches_transformers_logits(tmp_path, name):
    model = hf_models()[name]
    cfg, params = _import(tmp_path, name, model)
    tokens = np.random.default_rng(0).integers(0, 101, (3, 40))
    diff = np.abs(np.asarray(_logits(cfg.model, params, tokens)) - _hf_logits(model, tokens)).max()
    assert diff <= TOL, diff


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_of_trained_run_loads_in_transformers(tmp_path, byte_data, family):
    extra = {"n_kv_heads": 2, "tie_embeddings": False} if family == "llama" else {}
    cfg = tiny_config(byte_data, model={"family": family, **extra}, train={"steps": 5})
    train(cfg, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings about missing or unexpected weights
        model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg, params = load_run_params(tmp_path / "run")
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (2, 32))
    diff = np.abs(np.asarray(_logits(cfg.model, params, tokens)) - _hf_logits(model.eval(), tokens)).max()
    assert diff <= TOL, diff


def _greedy(cfg, params, prompt, n):
    """Step-by-step argmax with full recompute, padded to one length so it compiles once."""
    total = len(prompt) + n
    buf = np.zeros((1, total), np.int64)
    buf[0, : len(prompt)] = prompt
    for t in range(len(prompt), total):
        logits = _logits(cfg, params, jnp.asarray(buf, jnp.int32))
        buf[0, t] = int(jnp.argmax(logits[0, t - 1]))
    return buf[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["gpt2_tied", "llama_gqa_untied"])
def test_greedy_generation_equals_transformers_generate(tmp_path, name):
    model = hf_models()[name]
    cfg, params = _import(tmp_path, name, model)
    prompt = [5, 17, 42, 8]
    ours = _greedy(cfg.model, params, prompt, 32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                             pad_token_id=0, eos_token_id=None)
    assert ours == out[0, len(prompt):].tolist()


def test_per_token_logprobs_and_chain_rule(tmp_path):
    model = hf_models()["llama_gqa_untied"]
    cfg, params = _import(tmp_path, "lp", model)
    seq = np.random.default_rng(2).integers(0, 101, (1, 30))
    ours = jax.nn.log_softmax(_logits(cfg.model, params, seq)[0, :-1])
    ours = np.asarray(jnp.take_along_axis(ours, jnp.asarray(seq[0, 1:, None]), axis=-1)[:, 0])
    ref_all = torch.log_softmax(torch.from_numpy(_hf_logits(model, seq))[0, :-1], -1)
    ref = ref_all.gather(-1, torch.from_numpy(seq[0, 1:, None]).long())[:, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=TOL)
    with torch.no_grad():
        loss = model(torch.from_numpy(seq).long(), labels=torch.from_numpy(seq).long()).loss.item()
    assert ours.sum() == pytest.approx(-loss * (seq.shape[1] - 1), rel=1e-5)  # log p(x) = sum_t log p(x_t | x_<t)


def test_bad_input(tmp_path, byte_data, capsys):
    from transformers import BertConfig

    good = tmp_path / "good"
    hf_models()["gpt2_tied"].save_pretrained(good, safe_serialization=True)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps(BertConfig().to_dict() | {"architectures": ["BertForMaskedLM"]}))
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    (mismatch / "config.json").write_text(json.dumps(json.loads((good / "config.json").read_text()) | {"n_embd": 64}))
    (mismatch / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    qk = tiny_config(byte_data, model={"qk_norm": True}, train={"steps": 1})
    train(qk, tmp_path / "qk_run")
    cases = [
        (["import-hf", str(tmp_path / "nope"), str(tmp_path / "r1")], "does not exist"),
        (["import-hf", str(bert), str(tmp_path / "r2")], "architecture 'BertForMaskedLM' is not supported"),
        (["import-hf", str(mismatch), str(tmp_path / "r3")], "has shape"),
        (["import-hf", str(good), str(nonempty)], "already exists and is not empty"),
        (["export-hf", str(tmp_path / "qk_run"), str(tmp_path / "o1")], "model.qk_norm=true"),
        (["export-hf", str(tmp_path / "qk_run"), str(nonempty)], "model.qk_norm=true"),
    ]
    capsys.readouterr()  # drop the set-up's progress output
    for args, fragment in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (args, err)
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3", "o1"))
    assert (nonempty / "keep.txt").read_text() == "mine" and len(list(nonempty.iterdir())) == 1
