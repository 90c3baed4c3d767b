"""Device subsets for runs side by side: what there is to run on, how runs are packed onto it, and the
environment that shows a process only its subset.

A `Pool` is slices of hosts with the same number of devices each: this machine is one slice of one
host (its GPUs, TPU chips or, on CPU, fake host devices); a TPU pod is one slice of several hosts, a
multi-slice reservation several slices. A run that needs n devices gets a block of 2^ceil(log2 n)
devices: on one host, aligned (offset a multiple of the block size, so a TPU chip subset is a valid
sub-mesh), or, when larger than a host, a whole free slice. `pack` starts runs greedily, largest
first: each free moment, every waiting run that fits (in decreasing size) is placed, best fit first
(the host with the fewest free devices that holds the block), up to `max_concurrent` runs at once.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from ar_lm.errors import require
from ar_lm.io import cpu_cores
from ar_lm.parallel.tpu import CHIP_BOUNDS, chip_subset_env


@dataclasses.dataclass(frozen=True)
class Pool:
    kind: str  # cpu | gpu | tpu
    slices: tuple[tuple[str, ...], ...]  # host names per slice ("" for this machine)
    devices_per_host: int
    chip_bounds: str = ""  # tpu: the bounds of one host's chips ("2,2,1"), for subset environments

    @property
    def largest(self) -> int:
        return max(len(hosts) for hosts in self.slices) * self.devices_per_host

    @property
    def total(self) -> int:
        return sum(len(hosts) for hosts in self.slices) * self.devices_per_host


@dataclasses.dataclass(frozen=True)
class Placement:
    slice: int
    host: Optional[int]  # None: every host of the slice (a whole-slice run)
    devices: tuple[int, ...]  # device ids on the host (on each host for a whole slice)

    def describe(self, pool: Pool) -> str:
        hosts = pool.slices[self.slice]
        if self.host is None:
            return f"slice {self.slice} ({len(hosts)} hosts x {len(self.devices)})"
        where = hosts[self.host] or pool.kind
        return f"{where}:{','.join(map(str, self.devices))}" if where else ",".join(map(str, self.devices))


def block_size(need: int) -> int:
    """The devices a run needing `need` gets: the next power of two."""
    return 1 << max(0, int(need) - 1).bit_length()


class Allocation:
    """Which devices of a pool are in use."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.used: set[tuple[int, int, int]] = set()  # (slice, host, device)

    def _free_on(self, s: int, h: int) -> int:
        return self.pool.devices_per_host - sum(1 for u in self.used if u[:2] == (s, h))

    def place(self, need: int) -> Optional[Placement]:
        size = block_size(need)
        per_host = self.pool.devices_per_host
        if size > per_host:  # a whole free slice with enough devices
            for s, hosts in enumerate(self.pool.slices):
                if len(hosts) * per_host >= size and not any(u[0] == s for u in self.used):
                    return self._take(Placement(s, None, tuple(range(per_host))))
            return None
        hosts = sorted(((self._free_on(s, h), s, h) for s, names in enumerate(self.pool.slices)
                        for h in range(len(names))))
        for free, s, h in hosts:  # best fit: the fullest host that still holds the block
            if free < size:
                continue
            for start in range(0, per_host, size):
                block = tuple(range(start, start + size))
                if not any((s, h, d) in self.used for d in block):
                    return self._take(Placement(s, h, block))
        return None

    def _take(self, p: Placement) -> Placement:
        hosts = range(len(self.pool.slices[p.slice])) if p.host is None else (p.host,)
        self.used |= {(p.slice, h, d) for h in hosts for d in p.devices}
        return p

    def release(self, p: Placement) -> None:
        hosts = range(len(self.pool.slices[p.slice])) if p.host is None else (p.host,)
        self.used -= {(p.slice, h, d) for h in hosts for d in p.devices}


def check_fits(needs: dict[str, int], pool: Pool) -> None:
    """A one-line error naming the first run that needs more devices than the largest slice has."""
    for name, need in needs.items():
        require(block_size(need) <= pool.largest,
                f"point {name} needs {need} devices ({block_size(need)} as a block) but the largest slice here has "
                f"{pool.largest}: give it fewer devices (mesh.devices, --flops-per-device) or run on a larger machine")


def start_now(waiting: list[str], needs: dict[str, int], alloc: Allocation, running: int,
              max_concurrent: int) -> list[tuple[str, Placement]]:
    """The runs to start now, in `waiting`'s order (the caller sorts it largest first), and their
    placements (taken from `alloc`)."""
    started = []
    for name in waiting:
        if running + len(started) >= max_concurrent:
            break
        placement = alloc.place(needs[name])
        if placement is not None:
            started.append((name, placement))
    return started


def pack(needs: dict[str, int], cost: dict[str, float], pool: Pool, max_concurrent: int,
         after: Optional[dict[str, tuple[str, ...]]] = None) -> list[dict]:
    """The plan `start_now` produces when each run takes cost/devices time units (a dry run's estimate):
    rows {name, start, end, placement} in start order. `after[name]`: runs it waits for."""
    check_fits(needs, pool)
    after = after or {}
    alloc, clock, done, running, plan = Allocation(pool), 0.0, set(), [], []
    waiting = sorted(needs, key=lambda n: (-needs[n], -cost[n], n))
    while waiting or running:
        ready = [n for n in waiting if set(after.get(n, ())) <= done]
        for name, placement in start_now(ready, needs, alloc, len(running), max_concurrent):
            waiting.remove(name)
            end = clock + cost[name] / block_size(needs[name])
            heapq.heappush(running, (end, name, placement))
            plan.append({"name": name, "start": clock, "end": end, "placement": placement})
        require(running, f"points {', '.join(waiting)} wait for runs that are not in the sweep")
        clock, name, placement = heapq.heappop(running)
        alloc.release(placement)
        done.add(name)
    return plan


def cpu_devices_env(devices: int) -> dict[str, str]:
    """A JAX process on `devices` fake host CPU devices."""
    return {"JAX_NUM_CPU_DEVICES": str(max(1, devices)), "JAX_PLATFORMS": "cpu"}


def subset_env(pool: Pool, placement: Placement, port: int = 8476) -> dict[str, str]:
    """What a process needs in its environment to see only its devices: fake host devices on CPU
    (JAX_NUM_CPU_DEVICES), CUDA_VISIBLE_DEVICES on GPU, a TPU chip subset (`tpu.chip_subset_env`)."""
    if pool.kind == "cpu":
        return cpu_devices_env(len(placement.devices))
    if placement.host is None or len(placement.devices) == pool.devices_per_host:
        return {}
    if pool.kind == "gpu":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        ids = [visible[d] if len(visible) == pool.devices_per_host else str(d) for d in placement.devices]
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}
    return chip_subset_env(placement.devices, pool.chip_bounds, port)


def local_pool(devices: Optional[int] = None) -> Pool:
    """This machine: its GPUs (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`), its TPU chips (/dev/accel*,
    /dev/vfio/N), else its CPU cores as fake host devices. `devices` overrides the count (on CPU, any
    number of fake devices)."""
    kind, count = "cpu", cpu_cores()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    chips = [*Path("/dev").glob("accel*"), *(p for p in Path("/dev/vfio").glob("*") if p.name.isdigit())]
    if visible not in (None, "", "-1"):
        kind, count = "gpu", len(visible.split(","))
    elif shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
        if out.returncode == 0 and gpus:
            kind, count = "gpu", len(gpus)
    elif chips:
        kind, count = "tpu", len(chips)
    if devices:
        require(kind == "cpu" or devices <= count, f"--devices {devices}: this machine has {count} {kind} devices")
        count = devices
    bounds = CHIP_BOUNDS.get(count, "") if kind == "tpu" else ""
    return Pool(kind, (("",),), count, bounds)
