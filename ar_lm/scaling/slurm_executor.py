"""`ar-lm sweep --executor slurm`: the points as Slurm job arrays, through submitit.

One array per wave of points that can run together (a cooldown branch waits for its trunk's wave)
and device count (the same rule as the local executor: a point's GPUs), at most `--max-concurrent`
array tasks at once. Each array task runs one point (`executors.execute`). On preemption or the time
limit Slurm signals the job (USR2, `signal_delay_s` before the end); submitit calls
`PointJob.checkpoint`, which stops the run with SIGTERM (it checkpoints and exits) and requeues the
job, which resumes from that checkpoint. The command waits for the arrays, then the sweep fits; a
sweep whose coordinator was stopped picks its finished points up on the next `ar-lm sweep` call.
`--slurm-cluster local` runs the same arrays as local processes (submitit's LocalExecutor).
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ar_lm.errors import UserError
from ar_lm.parallel.placement import cpu_devices_env
from ar_lm.scaling.executors import PointTask, finish, largest_first, launch
from ar_lm.scaling.status import SweepStatus

try:
    import submitit
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:
    raise UserError("--executor slurm needs submitit: pip install 'ar_lm[slurm]'") from None


class PointJob(Checkpointable):
    """One array task: run the point; on preemption, stop it at a checkpoint and requeue."""

    def __init__(self):
        self.proc = None

    def __call__(self, task: PointTask, cpu: bool) -> int:
        env = cpu_devices_env(task.devices) if cpu else {}
        self.proc = launch(task, env=env, where=f"slurm:{_job_id()}", die_with_parent=True)
        code = self.proc.wait()
        finish(task, code)
        return code

    def checkpoint(self, task: PointTask, cpu: bool) -> DelayedSubmission:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the run finishes its step, checkpoints and exits
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        SweepStatus(task.status).update(task.name, state="submitted", error=None, requeued=time.time())
        return DelayedSubmission(PointJob(), task, cpu)


def _job_id() -> str:
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:
        return "?"


def waves(tasks: list[PointTask]) -> list[list[PointTask]]:
    """Points in order of dependency: each wave waits only for earlier waves."""
    names, out, left = set(), [], largest_first(tasks)
    while left:
        wave = [t for t in left if set(t.after) <= names or not set(t.after) & {x.name for x in left}]
        if not wave:
            raise UserError(f"points {', '.join(t.name for t in left)} wait for each other: fix their branch_of")
        out.append(wave)
        names |= {t.name for t in wave}
        left = [t for t in left if t.name not in names]
    return out


def _parameters(name: str, devices: int, gpu: bool, partition: str, time_min: int, max_concurrent: int) -> dict:
    params = {"timeout_min": time_min, "tasks_per_node": 1, "cpus_per_task": max(1, devices) * (8 if gpu else 1),
              "name": f"{name}-sweep", "slurm_array_parallelism": max_concurrent, "slurm_signal_delay_s": 120}
    if gpu:
        params["gpus_per_node"] = max(1, devices)
    if partition:
        params["slurm_partition"] = partition
    return params


def sbatch_scripts(tasks: list[PointTask], folder: Path, sweep_name: str, partition: str, time_min: int,
                   max_concurrent: int, gpu: bool = True) -> list[str]:
    """The sbatch files submitit would submit for these points (`--dry-run`), one per array."""
    from submitit.slurm.slurm import _make_sbatch_string

    scripts = []
    for wave in waves(tasks):
        for devices in sorted({t.devices for t in wave}, reverse=True):
            group = [t for t in wave if t.devices == devices]
            p = _parameters(sweep_name, devices, gpu, partition, time_min, max_concurrent)
            command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
            text = _make_sbatch_string(
                command=command, folder=folder, job_name=p["name"], partition=p.get("slurm_partition"),
                time=time_min, ntasks_per_node=1, cpus_per_task=p["cpus_per_task"], gpus_per_node=p.get("gpus_per_node"),
                signal_delay_s=120, array_parallelism=max_concurrent, map_count=len(group))
            scripts.append(f"# points: {', '.join(t.name for t in group)}\n{text}")
    return scripts


def run_slurm(tasks: list[PointTask], folder: Path, sweep_name: str, cluster: str, partition: str, time_min: int,
              max_concurrent: int, gpu: bool, on_tick: Callable[[], None] = lambda: None) -> dict:
    """Submit the arrays wave by wave and wait for them. Returns {"done": k, "failed": k}."""
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    codes: dict[str, int] = {}
    for wave in waves(tasks):
        runnable = [t for t in wave if not any(codes.get(a, 0) for a in t.after)]
        for t in wave:
            if t not in runnable:
                codes[t.name] = 1
                SweepStatus(t.status).update(t.name, state="failed", error="error: a point it waits for failed")
        chunk = max_concurrent if cluster == "local" else len(runnable) or 1  # local: no array parallelism limit
        for devices in sorted({t.devices for t in runnable}, reverse=True):
            group = [t for t in runnable if t.devices == devices]
            executor.update_parameters(**_parameters(sweep_name, devices, gpu, partition, time_min, max_concurrent))
            for i in range(0, len(group), chunk):
                part = group[i:i + chunk]
                jobs = executor.map_array(PointJob(), part, [not gpu] * len(part))
                for t, job in zip(part, jobs):
                    SweepStatus(t.status).update(t.name, state="submitted", job_id=job.job_id)
                codes |= _wait(part, jobs, on_tick)
    return {"done": sum(c == 0 for c in codes.values()), "failed": sum(c != 0 for c in codes.values())}


def _wait(tasks: list[PointTask], jobs, on_tick: Callable[[], None]) -> dict:
    while not all(job.done() for job in jobs):
        on_tick()
        time.sleep(1.0)
    codes = {}
    for t, job in zip(tasks, jobs):
        try:
            codes[t.name] = job.result()
        except Exception as e:  # the job died (killed, out of memory, cancelled) before its point ended
            codes[t.name] = 1
            SweepStatus(t.status).update(t.name, state="failed", error=f"error: Slurm job {job.job_id}: "
                                         f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__}")
    return codes
