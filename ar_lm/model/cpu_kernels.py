"""The decode kernels for XLA:CPU, XLA FFI handlers in one library built once per machine.

- `int8_matmul.cc`: XLA:CPU has no matmul that reads int8 weights and multiplies in float: `x @ (q * scale)`
  inside a decode loop gets its dequantisation hoisted out of the loop, so every step reads float32 weights
  again. The handler widens int8 to float32 in registers (y = scale * (x @ q), float32 sums).
- `decode_attention.cc`: attention of a few queries over one layer's slice of the KV cache, read in place and
  only at its valid slots; XLA copies the whole slice every step before its matmuls.

Both run over the threads of XLA's pool. Built with the C++ compiler ($CXX, else c++) against jax's FFI headers,
`-O3 -march=native`, into $AR_LM_KERNEL_CACHE (default ~/.cache/ar_lm/kernels), keyed by the sources, jaxlib's
version, the compiler and the CPU's flags. Where that fails (no compiler) `available()` is False, with one
warning, and the model runs XLA's ops instead; AR_LM_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from ar_lm.io import user_cache_dir

SOURCES = tuple(Path(__file__).with_name(name) for name in ("int8_matmul.cc", "decode_attention.cc"))
HEADER = Path(__file__).with_name("cpu_pool.h")  # parallel_for over XLA's threads, for both
TARGETS = {"ar_lm_int8_matmul": "ArLmInt8Matmul", "ar_lm_decode_attention": "ArLmDecodeAttention"}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build() -> Path:
    """The shared library (compiled now unless the cache holds it); raises OSError/CalledProcessError."""
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        raise OSError(f"no C++ compiler {cxx!r} on PATH")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256("\n".join([*(s.read_text() for s in (*SOURCES, HEADER)), jaxlib.__version__, cxx,
                                    *flags[:-1], _cpu_flags()]).encode()).hexdigest()[:16]
    cache_dir = Path(os.environ.get("AR_LM_KERNEL_CACHE") or user_cache_dir("kernels"))
    lib = cache_dir / f"cpu_kernels-{key}.so"
    if not lib.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".so.tmp")
        os.close(fd)
        try:
            subprocess.run([cxx, *flags, *map(str, SOURCES), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, lib)  # atomic: processes building at once each install a whole library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered with jax.ffi (on the first call); warns once if they cannot be."""
    if os.environ.get("AR_LM_CPU_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        print(f"warning: CPU decode kernels unavailable ({detail.strip().splitlines()[-1] if detail else e}): "
              f"decoding uses XLA's ops instead (int8 weights dequantised to float32; slower)", file=sys.stderr)
        return False
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True


def int8_matmul(x_MxK: jax.Array, q: jax.Array, scale_N: jax.Array, transposed: bool = False) -> jax.Array:
    """scale * (x @ q) for float32 x [M, K] and int8 q [K, N] (`transposed`: q [N, K], x @ q.T), float32 [M, N].
    Needs `available()`."""
    n = q.shape[0] if transposed else q.shape[1]
    out = jax.ShapeDtypeStruct((x_MxK.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call("ar_lm_int8_matmul", out)(x_MxK, q, scale_N, transposed=transposed)


def decode_attention(q_BxLxHxDh: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer, q_pos_BxL: jax.Array,
                     kv_pos_BxS: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(Dh), masked as `attention.attention_mask`) v over slice `layer` of float32 caches
    [layers, B, K, S, Dh], read in place; float32 [B, L, H, Dh]. Needs `available()`."""
    out = jax.ShapeDtypeStruct(q_BxLxHxDh.shape, jnp.float32)
    return jax.ffi.ffi_call("ar_lm_decode_attention", out)(
        q_BxLxHxDh.astype(jnp.float32), k_cache, v_cache, jnp.asarray(layer, jnp.int32),
        q_pos_BxL.astype(jnp.int32), kv_pos_BxS.astype(jnp.int32))
