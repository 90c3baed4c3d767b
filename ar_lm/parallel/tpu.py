"""Cloud TPU pods: the shape of an accelerator type, its runtime version, the environment that gives a
process a subset of one host's chips, and the gcloud commands that reach the workers.

Accelerator types name TensorCores on v4/v5p (2 per chip: v4-32 is 16 chips) and chips on v5e/v6e
(v5litepod-16 is 16 chips). Multi-host slices have 4 chips per host; v5e/v6e single hosts hold up to 8.
A sub-host run sees its chips through TPU_VISIBLE_CHIPS and single-process bounds (the variables of
Google's "run several TPU processes on one VM" recipe), so several points share a host side by side.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import time
from typing import Callable, Optional

from ar_lm.errors import UserError, require

# per family: TensorCores per chip (the accelerator type's number counts cores on v4/v5p), the runtime
# Google lists for it, chips per host of a multi-host slice, most chips on a single host
FAMILIES = {
    "v4": dict(cores_per_chip=2, runtime="tpu-ubuntu2204-base", chips_per_host=4, single_host_max=4),
    "v5e": dict(cores_per_chip=1, runtime="v2-alpha-tpuv5-lite", chips_per_host=4, single_host_max=8),
    "v5p": dict(cores_per_chip=2, runtime="v2-alpha-tpuv5", chips_per_host=4, single_host_max=4),
    "v6e": dict(cores_per_chip=1, runtime="v2-alpha-tpuv6e", chips_per_host=4, single_host_max=8),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}
CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}  # chips of one process, as x,y,z


@dataclasses.dataclass(frozen=True)
class TpuLayout:
    family: str
    chips: int
    hosts: int
    chips_per_host: int

    @property
    def host_bounds(self) -> str:
        return CHIP_BOUNDS[self.chips_per_host]


def tpu_layout(accelerator: str) -> TpuLayout:
    """`v4-32` -> 16 chips on 4 hosts of 4; `v5litepod-8` -> 8 chips on one host."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator or "")
    family = ALIASES.get(m.group(1), m.group(1)) if m else None
    require(family in FAMILIES, f"unknown TPU accelerator type {accelerator!r}: use FAMILY-SIZE with family "
            f"v4, v5e (v5litepod), v5p or v6e, e.g. v4-32, v5litepod-16")
    spec = FAMILIES[family]
    size = int(m.group(2))
    require(size % spec["cores_per_chip"] == 0 and size > 0,
            f"TPU accelerator type {accelerator!r}: {family} sizes count TensorCores, a multiple of {spec['cores_per_chip']}")
    chips = size // spec["cores_per_chip"]
    per_host = chips if chips <= spec["single_host_max"] else spec["chips_per_host"]
    require(chips % per_host == 0 and per_host in CHIP_BOUNDS,
            f"TPU accelerator type {accelerator!r}: {chips} chips do not split into hosts of {per_host}")
    return TpuLayout(family, chips, chips // per_host, per_host)


def runtime_version(accelerator: str, given: Optional[str] = None) -> str:
    """The TPU VM runtime for the accelerator's family, unless one is given."""
    return given or FAMILIES[tpu_layout(accelerator).family]["runtime"]


def chip_subset_env(chip_ids, host_bounds: str, port: int) -> dict[str, str]:
    """Environment for one process on `chip_ids` of a host whose chips span `host_bounds` (x,y,z),
    beside other such processes ({} for the whole host). Each process needs its own port."""
    n = len(chip_ids)
    host_chips = 1
    for b in host_bounds.split(","):
        host_chips *= int(b)
    if n == host_chips:
        return {}
    require(n in CHIP_BOUNDS, f"a TPU chip subset has 1, 2, 4 or 8 chips, not {n}")
    ids = ",".join(map(str, chip_ids))
    return {"TPU_VISIBLE_CHIPS": ids, "TPU_VISIBLE_DEVICES": ids, "TPU_CHIPS_PER_PROCESS_BOUNDS": CHIP_BOUNDS[n],
            "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_ADDRESSES": f"localhost:{port}",
            "TPU_PROCESS_PORT": str(port), "CLOUD_TPU_TASK_ID": "0", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def ssh_command(name: str, zone: Optional[str], project: Optional[str], worker, remote: str) -> list[str]:
    """`gcloud compute tpus tpu-vm ssh` running `remote` on one worker (an index) or `all`."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *([f"--zone={zone}"] if zone else []),
            f"--worker={worker}", *(["--project", project] if project else []), "--command", remote]


def remote_ar_lm(args: list[str], env: dict[str, str], remote_dir: str = "~/ar_lm") -> str:
    """The shell line a worker runs: `cd ~/ar_lm && VAR=... python3 -m ar_lm ARGS` (paths in ARGS kept
    as given: a sweep on shared storage has the same absolute path on every worker)."""
    assigns = "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())
    return f"cd {remote_dir} && {assigns}python3 -m ar_lm {shlex.join(args)}"


def queued_state(name: str, zone: str, project: Optional[str]) -> str:
    """The state of queued resource NAME-qr (ACTIVE, WAITING_FOR_RESOURCES, PROVISIONING, FAILED, ...)."""
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "describe", f"{name}-qr", f"--zone={zone}",
           "--format=value(state.state)", *(["--project", project] if project else [])]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else f"UNKNOWN ({out.stderr.strip().splitlines()[-1:]})"


def wait_active(name: str, zone: str, project: Optional[str], timeout_s: float, poll_s: float = 30.0,
                describe: Callable[[], str] | None = None) -> None:
    """Poll a queued resource until ACTIVE; a one-line error when it fails or `timeout_s` passes."""
    describe = describe or (lambda: queued_state(name, zone, project))
    deadline = time.monotonic() + timeout_s
    while True:
        state = describe()
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED", "DELETING"):
            raise UserError(f"queued resource {name}-qr is {state}: see `gcloud compute tpus queued-resources "
                            f"describe {name}-qr --zone={zone}`, then delete and re-create it")
        if time.monotonic() + poll_s > deadline:
            raise UserError(f"queued resource {name}-qr is still {state} after {timeout_s:.0f} s: wait longer "
                            "(--queued-timeout S) or try another zone")
        time.sleep(poll_s)
