"""Causal self-attention: masks, four attention implementations, the KV-cache write, the module.

Shapes are in names: B batch, L query length, S key/cache length, H query heads, K kv heads,
G = H/K query heads per kv head, Dh head dim. A query at position p sees keys at positions 0..p that
are valid (key position >= 0). Training passes no cache (positions 0..L-1); decoding passes a KV
cache of shape [layers, B, K, S, Dh] plus the position of every cache slot (-1: empty).

Document masking (`data.document_mask`): segment ids [B, L] (`document_segment_ids`: the count of
end-of-document tokens up to each position) restrict every query to the keys of its own segment, in all
implementations, and positions restart at each segment's start (`segment_positions`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_lm.config import ModelConfig
from ar_lm.model import cpu_kernels
from ar_lm.model.backend import platform, resolve_attention, resolve_compute_dtype
from ar_lm.model.gpu_attention import gpu_causal_attention
from ar_lm.model.layers import RMSNorm, hidden_initializers, param, rope
from ar_lm.model.mup import query_multiplier
from ar_lm.model.pallas_attention import pallas_causal_attention
from ar_lm.model.quantize import as_matrix, matmul

Array = jax.Array
KERNEL_QUERIES = 16  # up to this many query positions a CPU decode step attends through `cpu_kernels`


def attention_mask(q_pos_BxL: Array, kv_pos_BxS: Array) -> Array:
    """mask[b, l, s] = key s is valid (position >= 0) and not in the future of query l."""
    kv = kv_pos_BxS[:, None, :]
    return (kv >= 0) & (kv <= q_pos_BxL[:, :, None])


def document_segment_ids(tokens_BxL: Array, eos_id: int) -> Array:
    """segment[b, i] = number of eos tokens in tokens[b, 0..i]: the eos that ends document k is the first
    token (position 0) of segment k+1, as the eos a document is scored after; tokens before the first eos
    are segment 0."""
    return jnp.cumsum(tokens_BxL == eos_id, axis=1, dtype=jnp.int32)


def segment_positions(segment_ids_BxL: Array) -> Array:
    """position[b, i] = i - (the index where i's segment starts): positions restart at 0 per segment."""
    b, l = segment_ids_BxL.shape
    i_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    starts_BxL = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
    return i_BxL - jax.lax.cummax(jnp.where(starts_BxL, i_BxL, 0), axis=1)


def segment_mask(segment_ids_BxL: Array) -> Array:
    """mask[b, l, s] = query l and key s are in the same segment (self-attention: S = L)."""
    return segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]


def xla_attention(q_BxLxHxDh, k_BxKxSxDh, v_BxKxSxDh, mask_BxLxS) -> Array:
    """softmax(q k^T / sqrt(Dh) + mask) v, hand-written, for any mask (KV-cache decoding, padding);
    grouped heads share their kv head. Keys and values come heads-first, as the cache holds them, so
    the score and value matmuls need no transpose of the cache."""
    b, l, h, dh = q_BxLxHxDh.shape
    kh = k_BxKxSxDh.shape[1]
    q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, l, kh, h // kh, dh)
    # scores accumulate in float32 whatever the compute dtype, as in `causal_attention` (training)
    scores_BxKxGxLxS = jnp.einsum("blkgd,bksd->bkgls", q_BxLxKxGxDh, k_BxKxSxDh,
                                  preferred_element_type=jnp.float32) * (dh**-0.5)
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


def causal_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, bounds=None, segment_ids_BxL=None) -> Array:
    """Plain causal self-attention (positions 0..L-1), skipping the masked upper triangle; with
    `segment_ids_BxL`, within segments (the segment mask is applied inside each block).

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
        mask_BxCxS = (k_pos <= q_pos)[None]
        if segment_ids_BxL is not None:
            mask_BxCxS = mask_BxCxS & (segment_ids_BxL[:, lo:hi, None] == segment_ids_BxL[:, None, :hi])
        scores_BxKxGxCxS = jnp.where(mask_BxCxS[:, None, None], scores_BxKxGxCxS, big_neg)
        probs = jax.nn.softmax(scores_BxKxGxCxS, axis=-1).astype(v_BxLxKxDh.dtype).reshape(b, kh, g * c, hi)
        outs.append(jnp.einsum("bkxs,bksd->bkxd", probs, v_BxKxLxDh[:, :, :hi]).reshape(b, kh, g, c, dh))
    out_BxKxGxLxDh = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out_BxKxGxLxDh.transpose(0, 3, 1, 2, 4).reshape(b, l, h, dh)


def dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS=None, segment_ids_BxL=None) -> Array:
    """`jax.nn.dot_product_attention` (cuDNN flash attention on GPU when shapes allow);
    no mask: causal self-attention, within segments if `segment_ids_BxL` is given."""
    if mask_BxLxS is None:  # let the kernel build the causal mask (and-ed with the segment mask)
        same = None if segment_ids_BxL is None else segment_mask(segment_ids_BxL)[:, None]
        return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=same, is_causal=True)
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


def _cache_kernel_applies(impl: str, dtype, cache, q_BxLxHxDh) -> bool:
    """Whether a cache read goes through `cpu_kernels.decode_attention`: the hand-written softmax on CPU, float32,
    at most KERNEL_QUERIES query positions (a decode step, not a prefill), traced for one device (no mesh, or a
    mesh of one: the custom call has no partitioning rule, so a sharded cache would be gathered to every device)."""
    mesh = jax.sharding.get_abstract_mesh()
    return (impl == "xla" and jnp.dtype(dtype) == jnp.float32 and cache["k"].dtype == jnp.float32
            and q_BxLxHxDh.shape[1] <= KERNEL_QUERIES and platform() == "cpu"
            and (mesh.empty or mesh.size == 1) and cpu_kernels.available())


def causal_kernel(impl: str):
    """The causal self-attention function of `model.attention` (resolved): the same contract for every one."""
    if impl == "cudnn" or (impl == "pallas" and platform() == "gpu"):
        return functools.partial(gpu_causal_attention, requested=impl)
    return {"dot_product": dot_product_attention, "pallas": pallas_causal_attention}.get(impl, causal_attention)


def attend(cfg: ModelConfig, q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, positions_BxL, cache, layer, kv_pos_BxS,
           cache_index, segment_ids_BxL=None):
    """Attention output [B, L, H, Dh] for a chunk's projected queries, keys and values, and the new cache.

    No positions of keys (`kv_pos_BxS` None): plain causal self-attention over 0..L-1. With a cache, the
    chunk is written into slice `layer` at `cache_index` (in place, a loop carry) and attention reads the
    whole slice, masked by the position of each slot (a CPU decode step: only the valid slots, in place,
    `cpu_kernels.decode_attention`). `segment_ids_BxL`: attention stays inside each segment; with a cache (a
    prefill, written at slot 0 of an empty cache) the chunk attends within itself through `causal_kernel`,
    like training, with the padding in a segment of its own."""
    dtype = resolve_compute_dtype(cfg)
    impl = resolve_attention(cfg)
    prefill = cache is not None and segment_ids_BxL is not None
    if cache is None:  # keys and values are the chunk itself
        k_BxKxSxDh, v_BxKxSxDh = (x.transpose(0, 2, 1, 3) for x in (k_BxLxKxDh, v_BxLxKxDh))
        new_cache = None
    else:  # write the chunk into slice `layer` of the whole cache (in place, a carry), then read it
        new_cache = {n: write_cache(cache[n], layer, cache_index, new.transpose(0, 2, 1, 3))
                     for n, new in (("k", k_BxLxKxDh), ("v", v_BxLxKxDh))}
        if prefill:  # the chunk is all the cache holds: attend within it, by the training kernels
            return causal_kernel(impl)(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL=segment_ids_BxL), new_cache
        if _cache_kernel_applies(impl, dtype, new_cache, q_BxLxHxDh):  # reads the slice in place
            out_BxLxHxDh = cpu_kernels.decode_attention(q_BxLxHxDh, new_cache["k"], new_cache["v"], layer,
                                                        positions_BxL, kv_pos_BxS)
            return out_BxLxHxDh.astype(dtype), new_cache
        k_BxKxSxDh, v_BxKxSxDh = (jax.lax.dynamic_index_in_dim(new_cache[n], layer, 0, keepdims=False).astype(dtype)
                                  for n in ("k", "v"))

    dot_product = impl == "dot_product"
    if kv_pos_BxS is None:  # training/scoring: plain causal over positions 0..L-1, no cache
        return causal_kernel(impl)(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL=segment_ids_BxL), new_cache
    mask_BxLxS = attention_mask(positions_BxL, kv_pos_BxS)
    if segment_ids_BxL is not None:  # positions given without a cache: keys are the chunk itself
        mask_BxLxS = mask_BxLxS & segment_mask(segment_ids_BxL)
    if dot_product:
        out_BxLxHxDh = dot_product_attention(q_BxLxHxDh, *(x.transpose(0, 2, 1, 3) for x in (k_BxKxSxDh, v_BxKxSxDh)),
                                             mask_BxLxS)
    else:  # also for pallas: a decode step has L=1 query against a cache masked by slot positions
        out_BxLxHxDh = xla_attention(q_BxLxHxDh, k_BxKxSxDh, v_BxKxSxDh, mask_BxLxS)
    return out_BxLxHxDh, new_cache


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, cache, layer, kv_pos_BxS, cache_index, segment_ids_BxL=None):
        cfg = self.cfg
        dtype = resolve_compute_dtype(cfg)
        pdt = jnp.dtype(cfg.param_dtype)
        d, h, kh, dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        init, out_init = hidden_initializers(cfg)
        bias = cfg.family == "gpt2"

        def project(name, n, axes):
            w = param(self, f"{name}_kernel", init, (d, n, dh), ("embed", axes, "head_dim"), pdt)
            # a 2-D matmul (d -> n*dh): XLA:CPU runs it much faster than the 3-D einsum
            y = matmul(x_BxLxD, as_matrix(w, d), dtype).reshape(*x_BxLxD.shape[:2], n, dh)
            if bias:
                y = y + param(self, f"{name}_bias", nn.initializers.zeros, (n, dh), (axes, "head_dim"), pdt).astype(dtype)
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
        if query_multiplier(cfg) != 1.0:  # muP's sqrt(base_dh)/dh score scale
            q_BxLxHxDh = q_BxLxHxDh * query_multiplier(cfg)
        q_BxLxHxDh = nn.with_logical_constraint(q_BxLxHxDh, ("batch", "length", "heads", "head_dim"))

        out_BxLxHxDh, new_cache = attend(cfg, q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, positions_BxL, cache, layer,
                                         kv_pos_BxS, cache_index, segment_ids_BxL)

        wo = param(self, "o_kernel", out_init, (h, dh, d), ("heads", "head_dim", "embed"), pdt)
        y_BxLxD = matmul(out_BxLxHxDh.reshape(*out_BxLxHxDh.shape[:2], h * dh), as_matrix(wo, h * dh), dtype)
        if bias:
            y_BxLxD = y_BxLxD + param(self, "o_bias", nn.initializers.zeros, (d,), ("norm",), pdt).astype(dtype)
        return y_BxLxD, new_cache
