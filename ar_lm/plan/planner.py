"""Plan a run for a TPU topology before renting it: compile its real step ahead of time and read the result.

The train step (or, for decoding, one decode step) is compiled by the TPU compiler (libtpu) for the target's
compile-only devices with the run's mesh and logical-axis rules, from abstract arrays only: nothing is
allocated. From the compiled program:

- memory per device: `memory_analysis()` (arguments, temporaries, outputs, code; donated outputs alias their
  arguments) against the HBM the compiler lets a program use. Whether it fits is the compiler's word: it
  refuses a program whose peak does not fit. The sum shown is an upper bound of that peak (the compiler may
  reuse donated arguments' buffers for temporaries);
- FLOPs, HBM traffic and collectives per device and step from the compiled HLO (`ar_lm.plan.hlo`, loop
  bodies weighted by their trip counts);
- a roofline step time: the largest of compute at the chip's bf16 peak, HBM traffic at its bandwidth, and
  collective traffic at the bandwidth of one torus axis (ICI) or the host network (DCN), i.e. the time if
  everything else overlapped with the slowest; from it tokens/s per chip and the MFU ceiling,
  model FLOPs (`flops_per_token` x tokens) / (step time x peak).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from ar_lm.config import ExperimentConfig, MeshConfig
from ar_lm.decoding.decoder import lower_decode_step
from ar_lm.errors import require
from ar_lm.model.backend import resolve_attention, resolve_compute_dtype, resolve_remat, target_platform
from ar_lm.model.counts import flops_per_token, param_counts
from ar_lm.plan.hlo import Collective, HloModule
from ar_lm.plan.targets import GIB, Target, compile_devices
from ar_lm.training.loop import check_parallelism
from ar_lm.training.step import compiled_memory, fitting_remat, lower_train_step


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `ar-lm plan` reports for one config on one target (bytes and seconds per device and step)."""

    target: str
    chips: int
    step: str  # train | decode
    mesh: dict
    settings: dict  # the resolved attention, remat, compute dtype
    memory: dict  # arguments, temporaries, outputs, aliased, code, total, capacity (bytes)
    fits: bool
    flops: dict  # compiled (HLO dots), kernels (inside custom kernels), model (flops_per_token x tokens), per device
    hbm_bytes: float
    collectives: list  # per kind: count, bytes, traffic_bytes, seconds, network
    roofline: dict  # compute_s, hbm_s, ici_s, dcn_s, step_s, bound
    tokens_per_s_per_chip: float
    mfu_ceiling: float
    advice: str = ""
    activation_collectives: tuple = ()  # "kind dtype[dims] xcount" of collectives of activation size

    def to_json(self) -> dict:
        """A JSON-able dict; what the compiler could not tell (NaN: a program it refused) is null."""
        return jsonable(dataclasses.asdict(self))


def jsonable(x):
    """`x` with NaN floats as None, so that it dumps as strict JSON."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def with_slices(mesh: MeshConfig, slices: int) -> MeshConfig:
    """The run's mesh on `slices` slices: its own DCN sizes if it sets any, else data parallel across slices."""
    if slices > 1 and (mesh.dcn_data, mesh.dcn_fsdp, mesh.dcn_tensor) == (1, 1, 1):
        return dataclasses.replace(mesh, dcn_data=slices)
    return mesh


def activation_collectives(collectives: list[Collective], seq_len: int, param_sizes: set[int]) -> list[Collective]:
    """The collectives that move activations: a result with a sequence dimension (`seq_len`, or it padded
    to the 128 lanes a TPU kernel takes) whose element count is no parameter's (whole, one layer's, or a
    shard of either)."""
    lengths = {seq_len, -(-seq_len // 128) * 128}
    return [c for c in collectives
            if any(lengths & set(a.dims) and math.prod(a.dims) not in param_sizes for a in c.shapes)]


def parameter_sizes(abstract_params, n_layers: int, mesh_sizes) -> set[int]:
    """Element counts of every parameter, a layer's slice of a stacked one, and their shards over any
    product of mesh axis sizes."""
    divisors = {math.prod(c) for r in range(len(mesh_sizes) + 1) for c in itertools.combinations(mesh_sizes, r)}
    sizes = set()
    for leaf in jax.tree.leaves(abstract_params):
        n = math.prod(leaf.shape)
        for whole in (n, n // max(1, n_layers) if leaf.shape and leaf.shape[0] == n_layers else n):
            sizes |= {whole // d for d in divisors if d and whole % d == 0}
    return sizes


def _advice(cfg: ExperimentConfig, memory: dict, capacity: float) -> str:
    """What to change so the step fits, from where its bytes go."""
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    m = cfg.mesh
    parts = []
    if memory["arguments"] > 0.5 * capacity:
        if m.rules == "dp" or m.fsdp == 1:
            parts.append("shard parameters and optimizer state (--set mesh.rules=fsdp --set mesh.fsdp=-1 "
                         "--set mesh.data=1)")
        parts.append("more chips (a larger --target, or --slices)")
    if memory["temporaries"] > 0.25 * capacity:
        if resolve_remat(cfg.model) in ("none", "dots", "dots_no_batch"):
            parts.append("--set model.remat=full")
        parts.append("a smaller micro-batch (--set optim.grad_accum=K or a smaller data.batch_size)")
        if m.tensor == 1:
            parts.append("tensor parallelism (--set mesh.rules=fsdp_tp --set mesh.tensor=N)")
    need = memory["total"]
    return (f"does not fit: {gib(need)} per device of {gib(capacity)} (arguments {gib(memory['arguments'])}, "
            f"temporaries {gib(memory['temporaries'])}): try " + "; or ".join(parts or ["more chips"]))


_OOM = re.compile(r"required for (.+?) \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_bytes(message: str) -> Optional[tuple[float, float]]:
    """(bytes required, bytes available) from the TPU compiler's "Ran out of memory in HBM" error."""
    m = _OOM.search(message)
    if not m:
        return None
    return float(m.group(2)) * _UNITS[m.group(3)], float(m.group(4)) * _UNITS[m.group(5)]


def _compile(cfg: ExperimentConfig, mesh, rules, decode: bool):
    """(bytes per device or None, (compiled or None, the compiler's out-of-memory bytes, abstract params,
    abstract arguments)) of the train or decode step; a program refused for lack of HBM is not an error."""
    if decode:
        lowered, abstract_params, abstract_args = lower_decode_step(cfg, mesh, rules)
    else:  # the eos id a document mask needs changes no shape
        eos_id = 0 if cfg.data.document_mask else None
        lowered, abstract_params, abstract_args = lower_train_step(cfg, mesh, rules, eos_id)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses a program that cannot fit in HBM
        oom = _oom_bytes(str(e))
        if oom is None and "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, (None, oom, abstract_params, abstract_args)
    return compiled_memory(compiled)["total"], (compiled, None, abstract_params, abstract_args)


def plan(cfg: ExperimentConfig, target: Target, decode: bool = False, hlo_dir: Optional[Path] = None) -> Plan:
    """Compile `cfg`'s train step (or decode step) for `target` and report memory, FLOPs, collectives and a
    roofline; `model.remat=auto` takes the fastest policy that fits the chip's HBM (`fitting_remat`). Raises
    `UserError` for a config or mesh the target cannot take."""
    require(cfg.model.vocab_size > 0, "model.vocab_size=0 takes the dataset's vocabulary: pass --data DATA_DIR "
                                      "or --set model.vocab_size=N")
    devices = compile_devices(target)
    mesh_cfg = with_slices(cfg.mesh, target.slices)
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    chip = target.chip
    with target_platform("tpu"):
        mesh, rules = check_parallelism(cfg, devices)
        if decode:  # no backward pass: remat changes nothing, one compile
            _, (compiled, oom, abstract_params, abstract_args) = _compile(cfg, mesh, rules, decode)
        else:
            cfg, (compiled, oom, abstract_params, abstract_args) = fitting_remat(
                cfg, lambda c: _compile(c, mesh, rules, decode), chip.hbm_bytes)
        settings = {"attention": resolve_attention(cfg.model), "remat": resolve_remat(cfg.model),
                    "compute_dtype": str(np.dtype(resolve_compute_dtype(cfg.model)))}
        if compiled is None:
            return _not_fitting(cfg, target, decode, mesh, settings, oom, per_device_bytes(abstract_args))
    if hlo_dir is not None:
        hlo_dir = Path(hlo_dir)
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / f"{'decode' if decode else 'train'}_step.hlo.txt").write_text(compiled.as_text())
    memory = compiled_memory(compiled) | {"capacity": chip.hbm_bytes}

    module = HloModule(compiled.as_text(), target.slices)
    collectives = module.collectives()
    tokens = cfg.data.batch_size * (1 if decode else cfg.data.seq_len)
    n_dev = mesh.devices.size
    per_token = 2 * param_counts(cfg.model)["total"] if decode else flops_per_token(cfg.model, cfg.data.seq_len)
    flops = {"compiled": module.matmul_flops(), "model": per_token * tokens / n_dev,
             "kernels": _kernel_flops(cfg, settings, decode) * tokens / n_dev}
    hbm = module.hbm_bytes()
    rows = collective_rows(collectives, target)
    roof = roofline(flops["compiled"] + flops["kernels"], hbm, rows, target)
    step_s = max(roof["step_s"], 1e-12)
    sizes = parameter_sizes(abstract_params, cfg.model.n_layers, [s for s in mesh.shape.values() if s > 1])
    acts = activation_collectives(collectives, 1 if decode else cfg.data.seq_len, sizes) if not decode else []
    return Plan(
        target=str(target), chips=target.chips, step="decode" if decode else "train",
        mesh={**dict(mesh.shape), "rules": mesh_cfg.rules}, settings=settings, memory=memory, fits=True,
        flops=flops, hbm_bytes=hbm, collectives=rows, roofline=roof,
        tokens_per_s_per_chip=tokens / step_s / target.chips,
        mfu_ceiling=flops["model"] / (step_s * chip.bf16_flops),
        activation_collectives=tuple(f"{c.kind} {' '.join(map(str, c.shapes))} x{c.count}" for c in acts),
    )


def collective_rows(collectives: list[Collective], target: Target) -> list[dict]:
    """Collectives summed by kind and network (ICI within a slice, DCN across): executions per step, bytes
    per device, bytes sent, and seconds at the bandwidth of one torus axis (ICI) or the host network (DCN)."""
    chip = target.chip
    by_kind: dict[tuple[str, bool], dict] = {}
    for c in collectives:
        row = by_kind.setdefault((c.kind, c.dcn), {"kind": c.kind, "network": "dcn" if c.dcn else "ici", "count": 0,
                                                  "bytes": 0.0, "traffic_bytes": 0.0})
        row["count"] += c.count
        row["bytes"] += c.count * c.bytes
        row["traffic_bytes"] += c.count * c.traffic_bytes
    rows = sorted(by_kind.values(), key=lambda r: -r["traffic_bytes"])
    for r in rows:  # one torus axis: 2 of the chip's 2 x dims links, both directions
        r["seconds"] = r["traffic_bytes"] / (chip.dcn_bw if r["network"] == "dcn" else chip.ici_bw / chip.dims)
    return rows


def roofline(flops: float, hbm_bytes: float, rows: list[dict], target: Target) -> dict:
    """Seconds per step of compute at the bf16 peak, HBM traffic at its bandwidth and collectives (ICI, DCN);
    the step is the largest of them (everything else overlapped), `bound` names it."""
    chip = target.chip
    roof = {"compute_s": flops / chip.bf16_flops, "hbm_s": hbm_bytes / chip.hbm_bw,
            "ici_s": sum(r["seconds"] for r in rows if r["network"] == "ici"),
            "dcn_s": sum(r["seconds"] for r in rows if r["network"] == "dcn")}
    roof["bound"] = max(roof, key=roof.get).removesuffix("_s")
    roof["step_s"] = max(v for k, v in roof.items() if k.endswith("_s"))
    return roof


def _kernel_flops(cfg: ExperimentConfig, settings: dict, decode: bool) -> float:
    """FLOPs per token inside custom kernels, which the HLO does not show: splash attention's, counted as
    `flops_per_token` counts attention (forward and backward over the causal triangle)."""
    if decode or settings["attention"] != "pallas":
        return 0.0
    m = cfg.model
    return 6.0 * m.n_layers * m.n_heads * m.head_dim * (cfg.data.seq_len + 1)


def _not_fitting(cfg, target: Target, decode: bool, mesh, settings: dict, oom, arguments: float) -> Plan:
    """The plan of a program the TPU compiler refused for lack of HBM: its message's bytes used and available,
    the arguments' bytes from their shardings, the rest temporaries."""
    nan = float("nan")
    used, limit = oom if oom else (nan, target.chip.hbm_bytes)
    memory = {"arguments": arguments, "temporaries": used - arguments, "outputs": nan, "aliased": nan, "code": nan,
              "total": used, "capacity": limit}
    return Plan(target=str(target), chips=target.chips, step="decode" if decode else "train",
                mesh={**dict(mesh.shape), "rules": cfg.mesh.rules}, settings=settings, memory=memory, fits=False,
                flops={"compiled": nan, "model": nan, "kernels": nan}, hbm_bytes=nan, collectives=[],
                roofline={"compute_s": nan, "hbm_s": nan, "ici_s": nan, "dcn_s": nan, "step_s": nan, "bound": ""},
                tokens_per_s_per_chip=nan, mfu_ceiling=nan,
                advice=_advice(cfg, memory, limit) + " (the TPU compiler ran out of HBM)")


def per_device_bytes(tree) -> float:
    """Bytes of one device's shard of every abstract array (with a sharding) in `tree`."""
    return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))
