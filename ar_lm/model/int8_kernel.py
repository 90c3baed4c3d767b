"""The int8 weight-only matmul for XLA:CPU: `int8_matmul.cc`, an XLA FFI handler, built once per machine.

XLA:CPU has no matmul that reads int8 weights and multiplies in float: `x @ (q * scale)` inside a decode loop
gets its dequantisation hoisted out of the loop, so every step reads float32 weights again. The handler
widens int8 to float32 in registers (y = scale * (x @ q), float32 sums), over the threads of XLA's pool.

Built with the C++ compiler ($CXX, else c++) against jax's FFI headers, `-O3 -march=native`, into
$AR_LM_KERNEL_CACHE (default ~/.cache/ar_lm/kernels), keyed by the source, jaxlib's version, the compiler
and the CPU's flags. Where that fails (no compiler) `available()` is False, with one warning, and
`ar_lm.model.quantize` dequantises instead; AR_LM_INT8_KERNEL=0 turns the kernel off.
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

SOURCE = Path(__file__).with_name("int8_matmul.cc")
TARGET = "ar_lm_int8_matmul"


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
    key = hashlib.sha256("\n".join([SOURCE.read_text(), jaxlib.__version__, cxx, *flags[:-1], _cpu_flags()])
                         .encode()).hexdigest()[:16]
    cache_dir = Path(os.environ.get("AR_LM_KERNEL_CACHE") or user_cache_dir("kernels"))
    lib = cache_dir / f"int8_matmul-{key}.so"
    if not lib.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".so.tmp")
        os.close(fd)
        try:
            subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, lib)  # atomic: processes building at once each install a whole library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with jax.ffi (on the first call); warns once if it cannot be."""
    if os.environ.get("AR_LM_INT8_KERNEL", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        print(f"warning: int8 matmul kernel unavailable ({detail.strip().splitlines()[-1] if detail else e}): "
              f"int8 weights are dequantised to float32 instead (slower)", file=sys.stderr)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.ArLmInt8Matmul), platform="cpu")
    return True


def int8_matmul(x_MxK: jax.Array, q: jax.Array, scale_N: jax.Array, transposed: bool = False) -> jax.Array:
    """scale * (x @ q) for float32 x [M, K] and int8 q [K, N] (`transposed`: q [N, K], x @ q.T), float32 [M, N].
    Needs `available()`."""
    n = q.shape[0] if transposed else q.shape[1]
    out = jax.ShapeDtypeStruct((x_MxK.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x_MxK, q, scale_N, transposed=transposed)
