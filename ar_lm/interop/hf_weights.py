"""Hugging Face weights <-> ar_lm parameters, moved as safetensors only (never pickle).

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

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ar_lm.config import ModelConfig
from ar_lm.errors import UserError, require
from ar_lm.interop.hf_config import ARCH_OF_FAMILY, check_exportable


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


def ensure_safetensors():
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise UserError("Hugging Face interop needs the safetensors package: pip install 'ar_lm[hf]'") from None


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """The model's tensors as numpy (bfloat16 included): the shards that model.safetensors.index.json
    lists, else model.safetensors, else every *.safetensors in HF_DIR."""
    ensure_safetensors()
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
