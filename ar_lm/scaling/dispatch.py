"""Where and how a sweep's points run: the executor options, each point's device count, the device
pool (this machine, or a TPU pod's workers), the command for a placement, and the dry-run plan.

Devices per point: `mesh.devices` when the point's config fixes it; else, with `--flops-per-device F`,
the power of two >= C_run / F; else, running several at once, an equal share of the pool (a power of
two); one at a time (the default), every device.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path
from typing import Optional

from ar_lm.errors import require
from ar_lm.parallel.placement import Placement, Pool, block_size, local_pool, pack, subset_env
from ar_lm.scaling.executors import PointTask


@dataclasses.dataclass(frozen=True)
class ExecOptions:
    executor: str = "local"  # local | ray | slurm
    launcher: str = "local"  # local | tpu (points on a TPU pod's workers, coordinated from here)
    max_concurrent: int = 1
    max_retries: int = 2  # ray: retries of a point whose worker died
    ray_address: Optional[str] = None
    devices: Optional[int] = None  # the pool's size (default: this machine's devices)
    flops_per_device: Optional[float] = None
    slurm_cluster: str = "slurm"  # slurm | local (submitit's LocalExecutor)
    slurm_partition: str = ""
    slurm_time_min: int = 24 * 60
    slurm_gpu: bool = True
    tpu: dict = dataclasses.field(default_factory=dict)  # name(s), zone, accelerator, project
    progress: bool = True

    @property
    def concurrent(self) -> bool:
        return self.max_concurrent > 1 or self.executor != "local"


def check_options(opts: ExecOptions) -> None:
    require(opts.max_concurrent >= 1, f"--max-concurrent must be >= 1, got {opts.max_concurrent}")
    require(opts.max_retries >= 0, f"--max-retries must be >= 0, got {opts.max_retries}")
    require(opts.flops_per_device is None or opts.flops_per_device > 0,
            f"--flops-per-device must be > 0, got {opts.flops_per_device}")
    require(opts.launcher == "local" or opts.executor == "local",
            f"--launcher {opts.launcher} places points itself: use it with --executor local")


def preflight(opts: ExecOptions) -> None:
    """What must hold before a sweep writes anything: its engine is installed (and reachable)."""
    if opts.executor == "ray":
        from ar_lm.scaling.ray_executor import check_reachable, import_ray

        import_ray()
        if opts.ray_address:
            check_reachable(opts.ray_address)
    elif opts.executor == "slurm":
        import ar_lm.scaling.slurm_executor  # noqa: F401  (without submitit: a one-line error naming the extra)


def device_pool(opts: ExecOptions) -> Pool:
    if opts.launcher == "tpu":
        from ar_lm.parallel.tpu import tpu_layout

        require(opts.tpu.get("name") and opts.tpu.get("accelerator") and opts.tpu.get("zone"),
                "--launcher tpu needs the TPU: --tpu-name NAME[,NAME...] --tpu-accelerator TYPE (e.g. v4-32) --tpu-zone Z")
        layout = tpu_layout(opts.tpu["accelerator"])
        names = opts.tpu["name"].split(",")
        hosts = tuple(tuple(f"{n}/w{w}" for w in range(layout.hosts)) for n in names)
        return Pool("tpu", hosts, layout.chips_per_host, layout.host_bounds)
    return local_pool(opts.devices)


def devices_for(cfg, flops: float, opts: ExecOptions, pool: Pool) -> int:
    """A point's device count (0: all of this machine's, one point at a time)."""
    if cfg.mesh.devices:
        return cfg.mesh.devices
    if opts.flops_per_device:
        return block_size(math.ceil(flops / opts.flops_per_device))
    if not opts.concurrent:
        return 0
    share = max(1, pool.total // opts.max_concurrent) if opts.executor == "local" else 1
    return 1 << (share.bit_length() - 1)


def command_for(opts: ExecOptions, pool: Pool):
    """(task, placement) -> (argv, env) for the local executor: the run itself, restricted to its
    devices; on a TPU pod, an ssh to the placement's worker running it there."""
    def local(task: PointTask, placement: Placement):
        return task.argv, (subset_env(pool, placement, 8476 + placement.devices[0]) if task.devices else {})

    def tpu(task: PointTask, placement: Placement):
        from ar_lm.parallel.tpu import remote_ar_lm, ssh_command

        name = opts.tpu["name"].split(",")[placement.slice]
        worker = "all" if placement.host is None else placement.host
        env = subset_env(pool, placement, 8476 + placement.devices[0]) | dict(task.env)
        remote = remote_ar_lm(["train", task.config, "--run-dir", task.run_dir], env)
        return ssh_command(name, opts.tpu.get("zone"), opts.tpu.get("project"), worker, remote), {}

    return tpu if opts.launcher == "tpu" else local


def prepare_workers(opts: ExecOptions, dry_run: bool) -> None:
    """TPU pods: copy and install this project on every worker of every slice (once per sweep call)."""
    if opts.launcher != "tpu":
        return
    from ar_lm.parallel.launch import sync_tpu

    for name in opts.tpu["name"].split(","):
        if dry_run:
            print(f"# setup of {name}: copy and install this project on every worker")
        code = sync_tpu(name, opts.tpu["zone"], opts.tpu.get("project"), dry_run)
        require(code == 0, f"setting up TPU {name} failed (exit status {code}): see the gcloud output above")


def print_plan(tasks: list[PointTask], opts: ExecOptions, pool: Pool, sweep_dir: Path) -> None:
    """`--dry-run`: the coordinator, then each point's placement (estimated start) and command."""
    if opts.executor == "slurm":
        from ar_lm.scaling.slurm_executor import sbatch_scripts

        for script in sbatch_scripts(tasks, sweep_dir / "slurm", sweep_dir.name, opts.slurm_partition,
                                     opts.slurm_time_min, opts.max_concurrent, opts.slurm_gpu):
            print(script)
        return
    if opts.executor == "ray":
        print(f"# coordinator: this machine; Ray at {opts.ray_address or 'a local instance'}, "
              f"at most {opts.max_concurrent} points at once, {opts.max_retries} retries each")
        for t in tasks:
            print(f"# {t.name}: {max(1, t.devices)} device(s) as Ray resources; {shlex.join(t.argv)}")
        return
    needs = {t.name: t.devices or pool.largest for t in tasks}
    plan = pack(needs, {t.name: t.flops for t in tasks}, pool, opts.max_concurrent,
                {t.name: tuple(a for a in t.after if a in needs) for t in tasks})
    where = "this machine" + (f", ssh to the workers of {opts.tpu['name']}" if opts.launcher == "tpu" else "")
    print(f"# coordinator: {where}; {pool.kind} pool: {len(pool.slices)} slice(s) x {len(pool.slices[0])} host(s) x "
          f"{pool.devices_per_host} devices; at most {opts.max_concurrent} points at once")
    prepare_workers(opts, dry_run=True)
    by_name, scale = {t.name: t for t in tasks}, max((row["end"] for row in plan), default=1.0) or 1.0
    run = command_for(opts, pool)
    for row in plan:
        argv, env = run(by_name[row["name"]], row["placement"])
        print(f"# {row['name']}: {row['placement'].describe(pool)} from {row['start'] / scale:.2f} "
              f"to {row['end'] / scale:.2f} of the sweep's time")
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + (" " if env else "") + shlex.join(argv))
