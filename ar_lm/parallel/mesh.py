"""Device mesh and logical-axis rules: parallelism is data, not code (MaxText style).

The mesh has axes (data, fsdp, tensor). Parameters and activations carry logical axis names;
a rule table maps each logical name to mesh axes. A mesh axis is used at most once per array
(flax leaves a later dimension replicated when its axis is taken), so `batch -> (data, fsdp)`
and `embed -> fsdp` together shard activations by batch and parameters by embed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ar_lm.config import MeshConfig
from ar_lm.errors import UserError, require

MESH_AXES = ("data", "fsdp", "tensor")
# every logical name the model gives a parameter, an activation or the KV cache (the rule table's domain)
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "positions",
                "norm", "cache_length")

_BATCH = ("batch", ("data", "fsdp"))
RULE_PRESETS: dict[str, tuple[tuple[str, object], ...]] = {
    # every device holds all parameters; the batch is split over every axis
    "dp": (_BATCH,),
    # parameters and optimizer state split over fsdp along embed (ZeRO-3 style)
    "fsdp": (_BATCH, ("embed", "fsdp"), ("vocab", None)),
    # fsdp plus Megatron tensor parallelism over heads, mlp and vocab
    "fsdp_tp": (
        _BATCH,
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
    ),
}


def logical_rules(cfg: MeshConfig) -> tuple[tuple[str, object], ...]:
    """The preset named by `cfg.rules` with `cfg.rule_overrides` ("name=axis+axis") applied."""
    if cfg.rules not in RULE_PRESETS:
        raise UserError(f"mesh.rules={cfg.rules!r} is unknown: use one of {', '.join(RULE_PRESETS)}")
    rules = dict(RULE_PRESETS[cfg.rules])
    for item in cfg.rule_overrides:
        require("=" in item, f"mesh.rule_overrides entry {item!r} is not of the form logical=axis[+axis]")
        name, axes = (s.strip() for s in item.split("=", 1))
        require(name in LOGICAL_AXES, f"mesh.rule_overrides entry {item!r} names unknown logical axis {name!r}: "
                                      f"use one of {', '.join(LOGICAL_AXES)}")
        parts = tuple(a for a in axes.split("+") if a)
        for axis in parts:
            require(axis in MESH_AXES, f"logical rule {item!r} names unknown mesh axis {axis!r}: use {', '.join(MESH_AXES)}")
        rules[name] = None if not parts else parts[0] if len(parts) == 1 else parts
    return tuple(rules.items())


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve the (data, fsdp, tensor) sizes (one may be -1) against the device count."""
    ici = [cfg.data, cfg.fsdp, cfg.tensor]
    dcn = [cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor]
    require(all(d >= 1 for d in dcn), "mesh.dcn_* sizes must be >= 1")
    per_slice = n_devices // math.prod(dcn)
    require(per_slice * math.prod(dcn) == n_devices, f"mesh DCN sizes {dcn} do not divide the {n_devices} devices")
    free = [i for i, s in enumerate(ici) if s == -1]
    require(len(free) <= 1, "at most one mesh axis may be -1 (fill with the remaining devices)")
    require(all(s >= 1 or s == -1 for s in ici), f"mesh sizes must be positive or -1, got {ici}")
    known = math.prod(s for s in ici if s != -1)
    if free:
        require(
            per_slice % known == 0,
            f"mesh sizes data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} do not divide the {per_slice} devices per slice",
        )
        ici[free[0]] = per_slice // known
    shape = tuple(i * d for i, d in zip(ici, dcn))
    require(
        math.prod(shape) == n_devices,
        f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {math.prod(shape)} does not match the "
        f"{n_devices} devices: set sizes that multiply to {n_devices} (or use -1 for one axis)",
    )
    return shape  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: the first `cfg.devices`, or all) with device order following
    the physical topology."""
    if devices is None:
        require(cfg.devices <= jax.device_count(), f"mesh.devices={cfg.devices} exceeds the {jax.device_count()} devices")
        devices = jax.devices()[: cfg.devices or None]
    devices = list(devices)
    shape = mesh_shape(cfg, len(devices))
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor)
    if math.prod(dcn) > 1:
        ici = tuple(s // d for s, d in zip(shape, dcn))
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):  # topology unknown (e.g. CPU subsets)
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_sharding(mesh: Mesh, rules, axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def tree_shardings(mesh: Mesh, rules, boxed_abstract_tree):
    """NamedShardings for a tree of flax `LogicallyPartitioned` boxes (unboxed leaves: replicated).

    A dimension that its mesh axes do not divide (e.g. a vocabulary of 257 over tensor=2) stays
    replicated rather than failing."""
    specs = nn.get_partition_spec(boxed_abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    shapes = jax.tree.map(lambda x: x.value.shape if is_box(x) else x.shape, boxed_abstract_tree, is_leaf=is_box)
    return jax.tree.map(lambda sh, shape: _divisible(sh, shape, mesh), shardings, shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _divisible(sharding: NamedSharding, shape, mesh: Mesh) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if names and shape[i] % math.prod(mesh.shape[a] for a in names):
            spec[i] = None
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules) -> int:
    """How many ways the batch dimension is split."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
    """Mesh and logical-axis rules for tracing (activation sharding constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def inference_mesh(cfg: MeshConfig, batch: int, n_devices: int | None = None) -> MeshConfig:
    """A run's mesh fitted to the devices here, for evaluation and decoding: the run's tensor parallelism
    when that many devices exist, and data parallel over as many of the rest as divide `batch` (no fsdp,
    one slice). A run trained on a pod can so be evaluated or sampled on one host."""
    n_devices = jax.device_count() if n_devices is None else n_devices
    tensor = cfg.tensor if 1 <= cfg.tensor <= n_devices else 1
    data = max(d for d in range(1, n_devices // tensor + 1) if batch % d == 0)
    return dataclasses.replace(cfg, data=data, fsdp=1, tensor=tensor, devices=data * tensor, dcn_data=1, dcn_fsdp=1,
                               dcn_tensor=1)
