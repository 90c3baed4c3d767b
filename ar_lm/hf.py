"""Hugging Face interop: import GPT-2 / Llama checkpoints as ar_lm runs, export runs back.

Weights move as safetensors only (no pickle); `transformers`/`torch` (the `hf` extra) are needed
only to load an export with `transformers`, not to convert. Layouts (ar_lm <- HF):

- GPT-2 (Conv1D weights are [in, out]): c_attn [D, 3D] -> q/k/v_kernel [D, H, Dh] (+ biases),
  c_proj [D, D] -> o_kernel [H, Dh, D], c_fc [D, F] -> wi_kernel, mlp.c_proj [F, D] -> wo_kernel,
  ln_1/ln_2/ln_f -> attn_norm/mlp_norm/final_norm, wte -> embed, wpe -> pos_embed.
- Llama (torch Linear weights are [out, in]): q_proj [H*Dh, D] -> q_kernel [D, H, Dh] (k/v with
  K kv heads), o_proj [D, H*Dh] -> o_kernel [H, Dh, D], gate/up_proj [F, D] -> gate/up_kernel
  [D, F], down_proj [D, F] -> wo_kernel [F, D], input/post_attention_layernorm -> attn/mlp_norm,
  embed_tokens -> embed, lm_head [V, D] -> unembed [D, V] when untied. RoPE is HF's rotate-half
  layout already, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ar_lm import rundir
from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, TrainConfig
from ar_lm.errors import UserError, require
from ar_lm.io import atomic_write_json, sha256_file

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}


# ---------------------------------------------------------------------------------------------
# Configs


def model_config_from_hf(hf: dict) -> ModelConfig:
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    arch = archs[0]
    require(arch in ARCHITECTURES,
            f"architecture {arch!r} is not supported: import GPT2LMHeadModel or LlamaForCausalLM checkpoints")
    if ARCHITECTURES[arch] == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        require(act in ("gelu_new", "gelu_pytorch_tanh"), f"GPT-2 activation_function={act!r} is not supported (ar_lm uses tanh GELU)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            require(not hf.get(flag), f"GPT-2 option {flag}=true is not supported")
        require(hf.get("scale_attn_weights", True), "GPT-2 option scale_attn_weights=false is not supported")
        d = hf["n_embd"]
        return ModelConfig(family="gpt2", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
                           n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"],
                           tie_embeddings=hf.get("tie_word_embeddings", True),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), scan_layers=True)
    rope = hf.get("rope_parameters") or {}
    require(not hf.get("rope_scaling") and rope.get("rope_type", "default") == "default",
            "Llama rope scaling (rope_scaling / rope_type other than default) is not supported")
    require(not hf.get("attention_bias") and not hf.get("mlp_bias"), "Llama attention_bias/mlp_bias=true is not supported")
    require(hf.get("hidden_act", "silu") == "silu", f"Llama hidden_act={hf.get('hidden_act')!r} is not supported")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    require(hf.get("head_dim") in (None, d // h), f"Llama head_dim={hf.get('head_dim')} != hidden_size/num_heads is not supported")
    return ModelConfig(family="llama", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=h,
                       n_kv_heads=hf.get("num_key_value_heads") or h, d_ff=hf["intermediate_size"],
                       max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=hf.get("tie_word_embeddings", False),
                       rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), scan_layers=True)


def export_blockers(m: ModelConfig) -> None:
    """Raise UserError naming the first option without a Hugging Face equivalent."""
    require(not m.qk_norm, f"model.qk_norm=true has no {m.family} equivalent in Hugging Face: this run cannot be exported")
    if m.family == "gpt2":
        require(m.kv_heads == m.n_heads, "model.n_kv_heads (grouped-query attention) has no GPT-2 equivalent: cannot export")
        require(m.compute_dtype != "float16", "model.compute_dtype=float16 is not exported")


def hf_config(m: ModelConfig):
    export_blockers(m)
    if m.family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=m.vocab_size, n_positions=m.max_seq_len, n_embd=m.d_model, n_layer=m.n_layers,
                          n_head=m.n_heads, n_inner=m.ff_dim, activation_function="gelu_new",
                          layer_norm_epsilon=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, architectures=["GPT2LMHeadModel"])
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ff_dim,
                       num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads,
                       head_dim=m.head_dim, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                       rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, attention_bias=False,
                       mlp_bias=False, hidden_act="silu", architectures=["LlamaForCausalLM"])


# ---------------------------------------------------------------------------------------------
# Weights


def params_from_hf(m: ModelConfig, w: dict[str, np.ndarray]) -> dict:
    """HF state dict (numpy) -> ar_lm params (scanned layout: layers stacked on axis 0)."""
    d, h, kh, dh = m.d_model, m.n_heads, m.kv_heads, m.head_dim

    def get(name, shape):
        require(name in w, f"weight {name} is missing from the checkpoint")
        arr = np.asarray(w[name], np.float32)
        require(arr.shape == tuple(shape), f"weight {name} has shape {arr.shape}, the config implies {tuple(shape)}")
        return arr

    layers = []
    for i in range(m.n_layers):
        if m.family == "gpt2":
            p = f"transformer.h.{i}."
            qkv = get(p + "attn.c_attn.weight", (d, 3 * d))
            qkv_b = get(p + "attn.c_attn.bias", (3 * d,))
            q, k, v = np.split(qkv, 3, axis=1)
            qb, kb, vb = np.split(qkv_b, 3)
            layers.append({
                "attn": {"q_kernel": q.reshape(d, h, dh), "k_kernel": k.reshape(d, h, dh), "v_kernel": v.reshape(d, h, dh),
                         "q_bias": qb.reshape(h, dh), "k_bias": kb.reshape(h, dh), "v_bias": vb.reshape(h, dh),
                         "o_kernel": get(p + "attn.c_proj.weight", (d, d)).reshape(h, dh, d),
                         "o_bias": get(p + "attn.c_proj.bias", (d,))},
                "attn_norm": {"scale": get(p + "ln_1.weight", (d,)), "bias": get(p + "ln_1.bias", (d,))},
                "mlp_norm": {"scale": get(p + "ln_2.weight", (d,)), "bias": get(p + "ln_2.bias", (d,))},
                "mlp": {"wi_kernel": get(p + "mlp.c_fc.weight", (d, m.ff_dim)), "wi_bias": get(p + "mlp.c_fc.bias", (m.ff_dim,)),
                        "wo_kernel": get(p + "mlp.c_proj.weight", (m.ff_dim, d)), "wo_bias": get(p + "mlp.c_proj.bias", (d,))},
            })
        else:
            p = f"model.layers.{i}."
            layers.append({
                "attn": {"q_kernel": get(p + "self_attn.q_proj.weight", (h * dh, d)).T.reshape(d, h, dh),
                         "k_kernel": get(p + "self_attn.k_proj.weight", (kh * dh, d)).T.reshape(d, kh, dh),
                         "v_kernel": get(p + "self_attn.v_proj.weight", (kh * dh, d)).T.reshape(d, kh, dh),
                         "o_kernel": get(p + "self_attn.o_proj.weight", (d, h * dh)).T.reshape(h, dh, d)},
                "attn_norm": {"scale": get(p + "input_layernorm.weight", (d,))},
                "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight", (d,))},
                "mlp": {"gate_kernel": get(p + "mlp.gate_proj.weight", (m.ff_dim, d)).T,
                        "up_kernel": get(p + "mlp.up_proj.weight", (m.ff_dim, d)).T,
                        "wo_kernel": get(p + "mlp.down_proj.weight", (d, m.ff_dim)).T},
            })
    params: dict[str, Any] = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    if m.family == "gpt2":
        params["embed"] = get("transformer.wte.weight", (m.vocab_size, d))
        params["pos_embed"] = get("transformer.wpe.weight", (m.max_seq_len, d))
        params["final_norm"] = {"scale": get("transformer.ln_f.weight", (d,)), "bias": get("transformer.ln_f.bias", (d,))}
    else:
        params["embed"] = get("model.embed_tokens.weight", (m.vocab_size, d))
        params["final_norm"] = {"scale": get("model.norm.weight", (d,))}
    if not m.tie_embeddings:
        params["unembed"] = get("lm_head.weight", (m.vocab_size, d)).T
    return params


def params_to_hf(m: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """ar_lm params (scanned or unrolled layout) -> HF state dict (numpy float32, contiguous)."""
    export_blockers(m)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    if "layers" in params:
        layers = [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(m.n_layers)]
    else:
        layers = [params[f"layer_{i}"] for i in range(m.n_layers)]
    d, h, kh, dh = m.d_model, m.n_heads, m.kv_heads, m.head_dim
    w: dict[str, np.ndarray] = {}
    for i, lp in enumerate(layers):
        a, mlp = lp["attn"], lp["mlp"]
        if m.family == "gpt2":
            p = f"transformer.h.{i}."
            w[p + "attn.c_attn.weight"] = np.concatenate([a[f"{n}_kernel"].reshape(d, d) for n in "qkv"], axis=1)
            w[p + "attn.c_attn.bias"] = np.concatenate([a[f"{n}_bias"].reshape(d) for n in "qkv"])
            w[p + "attn.c_proj.weight"] = a["o_kernel"].reshape(d, d)
            w[p + "attn.c_proj.bias"] = a["o_bias"]
            w[p + "ln_1.weight"], w[p + "ln_1.bias"] = lp["attn_norm"]["scale"], lp["attn_norm"]["bias"]
            w[p + "ln_2.weight"], w[p + "ln_2.bias"] = lp["mlp_norm"]["scale"], lp["mlp_norm"]["bias"]
            w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"] = mlp["wi_kernel"], mlp["wi_bias"]
            w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"] = mlp["wo_kernel"], mlp["wo_bias"]
        else:
            p = f"model.layers.{i}."
            w[p + "self_attn.q_proj.weight"] = a["q_kernel"].reshape(d, h * dh).T
            w[p + "self_attn.k_proj.weight"] = a["k_kernel"].reshape(d, kh * dh).T
            w[p + "self_attn.v_proj.weight"] = a["v_kernel"].reshape(d, kh * dh).T
            w[p + "self_attn.o_proj.weight"] = a["o_kernel"].reshape(h * dh, d).T
            w[p + "input_layernorm.weight"] = lp["attn_norm"]["scale"]
            w[p + "post_attention_layernorm.weight"] = lp["mlp_norm"]["scale"]
            w[p + "mlp.gate_proj.weight"] = mlp["gate_kernel"].T
            w[p + "mlp.up_proj.weight"] = mlp["up_kernel"].T
            w[p + "mlp.down_proj.weight"] = mlp["wo_kernel"].T
    if m.family == "gpt2":
        w["transformer.wte.weight"], w["transformer.wpe.weight"] = params["embed"], params["pos_embed"]
        w["transformer.ln_f.weight"], w["transformer.ln_f.bias"] = params["final_norm"]["scale"], params["final_norm"]["bias"]
    else:
        w["model.embed_tokens.weight"], w["model.norm.weight"] = params["embed"], params["final_norm"]["scale"]
    if not m.tie_embeddings:
        w["lm_head.weight"] = params["unembed"].T
    return {k: np.ascontiguousarray(v) for k, v in w.items()}


def read_hf_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    require(files, f"{hf_dir} has no *.safetensors weights (pickled .bin checkpoints are not read: convert them first)")
    weights: dict[str, np.ndarray] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"{f} is not a readable safetensors file ({type(e).__name__})") from None
    return weights


def _empty_or_missing(path: Path, what: str) -> None:
    require(not path.exists() or (path.is_dir() and not any(path.iterdir())),
            f"{what} {path} already exists and is not empty: choose another directory")


# ---------------------------------------------------------------------------------------------
# Commands


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> dict:
    """Write an ar_lm run directory (config, step-0 checkpoint, tokenizer if supported)."""
    from ar_lm.checkpoint import Checkpointer
    from ar_lm.optimizer import make_optimizer
    from ar_lm.sharding import logical_rules, make_mesh
    from ar_lm.train import init_state, mesh_context, state_shardings

    hf_dir, run_dir = Path(hf_dir).absolute(), Path(run_dir).absolute()
    require(hf_dir.is_dir(), f"Hugging Face directory {hf_dir} does not exist")
    cfg_path = hf_dir / "config.json"
    require(cfg_path.is_file(), f"{hf_dir} has no config.json: pass a directory saved with save_pretrained")
    _empty_or_missing(run_dir, "run directory")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{cfg_path} is not valid JSON") from None
    model = model_config_from_hf(hf)
    weights = read_hf_weights(hf_dir)
    params = params_from_hf(model, weights)
    seq_len = min(model.max_seq_len, 1024)
    cfg = ExperimentConfig(name=run_dir.name, model=model, data=DataConfig(seq_len=seq_len, batch_size=8),
                           train=TrainConfig(steps=1), mesh=MeshConfig(devices=1), logging=LoggingConfig(wandb=False))
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    tx, _ = make_optimizer(cfg.optim, 1)
    shardings = state_shardings(cfg, tx, mesh, rules)
    with mesh_context(mesh, rules):
        state = init_state(cfg, tx, shardings, jax.random.key(0))
    state["params"] = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding),
                                   params, state["params"])
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = Checkpointer(run_dir / rundir.CHECKPOINTS, keep=1, async_save=False)
        ckpt.save(0, state, {})
        ckpt.close()
        rundir.write_config(run_dir, cfg)
        tokenizer = _carry_tokenizer(hf_dir, run_dir, model.vocab_size)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return {"run_dir": str(run_dir), "family": model.family, "params": int(sum(x.size for x in jax.tree.leaves(params))),
            "tokenizer": tokenizer}


def _carry_tokenizer(hf_dir: Path, run_dir: Path, vocab_size: int) -> str | None:
    """Copy a sentencepiece tokenizer.model (the one kind ar_lm reads); None when there is none."""
    from ar_lm.tokenizer import SentencePieceTokenizer

    sp = hf_dir / "tokenizer.model"
    if not sp.is_file():
        return None
    tok = SentencePieceTokenizer(sp.read_bytes())
    dest = run_dir / rundir.TOKENIZER
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(sp, dest / "tokenizer.model")
    atomic_write_json(dest / "metadata.json", {"tokenizer": {
        "kind": "sentencepiece", "vocab_size": vocab_size, "eos_id": tok.eos_id, "file": "tokenizer.model",
        "sha256": sha256_file(sp)}})
    return "sentencepiece"


def load_run_params(run_dir: Path):
    from ar_lm.checkpoint import Checkpointer
    from ar_lm.sharding import logical_rules, make_mesh
    from ar_lm.train import abstract_params, mesh_context

    cfg = rundir.load_run_config(run_dir)
    ckpt_dir = Path(run_dir) / rundir.CHECKPOINTS
    require(ckpt_dir.is_dir(), f"run directory {run_dir} has no checkpoints yet")
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    step = ckpt.latest_step()
    require(step is not None, f"run directory {run_dir} has no complete checkpoint yet")
    cfg1 = dataclasses.replace(cfg, mesh=MeshConfig(devices=1))
    mesh, rules = make_mesh(cfg1.mesh), logical_rules(cfg1.mesh)
    with mesh_context(mesh, rules):
        params = ckpt.restore_params(step, abstract_params(cfg1, mesh, rules))
    ckpt.close()
    return cfg, jax.device_get(params)


def export_hf(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write OUT_DIR/config.json and OUT_DIR/model.safetensors that transformers loads."""
    from safetensors.numpy import save_file

    run_dir, out_dir = Path(run_dir).absolute(), Path(out_dir).absolute()
    cfg = rundir.load_run_config(run_dir)
    export_blockers(cfg.model)
    _empty_or_missing(out_dir, "output directory")
    _, params = load_run_params(run_dir)
    weights = params_to_hf(cfg.model, params)
    hf_cfg = hf_config(cfg.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_cfg.save_pretrained(str(out_dir))
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    sp = run_dir / rundir.TOKENIZER / "tokenizer.model"
    if sp.is_file():
        shutil.copy2(sp, out_dir / "tokenizer.model")
    return {"out_dir": str(out_dir), "architecture": hf_cfg.architectures[0], "tensors": len(weights)}
