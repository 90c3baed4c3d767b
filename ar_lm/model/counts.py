"""Exact parameter counts and training FLOPs per token, as functions of the config alone."""

from __future__ import annotations

from ar_lm.config import ModelConfig


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts, from the config alone.

    Per layer: attention d*Dh*(H + 2K) + H*Dh*d weights (+ Dh*(H + 2K) + d biases for gpt2,
    + 2*Dh for QK-norm scales); MLP 2*d*F (gpt2, + F + d biases) or 3*d*F (llama); two norms
    (2d each for LayerNorm, d for RMSNorm). Plus a final norm, the token embedding V*d, learned
    positions max_seq_len*d (gpt2) and an output projection d*V when untied.

    ``non_embedding`` = total minus token embedding, position embedding and untied output
    projection (Kaplan et al. 2020's N).
    """
    d, h, kh, dh, f, v = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim, cfg.vocab_size
    gpt2 = cfg.family == "gpt2"
    norm = 2 * d if gpt2 else d
    attn = d * dh * (h + 2 * kh) + h * dh * d
    if gpt2:
        attn += dh * (h + 2 * kh) + d
    if cfg.qk_norm:
        attn += 2 * dh
    mlp = 2 * d * f + f + d if gpt2 else 3 * d * f
    per_layer = attn + mlp + 2 * norm
    embedding = v * d
    positions = cfg.max_seq_len * d if gpt2 else 0
    unembed = 0 if cfg.tie_embeddings else d * v
    non_embedding = cfg.n_layers * per_layer + norm
    return {
        "total": non_embedding + embedding + positions + unembed,
        "non_embedding": non_embedding,
        "embedding": embedding + positions + unembed,
        "per_layer": per_layer,
    }


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal_halved: bool = True) -> float:
    """Training FLOPs per token of the attention scores QK^T and the value product AV.

    Each costs 2*H*Dh FLOPs per (query, key) pair forward, x3 forward + backward. ``causal_halved``:
    the query at position t attends to t keys, (L+1)/2 on average: 6 * n_layers * H * Dh * (L + 1).
    Otherwise the full L x L square, as Hoffmann et al. 2022 (Chinchilla, Appendix F) count it:
    12 * n_layers * H * Dh * L (their softmax term, 3*H*L forward, is not counted here).
    """
    hd = cfg.n_layers * cfg.n_heads * cfg.head_dim
    return float(6 * hd * (seq_len + 1) if causal_halved else 12 * hd * seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal_halved: bool = True) -> float:
    """Training FLOPs (forward + backward) per token.

    6 * (matmul weights) + `attention_flops_per_token` (causal: 6 * n_layers * H * Dh * (seq_len + 1)).

    Matmul weights per layer: d*Dh*(H + 2K) + H*Dh*d + (2 or 3)*d*F; plus the output projection
    d*V (tied or not). Each weight costs 2 FLOPs per token forward and 4 backward (Kaplan et al.
    2020). Causal attention (the default, ``causal_halved``): the query at position t attends to t
    keys, so over a sequence of length L the average is (L+1)/2 keys; QK^T and AV each cost 2*H*Dh
    FLOPs per key forward, so 4*H*Dh*(L+1)/2 forward and 3x that forward+backward, counted once for
    the causal triangle. ``causal_halved=False`` counts the full L x L square (Chinchilla's convention).
    """
    d, h, kh, dh, f, v = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim, cfg.vocab_size
    mlp_mats = 2 if cfg.family == "gpt2" else 3
    matmul_weights = cfg.n_layers * (d * dh * (h + 2 * kh) + h * dh * d + mlp_mats * d * f) + d * v
    return 6.0 * matmul_weights + attention_flops_per_token(cfg, seq_len, causal_halved)
