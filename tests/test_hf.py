"""ar_lm against Hugging Face transformers' own PyTorch models (the reference implementation):
import, export, greedy decoding and per-token log-probabilities. Reference models are built from
configs with random weights (no download); biases and norm scales are perturbed away from 0 and 1
and the init is widened so that logits are O(1-10) and a mapping bug cannot hide."""

import dataclasses
import functools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config

from ar_lm.cli import main
from ar_lm.config import load_json
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.pipeline import eval_batches
from ar_lm.errors import UserError
from ar_lm.interop.hf import export_hf, import_hf, load_run_params
from ar_lm.interop.hf_weights import params_from_hf
from ar_lm.model import transformer as M
from ar_lm.training.loop import train

# torch and transformers are imported inside the tests marked `torch` (the `test` extra), so that the rest of
# this module runs where they are not installed (`pytest -m "not torch"` with the `test-core` extra)

TOL = 1e-4  # max abs logit difference in float32 (measured: 2e-6 to 7e-6 on imports, about 1e-6 on exports)
VOCAB = 101
CONFIGS = {  # name -> (transformers class name, config kwargs)
    "gpt2_tied": ("GPT2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt2_untied": ("GPT2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48, tie_word_embeddings=False,
                                 layer_norm_epsilon=1e-4)),
    "llama_gqa_untied": ("Llama", dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64, rope_theta=5e4,
                                       rms_norm_eps=1e-5)),
    "llama_mqa_tied": ("Llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)),
}


def hf_model(name: str, vocab: int = VOCAB, seed: int = 0, bos: int = 0, eos: int = 0):
    """A transformers model with random, non-trivial weights, in eval mode."""
    import torch
    import transformers
    kind, kwargs = CONFIGS[name]
    config = getattr(transformers, f"{kind}Config")(vocab_size=vocab, initializer_range=0.2, bos_token_id=bos,
                                                    eos_token_id=eos, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}LMHeadModel" if kind == "GPT2" else f"{kind}ForCausalLM")(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # biases and norm scales
                p.add_(0.2 * torch.randn(p.shape))
    return model.eval()


@functools.partial(jax.jit, static_argnums=0)
def ar_logits(cfg, params, tokens_BxL):
    return M.apply(cfg, params, tokens_BxL)


def hf_logits(model, tokens_BxL) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens_BxL), dtype=torch.long)).logits.numpy()


def max_logit_diff(cfg, params, model, tokens_BxL) -> float:
    return float(np.abs(np.asarray(ar_logits(cfg, params, tokens_BxL)) - hf_logits(model, tokens_BxL)).max())


def import_model(tmp_path, name: str, model):
    model.save_pretrained(tmp_path / f"hf_{name}")
    import_hf(tmp_path / f"hf_{name}", tmp_path / f"run_{name}")
    cfg, step, params = load_run_params(tmp_path / f"run_{name}")
    assert step == 0
    return cfg.model, params


def load_without_warnings(out_dir, capfd):
    """AutoModelForCausalLM.from_pretrained, asserting nothing is missing, unexpected or mismatched."""
    import transformers
    capfd.readouterr()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    log = capfd.readouterr().err.lower()
    assert not any(word in log for word in ("missing", "unexpected", "newly initialized", "mismatch")), log
    return model.eval()


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_matches_transformers_logits(tmp_path, name):
    model = hf_model(name)
    cfg, params = import_model(tmp_path, name, model)
    assert (cfg.kv_heads, cfg.tie_embeddings) == (
        model.config.num_key_value_heads if cfg.family == "llama" else cfg.n_heads, model.config.tie_word_embeddings)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 64))
    scale = float(np.abs(hf_logits(model, tokens)).max())
    diff = max_logit_diff(cfg, params, model, tokens)
    assert scale > 1.0 and diff <= TOL, f"{name}: max |logit difference| {diff:.2e} (logits up to {scale:.1f})"


@pytest.mark.torch
def test_import_bfloat16_shards_and_sentencepiece_tokenizer(tmp_path, corpus_dir):
    """A bfloat16 checkpoint in several safetensors shards, with a sentencepiece tokenizer.model."""
    import torch
    import transformers

    from ar_lm.data.tokenizers import SentencePieceTokenizer, load_tokenizer
    from ar_lm.interop.hf import find_tokenizer

    tok = SentencePieceTokenizer.train([p.read_text() for p in sorted(corpus_dir.iterdir())], vocab_size=300)
    model = hf_model("llama_gqa_untied", vocab=tok.vocab_size).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    tok.save(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    cfg, _, params = load_run_params(tmp_path / "run")
    tokens = np.random.default_rng(4).integers(0, tok.vocab_size, (2, 48))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    diff = max_logit_diff(cfg.model, params, reference, tokens)  # bfloat16 values, float32 compute on both sides
    assert diff <= TOL, diff
    carried = load_tokenizer(tmp_path / "run" / "tokenizer", "sentencepiece")
    assert carried.encode("the cat sat") == tok.encode("the cat sat")
    meta, _, note = find_tokenizer(tmp_path / "hf", tok.vocab_size + 1)
    assert meta is None and "the run has no text tokenizer" in note


@pytest.mark.torch
def test_imported_llama_prompts_start_with_its_bos_id(tmp_path, corpus_dir, capsys):
    from ar_lm.cli import main
    from ar_lm.data.tokenizers import SentencePieceTokenizer

    tok = SentencePieceTokenizer.train([p.read_text() for p in sorted(corpus_dir.iterdir())], vocab_size=300)
    bos = tok.sp.bos_id()
    assert bos >= 0 and bos != tok.eos_id
    hf_model("llama_gqa_untied", vocab=tok.vocab_size, bos=bos, eos=tok.eos_id).save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "the cat", "--max-new-tokens", "2",
                 "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] == [bos] + tok.encode("the cat")


@pytest.mark.torch
@pytest.mark.parametrize("name", ["gpt2_tied", "llama_gqa_untied"])
def test_greedy_decoding_equals_transformers_generate(tmp_path, name):
    import torch

    from ar_lm.decoding import generate

    model = hf_model(name)
    cfg, params = import_model(tmp_path, name, model)
    prompt = [5, 17, 42, 8, 99]
    ours = generate(cfg, params, [prompt], 32).tokens[0].tolist()
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


@pytest.mark.torch
def test_per_token_logprobs_and_chain_rule(tmp_path):
    import torch
    model = hf_model("llama_gqa_untied")
    cfg, params = import_model(tmp_path, "llama", model)
    seq_1xT = np.random.default_rng(2).integers(0, VOCAB, (1, 40))
    logp_TxV = jax.nn.log_softmax(ar_logits(cfg, params, seq_1xT)[0, :-1], axis=-1)
    ours_T = np.asarray(logp_TxV)[np.arange(39), seq_1xT[0, 1:]]
    ref_TxV = torch.log_softmax(torch.from_numpy(hf_logits(model, seq_1xT)[0, :-1]), dim=-1).numpy()
    np.testing.assert_allclose(ours_T, ref_TxV[np.arange(39), seq_1xT[0, 1:]], atol=TOL, rtol=0)
    with torch.no_grad():  # transformers' mean next-token cross-entropy over the 39 predicted tokens
        mean_nll = model(torch.from_numpy(seq_1xT), labels=torch.from_numpy(seq_1xT)).loss.item()
    # chain rule: log p(x_1..x_T | x_0) = sum_t log p(x_t | x_<t)
    assert float(ours_T.astype(np.float64).sum()) == pytest.approx(-39 * mean_nll, rel=1e-5, abs=1e-4)


@pytest.mark.torch
def test_round_trip_import_eval_finetune_export(tmp_path, byte_data, capfd):
    """HF GPT-2 (byte vocabulary) -> ar_lm run -> `ar-lm eval` (= transformers' loss) -> a few steps of
    ar_lm training -> export -> transformers loads it without warnings, same logits -> import again."""
    import torch
    model = hf_model("gpt2_tied", vocab=257)
    model.save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    assert main(["import-hf", str(tmp_path / "hf"), str(run)]) == 0
    assert "no text tokenizer" in capfd.readouterr().err

    cfg = load_json(run / "config.json")
    one_batch = cfg.data.batch_size * cfg.data.seq_len
    assert main(["eval", str(run), "--data", str(byte_data), "--tokens", str(one_batch), "--json"]) == 0
    ours = json.loads(capfd.readouterr().out)["loss"]
    batches = eval_batches(TokenDataset(byte_data), cfg.data.seq_len, cfg.data.batch_size, one_batch, cfg.train.seed)
    assert len(batches) == 1
    batch_BxL1 = batches[0]
    logits_BxLxV = torch.from_numpy(hf_logits(model, batch_BxL1[:, :-1]))
    ref = torch.nn.functional.cross_entropy(logits_BxLxV.flatten(0, 1), torch.from_numpy(batch_BxL1[:, 1:]).long().flatten())
    assert ours == pytest.approx(ref.item(), rel=1e-5)

    finetune = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(byte_data), prefetch=0),
                                   train=dataclasses.replace(cfg.train, steps=3, eval_tokens=one_batch))
    assert train(finetune, run).summary["step"] == 3  # resumes from the imported step-0 checkpoint
    assert main(["export-hf", str(run), str(tmp_path / "out")]) == 0
    exported = load_without_warnings(tmp_path / "out", capfd)
    cfg, step, params = load_run_params(run)
    assert step == 3
    tokens = np.random.default_rng(3).integers(0, 257, (2, 64))
    diff = max_logit_diff(cfg.model, params, exported, tokens)
    assert diff <= TOL and max_logit_diff(cfg.model, params, model, tokens) > 1e-3, diff  # trained, and exported exactly

    assert main(["import-hf", str(tmp_path / "out"), str(tmp_path / "again")]) == 0  # the byte tokenizer comes back
    assert json.loads((tmp_path / "again" / "tokenizer" / "metadata.json").read_text())["tokenizer"]["kind"] == "byte"
    again_cfg, _, again = load_run_params(tmp_path / "again")
    assert again_cfg.model == cfg.model
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, again, params)))


@pytest.mark.torch
def test_export_of_ar_lm_trained_llama_loads_in_transformers(tmp_path, byte_data, capfd):
    """(The round trip above exports an ar_lm-trained GPT-2.)"""
    cfg = tiny_config(byte_data, model={"family": "llama", "n_kv_heads": 2, "tie_embeddings": False}, train={"steps": 4})
    train(cfg, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "out")
    model = load_without_warnings(tmp_path / "out", capfd)
    cfg, _, params = load_run_params(tmp_path / "run")
    tokens = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (2, 32))
    diff = max_logit_diff(cfg.model, params, model, tokens)
    assert diff <= TOL, f"max |logit difference| {diff:.2e}"


def test_export_of_unrolled_layers_equals_scanned():
    """`scan_layers=False` runs keep layer_0, layer_1, ...: the same weights export identically."""
    from ar_lm.interop.hf_weights import params_to_hf

    cfg = tiny_config(model={"vocab_size": 257, "tie_embeddings": False}).model
    shapes = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
    rng = np.random.default_rng(5)
    scanned = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    unrolled = {k: v for k, v in scanned.items() if k != "layers"}
    unrolled |= {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], scanned["layers"]) for i in range(cfg.n_layers)}
    a = params_to_hf(cfg, scanned)
    b = params_to_hf(dataclasses.replace(cfg, scan_layers=False), unrolled)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _hf_dir(tmp_path, name, config_changes=None, weights=True, model="gpt2_tied"):
    """A saved tiny model directory, its config.json edited (and its weights removed)."""
    path = tmp_path / name
    hf_model(model).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    if not weights:
        (path / "model.safetensors").unlink()
    return path


@pytest.mark.torch
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, capfd):
    from ar_lm.training.rundir import write_config

    def d(name):
        return str(tmp_path / name)

    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    pickled = _hf_dir(tmp_path, "pickled", weights=False)
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    qk_run = tmp_path / "qk_run"  # its config blocks export, which is checked before any checkpoint is read
    qk_run.mkdir()
    write_config(qk_run, tiny_config(model={"qk_norm": True, "vocab_size": 257}))
    import_hf(_hf_dir(tmp_path, "good"), tmp_path / "run_ok")
    cases = [
        (["import-hf", d("missing"), d("new_r1")], "does not exist"),
        (["import-hf", d("nonempty"), d("new_r2")], "has no config.json"),
        (["import-hf", d("pickled"), d("new_r3")], "only safetensors are read"),
        (["import-hf", str(_hf_dir(tmp_path, "bert", {"architectures": ["BertForMaskedLM"]})), d("new_r4")],
         "architecture 'BertForMaskedLM' is not supported"),
        (["import-hf", str(_hf_dir(tmp_path, "wide", {"n_embd": 64})), d("new_r5")],
         "has shape (32, 96) but config.json implies (64, 192)"),
        (["import-hf", str(_hf_dir(tmp_path, "deep", {"n_layer": 3})), d("new_r6")],
         "transformer.h.2.attn.c_attn.weight is missing"),
        (["import-hf", str(_hf_dir(tmp_path, "shallow", {"n_layer": 1})), d("new_r7")], "unexpected in all"),
        (["import-hf", str(_hf_dir(tmp_path, "act", {"activation_function": "relu"})), d("new_r8")],
         "option activation_function='relu'"),
        (["import-hf", str(_hf_dir(tmp_path, "idx", {"scale_attn_by_inverse_layer_idx": True})), d("new_r9")],
         "option scale_attn_by_inverse_layer_idx=True"),
        (["import-hf", str(_hf_dir(tmp_path, "rope", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                                   model="llama_gqa_untied")), d("new_r10")], "option rope_scaling="),
        (["import-hf", str(_hf_dir(tmp_path, "bias", {"attention_bias": True}, model="llama_gqa_untied")), d("new_r11")],
         "option attention_bias=True"),
        (["import-hf", d("run_ok"), d("new_r12")], "names no architecture"),
        (["import-hf", str(pickled), str(nonempty)], "already exists and is not empty"),
        (["export-hf", str(qk_run), d("new_o1")], "model.qk_norm=true has no GPT2LMHeadModel equivalent"),
        (["export-hf", d("missing"), d("new_o2")], "does not exist"),
        (["export-hf", d("run_ok"), str(nonempty)], "already exists and is not empty"),
    ]
    capfd.readouterr()
    for args, fragment in cases:
        assert main(args) == 2, args
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (args, err)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "new_")))
    assert not left, left  # no target directory, no staging leftovers
    assert [p.name for p in nonempty.iterdir()] == ["keep.txt"] and (nonempty / "keep.txt").read_text() == "mine"


@pytest.mark.torch
def test_unsupported_weights_are_named():
    """A Llama checkpoint with attention biases but a config that says none: the extra weight is named."""
    from ar_lm.interop.hf_config import model_config_from_hf
    from ar_lm.interop.hf_weights import params_to_hf

    cfg = model_config_from_hf(hf_model("llama_gqa_untied").config.to_dict())
    shapes = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
    weights = params_to_hf(cfg, jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes))
    weights["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    with pytest.raises(UserError, match=r"weight model\.layers\.0\.self_attn\.q_proj\.bias \(1 unexpected"):
        params_from_hf(cfg, weights)


def test_core_package_does_not_import_torch_or_transformers():
    code = ("import importlib, pkgutil, sys, ar_lm; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(ar_lm.__path__, 'ar_lm.') "
            "if m.name != 'ar_lm.__main__']; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
