"""TPU targets for ahead-of-time planning: chip figures, topology names, compile-only devices.

A target is a topology (`v5e:2x2`, `v5p:4x4x8`, `v4:2x2x2`, `v6e:8x8`) or an accelerator type (`v5p-128`,
`v5litepod-16`, `v4-32`, `v6e-64`, read by `ar_lm.parallel.tpu.tpu_layout`), times `slices` over DCN.
`compile_devices` asks libtpu (`pip install 'ar_lm[tpu]'`) for devices of that topology that can be compiled
for but not run on, with JAX_PLATFORMS=cpu: no TPU is needed.

HBM per chip is what the TPU compiler lets one program use (the "available HBM" of its out-of-memory error:
30.75, 15.75, 95.74 and 31.25 GiB on v4, v5e, v5p and v6e with libtpu 0.0.42). The other chip figures, per
chip, are from Google Cloud's TPU pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
bf16 peak, HBM capacity and bandwidth, bidirectional ICI bandwidth, and DCN bandwidth per chip (v5p: the
page's per-chip figure; v5e and v6e: the host's NICs, 2 x 100 and 4 x 200 Gbit/s, over its 8 chips; v4: the
page gives none, so v5p's is assumed).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from ar_lm.errors import UserError, require
from ar_lm.parallel.tpu import ALIASES, tpu_layout

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # FLOP/s per chip
    hbm_bytes: float  # per chip, available to a program (libtpu 0.0.42's limit)
    hbm_bw: float  # bytes/s per chip
    ici_bw: float  # bytes/s per chip, bidirectional, all links
    dcn_bw: float  # bytes/s per chip
    dims: int  # torus dimensions (2 or 3)
    source: str


CHIPS = {  # hbm_bytes: what the TPU compiler lets one program use (its "available HBM"), below the capacity
    "v4": Chip("TPU v4", 275e12, 30.75 * GIB, 1200e9, 540e9, 50e9 / 8, 3,
               "cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB at 1200 GB/s; ICI: 6 links of 45 GB/s each way "
               "(Austin et al. 2025, 'How to Scale Your Model', TPUs chapter); DCN assumed as v5p"),
    "v5e": Chip("TPU v5e", 197e12, 15.75 * GIB, 819e9, 400e9, 2 * 100e9 / 8 / 8, 2,
                "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GB at 819 GB/s, ICI 400 GB/s, 2 x 100 Gbit/s "
                "NICs per 8-chip host"),
    "v5p": Chip("TPU v5p", 459e12, 95.74 * GIB, 2765e9, 1200e9, 50e9 / 8, 3,
                "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s, 95 GiB at 2765 GB/s, ICI 1200 GB/s, DCN 50 Gbit/s "
                "per chip"),
    "v6e": Chip("TPU v6e", 918e12, 31.25 * GIB, 1638e9, 800e9, 4 * 200e9 / 8 / 8, 2,
                "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s, 32 GB at 1638 GB/s, ICI 800 GB/s, 4 x 200 Gbit/s "
                "NICs per 8-chip host"),
}


@dataclasses.dataclass(frozen=True)
class Target:
    family: str  # v4 | v5e | v5p | v6e
    topology: str  # libtpu's name, e.g. v5p:2x2x1
    slices: int = 1

    @property
    def chip(self) -> Chip:
        return CHIPS[self.family]

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(x) for x in self.topology.split(":")[1].split("x"))

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    def __str__(self) -> str:
        return self.topology + (f" x {self.slices} slices" if self.slices > 1 else "")


def _shape(chips: int, dims: int) -> str:
    """Google's slice shape for a power-of-two chip count: near-cubic, ascending, a 1 last (2x2x1, 4x4x8, 8x16)."""
    k = chips.bit_length() - 1
    sizes = sorted(2 ** (k // dims + (1 if i < k % dims else 0)) for i in range(dims))
    return "x".join(map(str, [s for s in sizes if s > 1] + [s for s in sizes if s == 1]))


def parse_target(name: str, slices: int = 1) -> Target:
    """`v5e:2x2`-style topologies and `v5p-128`-style accelerator types; one-line errors otherwise."""
    require(slices >= 1, f"--slices must be >= 1, got {slices}")
    name = (name or "").strip()
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name)
    if m:
        family = ALIASES.get(m.group(1), m.group(1))
        require(family in CHIPS, f"unknown TPU family {m.group(1)!r} in --target {name!r}: use one of "
                                 f"{', '.join(CHIPS)} (e.g. v5e:2x2, v5p:2x2x1)")
        dims = m.group(2).split("x")
        require(len(dims) == CHIPS[family].dims, f"--target {name!r}: {family} topologies have "
                f"{CHIPS[family].dims} dimensions, e.g. {family}:{_shape(4, CHIPS[family].dims)}")
        return Target(family, f"{family}:{m.group(2)}", slices)
    if re.fullmatch(r"v\d+[a-z]*-\d+", name):
        try:
            layout = tpu_layout(name)
        except UserError as e:
            raise UserError(f"--target {name!r}: {e}") from None
        chips = layout.chips
        require(chips & (chips - 1) == 0, f"--target {name!r} has {chips} chips, not a power of two: give its "
                f"topology instead (e.g. {layout.family}:2x2x3)")
        return Target(layout.family, f"{layout.family}:{_shape(chips, CHIPS[layout.family].dims)}", slices)
    raise UserError(f"--target {name!r} is not a TPU topology or accelerator type: use e.g. v5e:2x2, v5p:4x4x8, "
                    "v4:2x2x2, v6e:8x8, or v5p-128, v5litepod-16, v4-32, v6e-64")


def compile_devices(target: Target) -> list:
    """Compile-only devices of the target from libtpu (slice-major), one per chip (v4 as megacore)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: several planners may run at once
    require(importlib.util.find_spec("libtpu") is not None,
            "planning for TPU needs libtpu: pip install 'ar_lm[tpu]' (jax[tpu] at this jax version)")
    from jax.experimental import topologies

    kwargs: dict = {"chip_config_name": "megacore"} if target.family == "v4" else {}
    if target.slices > 1:
        kwargs["num_slices"] = target.slices
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kwargs).devices
    except Exception as e:  # noqa: BLE001 - libtpu's INVALID_ARGUMENT for shapes it does not know
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "INVALID_ARGUMENT" not in msg:
            raise
        raise UserError(f"--target {target.topology}: libtpu refuses it ({msg}): use a slice shape Google "
                        "offers, e.g. v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:4x4x4") from None
    return list(devices)


