"""`ar-lm sweep --executor ray`: each point is a Ray task holding its devices as Ray resources.

Connects to `--ray-address` (a running cluster; its nodes need ar_lm installed and the sweep directory
on shared storage at the same path) or starts a local instance sized to this machine. A point asks for
`num_gpus` on GPU clusters, the `TPU` resource on TPU clusters (Ray sets CUDA_VISIBLE_DEVICES /
TPU_VISIBLE_CHIPS for it) and `num_cpus` (as many fake host devices) on CPU. A task whose worker dies
(node lost, preempted, killed) is retried up to `--max-retries` times by Ray and resumes from the run's
checkpoint; a run that fails by itself (an error in its config) is not retried.
"""

from __future__ import annotations

import socket
from typing import Callable, Optional

from ar_lm.errors import UserError, require
from ar_lm.io import cpu_cores
from ar_lm.parallel.placement import cpu_devices_env
from ar_lm.scaling.executors import PointTask, execute, largest_first
from ar_lm.scaling.status import SweepStatus


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'ar_lm[ray]'") from None
    return ray


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A one-line error, within `timeout_s`, when nothing listens at a Ray address (HOST:PORT or
    ray://HOST:PORT); `ray.init` itself would wait for minutes."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    require(host and port.isdigit(), f"--ray-address {address!r} is not HOST:PORT: give e.g. 10.0.0.2:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}): start it with "
                        "`ray start --head` there or fix --ray-address") from None


def _resources(task: PointTask, kind: str) -> dict:
    devices = max(1, task.devices)
    if kind == "gpu":
        return {"num_gpus": devices, "num_cpus": 1}
    if kind == "tpu":
        return {"resources": {"TPU": devices}, "num_cpus": 1}
    return {"num_cpus": devices}


def _cluster_kind(ray) -> tuple[str, float]:
    total = ray.cluster_resources()
    for kind, key in (("tpu", "TPU"), ("gpu", "GPU"), ("cpu", "CPU")):
        if total.get(key):
            return kind, total[key]
    return "cpu", 0.0


def _run_point(task: PointTask, kind: str, *waited_for: int) -> int:
    """The Ray task: run the point unless a point it waits for failed."""
    if any(code != 0 for code in waited_for):
        SweepStatus(task.status).update(task.name, state="failed",
                                        error=f"error: it waits for {', '.join(task.after)}, which failed")
        return 1
    env = cpu_devices_env(task.devices) if kind == "cpu" else {}
    return execute(task, env=env, where=f"ray:{kind}x{max(1, task.devices)}")


def run_ray(tasks: list[PointTask], address: Optional[str], max_concurrent: int, max_retries: int,
            on_tick: Callable[[], None] = lambda: None) -> dict:
    """Submit every point as a Ray task (dependencies as task arguments), at most `max_concurrent` at
    a time, and wait for them all."""
    ray = import_ray()
    if address:
        check_reachable(address)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": cpu_cores()}))
    try:
        kind, capacity = _cluster_kind(ray)
        for t in tasks:
            require(max(1, t.devices) <= capacity, f"point {t.name} needs {max(1, t.devices)} {kind} devices but "
                    f"the Ray cluster has {capacity:g}: give it fewer or add nodes")
        remote = ray.remote(_run_point)
        refs, codes, pending = {}, {}, [t for t in largest_first(tasks)]
        pending.sort(key=lambda t: bool(t.after))  # trunks before the branches that wait for them
        while pending or refs:
            while pending and len(refs) < max_concurrent:
                t = pending.pop(0)
                deps = [refs.get(a) or codes.get(a, 0) for a in t.after]
                options = {**_resources(t, kind), "max_retries": max_retries, "retry_exceptions": False}
                refs[t.name] = remote.options(**options).remote(t, kind, *deps)
            ready, _ = ray.wait(list(refs.values()), num_returns=1, timeout=1.0)
            on_tick()
            for name in [n for n, r in refs.items() if r in ready]:
                codes[name] = _result(ray, refs.pop(name), next(t for t in tasks if t.name == name))
        return {"done": sum(c == 0 for c in codes.values()), "failed": sum(c != 0 for c in codes.values())}
    finally:
        if started_here:
            ray.shutdown()


def _result(ray, ref, task: PointTask) -> int:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:  # retries exhausted (the worker kept dying), or cancelled
        SweepStatus(task.status).update(task.name, state="failed", error=f"error: Ray: {str(e).splitlines()[0]}")
        return 1
