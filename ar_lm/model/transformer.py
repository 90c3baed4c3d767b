"""The decoder-only transformer (flax.linen), functional: params are a plain pytree.

Shapes are in names: B batch, L length, S cache slots, D d_model, V vocab. `init_params` and `apply`
are the entry points; with a KV cache (`init_cache`) `apply` also returns the updated cache.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_lm.config import ModelConfig
from ar_lm.model.attention import Attention, segment_positions
from ar_lm.model.backend import resolve_compute_dtype, resolve_remat
from ar_lm.model.layers import Mlp, make_norm, param
from ar_lm.model import head
from ar_lm.model.quantize import embed_lookup

Array = jax.Array
Cache = dict  # {"k": [n_layers, B, K, S, Dh], "v": [n_layers, B, K, S, Dh]}


class Block(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += mlp(norm(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, positions_BxL, kv_pos_BxS, cache_index, segment_ids_BxL):
        x_BxLxD, cache = carry  # the whole cache (or None); this block owns its slice `layer`
        h, cache = Attention(self.cfg, name="attn")(
            make_norm(self.cfg, "attn_norm")(x_BxLxD), positions_BxL, cache, layer, kv_pos_BxS, cache_index,
            segment_ids_BxL,
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
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        # the saved matmul outputs go to host memory and come back for the backward pass
        "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }[remat]
    return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


def _layer_stack(cfg: ModelConfig, x_BxLxD, cache, positions_BxL, kv_positions_BxS, cache_index, segment_ids_BxL):
    """The n_layers blocks, created in the calling module: scanned (one compiled layer, parameters stacked
    on axis 0 under `layers`) or unrolled (`layer_0`, `layer_1`, ...). Returns (x, the new cache)."""
    block = _remat_block(cfg)
    if cfg.scan_layers:
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        (x_BxLxD, new_cache), _ = layers(
            (x_BxLxD, cache), jnp.arange(cfg.n_layers), positions_BxL, kv_positions_BxS, cache_index, segment_ids_BxL
        )
    else:
        new_cache = cache
        for i in range(cfg.n_layers):
            (x_BxLxD, new_cache), _ = block(cfg, name=f"layer_{i}")(
                (x_BxLxD, new_cache), i, positions_BxL, kv_positions_BxS, cache_index, segment_ids_BxL
            )
    return x_BxLxD, new_cache


class Transformer(nn.Module):
    """tokens [B, L] -> logits [B, L, V] (float32).

    With `cache` (see `init_cache`): writes the chunk's keys/values at slot `cache_index` (a scalar,
    or one slot per row of shape [B]) and returns (logits, new_cache); `kv_positions_BxS` gives the position held by each cache slot
    after the write (-1 for empty/padding slots).

    `hidden=True` returns the final (normed) hidden states [B, L, D] instead of the logits (`ar_lm.model.head`
    turns them into logits, or into a cross-entropy over chunks of positions).

    `segment_ids_BxL` (e.g. `attention.document_segment_ids`) keeps attention inside each segment, and
    positions (when not given) restart at 0 at every segment's start (`segment_positions`). With a cache they
    mark a prefill: the chunk goes to slot 0 of an empty cache and attends within itself (`attention.attend`).
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
        segment_ids_BxL: Optional[Array] = None,
        hidden: bool = False,
    ):
        cfg = self.cfg
        dtype = resolve_compute_dtype(cfg)
        pdt = jnp.dtype(cfg.param_dtype)
        b, l = tokens_BxL.shape
        if cache is None:  # keys are the chunk itself; None means plain causal over 0..L-1
            kv_positions_BxS = positions_BxL
        if positions_BxL is None and segment_ids_BxL is not None:
            positions_BxL = segment_positions(segment_ids_BxL)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))

        embed_VxD = param(
            self, "embed", nn.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt
        )
        x_BxLxD = embed_lookup(embed_VxD, tokens_BxL).astype(dtype)
        if cfg.family == "gpt2":
            pos_PxD = param(
                self, "pos_embed", nn.initializers.normal(cfg.init_std / 2), (cfg.max_seq_len, cfg.d_model),
                ("positions", "embed"), pdt,
            )
            x_BxLxD = x_BxLxD + jnp.take(pos_PxD, jnp.clip(positions_BxL, 0, cfg.max_seq_len - 1), axis=0).astype(dtype)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

        x_BxLxD, new_cache = _layer_stack(cfg, x_BxLxD, cache, positions_BxL, kv_positions_BxS, cache_index,
                                          segment_ids_BxL)

        x_BxLxD = make_norm(cfg, "final_norm")(x_BxLxD)
        if cfg.tie_embeddings:
            w, transposed = embed_VxD, True
        else:
            w = param(self, "unembed", nn.initializers.normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                      ("embed", "vocab"), pdt)
            transposed = False
        out_BxLxV = x_BxLxD if hidden else head.project(cfg, x_BxLxD, w, transposed)
        return out_BxLxV if cache is None else (out_BxLxV, new_cache)


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
    """Forward pass: logits [B, L, V] in float32, or with `hidden=True` the final hidden states [B, L, D]
    (and the new cache if one is passed)."""
    return make_model(cfg).apply({"params": params}, tokens_BxL, **kwargs)


def relayout_layers(tree, n_layers: int, scanned: bool):
    """A parameter tree (or any tree holding one, like optimizer moments) in the layout of
    `scan_layers=scanned`: {"layers": leaves stacked on axis 0} <-> {"layer_0": ..., "layer_1": ...}."""
    if isinstance(tree, dict):
        tree = {k: relayout_layers(v, n_layers, scanned) for k, v in tree.items()}
        if scanned and "layer_0" in tree:
            per_layer = [tree.pop(f"layer_{i}") for i in range(n_layers)]
            tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
        elif not scanned and "layers" in tree:
            stacked = tree.pop("layers")
            tree |= {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n_layers)}
        return tree
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple optimizer states
        return type(tree)(*(relayout_layers(x, n_layers, scanned) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(relayout_layers(x, n_layers, scanned) for x in tree)
    return tree
