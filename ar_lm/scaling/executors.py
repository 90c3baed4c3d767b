"""Running a sweep's points: one `PointTask` per point, started by an executor.

Every executor runs a point the same way (`launch` then `finish`): the point's status goes to
running (attempt k, pid, host, devices), `python -m ar_lm train POINT.json --run-dir RUN` runs with
its output appended to SWEEP_DIR/logs/<point>.log, and the point is done when it exited 0 with a
finished summary, else failed with the log's last `error:` line. A run that is started again resumes
from its last checkpoint, so retries (Ray), requeues (Slurm) and re-runs lose at most the steps since.

`run_local` is the local executor: one point at a time on all devices (the default), or up to
`max_concurrent` side by side on device subsets packed by `ar_lm.parallel.placement`; `command_for`
turns a point and its placement into the command and environment (for TPU pods: an ssh to a worker).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ar_lm.parallel.placement import Allocation, Placement, Pool, block_size, check_fits, start_now
from ar_lm.scaling.status import SweepStatus
from ar_lm.training import rundir


@dataclasses.dataclass(frozen=True)
class PointTask:
    name: str
    config: str  # the point's resolved config (SWEEP_DIR/points/<name>.json)
    run_dir: str
    log: str
    status: str  # SWEEP_DIR/status.json
    config_sha: str
    devices: int  # devices it asks for (0: all of them, the serial default)
    flops: float  # what running it costs (for packing and the ETA)
    after: tuple[str, ...] = ()  # points it waits for (a cooldown branch: its trunk)
    env: tuple[tuple[str, str], ...] = ()  # extra environment (the sweep's compilation cache)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "ar_lm", "train", self.config, "--run-dir", self.run_dir]


def _die_with_parent() -> None:  # Linux: the child gets SIGKILL when its parent dies (a killed Ray worker)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def launch(task: PointTask, argv: Optional[list[str]] = None, env: Optional[dict] = None, where: str = "",
           die_with_parent: bool = False) -> subprocess.Popen:
    """Start the point's run (status: running) and return its process."""
    SweepStatus(Path(task.status)).start_attempt(task.name, pid=os.getpid(), host=socket.gethostname(),
                                                 devices=where or None, started=time.time(), error=None)
    Path(task.log).parent.mkdir(parents=True, exist_ok=True)
    with open(task.log, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} start on {socket.gethostname()} {where}\n".encode())
        full_env = {**os.environ, **dict(task.env), **(env or {})}
        return subprocess.Popen(argv or task.argv, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                preexec_fn=_die_with_parent if die_with_parent else None)


def finish(task: PointTask, code: int) -> bool:
    """Record how the run ended: done (exit 0 and a finished summary) or failed, with the error."""
    summary = rundir.read_summary(Path(task.run_dir))
    status = SweepStatus(Path(task.status))
    if code == 0 and summary and summary.get("finished"):
        status.update(task.name, state="done", error=None, finished=time.time(), config_sha=task.config_sha,
                      exit_status=0)
        return True
    error = last_error(Path(task.log)) or f"exit status {code}"
    status.update(task.name, state="failed", error=error, exit_status=code, finished=time.time())
    return False


def execute(task: PointTask, env: Optional[dict] = None, where: str = "") -> int:
    """Run the point to the end in this process (a Ray task, a Slurm job): its exit status."""
    proc = launch(task, env=env, where=where, die_with_parent=True)
    code = proc.wait()
    finish(task, code)
    return code


def last_error(log_path: Path) -> str:
    if not log_path.is_file():
        return ""
    lines = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip() and not l.startswith("# ")]
    errors = [l for l in lines if l.startswith("error:")]
    return (errors[-1] if errors else lines[-1] if lines else "")[:500]


def largest_first(tasks: list[PointTask]) -> list[PointTask]:
    return sorted(tasks, key=lambda t: (-block_size(t.devices or 1), -t.flops, t.name))


def run_local(tasks: list[PointTask], pool: Pool, max_concurrent: int,
              command_for: Callable[[PointTask, Placement], tuple[list[str], dict]],
              on_tick: Callable[[], None] = lambda: None, done: frozenset = frozenset()) -> dict:
    """Run `tasks` on this machine, each when the points it waits for are done, up to `max_concurrent`
    at once. `done`: points finished before (a branch's trunk). Returns {"done": k, "failed": k}."""
    needs = {t.name: t.devices or pool.largest for t in tasks}
    check_fits(needs, pool)
    by_name, alloc = {t.name: t for t in tasks}, Allocation(pool)
    waiting = [t.name for t in largest_first(tasks)]
    running: dict[str, tuple[subprocess.Popen, Placement]] = {}
    finished, failed = set(done), set()
    while waiting or running:
        for name in [n for n in waiting if set(by_name[n].after) & failed]:
            waiting.remove(name)
            failed.add(name)
            SweepStatus(Path(by_name[name].status)).update(name, state="failed", error=(
                f"error: it waits for {', '.join(sorted(set(by_name[name].after) & failed))}, which failed"))
        ready = [n for n in waiting if set(by_name[n].after) <= finished]
        for name, placement in start_now(ready, needs, alloc, len(running), max_concurrent):
            waiting.remove(name)
            argv, env = command_for(by_name[name], placement)
            running[name] = (launch(by_name[name], argv, env, placement.describe(pool)), placement)
        if not running and waiting:  # what is left waits for points that are not part of this run
            for name in waiting:
                SweepStatus(Path(by_name[name].status)).update(name, state="failed", error=(
                    f"error: it waits for {', '.join(by_name[name].after)}, which did not run"))
            failed |= set(waiting)
            break
        on_tick()
        time.sleep(0.2)
        for name, (proc, placement) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                alloc.release(placement)
                (finished if finish(by_name[name], proc.returncode) else failed).add(name)
    on_tick()
    return {"done": len(finished - set(done)), "failed": len(failed)}
