"""Causal self-attention with a Pallas kernel: JAX's splash attention (TPU), or its interpreter elsewhere.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) is JAX's TPU kernel for
FlashAttention (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness"): queries and keys go through the kernel in blocks with an online softmax (running max and
sum in float32), so no [L, L] score matrix is ever materialised, and with a causal mask the blocks above
the diagonal are skipped outright. Its backward pass is a Pallas kernel too (dq, then dk/dv), recomputing the scores block by
block from the saved log-sum-exp. Off TPU the same kernel runs in Pallas interpret mode (correct, slow):
that is how the tests check it on CPU.

Shapes are in names: B batch, L length, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from ar_lm.errors import require
from ar_lm.model.backend import platform

Array = jax.Array

# the kernel's key blocks are whole multiples of the TPU's 128 vector lanes (it checks this even when
# interpreted): other lengths are padded up to a multiple of 128
MIN_BLOCK = splash.NUM_LANES
BLOCKS = (512, 256, 128)  # largest first; 512 is MaxText's splash default, 128 JAX's (not tuned here)


def padded_length(length: int) -> int:
    """`length` rounded up to a multiple of 128. Padding a causal attention at the end is exact: a real
    query (position < L) never sees a padded key (position >= L), and the padded rows are dropped."""
    return -(-length // MIN_BLOCK) * MIN_BLOCK


def block_size(length: int) -> int:
    """The query and key block of the kernel: the largest of 512, 256, 128 that divides `length`."""
    return next(b for b in BLOCKS if length % b == 0)


def splash_kernel(heads: int, length: int, interpret: bool):
    """A splash-attention kernel for `heads` query heads over [length, Dh] with a causal mask, the same
    block size for the forward, dq and dk/dv passes. Grouped-query heads need no repeat: the kernel maps
    query head h to kv head h // (heads / kv heads)."""
    b = block_size(length)
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                               block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length)) for _ in range(heads)])
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def pallas_causal_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, interpret: bool | None = None,
                            segment_ids_BxL: Array | None = None) -> Array:
    """Causal self-attention over positions 0..L-1 by the splash-attention kernel: the contract of
    `ar_lm.model.attention.causal_attention` (kv head h // G for query head h, scale 1/sqrt(Dh) applied
    here, scores and softmax in float32 inside the kernel, output in q's dtype), within segments when
    `segment_ids_BxL` is given (the kernel's `SegmentIds`, and-ed with the causal mask in every block).

    `interpret` None: the compiled kernel on TPU, Pallas interpret mode on any other backend. A length
    that is not a multiple of 128 is padded up to one (see `padded_length`; padded positions get segment
    -1, so a padded query still sees itself).
    """
    b, l, h, dh = q_BxLxHxDh.shape
    kh = k_BxLxKxDh.shape[2]
    require(not h % kh and k_BxLxKxDh.shape == v_BxLxKxDh.shape and k_BxLxKxDh.shape[:2] == (b, l)
            and k_BxLxKxDh.shape[3] == dh,
            f"model.attention=pallas cannot take q {q_BxLxHxDh.shape}, k {k_BxLxKxDh.shape}, v {v_BxLxKxDh.shape} "
            "(it needs [B, L, H, Dh] queries and [B, L, K, Dh] keys and values with K dividing H): "
            "use model.attention=xla")
    if interpret is None:
        interpret = platform() != "tpu"
    return per_device(lambda q, k, v, seg: _splash(q, k, v, seg, interpret), q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh,
                      segment_ids_BxL)


def per_device(kernel, q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL=None) -> Array:
    """`kernel(q, k, v, segment_ids)` (an attention kernel with no partitioning rule, like a Pallas or cuDNN
    call) run by each device on its own rows and heads (`jax.shard_map` over the mesh axes that the logical
    rules give the batch and the heads), so no device gathers the others' queries, keys or values."""
    batch_axes, head_axes = _sharded_axes(q_BxLxHxDh.shape[0], k_BxLxKxDh.shape[2])
    if not batch_axes and not head_axes:  # one device, or nothing to split: the kernel over the whole arrays
        return kernel(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL)
    qkv_spec = P(batch_axes or None, None, head_axes or None, None)
    seg_spec = None if segment_ids_BxL is None else P(batch_axes or None, None)
    return jax.shard_map(kernel, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec), out_specs=qkv_spec,
                         check_vma=False)(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL)


def _sharded_axes(batch: int, kv_heads: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The mesh axes (of more than one device) that the logical rules in force give the batch and the heads,
    each kept only where it divides the batch or the kv heads (so every device holds whole kv groups)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return (), ()
    spec = nn.logical_to_mesh_axes(("batch", "heads"))

    def dividing(entry, n):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        return axes if axes and n % math.prod(mesh.shape[a] for a in axes) == 0 else ()

    return dividing(spec[0], batch), dividing(spec[1], kv_heads)


def _splash(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, interpret: bool) -> Array:
    """The splash kernel over every row of (local) arrays, vmapped over the batch."""
    b, l, h, dh = q_BxLxHxDh.shape
    lp = padded_length(l)
    kernel = splash_kernel(h, lp, interpret)

    def heads_first(x_BxLxNxDh):  # the kernel takes one sequence, heads first: [H, L, Dh], [K, L, Dh]
        return jnp.pad(x_BxLxNxDh, ((0, 0), (0, lp - l), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q_BxHxLxDh = heads_first((q_BxLxHxDh * dh**-0.5).astype(q_BxLxHxDh.dtype))  # the kernel applies no scale
    qkv = (q_BxHxLxDh, heads_first(k_BxLxKxDh), heads_first(v_BxLxKxDh))
    if segment_ids_BxL is None:
        out_BxHxLxDh = jax.vmap(kernel)(*qkv)
    else:
        seg_BxL = jnp.pad(segment_ids_BxL.astype(jnp.int32), ((0, 0), (0, lp - l)), constant_values=-1)
        out_BxHxLxDh = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(*qkv, seg_BxL)
    return out_BxHxLxDh[:, :, :l].transpose(0, 2, 1, 3).astype(q_BxLxHxDh.dtype)
