"""Process start-up, before any computation: `jax.distributed`, host CPU devices, the compilation cache, the
per-backend XLA flags.

- TPU pods and Slurm: `jax.distributed.initialize()` finds the coordinator, process count and id
  from the environment (TPU metadata, SLURM_* variables).
- Elsewhere: explicitly, from flags or AR_LM_COORDINATOR / AR_LM_NUM_PROCESSES / AR_LM_PROCESS_ID.

A missing peer fails after `timeout` seconds with a one-line message instead of hanging for
jax's default five minutes.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import Optional

import jax

from ar_lm.errors import UserError, require
from ar_lm.io import cpu_cores, user_cache_dir


def _on_tpu_pod() -> bool:
    """A multi-host TPU slice's worker, unless this process was given a sub-host chip subset
    (TPU_PROCESS_BOUNDS=1,1,1: one process, see `ar_lm.parallel.tpu.chip_subset_env`)."""
    if os.environ.get("TPU_PROCESS_BOUNDS") == "1,1,1":
        return False
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or (not hosts and bool(os.environ.get("CLOUD_TPU_TASK_ID")))


def _under_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, timeout: int = 120) -> bool:
    """Start the multi-controller runtime if this is a multi-process run; returns whether it did."""
    coordinator = coordinator or os.environ.get("AR_LM_COORDINATOR")
    num_processes = num_processes or _int_env("AR_LM_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("AR_LM_PROCESS_ID")
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit:
        require(coordinator and num_processes and process_id is not None,
                "a multi-process run needs --coordinator HOST:PORT, --num-processes N and --process-id I together")
        require(0 <= process_id < num_processes, f"--process-id {process_id} is outside [0, {num_processes})")
        if num_processes == 1:
            return False
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif _on_tpu_pod() or _under_slurm():
        kwargs = {}
    else:
        return False
    where = coordinator or "the auto-detected coordinator"
    message = (f"could not start the {num_processes or '?'}-process run through {where} within {timeout} s: "
               "check that every process was started and the address is reachable")
    # jax's runtime aborts the whole process (a C++ fatal error) when a peer never comes, so a
    # watchdog says what went wrong, in one line, and exits with status 2 just before that
    watchdog = threading.Timer(timeout, _give_up, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout + 30)
    except Exception as e:  # noqa: BLE001 - jax raises several types for an unreachable peer
        raise UserError(f"{message} ({type(e).__name__})") from None
    finally:
        watchdog.cancel()
    return True


def multi_process_requested(coordinator: Optional[str] = None) -> bool:
    return bool(coordinator or os.environ.get("AR_LM_COORDINATOR") or _on_tpu_pod() or _under_slurm())


def configure_cpu_devices(mesh, micro_batch: int, max_auto: int = 8) -> Optional[int]:
    """Split the CPU into host-platform devices (data parallel across them) before JAX starts;
    returns the count set, or None where it is not ours to set.

    `mesh.cpu_devices` > 0 is taken as given. 0 (auto): `mesh.devices` if set; the product of the
    mesh sizes if none is -1; else one device per core (at most `max_auto`) that the fixed mesh
    sizes and the micro-batch divide (devices splitting the batch beat one device splitting every op
    over all cores; see docs/explanation/performance.md). Left alone when JAX_NUM_CPU_DEVICES or
    --xla_force_host_platform_device_count is set (the local launcher sets it) and once JAX has
    started its backends. A machine with accelerators ignores the host-platform count.
    """
    from jax._src import xla_bridge

    if ("JAX_NUM_CPU_DEVICES" in os.environ or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or xla_bridge.backends_are_initialized() or jax.config.jax_num_cpu_devices != -1):
        return None
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    fixed = math.prod(s for s in sizes if s != -1)
    if mesh.cpu_devices:
        n = mesh.cpu_devices
    elif mesh.devices:
        n = mesh.devices
    elif -1 not in sizes:
        n = fixed
    else:
        limit = max(min(cpu_cores(), max_auto), fixed)
        n = max((d for d in range(fixed, limit + 1, fixed) if micro_batch % d == 0), default=fixed)
    jax.config.update("jax_num_cpu_devices", n)
    return n


# MaxText's TPU set, less its v5e-only async collective fusion flags (libtpu 0.0.50 refuses continuation fusion
# on any other chip): collectives run asynchronously and overlap compute, data-parallel all-reduces optimised
TPU_XLA_FLAGS = (
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
)
# JAX's GPU performance tips and MaxText's GPU runs: the latency-hiding scheduler overlaps collectives with
# compute, collectives combined up to 128 MiB and pipelined across the layer loop, cuBLAS for matmuls
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
)
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def merged_flags(current: str, ours: tuple[str, ...]) -> str:
    """`current` (a flag string the user set) plus each of `ours` whose name it does not set: the user's win."""
    names = {f.split("=", 1)[0] for f in current.split()}
    return " ".join([*current.split(), *(f for f in ours if f.split("=", 1)[0] not in names)])


def set_backend_xla_flags(environ=os.environ) -> dict[str, str]:
    """Our per-backend XLA flags, added to the environment before any backend starts: TPU_XLA_FLAGS to
    LIBTPU_INIT_ARGS where libtpu is installed (it reads them also when `ar-lm plan` compiles for a TPU here),
    GPU_XLA_FLAGS to XLA_FLAGS where a CUDA plugin is; flags the user set keep their values; a machine with
    neither gets none. Returns what was set (`backend_xla_flags` reads it back for the run's summary)."""
    import importlib.util

    set_now = {}
    if importlib.util.find_spec("libtpu") is not None:
        set_now["LIBTPU_INIT_ARGS"] = merged_flags(environ.get("LIBTPU_INIT_ARGS", ""), TPU_XLA_FLAGS)
    if any(importlib.util.find_spec(p) is not None for p in CUDA_PLUGINS):
        set_now["XLA_FLAGS"] = merged_flags(environ.get("XLA_FLAGS", ""), GPU_XLA_FLAGS)
    environ.update(set_now)
    return set_now


def backend_xla_flags() -> str:
    """The XLA flags in effect for the backend this process runs on (recorded in the run's summary)."""
    return os.environ.get("LIBTPU_INIT_ARGS" if jax.default_backend() == "tpu" else "XLA_FLAGS", "")


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache for the commands that compile (train, eval, generate):
    a repeated run of the same shapes loads its programs instead of compiling them again.

    Directory: $JAX_COMPILATION_CACHE_DIR if set (a sweep gives its runs one of their own), else
    $AR_LM_COMPILE_CACHE, else ~/.cache/ar_lm/jax (under $XDG_CACHE_HOME if set);
    AR_LM_COMPILE_CACHE=off disables it. Programs that compile in under 0.3 s are not stored.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = os.environ["JAX_COMPILATION_CACHE_DIR"]
    else:
        path = os.environ.get("AR_LM_COMPILE_CACHE") or str(user_cache_dir("jax"))
    if path.lower() == "off":
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def _give_up(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def _int_env(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None
