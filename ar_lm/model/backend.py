"""Per-backend defaults of the model's `auto` settings, and XLA:CPU compiler options.

Each `resolve_*` turns an `auto` config value into what runs on the target backend: the one JAX runs on,
or the one a program is compiled for ahead of time (`target_platform("tpu")`, as `ar-lm plan` does on a
CPU machine). The measurements behind the choices are in docs/explanation/performance.md.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp

from ar_lm.config import ModelConfig
from ar_lm.errors import require

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("ar_lm_target_platform", default=None)


def platform() -> str:
    """The platform programs are traced for: `target_platform`'s, else JAX's default backend."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target_platform(name: str) -> Iterator[None]:
    """Trace for `name` ("tpu", "gpu", "cpu") whatever backend runs here (ahead-of-time compilation)."""
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)


def resolve_compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """`auto`: float32 on CPU (bf16 is slower there), bfloat16 on GPU/TPU."""
    if cfg.compute_dtype == "auto":
        return jnp.float32 if platform() == "cpu" else jnp.bfloat16
    return jnp.dtype(cfg.compute_dtype)


def resolve_attention(cfg: ModelConfig) -> str:
    """`auto`: the Pallas splash-attention kernel on TPU (`ar_lm.model.pallas_attention`), cuDNN's fused
    attention on GPU (`ar_lm.model.gpu_attention`: the Pallas GPU kernel for document masks and the shapes
    cuDNN cannot take), the hand-written masked softmax on CPU. The kernels serve training, scoring and
    prefill; a KV-cache decode step keeps the masked softmax."""
    if cfg.attention == "auto":
        return {"tpu": "pallas", "gpu": "cudnn"}.get(platform(), "xla")
    return cfg.attention


def resolve_remat(cfg: ModelConfig) -> str:
    """`auto`: `dots_no_batch` on CPU when layers are scanned, else `none`. On a GPU/TPU `auto` is settled by
    compiling instead, where a compile is possible: the fastest policy whose step fits the device's memory
    (`ar_lm.training.step.fitting_remat`, at the start of training and in `ar-lm plan`).

    The policies (`model.remat`): `none` saves every activation; `dots` saves the outputs of all matmuls,
    `dots_no_batch` those without batch dimensions (the weight matmuls, not attention's scores), `offload`
    moves those to host memory until the backward pass (TPU/GPU), `full` saves only each layer's input.

    On XLA:CPU the backward of `nn.scan` stacks every saved activation of every layer into
    [n_layers, ...] buffers; saving only the matmul outputs and recomputing the cheap elementwise
    work avoids that. Unrolled layers gain nothing from it, and on GPU/TPU recomputation only costs
    time.
    """
    if cfg.remat == "auto":
        return "dots_no_batch" if cfg.scan_layers and platform() == "cpu" else "none"
    require(cfg.remat != "offload" or platform() != "cpu", "model.remat=offload moves activations to host "
            "memory, which a CPU run does not have: use dots_no_batch or full")
    return cfg.remat


def cpu_compiler_options() -> dict:
    """XLA:CPU backend (LLVM) optimisation level 1 for a program; empty on GPU/TPU.

    Level 1 compiles faster than the default at the same step time (the matmuls are library
    calls); level 0 compiles faster still but runs slower.
    """
    return {"xla_backend_optimization_level": 1} if platform() == "cpu" else {}
