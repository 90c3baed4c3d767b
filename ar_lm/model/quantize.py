"""Int8 weight-only quantisation of the matmul weights, for decoding.

Per output channel, symmetric (e.g. Dettmers et al. 2022, LLM.int8()'s vector-wise weights without outliers):
for a kernel W with contraction axes C, scale = max_C |W| / 127 (float32, one per output channel) and
q = round(W / scale) in [-127, 127] (int8), so |W - q * scale| <= scale / 2 elementwise.

A quantised kernel is a `QuantizedArray` leaf pair in the param pytree in place of the float array; the model
multiplies by every weight through `matmul` (the int8 kernel on CPU for decode-sized inputs, else `dequantize`,
the identity on a float array) and looks up embeddings through `embed_lookup`. Quantised: attention q/k/v/o, the MLP
kernels, the output projection (`unembed`) and the token embedding (per row: its logits matmul when tied,
and the lookup). Norms, biases and gpt2's position table stay float.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from ar_lm.config import ModelConfig
from ar_lm.errors import require
from ar_lm.model import cpu_kernels
from ar_lm.model.backend import platform

Array = jax.Array
MODES = ("int8",)
KERNEL_ROWS = 16  # up to this many rows (batch x new tokens) a matmul uses the int8 kernel; more: a float GEMM
FAMILIES = ("gpt2", "llama")  # the families whose weight names CONTRACT_AXES covers
# contraction axes of each quantised weight, as unrolled layers hold it (`layers/` stacks add a leading axis)
CONTRACT_AXES = {"q_kernel": (0,), "k_kernel": (0,), "v_kernel": (0,), "o_kernel": (0, 1), "wi_kernel": (0,),
                 "gate_kernel": (0,), "up_kernel": (0,), "wo_kernel": (0,), "unembed": (0,), "embed": (1,)}


@flax.struct.dataclass
class QuantizedArray:
    """q (int8, the kernel's shape) * scale (float32, the kernel's shape with the contraction axes of size 1).
    q comes first in the pytree: flax checks a parameter's shape against its first leaf."""

    q: Array
    scale: Array


def quantize_array(w: Array, contract_axes: tuple[int, ...]) -> QuantizedArray:
    """Symmetric per-output-channel int8: scale = max|w| / 127 over `contract_axes` (1 for an all-zero channel)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=contract_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return QuantizedArray(q, scale.astype(jnp.float32))


def dequantize(w):
    """The float weight: q * scale for a `QuantizedArray` (float32), else `w` unchanged. Inside a jitted decode
    loop the weights are loop invariants, so XLA may hoist this out of the loop."""
    if isinstance(w, QuantizedArray):
        return w.q.astype(jnp.float32) * w.scale
    return w


def as_matrix(w, k: int):
    """A kernel (float or `QuantizedArray`) whose leading axes contract, viewed as [k, N] (scale [1, N])."""
    if isinstance(w, QuantizedArray):
        return QuantizedArray(w.q.reshape(k, -1), w.scale.reshape(1, -1))
    return w.reshape(k, -1)


def matmul(x_xK: Array, w, dtype, transposed: bool = False, out_dtype=None) -> Array:
    """x @ w for a 2-D weight w [K, N] (`transposed`: w [N, K], x @ w.T), float or `QuantizedArray`, in `dtype`
    (accumulated and returned in `out_dtype` when given: `preferred_element_type`).
    Int8 weights times float32 x with at most KERNEL_ROWS rows (decode steps) on CPU go through the int8 kernel
    (`ar_lm.model.cpu_kernels`), which reads the int8 weights; otherwise they are dequantised first."""
    rows = x_xK.size // x_xK.shape[-1]
    if (isinstance(w, QuantizedArray) and rows <= KERNEL_ROWS and jnp.dtype(dtype) == jnp.float32
            and platform() == "cpu" and cpu_kernels.available()):
        y = cpu_kernels.int8_matmul(x_xK.reshape(rows, -1).astype(jnp.float32), w.q, w.scale.reshape(-1), transposed)
        y = y.reshape(*x_xK.shape[:-1], y.shape[-1])
        return y if out_dtype is None else y.astype(out_dtype)
    w = dequantize(w).astype(dtype)
    return jnp.matmul(x_xK.astype(dtype), w.T if transposed else w, preferred_element_type=out_dtype)


def embed_lookup(embed_VxD, tokens: Array) -> Array:
    """Rows of an embedding table (float, or int8 with a scale per row: only the rows taken are dequantised)."""
    if isinstance(embed_VxD, QuantizedArray):
        return jnp.take(embed_VxD.q, tokens, axis=0).astype(jnp.float32) * jnp.take(embed_VxD.scale, tokens, axis=0)
    return jnp.take(embed_VxD, tokens, axis=0)


def is_quantized(params) -> bool:
    return any(isinstance(x, QuantizedArray)
               for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedArray)))


def _quantize_tree(tree, stacked: bool):
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out[name] = _quantize_tree(value, stacked or name == "layers")
        elif name in CONTRACT_AXES:
            out[name] = quantize_array(value, tuple(a + int(stacked) for a in CONTRACT_AXES[name]))
        else:
            out[name] = value
    return out


_quantize_jit = jax.jit(_quantize_tree, static_argnames="stacked")


def check_quantizable(cfg: ModelConfig, mode: str = "int8") -> None:
    """Refuse (UserError) a mode or a model this module cannot quantise, before anything is loaded."""
    require(mode in MODES, f"unknown quantisation {mode!r}: use one of {', '.join(MODES)}")
    require(cfg.family in FAMILIES, f"--quantize {mode} knows the weights of the {' and '.join(FAMILIES)} families, "
                                    f"not {cfg.family!r}: drop --quantize")


def _unknown_kernels(tree, prefix: str = "") -> list[str]:
    """Matmul weights (`*_kernel`) this module has no contraction axes for."""
    out = []
    for name, value in tree.items():
        if isinstance(value, dict):
            out += _unknown_kernels(value, f"{prefix}{name}/")
        elif name.endswith("_kernel") and name not in CONTRACT_AXES:
            out.append(prefix + name)
    return out


def quantize_params(cfg: ModelConfig, params, mode: str = "int8"):
    """The param pytree with its matmul weights quantised (`mode` "int8"), computed once, in one jitted call
    (on the parameters' devices). Refuses an unknown mode or family, params already quantised, or a tree
    without the weights this model names."""
    check_quantizable(cfg, mode)
    require(isinstance(params, dict) and "embed" in params, "--quantize needs a parameter tree of this model")
    require(not is_quantized(params), "the parameters are already quantised: quantise float parameters once")
    unknown = _unknown_kernels(params)
    require(not unknown, f"--quantize {mode} does not know the weights {', '.join(unknown)}: drop --quantize")
    return _quantize_jit(params, stacked=False)


def param_bytes(params) -> int:
    """Bytes of every array in the tree (int8 weights, their float32 scales, the float rest)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
