"""Hugging Face config.json <-> ModelConfig for GPT2LMHeadModel and LlamaForCausalLM."""

from __future__ import annotations

from ar_lm.config import ModelConfig
from ar_lm.errors import require

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}


ARCH_OF_FAMILY = {family: arch for arch, family in ARCHITECTURES.items()}


GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
                 "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                 "tie_word_embeddings": True}


LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                  "tie_word_embeddings": False}


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
    require(m.parametrization == "sp" or m.d_model == m.mup_base_width,
            f"model.parametrization=mup at width {m.d_model} (base {m.mup_base_width}) scales its logits and scores, "
            f"which {arch} in transformers cannot: this run cannot be exported")
    require(m.family == "llama" or m.kv_heads == m.n_heads,
            f"model.n_kv_heads={m.n_kv_heads} (grouped-query attention) has no {arch} equivalent: this run cannot be exported")


def hf_config_dict(m: ModelConfig, eos_id: int | None, bos_id: int | None = None) -> dict:
    """config.json for transformers, every field explicit (no dropout: ar_lm trains without it)."""
    common = {"architectures": [ARCH_OF_FAMILY[m.family]], "vocab_size": m.vocab_size,
              "tie_word_embeddings": m.tie_embeddings, "bos_token_id": eos_id if bos_id is None else bos_id,
              "eos_token_id": eos_id,
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
