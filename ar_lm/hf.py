"""Hugging Face interop: GPT-2 / Llama checkpoints in as ar_lm runs, ar_lm runs out as checkpoints.

`import_hf(HF_DIR, RUN_DIR)` reads ``config.json`` + ``*.safetensors`` of a ``GPT2LMHeadModel`` or
``LlamaForCausalLM`` and writes a run directory: the resolved config, a step-0 checkpoint (imported
parameters, fresh optimizer state) and the tokenizer when ar_lm can read it. `export_hf(RUN_DIR,
OUT_DIR)` writes ``config.json`` + ``model.safetensors`` that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. Weights move as safetensors only (never
pickle); neither direction imports torch or transformers (only the `hf` extra's safetensors).

Layouts (ar_lm <- HF; ar_lm stacks the L layers on axis 0 under ``layers``):

- GPT-2 (Conv1D weights are [in, out]): c_attn [D, 3D] = q|k|v -> {q,k,v}_kernel [D, H, Dh] and
  c_attn.bias -> {q,k,v}_bias [H, Dh]; attn.c_proj [D, D] -> o_kernel [H, Dh, D]; mlp.c_fc [D, F] ->
  wi_kernel; mlp.c_proj [F, D] -> wo_kernel; ln_1 / ln_2 / ln_f -> attn_norm / mlp_norm / final_norm;
  wte -> embed [V, D]; wpe -> pos_embed [max_seq_len, D]; lm_head [V, D] -> unembed [D, V] if untied.
- Llama (torch Linear weights are [out, in]): q_proj [H*Dh, D] -> q_kernel [D, H, Dh], k/v_proj
  [K*Dh, D] -> [D, K, Dh], o_proj [D, H*Dh] -> o_kernel [H, Dh, D]; gate/up_proj [F, D] ->
  gate/up_kernel [D, F]; down_proj [D, F] -> wo_kernel [F, D]; input_layernorm /
  post_attention_layernorm / norm -> attn_norm / mlp_norm / final_norm; embed_tokens -> embed;
  lm_head -> unembed if untied. ar_lm's RoPE is HF's rotate-half layout, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ar_lm import rundir
from ar_lm.config import DataConfig, ExperimentConfig, MeshConfig, ModelConfig, validate
from ar_lm.errors import UserError, require

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
ARCH_OF_FAMILY = {family: arch for arch, family in ARCHITECTURES.items()}
TOKENIZER_DIR = "ar_lm_tokenizer"  # an exported run's ar_lm tokenizer (byte, char or sentencepiece)
# transformers' defaults for keys that config.json may leave out
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                 "tie_word_embeddings": True}
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                  "tie_word_embeddings": False}


# ---------------------------------------------------------------------------------------------
# Configs


def model_config_from_hf(hf: dict) -> ModelConfig:
    """A transformers config.json (dict) -> ModelConfig; UserError naming any unsupported option."""
    arch = (hf.get("architectures") or [None])[0] or ARCH_OF_FAMILY.get(hf.get("model_type"), hf.get("model_type"))
    require(arch is not None, "config.json names no architecture (neither architectures nor model_type): "
                              "pass a Hugging Face model directory")
    require(arch in ARCHITECTURES,
            f"architecture {arch!r} is not supported: import a GPT2LMHeadModel or LlamaForCausalLM checkpoint")
    family = ARCHITECTURES[arch]
    c = {**(GPT2_DEFAULTS if family == "gpt2" else LLAMA_DEFAULTS), **{k: v for k, v in hf.items() if v is not None}}

    def unsupported(option: str, ok: bool) -> None:
        require(ok, f"{arch} option {option}={hf.get(option)!r} in config.json has no ar_lm equivalent: it cannot be imported")

    if family == "gpt2":
        unsupported("activation_function", c["activation_function"] in ("gelu_new", "gelu_pytorch_tanh"))
        unsupported("scale_attn_by_inverse_layer_idx", not c.get("scale_attn_by_inverse_layer_idx"))
        unsupported("scale_attn_weights", c.get("scale_attn_weights", True))
        unsupported("add_cross_attention", not c.get("add_cross_attention"))
        d = c["n_embd"]
        return ModelConfig(family="gpt2", vocab_size=c["vocab_size"], d_model=d, n_layers=c["n_layer"],
                           n_heads=c["n_head"], d_ff=c["n_inner"] or 4 * d, max_seq_len=c["n_positions"],
                           tie_embeddings=bool(c["tie_word_embeddings"]), norm_eps=float(c["layer_norm_epsilon"]))
    rope = c.get("rope_parameters") or {}
    unsupported("rope_scaling", not c.get("rope_scaling"))
    unsupported("rope_parameters", rope.get("rope_type", "default") == "default")
    unsupported("attention_bias", not c.get("attention_bias"))
    unsupported("mlp_bias", not c.get("mlp_bias"))
    unsupported("hidden_act", c["hidden_act"] == "silu")
    d, h = c["hidden_size"], c["num_attention_heads"]
    unsupported("head_dim", c["head_dim"] in (None, d // h))  # ar_lm's head_dim is d_model / n_heads
    return ModelConfig(family="llama", vocab_size=c["vocab_size"], d_model=d, n_layers=c["num_hidden_layers"],
                       n_heads=h, n_kv_heads=c["num_key_value_heads"] or h, d_ff=c["intermediate_size"],
                       max_seq_len=c["max_position_embeddings"], tie_embeddings=bool(c["tie_word_embeddings"]),
                       rope_theta=float(rope.get("rope_theta", c["rope_theta"])), norm_eps=float(c["rms_norm_eps"]))


def check_exportable(m: ModelConfig) -> None:
    """UserError naming the first option that has no GPT-2 / Llama equivalent in transformers."""
    arch = ARCH_OF_FAMILY[m.family]
    require(not m.qk_norm, f"model.qk_norm=true has no {arch} equivalent in transformers: this run cannot be exported")
    require(m.family == "llama" or m.kv_heads == m.n_heads,
            f"model.n_kv_heads={m.n_kv_heads} (grouped-query attention) has no {arch} equivalent: this run cannot be exported")


def hf_config_dict(m: ModelConfig, eos_id: int | None) -> dict:
    """config.json for transformers, every field explicit (no dropout: ar_lm trains without it)."""
    common = {"architectures": [ARCH_OF_FAMILY[m.family]], "vocab_size": m.vocab_size,
              "tie_word_embeddings": m.tie_embeddings, "bos_token_id": eos_id, "eos_token_id": eos_id,
              "pad_token_id": None, "dtype": "float32", "use_cache": True}
    if m.family == "gpt2":
        return {"model_type": "gpt2", **common, "n_positions": m.max_seq_len, "n_embd": m.d_model,
                "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.ff_dim, "activation_function": "gelu_new",
                "layer_norm_epsilon": m.norm_eps, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return {"model_type": "llama", **common, "hidden_size": m.d_model, "intermediate_size": m.ff_dim,
            "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
            "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
            "rms_norm_eps": m.norm_eps, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "pretraining_tp": 1, "rope_scaling": None,
            # transformers >= 5 reads rope_parameters, 4.x reads rope_theta
            "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}}


# ---------------------------------------------------------------------------------------------
# Weights


def _normalize_names(family: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop non-parameter buffers of older checkpoints; add the `transformer.` prefix that GPT-2
    checkpoints saved from GPT2Model (e.g. the original `gpt2`) leave out."""
    out = {}
    for name, w in weights.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue
        if family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        out[name] = w
    return out


def params_from_hf(m: ModelConfig, weights: dict[str, np.ndarray]) -> dict:
    """HF state dict (numpy) -> ar_lm params (float32, layers stacked on axis 0); UserError on a
    missing, unexpected or wrongly shaped weight."""
    w = _normalize_names(m.family, weights)
    d, h, kh, dh, f = m.d_model, m.n_heads, m.kv_heads, m.head_dim, m.ff_dim

    def take(name: str, shape: tuple) -> np.ndarray:
        require(name in w, f"weight {name} is missing from the safetensors files: the checkpoint is incomplete")
        arr = np.asarray(w.pop(name), np.float32)
        require(arr.shape == shape,
                f"weight {name} has shape {arr.shape} but config.json implies {shape}: the config does not match the weights")
        return arr

    layers = []
    for i in range(m.n_layers):
        if m.family == "gpt2":
            p = f"transformer.h.{i}."
            q_DxD, k_DxD, v_DxD = np.split(take(p + "attn.c_attn.weight", (d, 3 * d)), 3, axis=1)
            q_b, k_b, v_b = np.split(take(p + "attn.c_attn.bias", (3 * d,)), 3)
            layers.append({
                "attn": {"q_kernel": q_DxD.reshape(d, h, dh), "k_kernel": k_DxD.reshape(d, h, dh),
                         "v_kernel": v_DxD.reshape(d, h, dh), "q_bias": q_b.reshape(h, dh),
                         "k_bias": k_b.reshape(h, dh), "v_bias": v_b.reshape(h, dh),
                         "o_kernel": take(p + "attn.c_proj.weight", (d, d)).reshape(h, dh, d),
                         "o_bias": take(p + "attn.c_proj.bias", (d,))},
                "attn_norm": {"scale": take(p + "ln_1.weight", (d,)), "bias": take(p + "ln_1.bias", (d,))},
                "mlp_norm": {"scale": take(p + "ln_2.weight", (d,)), "bias": take(p + "ln_2.bias", (d,))},
                "mlp": {"wi_kernel": take(p + "mlp.c_fc.weight", (d, f)), "wi_bias": take(p + "mlp.c_fc.bias", (f,)),
                        "wo_kernel": take(p + "mlp.c_proj.weight", (f, d)), "wo_bias": take(p + "mlp.c_proj.bias", (d,))},
            })
        else:
            p = f"model.layers.{i}."
            layers.append({
                "attn": {"q_kernel": take(p + "self_attn.q_proj.weight", (h * dh, d)).T.reshape(d, h, dh),
                         "k_kernel": take(p + "self_attn.k_proj.weight", (kh * dh, d)).T.reshape(d, kh, dh),
                         "v_kernel": take(p + "self_attn.v_proj.weight", (kh * dh, d)).T.reshape(d, kh, dh),
                         "o_kernel": take(p + "self_attn.o_proj.weight", (d, h * dh)).T.reshape(h, dh, d)},
                "attn_norm": {"scale": take(p + "input_layernorm.weight", (d,))},
                "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight", (d,))},
                "mlp": {"gate_kernel": take(p + "mlp.gate_proj.weight", (f, d)).T,
                        "up_kernel": take(p + "mlp.up_proj.weight", (f, d)).T,
                        "wo_kernel": take(p + "mlp.down_proj.weight", (d, f)).T},
            })
    params: dict[str, Any] = {"layers": jax.tree.map(lambda *per_layer: np.stack(per_layer), *layers)}
    if m.family == "gpt2":
        params["embed"] = take("transformer.wte.weight", (m.vocab_size, d))
        params["pos_embed"] = take("transformer.wpe.weight", (m.max_seq_len, d))
        params["final_norm"] = {"scale": take("transformer.ln_f.weight", (d,)), "bias": take("transformer.ln_f.bias", (d,))}
    else:
        params["embed"] = take("model.embed_tokens.weight", (m.vocab_size, d))
        params["final_norm"] = {"scale": take("model.norm.weight", (d,))}
    if not m.tie_embeddings:
        params["unembed"] = take("lm_head.weight", (m.vocab_size, d)).T
    w.pop("lm_head.weight", None)  # a tied checkpoint may store the shared matrix twice
    if w:
        raise UserError(f"weight {sorted(w)[0]} ({len(w)} unexpected in all) has no place in a {ARCH_OF_FAMILY[m.family]} "
                        "of this config: the checkpoint is another architecture variant")
    return params


def params_to_hf(m: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """ar_lm params (scanned or unrolled layers) -> HF state dict (contiguous float32 numpy)."""
    check_exportable(m)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    if "layers" in params:
        layers = [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(m.n_layers)]
    else:
        layers = [params[f"layer_{i}"] for i in range(m.n_layers)]
    d, h, kh, dh = m.d_model, m.n_heads, m.kv_heads, m.head_dim
    w: dict[str, np.ndarray] = {}
    for i, layer in enumerate(layers):
        attn, mlp, ln1, ln2 = layer["attn"], layer["mlp"], layer["attn_norm"], layer["mlp_norm"]
        if m.family == "gpt2":
            p = f"transformer.h.{i}."
            w[p + "attn.c_attn.weight"] = np.concatenate([attn[f"{n}_kernel"].reshape(d, d) for n in "qkv"], axis=1)
            w[p + "attn.c_attn.bias"] = np.concatenate([attn[f"{n}_bias"].reshape(d) for n in "qkv"])
            w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"] = attn["o_kernel"].reshape(d, d), attn["o_bias"]
            w[p + "ln_1.weight"], w[p + "ln_1.bias"] = ln1["scale"], ln1["bias"]
            w[p + "ln_2.weight"], w[p + "ln_2.bias"] = ln2["scale"], ln2["bias"]
            w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"] = mlp["wi_kernel"], mlp["wi_bias"]
            w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"] = mlp["wo_kernel"], mlp["wo_bias"]
        else:
            p = f"model.layers.{i}."
            w[p + "self_attn.q_proj.weight"] = attn["q_kernel"].reshape(d, h * dh).T
            w[p + "self_attn.k_proj.weight"] = attn["k_kernel"].reshape(d, kh * dh).T
            w[p + "self_attn.v_proj.weight"] = attn["v_kernel"].reshape(d, kh * dh).T
            w[p + "self_attn.o_proj.weight"] = attn["o_kernel"].reshape(h * dh, d).T
            w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"] = ln1["scale"], ln2["scale"]
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
    return {name: np.ascontiguousarray(x) for name, x in w.items()}


def _safetensors():
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise UserError("Hugging Face interop needs the safetensors package: pip install 'ar_lm[hf]'") from None


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """The model's tensors as numpy (bfloat16 included): the shards that model.safetensors.index.json
    lists, else model.safetensors, else every *.safetensors in HF_DIR."""
    _safetensors()
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = [hf_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        for f in files:
            require(f.is_file(), f"{index} lists {f.name}, which is missing: the checkpoint is incomplete")
    elif (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
    require(files, f"{hf_dir} has no *.safetensors weights: only safetensors are read (never pickled .bin files); "
                   "convert the checkpoint with save_pretrained(..., safe_serialization=True)")
    weights: dict[str, np.ndarray] = {}
    # framework="flax" reads bfloat16 (numpy cannot); keep the arrays on the host
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        for path in files:
            try:
                with safe_open(str(path), framework="flax") as f:
                    weights.update({name: np.asarray(f.get_tensor(name)) for name in f.keys()})
            except Exception as e:  # noqa: BLE001 - safetensors raises several error types
                raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return weights


# ---------------------------------------------------------------------------------------------
# Directories and tokenizers


def _require_fresh(path: Path, what: str) -> None:
    require(not path.exists() or (path.is_dir() and not any(path.iterdir())),
            f"{what} {path} already exists and is not empty: choose a new directory (nothing was changed)")


def _publish(tmp: Path, dest: Path) -> None:
    """Move a fully written temporary directory to `dest` (missing or empty)."""
    if dest.is_dir():
        dest.rmdir()
    os.replace(tmp, dest)


def _staging_dir(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp"))


def find_tokenizer(hf_dir: Path, vocab_size: int) -> tuple[dict | None, Path | None, str]:
    """(metadata, file, note) of a tokenizer ar_lm reads in HF_DIR: an ar_lm export's
    ar_lm_tokenizer/ (byte, char or sentencepiece), else a sentencepiece tokenizer.model with the
    model's vocabulary; (None, None, why) when there is none."""
    from ar_lm.io import sha256_file
    from ar_lm.tokenizer import load_tokenizer

    candidates = []  # (kind, directory, file)
    if (hf_dir / TOKENIZER_DIR / "metadata.json").is_file():
        meta = json.loads((hf_dir / TOKENIZER_DIR / "metadata.json").read_text())["tokenizer"]
        candidates.append((meta["kind"], hf_dir / TOKENIZER_DIR, hf_dir / TOKENIZER_DIR / meta["file"]))
    if (hf_dir / "tokenizer.model").is_file():
        candidates.append(("sentencepiece", hf_dir, hf_dir / "tokenizer.model"))
    for kind, directory, file in candidates:
        try:
            tok = load_tokenizer(directory, kind)
        except Exception:  # noqa: BLE001 - e.g. a tokenizer.model that sentencepiece cannot read
            continue
        if tok.vocab_size != vocab_size:
            return None, None, (f"the {kind} tokenizer in {directory} has {tok.vocab_size} tokens but the model has "
                                f"{vocab_size}: the run has no text tokenizer; give token ids")
        meta = {"kind": kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "file": file.name,
                "sha256": sha256_file(file)}
        return meta, file, f"{kind} tokenizer carried over"
    return None, None, (f"{hf_dir} holds no tokenizer ar_lm reads (an ar_lm export's {TOKENIZER_DIR}/ or a "
                        "sentencepiece tokenizer.model): the run has no text tokenizer; give token ids")


def _copy_tokenizer(meta: dict, file: Path, dest: Path) -> None:
    from ar_lm.io import atomic_write_json

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(file, dest / meta["file"])
    atomic_write_json(dest / "metadata.json", {"tokenizer": meta})


# ---------------------------------------------------------------------------------------------
# Import and export


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> dict:
    """Write RUN_DIR (config.json, checkpoints/0 with the imported parameters and a fresh optimizer
    state, tokenizer/ when ar_lm reads HF_DIR's tokenizer). Checks everything before writing."""
    from ar_lm.checkpoint import Checkpointer
    from ar_lm.optimizer import make_optimizer
    from ar_lm.sharding import logical_rules, make_mesh
    from ar_lm.train import _fresh_state, mesh_context, state_shardings

    hf_dir, run_dir = Path(hf_dir).absolute(), Path(run_dir).absolute()
    require(hf_dir.is_dir(), f"Hugging Face directory {hf_dir} does not exist")
    config_path = hf_dir / "config.json"
    require(config_path.is_file(), f"{hf_dir} has no config.json: pass a directory written by save_pretrained")
    _require_fresh(run_dir, "run directory")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    model = model_config_from_hf(hf)
    params = params_from_hf(model, read_safetensors(hf_dir))
    cfg = validate(ExperimentConfig(name=run_dir.name, model=model, mesh=MeshConfig(devices=1),
                                    data=DataConfig(seq_len=min(model.max_seq_len, 1024), batch_size=8)))
    tok_meta, tok_file, tok_note = find_tokenizer(hf_dir, model.vocab_size)

    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
    shardings = state_shardings(cfg, tx, mesh, rules)

    def imported_state(params):  # a fresh train state around the imported parameters (XLA drops the unused init)
        return {**_fresh_state(cfg, tx, jax.random.key(0)), "params": params, "opt_state": tx.init(params)}

    with mesh_context(mesh, rules):
        state = jax.jit(imported_state, out_shardings=shardings)(params)
    tmp = _staging_dir(run_dir)
    try:
        ckpt = Checkpointer(tmp / rundir.CHECKPOINTS, keep=1, async_save=False)
        ckpt.save(0, state, {"next_index": 0})  # the data iterator's state before its first batch
        ckpt.close()
        rundir.write_config(tmp, cfg)
        if tok_meta:
            _copy_tokenizer(tok_meta, tok_file, tmp / rundir.TOKENIZER)
        _publish(tmp, run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    return {"run_dir": str(run_dir), "architecture": ARCH_OF_FAMILY[model.family], "params": n_params,
            "tokenizer": tok_meta["kind"] if tok_meta else None, "note": tok_note}


def load_run_params(run_dir: str | Path) -> tuple[ExperimentConfig, int, dict]:
    """(config, step, params as numpy) of a run's latest checkpoint, restored on one device."""
    from ar_lm.sharding import logical_rules, make_mesh
    from ar_lm.train import restore_latest_params

    run_dir = Path(run_dir).absolute()
    cfg = rundir.load_run_config(run_dir)
    one_device = dataclasses.replace(cfg, mesh=MeshConfig(devices=1))
    mesh, rules = make_mesh(one_device.mesh), logical_rules(one_device.mesh)
    step, params = restore_latest_params(run_dir, one_device, mesh, rules)
    return cfg, step, jax.device_get(params)


def export_hf(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write OUT_DIR/config.json + model.safetensors (+ the run's tokenizer in ar_lm_tokenizer/, and
    a sentencepiece tokenizer.model at the top) from the run's latest checkpoint."""
    _safetensors()
    from safetensors.numpy import save_file

    run_dir, out_dir = Path(run_dir).absolute(), Path(out_dir).absolute()
    cfg = rundir.load_run_config(run_dir)
    check_exportable(cfg.model)
    _require_fresh(out_dir, "output directory")
    _, step, params = load_run_params(run_dir)
    weights = params_to_hf(cfg.model, params)
    tok_dir = run_dir / rundir.TOKENIZER
    tok_meta = json.loads((tok_dir / "metadata.json").read_text())["tokenizer"] if (tok_dir / "metadata.json").is_file() else None
    eos_id = tok_meta["eos_id"] if tok_meta else None
    tmp = _staging_dir(out_dir)
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg.model, eos_id), indent=2) + "\n")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tok_meta:
            _copy_tokenizer(tok_meta, tok_dir / tok_meta["file"], tmp / TOKENIZER_DIR)
            if tok_meta["kind"] == "sentencepiece":
                shutil.copy2(tok_dir / tok_meta["file"], tmp / "tokenizer.model")
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": str(out_dir), "architecture": ARCH_OF_FAMILY[cfg.model.family], "step": step,
            "tensors": len(weights), "tokenizer": tok_meta["kind"] if tok_meta else None}
