"""Causal self-attention on GPU: cuDNN's fused flash attention, or JAX's Pallas flash kernel with segment ids.

`model.attention=auto` on GPU is `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn",
is_causal=True)`, cuDNN's FlashAttention-2 style kernel (Dao 2023), which needs bf16/fp16 inputs and a head
dim of at most 128 that is a multiple of 8. It takes no segment ids (a mask goes in as a dense [B, 1, L, L]
array), so document masks, and the shapes cuDNN cannot take, go to JAX's Pallas GPU kernel
(`jax.experimental.pallas.ops.gpu.attention.mha`, Triton): an online softmax over key blocks with the segment
test inside each block, never [L, L] scores. `model.attention=pallas` on GPU always takes the Pallas kernel.
Both run per device under `jax.shard_map` (`pallas_attention.per_device`). Off GPU the Pallas kernel runs in
interpret mode (correct, slow; the tests), and cuDNN is refused.

From jax 0.11 JAX's Pallas GPU kernel is deprecated in favour of tokamax, which needs Python >= 3.12 and
jax >= 0.11.1 (the 3.11 leg runs jax 0.10.2) and whose public `dot_product_attention` takes a document mask only
as a dense [B, H, L, L] array: `_pallas_mha` imports JAX's kernel with that one warning silenced until ar_lm
requires jax >= 0.11.1.

Shapes are in names: B batch, L length, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from ar_lm.errors import require
from ar_lm.model.backend import platform
from ar_lm.model.pallas_attention import padded_length, per_device

Array = jax.Array
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def gpu_kernel(dtype, head_dim: int, segments: bool, requested: str = "cudnn") -> str:
    """The GPU attention kernel for these inputs: "cudnn" where cuDNN's fused attention takes them (bf16/fp16,
    head dim <= 128 and a multiple of 8, no segment ids) and `requested` is cudnn, else "pallas"."""
    cudnn_takes = (jnp.dtype(dtype) in CUDNN_DTYPES and head_dim <= CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0
                   and not segments)
    return "cudnn" if requested == "cudnn" and cudnn_takes else "pallas"


def gpu_causal_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL: Array | None = None,
                         requested: str = "cudnn", interpret: bool | None = None) -> Array:
    """Causal self-attention over positions 0..L-1 (within segments when `segment_ids_BxL` is given), the
    contract of `ar_lm.model.attention.causal_attention`, by the kernel `gpu_kernel` picks.

    `interpret` None: the compiled kernels on GPU, the Pallas kernel in interpret mode elsewhere."""
    kernel = gpu_kernel(q_BxLxHxDh.dtype, q_BxLxHxDh.shape[-1], segment_ids_BxL is not None, requested)
    if interpret is None:
        interpret = platform() != "gpu"
    if kernel == "cudnn":
        require(not interpret, "model.attention=cudnn runs on a GPU only: use model.attention=auto")
        return per_device(_cudnn, q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh)
    return per_device(lambda q, k, v, seg: _pallas(q, k, v, seg, interpret), q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh,
                      segment_ids_BxL)


def _cudnn(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, _segment_ids=None) -> Array:
    """cuDNN's fused causal attention; grouped kv heads are taken as they are."""
    return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, is_causal=True, implementation="cudnn")


def _pallas(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, interpret: bool) -> Array:
    """The Pallas GPU kernel, which needs as many kv heads as query heads (repeated here) and a length that is
    a multiple of its 128-row blocks (padded at the end, exact for causal attention; padded positions get
    segment -1)."""
    b, l, h, dh = q_BxLxHxDh.shape
    lp = padded_length(l)
    g = h // k_BxLxKxDh.shape[2]

    def prepare(x_BxLxNxDh, repeat):
        x_BxLxHxDh = jnp.repeat(x_BxLxNxDh, repeat, axis=2) if repeat > 1 else x_BxLxNxDh
        return jnp.pad(x_BxLxHxDh, ((0, 0), (0, lp - l), (0, 0), (0, 0)))

    seg_BxL = None
    if segment_ids_BxL is not None:
        seg_BxL = jnp.pad(segment_ids_BxL.astype(jnp.int32), ((0, 0), (0, lp - l)), constant_values=-1)
    out = _pallas_mha()(prepare(q_BxLxHxDh, 1), prepare(k_BxLxKxDh, g), prepare(v_BxLxKxDh, g), seg_BxL,
                         sm_scale=dh**-0.5, causal=True, interpret=interpret)
    return out[:, :l].astype(q_BxLxHxDh.dtype)


def _pallas_mha():
    """`jax.experimental.pallas.ops.gpu.attention.mha`, imported on first use (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"jax\.experimental\.pallas\.ops\.gpu\.attention is deprecated",
                                category=DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention

    return attention.mha
