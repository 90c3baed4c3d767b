"""Launchers: run any `ar-lm` command on a TPU pod, a Slurm cluster, or N local processes.

All three start one process per host (TPU) or per GPU (Slurm) or per slot (local), and
`ar_lm.parallel.runtime.initialize` joins them with `jax.distributed`. Every launcher has `--dry-run`,
which prints the exact commands (or sbatch script) instead of running them.

    ar-lm launch local --processes 2 --devices-per-process 4 -- train experiments/tiny.py --data D
    ar-lm launch tpu --name my-v5e --zone us-west4-a --accelerator v5litepod-16 -- train experiments/x.py
    ar-lm launch slurm --nodes 2 --gpus-per-node 8 --partition gpu -- train experiments/x.py
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ar_lm.errors import UserError, require
from ar_lm.parallel.tpu import remote_ar_lm, runtime_version, ssh_command, wait_active

REMOTE_DIR = "~/ar_lm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# local


def local_commands(args: list[str], processes: int, port: int) -> list[list[str]]:
    return [
        [sys.executable, "-m", "ar_lm", *args, "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", str(processes), "--process-id", str(i)]
        for i in range(processes)
    ]


def run_local(args: list[str], processes: int, devices_per_process: int, timeout: float, dry_run: bool,
              log_dir: Path | None = None) -> int:
    """N processes on this machine, each with `devices_per_process` fake CPU devices."""
    require(processes >= 1, f"--processes must be >= 1, got {processes}")
    cmds = local_commands(args, processes, _free_port())
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices_per_process), JAX_PLATFORMS="cpu")
    if dry_run:
        for cmd in cmds:
            print(f"JAX_NUM_CPU_DEVICES={devices_per_process} JAX_PLATFORMS=cpu {shlex.join(cmd)} &")
        print("wait")
        return 0
    logs = []
    procs = []
    for i, cmd in enumerate(cmds):
        out = open(log_dir / f"process_{i}.log", "w") if log_dir else None
        logs.append(out)
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
    try:
        return _wait_all(procs, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            if f:
                f.close()


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal s: 128 + s, as a shell reports it


def _wait_all(procs: list[subprocess.Popen], timeout: float, grace: float = 30.0) -> int:
    """The highest exit status once all have exited. After the first failure the others get
    `grace` seconds to stop by themselves (a preempted peer is finishing its checkpoint), then are
    killed: they would otherwise wait in a collective for a dead peer (``srun --kill-on-bad-exit``)."""
    deadline = time.time() + timeout
    failed: list[int] = []
    while time.time() < deadline:
        codes = [p.poll() for p in procs]
        if None not in codes:
            return max(_exit_status(c) for c in codes)
        if not failed and any(c not in (None, 0) for c in codes):
            failed = [c for c in codes if c not in (None, 0)]
            deadline = min(deadline, time.time() + grace)
        time.sleep(0.05)
    if failed:
        return max(_exit_status(c) for c in failed)
    raise UserError(f"the local {len(procs)}-process run did not finish within {timeout:.0f} s")


# ---------------------------------------------------------------------------------------------
# TPU pods (gcloud)


def tpu_commands(args: list[str], name: str, zone: str, accelerator: str, version: str, project: Optional[str],
                 spot: bool, queued: bool, exists: bool) -> list[list[str]]:
    proj = ["--project", project] if project else []
    cmds = []
    if not exists:
        if queued:
            cmds.append(["gcloud", "compute", "tpus", "queued-resources", "create", f"{name}-qr", f"--node-id={name}",
                         f"--zone={zone}", f"--accelerator-type={accelerator}", f"--runtime-version={version}",
                         *(["--spot"] if spot else []), *proj])
        else:
            cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "create", name, f"--zone={zone}",
                         f"--accelerator-type={accelerator}", f"--version={version}", *(["--spot"] if spot else []), *proj])
    archive = "/tmp/ar_lm_project.tar.gz"
    cmds.append(["tar", "czf", archive, "--exclude=.venv", "--exclude=runs", "--exclude=sweeps", "--exclude=data",
                 "--exclude=.git", "."])
    cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{name}:/tmp/", f"--zone={zone}", "--worker=all", *proj])
    cmds.append(ssh_command(name, zone, project, "all", f"mkdir -p {REMOTE_DIR} && tar xzf {archive} -C {REMOTE_DIR} "
                            f"&& cd {REMOTE_DIR} && pip install -q -e . 'jax[tpu]'"))
    cmds.append(ssh_command(name, zone, project, "all", remote_ar_lm(args, {}, REMOTE_DIR)))
    return cmds


def run_tpu(args: list[str], name: str, zone: str, accelerator: str, version: Optional[str], project: Optional[str],
            spot: bool, queued: bool, dry_run: bool, queued_timeout: float = 3600.0) -> int:
    """Create the TPU (unless it exists; through queued resources with `queued`, waiting until it is
    ACTIVE), copy this project to every worker, install it, run `ar-lm ARGS` on all workers."""
    require(name and zone and accelerator, "the TPU launcher needs --name, --zone and --accelerator (e.g. v5litepod-16)")
    version = runtime_version(accelerator, version)
    exists = False
    if not dry_run:
        require(_which("gcloud"), "gcloud is not installed: install the Google Cloud SDK or use --dry-run")
        describe = ["gcloud", "compute", "tpus", "tpu-vm", "describe", name, f"--zone={zone}"]
        exists = subprocess.run(describe, capture_output=True).returncode == 0
    cmds = tpu_commands(args, name, zone, accelerator, version, project, spot, queued, exists)
    if queued and not exists:  # create, wait for ACTIVE, then the rest
        code = _run_or_print(cmds[:1], dry_run)
        if code:
            return code
        if dry_run:
            print(f"# wait until queued resource {name}-qr is ACTIVE (at most {queued_timeout:.0f} s)")
        else:
            wait_active(name, zone, project, queued_timeout)
        cmds = cmds[1:]
    return _run_or_print(cmds, dry_run)


def sync_tpu(name: str, zone: str, project: Optional[str], dry_run: bool) -> int:
    """Copy this project to every worker of an existing TPU and install it there (what `run_tpu` does
    before its command; `ar-lm sweep --launcher tpu` does it once per slice before placing points)."""
    if not dry_run:
        require(_which("gcloud"), "gcloud is not installed: install the Google Cloud SDK or use --dry-run")
    return _run_or_print(tpu_commands([], name, zone, "", "", project, False, False, exists=True)[:-1], dry_run)


# ---------------------------------------------------------------------------------------------
# Slurm


def slurm_script(args: list[str], nodes: int, gpus_per_node: int, partition: str | None, time_limit: str,
                 job_name: str, workdir: str) -> str:
    """One task per GPU; `jax.distributed.initialize()` reads SLURM_* to find its peers."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus_per_node}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        "#SBATCH --cpus-per-task=8",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={job_name}-%j.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(workdir)}",
        "export WANDB_MODE=${WANDB_MODE:-offline}",
        f"srun --kill-on-bad-exit=1 python3 -m ar_lm {shlex.join(args)}",
        "",
    ]
    return "\n".join(lines)


def run_slurm(args: list[str], nodes: int, gpus_per_node: int, partition: str | None, time_limit: str, job_name: str,
              dry_run: bool) -> int:
    require(nodes >= 1 and gpus_per_node >= 1, "--nodes and --gpus-per-node must be >= 1")
    script = slurm_script(args, nodes, gpus_per_node, partition, time_limit, job_name, os.getcwd())
    if dry_run:
        print(script, end="")
        return 0
    require(_which("sbatch"), "sbatch is not installed here: run this on a Slurm login node, or use --dry-run")
    path = Path(f"{job_name}.sbatch")
    path.write_text(script)
    return subprocess.run(["sbatch", str(path)]).returncode


# ---------------------------------------------------------------------------------------------


def _which(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


def _run_or_print(cmds: list[list[str]], dry_run: bool) -> int:
    for cmd in cmds:
        if dry_run:
            print(shlex.join(cmd))
            continue
        code = subprocess.run(cmd).returncode
        if code:
            return code
    return 0


def settings_from_env() -> dict:
    """Launcher settings from AR_LM_TPU_* / AR_LM_GCP_PROJECT / AR_LM_SLURM_* (the options' defaults)."""
    env = os.environ.get
    return {"name": env("AR_LM_TPU_NAME"), "zone": env("AR_LM_TPU_ZONE"), "accelerator": env("AR_LM_TPU_TYPE"),
            "version": env("AR_LM_TPU_VERSION"), "project": env("AR_LM_GCP_PROJECT"),
            "nodes": int(env("AR_LM_SLURM_NODES", 1)), "gpus_per_node": int(env("AR_LM_SLURM_GPUS", 8)),
            "partition": env("AR_LM_SLURM_PARTITION")}


DEFAULTS = {"processes": 2, "devices_per_process": 4, "timeout": 600.0, "spot": False, "queued": False,
            "time": "24:00:00", "job_name": "ar_lm"}


def launch_command(ns) -> int:
    """`ar-lm launch local|tpu|slurm [options] -- COMMAND ...`."""
    args = getattr(ns, "cmd_args", [])
    require(args, "give the ar-lm command to launch after --, e.g. -- train experiments/tiny.py --data DATA")
    if ns.launcher == "local":
        return run_local(args, ns.processes, ns.devices_per_process, ns.timeout, ns.dry_run)
    if ns.launcher == "tpu":
        return run_tpu(args, ns.name, ns.zone, ns.accelerator, ns.version, ns.project, ns.spot, ns.queued, ns.dry_run,
                       ns.queued_timeout)
    return run_slurm(args, ns.nodes, ns.gpus_per_node, ns.partition, ns.time, ns.job_name, ns.dry_run)
