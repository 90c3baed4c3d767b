"""Decoder-only transformer (flax.linen), functional: params are a plain pytree.

Shapes are written into names: B batch, L query length, S key/cache length, D d_model,
H query heads, K kv heads, G = H/K query heads per kv head, Dh head dim, F mlp width, V vocab.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab`, `layers`, ...) so that sharding is a rule table (`ar_lm.sharding`), not code.

Attention is causal through positions: a query at position p sees keys at positions 0..p that
are valid (key position >= 0). Training passes no cache (positions 0..L-1); decoding passes a
KV cache of shape [layers, B, K, S, Dh] plus the position of every cache slot (-1: empty).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_lm.config import ModelConfig

Array = jax.Array
Cache = dict  # {"k": [n_layers, B, K, S, Dh], "v": [n_layers, B, K, S, Dh]}


def resolve_compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """`auto`: float32 on CPU (bf16 is slower there), bfloat16 on GPU/TPU."""
    if cfg.compute_dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(cfg.compute_dtype)


def resolve_attention(cfg: ModelConfig) -> str:
    """`auto`: the hand-written masked softmax on CPU/TPU, `jax.nn.dot_product_attention` on GPU
    (cuDNN flash attention)."""
    if cfg.attention == "auto":
        return "dot_product" if jax.default_backend() == "gpu" else "xla"
    return cfg.attention


def resolve_remat(cfg: ModelConfig) -> str:
    """`auto`: `dots` on CPU when layers are scanned, else `none`.

    On XLA:CPU the backward of `nn.scan` stacks every saved activation of every layer into
    [n_layers, ...] buffers (zero-filled, written and read back slice by slice); saving only the
    matmul outputs and recomputing the cheap elementwise work is faster there: 6-layer/384
    train step 1,407 -> 1,162 ms, nanoGPT CPU config 68 -> 41 ms (2 cores). Unrolled layers gain
    nothing from it, and on GPU/TPU recomputation only costs time.
    """
    if cfg.remat == "auto":
        return "dots" if cfg.scan_layers and jax.default_backend() == "cpu" else "none"
    return cfg.remat


def cpu_compiler_options() -> dict:
    """XLA:CPU backend (LLVM) optimisation level 1 for a program; empty on GPU/TPU.

    Measured on the 6-layer/384 model (2-core CPU): the train step compiles in 2.6-3.3 s instead of
    3.9-4.9 s at the same step time (its matmuls are library calls); initialisation compiles and
    runs in 1.1 s instead of 1.5 s. Level 0 would compile faster still but makes the step 1.7x and
    initialisation 4-8x slower.
    """
    return {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else {}


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale (Zhang & Sennrich 2019), computed in float32."""

    eps: float
    param_dtype: Any
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias (Ba et al. 2016), computed in float32."""

    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, (d,), ("norm",), self.param_dtype)
        bias = _param(self, "bias", nn.initializers.zeros, (d,), ("norm",), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    param_dtype = jnp.dtype(cfg.param_dtype)
    if cfg.family == "gpt2":
        return LayerNorm(cfg.norm_eps, param_dtype, name=name)
    return RMSNorm(cfg.norm_eps, param_dtype, name=name)


def rope(x_BxLxNxDh: Array, positions_BxL: Array, theta: float) -> Array:
    """Rotary position embedding (Su et al. 2021), rotate-half layout as in HF Llama."""
    dh = x_BxLxNxDh.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    angles_BxLxDh2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    angles_BxLxDh = jnp.concatenate([angles_BxLxDh2, angles_BxLxDh2], axis=-1)[:, :, None, :]
    x = x_BxLxNxDh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles_BxLxDh) + rotated * jnp.sin(angles_BxLxDh)).astype(x_BxLxNxDh.dtype)


def attention_mask(q_pos_BxL: Array, kv_pos_BxS: Array) -> Array:
    """mask[b, l, s] = key s is valid (position >= 0) and not in the future of query l."""
    kv = kv_pos_BxS[:, None, :]
    return (kv >= 0) & (kv <= q_pos_BxL[:, :, None])


def xla_attention(q_BxLxHxDh, k_BxKxSxDh, v_BxKxSxDh, mask_BxLxS) -> Array:
    """softmax(q k^T / sqrt(Dh) + mask) v, hand-written, for any mask (KV-cache decoding, padding);
    grouped heads share their kv head. Keys and values come heads-first, as the cache holds them, so
    the score and value matmuls need no transpose of the cache."""
    b, l, h, dh = q_BxLxHxDh.shape
    kh = k_BxKxSxDh.shape[1]
    q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, l, kh, h // kh, dh)
    scores_BxKxGxLxS = jnp.einsum("blkgd,bksd->bkgls", q_BxLxKxGxDh, k_BxKxSxDh) * (dh**-0.5)
    scores_BxKxGxLxS = scores_BxKxGxLxS.astype(jnp.float32)
    big_neg = jnp.finfo(jnp.float32).min
    scores_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], scores_BxKxGxLxS, big_neg)
    probs = jax.nn.softmax(scores_BxKxGxLxS, axis=-1).astype(v_BxKxSxDh.dtype)
    out_BxLxKxGxDh = jnp.einsum("bkgls,bksd->blkgd", probs, v_BxKxSxDh)
    return out_BxLxKxGxDh.reshape(b, l, h, dh)


def causal_block_bounds(length: int, block: int = 64, max_blocks: int = 8) -> list[int]:
    """Query-block boundaries for `causal_attention`: about `length / block` blocks (at most
    `max_blocks`), so 64-128 query rows per block at the sequence lengths we train."""
    n = max(1, min(max_blocks, length // block))
    return [round(i * length / n) for i in range(n + 1)]


def causal_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, bounds=None) -> Array:
    """Plain causal self-attention (positions 0..L-1), skipping the masked upper triangle.

    Queries are cut into blocks [lo, hi); a block attends to keys [0, hi) only, so with n blocks
    the score and value matmuls cost (n+1)/(2n) of the full L x L square (0.625 at n=4), and
    heads lead the layout ([B, K, G*c, Dh] x [B, K, S, Dh]) so every matmul is a plain batched
    2-D one. Same result as `xla_attention` with the causal mask.
    """
    b, l, h, dh = q_BxLxHxDh.shape
    kh = k_BxLxKxDh.shape[2]
    g = h // kh
    q_BxKxGxLxDh = (q_BxLxHxDh * dh**-0.5).reshape(b, l, kh, g, dh).transpose(0, 2, 3, 1, 4)
    k_BxKxLxDh, v_BxKxLxDh = (x.transpose(0, 2, 1, 3) for x in (k_BxLxKxDh, v_BxLxKxDh))
    big_neg = jnp.finfo(jnp.float32).min
    outs = []
    bounds = bounds or causal_block_bounds(l)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        c = hi - lo
        q_BxKxXxDh = q_BxKxGxLxDh[:, :, :, lo:hi].reshape(b, kh, g * c, dh)
        scores = jnp.einsum("bkxd,bksd->bkxs", q_BxKxXxDh, k_BxKxLxDh[:, :, :hi], preferred_element_type=jnp.float32)
        scores_BxKxGxCxS = scores.reshape(b, kh, g, c, hi)
        q_pos = jax.lax.broadcasted_iota(jnp.int32, (c, hi), 0) + lo
        k_pos = jax.lax.broadcasted_iota(jnp.int32, (c, hi), 1)
        scores_BxKxGxCxS = jnp.where(k_pos <= q_pos, scores_BxKxGxCxS, big_neg)
        probs = jax.nn.softmax(scores_BxKxGxCxS, axis=-1).astype(v_BxLxKxDh.dtype).reshape(b, kh, g * c, hi)
        outs.append(jnp.einsum("bkxs,bksd->bkxd", probs, v_BxKxLxDh[:, :, :hi]).reshape(b, kh, g, c, dh))
    out_BxKxGxLxDh = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out_BxKxGxLxDh.transpose(0, 3, 1, 2, 4).reshape(b, l, h, dh)


def dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS=None) -> Array:
    """`jax.nn.dot_product_attention` (cuDNN flash attention on GPU when shapes allow);
    no mask: plain causal self-attention."""
    if mask_BxLxS is None:  # let the kernel build the causal mask
        return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, is_causal=True)
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask_BxLxS[:, None])


def write_cache(cache_LxBxKxSxDh: Array, layer, cache_index, new_BxKxLxDh: Array) -> Array:
    """Write a chunk into slice `layer` of a cache at slot `cache_index`: one slot for the whole
    batch (a scalar), or a slot per row ([B]; speculative rows advance by different amounts)."""
    new = new_BxKxLxDh.astype(cache_LxBxKxSxDh.dtype)
    zero = jnp.zeros((), jnp.int32)
    layer = jnp.asarray(layer, jnp.int32)
    index = jnp.asarray(cache_index, jnp.int32)
    if index.ndim == 1 and index.shape[0] == 1:  # one row: its slot is the batch's
        index = index[0]
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache_LxBxKxSxDh, new[None], (layer, zero, zero, index, zero))

    def write_row(b, c):  # row by row, each an in-place slice update (a vmapped one becomes a slow scatter)
        return jax.lax.dynamic_update_slice(c, new[b][None, None], (layer, b, zero, index[b], zero))

    return jax.lax.fori_loop(0, new.shape[0], write_row, cache_LxBxKxSxDh)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, cache, layer, kv_pos_BxS, cache_index):
        cfg = self.cfg
        dtype = resolve_compute_dtype(cfg)
        pdt = jnp.dtype(cfg.param_dtype)
        d, h, kh, dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        init = nn.initializers.normal(cfg.init_std)
        out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        bias = cfg.family == "gpt2"

        def project(name, n, axes):
            w = _param(self, f"{name}_kernel", init, (d, n, dh), ("embed", axes, "head_dim"), pdt)
            # a 2-D matmul (d -> n*dh): XLA:CPU runs it much faster than the 3-D einsum
            y = (x_BxLxD @ w.reshape(d, n * dh).astype(dtype)).reshape(*x_BxLxD.shape[:2], n, dh)
            if bias:
                y = y + _param(self, f"{name}_bias", nn.initializers.zeros, (n, dh), (axes, "head_dim"), pdt).astype(dtype)
            return y

        q_BxLxHxDh = project("q", h, "heads")
        k_BxLxKxDh = project("k", kh, "kv_heads")
        v_BxLxKxDh = project("v", kh, "kv_heads")
        if cfg.qk_norm:
            q_BxLxHxDh = RMSNorm(cfg.norm_eps, pdt, axis_name="head_dim", name="q_norm")(q_BxLxHxDh)
            k_BxLxKxDh = RMSNorm(cfg.norm_eps, pdt, axis_name="head_dim", name="k_norm")(k_BxLxKxDh)
        if cfg.family == "llama":
            q_BxLxHxDh = rope(q_BxLxHxDh, positions_BxL, cfg.rope_theta)
            k_BxLxKxDh = rope(k_BxLxKxDh, positions_BxL, cfg.rope_theta)
        q_BxLxHxDh = nn.with_logical_constraint(q_BxLxHxDh, ("batch", "length", "heads", "head_dim"))

        if cache is None:  # keys and values are the chunk itself
            k_BxKxSxDh, v_BxKxSxDh = (x.transpose(0, 2, 1, 3) for x in (k_BxLxKxDh, v_BxLxKxDh))
            new_cache = None
        else:  # write the chunk into slice `layer` of the whole cache (in place, a carry), then read it
            new_cache = {n: write_cache(cache[n], layer, cache_index, new.transpose(0, 2, 1, 3))
                         for n, new in (("k", k_BxLxKxDh), ("v", v_BxLxKxDh))}
            k_BxKxSxDh, v_BxKxSxDh = (jax.lax.dynamic_index_in_dim(new_cache[n], layer, 0, keepdims=False).astype(dtype)
                                      for n in ("k", "v"))

        dot_product = resolve_attention(cfg) == "dot_product"
        if kv_pos_BxS is None:  # training/scoring: plain causal over positions 0..L-1, no cache
            attend = dot_product_attention if dot_product else causal_attention
            out_BxLxHxDh = attend(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh)
        elif dot_product:
            out_BxLxHxDh = dot_product_attention(q_BxLxHxDh, *(x.transpose(0, 2, 1, 3) for x in (k_BxKxSxDh, v_BxKxSxDh)),
                                                 attention_mask(positions_BxL, kv_pos_BxS))
        else:
            out_BxLxHxDh = xla_attention(q_BxLxHxDh, k_BxKxSxDh, v_BxKxSxDh, attention_mask(positions_BxL, kv_pos_BxS))

        wo = _param(self, "o_kernel", out_init, (h, dh, d), ("heads", "head_dim", "embed"), pdt)
        y_BxLxD = out_BxLxHxDh.reshape(*out_BxLxHxDh.shape[:2], h * dh) @ wo.reshape(h * dh, d).astype(dtype)
        if bias:
            y_BxLxD = y_BxLxD + _param(self, "o_bias", nn.initializers.zeros, (d,), ("norm",), pdt).astype(dtype)
        return y_BxLxD, new_cache


class Mlp(nn.Module):
    """gpt2: W2 gelu(W1 x + b1) + b2 (tanh GELU). llama: W2 (silu(Wg x) * (Wu x)) (SwiGLU)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        dtype = resolve_compute_dtype(cfg)
        pdt = jnp.dtype(cfg.param_dtype)
        d, f = cfg.d_model, cfg.ff_dim
        init = nn.initializers.normal(cfg.init_std)
        out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)

        def dense(name, shape, axes, kernel_init, x):
            w = _param(self, f"{name}_kernel", kernel_init, shape, axes, pdt)
            return jnp.einsum("bli,io->blo", x, w.astype(dtype))

        if cfg.family == "gpt2":
            h_BxLxF = dense("wi", (d, f), ("embed", "mlp"), init, x_BxLxD)
            h_BxLxF = h_BxLxF + _param(self, "wi_bias", nn.initializers.zeros, (f,), ("mlp",), pdt).astype(dtype)
            h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)
        else:
            gate_BxLxF = dense("gate", (d, f), ("embed", "mlp"), init, x_BxLxD)
            up_BxLxF = dense("up", (d, f), ("embed", "mlp"), init, x_BxLxD)
            h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
        y_BxLxD = dense("wo", (f, d), ("mlp", "embed"), out_init, h_BxLxF)
        if cfg.family == "gpt2":
            y_BxLxD = y_BxLxD + _param(self, "wo_bias", nn.initializers.zeros, (d,), ("norm",), pdt).astype(dtype)
        return y_BxLxD


class Block(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += mlp(norm(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, positions_BxL, kv_pos_BxS, cache_index):
        x_BxLxD, cache = carry  # the whole cache (or None); this block owns its slice `layer`
        h, cache = Attention(self.cfg, name="attn")(
            make_norm(self.cfg, "attn_norm")(x_BxLxD), positions_BxL, cache, layer, kv_pos_BxS, cache_index
        )
        x_BxLxD = x_BxLxD + h
        x_BxLxD = x_BxLxD + Mlp(self.cfg, name="mlp")(make_norm(self.cfg, "mlp_norm")(x_BxLxD))
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        return (x_BxLxD, cache), None


def _remat_block(cfg: ModelConfig):
    remat = resolve_remat(cfg)
    if remat == "none":
        return Block
    policy = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[remat]
    return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
    """tokens [B, L] -> logits [B, L, V] (float32).

    With `cache` (see `init_cache`): writes the chunk's keys/values at slot `cache_index` (a scalar,
    or one slot per row of shape [B]) and returns (logits, new_cache); `kv_positions_BxS` gives the position held by each cache slot
    after the write (-1 for empty/padding slots).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxL: Array,
        positions_BxL: Optional[Array] = None,
        cache: Optional[Cache] = None,
        cache_index: Optional[Array] = None,
        kv_positions_BxS: Optional[Array] = None,
    ):
        cfg = self.cfg
        dtype = resolve_compute_dtype(cfg)
        pdt = jnp.dtype(cfg.param_dtype)
        b, l = tokens_BxL.shape
        if cache is None:  # keys are the chunk itself; None means plain causal over 0..L-1
            kv_positions_BxS = positions_BxL
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))

        embed_VxD = _param(
            self, "embed", nn.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt
        )
        x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(dtype)
        if cfg.family == "gpt2":
            pos_PxD = _param(
                self, "pos_embed", nn.initializers.normal(cfg.init_std / 2), (cfg.max_seq_len, cfg.d_model),
                ("positions", "embed"), pdt,
            )
            x_BxLxD = x_BxLxD + jnp.take(pos_PxD, jnp.clip(positions_BxL, 0, cfg.max_seq_len - 1), axis=0).astype(dtype)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

        block = _remat_block(cfg)
        if cfg.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            (x_BxLxD, new_cache), _ = layers(
                (x_BxLxD, cache), jnp.arange(cfg.n_layers), positions_BxL, kv_positions_BxS, cache_index
            )
        else:
            new_cache = cache
            for i in range(cfg.n_layers):
                (x_BxLxD, new_cache), _ = block(cfg, name=f"layer_{i}")(
                    (x_BxLxD, new_cache), i, positions_BxL, kv_positions_BxS, cache_index
                )

        x_BxLxD = make_norm(cfg, "final_norm")(x_BxLxD)
        if cfg.tie_embeddings:
            logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD, embed_VxD.astype(dtype))
        else:
            unembed_DxV = _param(
                self, "unembed", nn.initializers.normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                ("embed", "vocab"), pdt,
            )
            logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, unembed_DxV.astype(dtype))
        logits_BxLxV = nn.with_logical_constraint(logits_BxLxV.astype(jnp.float32), ("batch", "length", "vocab"))
        if cache is None:
            return logits_BxLxV
        return logits_BxLxV, new_cache


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
    """An empty KV cache: k and v of shape [n_layers, B, K, S, Dh] (K = kv heads, so GQA shrinks it;
    heads before slots, so attention reads it without a transpose)."""
    dtype = dtype or resolve_compute_dtype(cfg)
    shape = (cfg.n_layers, batch, cfg.kv_heads, length, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


CACHE_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")


@functools.lru_cache(maxsize=None)
def make_model(cfg: ModelConfig) -> Transformer:
    return Transformer(cfg)


def init_params(cfg: ModelConfig, rng: Array, boxed: bool = False):
    """Initialise parameters; `boxed=True` keeps the flax `LogicallyPartitioned` boxes."""
    tokens = jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)
    params = make_model(cfg).init(rng, tokens)["params"]
    return params if boxed else nn.meta.unbox(params)


@functools.partial(jax.jit, static_argnums=0)
def init_params_jit(cfg: ModelConfig, rng: Array):
    """`init_params` compiled (much faster than op-by-op on CPU); replicated on the default device."""
    return init_params(cfg, rng)


def apply(cfg: ModelConfig, params, tokens_BxL: Array, **kwargs):
    """Forward pass: logits [B, L, V] in float32 (and the new cache if one is passed)."""
    return make_model(cfg).apply({"params": params}, tokens_BxL, **kwargs)


# ---------------------------------------------------------------------------------------------
# Exact sizes and FLOPs


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


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token.

    6 * (matmul weights) + 6 * n_layers * H * Dh * (seq_len + 1).

    Matmul weights per layer: d*Dh*(H + 2K) + H*Dh*d + (2 or 3)*d*F; plus the output projection
    d*V (tied or not). Each weight costs 2 FLOPs per token forward and 4 backward (Kaplan et al.
    2020). Causal attention: the query at position t attends to t keys, so over a sequence of
    length L the average is (L+1)/2 keys; QK^T and AV each cost 2*H*Dh FLOPs per key forward,
    so 4*H*Dh*(L+1)/2 forward and 3x that forward+backward, counted once for the causal triangle
    (not the full L x L square).
    """
    d, h, kh, dh, f, v = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim, cfg.vocab_size
    mlp_mats = 2 if cfg.family == "gpt2" else 3
    matmul_weights = cfg.n_layers * (d * dh * (h + 2 * kh) + h * dh * d + mlp_mats * d * f) + d * v
    attention = 6 * cfg.n_layers * h * dh * (seq_len + 1)
    return 6.0 * matmul_weights + attention
