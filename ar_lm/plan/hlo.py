"""Reading a compiled (SPMD-partitioned, per-device) HLO module: what one device executes per step.

XLA's `cost_analysis()` counts the body of a `while` loop once, so a model whose layers run in a
`lax.scan` (`model.scan_layers`) would look 1/n_layers as costly. Here every instruction is weighted by
how often it runs: its computation's multiplicity, the product of the trip counts of the loops around it
(a scan's loop condition is `counter < N`, read from the condition computation).

- `matmul_flops`: 2 x multiply-adds of every `dot` and `convolution` (TPU lowers batched matmuls to
  convolutions; the count of valid window positions follows XLA's `HloCostAnalysis`); custom kernels
  (Pallas/Mosaic) are opaque and not counted.
- `hbm_bytes`: bytes read and written by every top-level instruction (a fusion counts its operands and
  result, a slice of a stacked buffer only the slice): an estimate of HBM traffic.
- `collectives`: every all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute with its
  result shape, bytes, group size and how often it runs; in a multi-slice program (compiled per slice) the
  collectives across slices are host transfers to the Megascale runtime, counted as DCN collectives.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import cached_property
from typing import Optional

import numpy as np

from ar_lm.plan.flops import convolution_flops, dot_flops

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# instructions that move no data of their own (control flow, aliases, bookkeeping)
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "opt-barrier", "custom-call", "iota"}
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(.*\{$")


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]

    @property
    def bytes(self) -> float:
        return DTYPE_BYTES.get(self.dtype, 1 if self.dtype.startswith("f8") else 4) * math.prod(self.dims)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


def parse_shape(text: str) -> list[Array]:
    """The arrays of an HLO shape (one, or the elements of a tuple), layouts dropped."""
    return [Array(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
            for m in _ARRAY.finditer(re.sub(r"\{[^{}]*\}", "", text)) if m.group(1) in DTYPE_BYTES or
            m.group(1).startswith("f8")]


def _matching(text: str, start: int) -> int:
    """Index just past the bracket closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


@dataclasses.dataclass
class Instruction:
    name: str
    shape: list[Array]
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False
    args: str = ""  # the text between the opcode's parentheses (a constant's value, a parameter's index)

    @property
    def result_bytes(self) -> float:
        return sum(a.bytes for a in self.shape)

    def attr(self, key: str) -> Optional[str]:
        m = re.search(rf"\b{key}=(%?[\w.\-]+)", self.attrs)
        return m.group(1).lstrip("%") if m else None


def parse_instruction(line: str) -> Optional[Instruction]:
    m = re.match(r"\s*(ROOT )?%(\S+) = ", line)
    if not m:
        return None
    i = m.end()
    if line[i] == "(":
        end = _matching(line, i)
        shape_text = line[i:end]
    else:
        end = line.index(" ", i)
        shape_text = line[i:end]
    op = re.match(r"\s*([a-z][\w\-]*)\(", line[end:])
    if not op:
        return None
    open_at = end + op.end() - 1
    close = _matching(line, open_at)
    operands = re.findall(r"%([\w.\-]+)", line[open_at:close])
    return Instruction(m.group(2), parse_shape(shape_text), op.group(1), operands, line[close:], bool(m.group(1)),
                       line[open_at + 1:close - 1])


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # all-gather | all-reduce | reduce-scatter | all-to-all | collective-permute
    shapes: tuple[Array, ...]  # its result (per device)
    bytes: float  # its buffer on one device per execution: the result, or a reduce-scatter's whole input
    group_size: int
    count: int  # executions per step
    dcn: bool  # a group spans slices

    @property
    def traffic_bytes(self) -> float:
        """Bytes each device sends per execution under ring algorithms (n = group size): (n-1)/n of the
        buffer (all-gather, reduce-scatter, all-to-all), 2(n-1)/n (all-reduce), all of it (a permute)."""
        n = self.group_size
        if n <= 1:
            return 0.0
        factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(self.kind, (n - 1) / n)
        return factor * self.bytes


def replica_groups(attrs: str, n_partitions: int) -> list[list[int]]:
    """The device groups of a collective, in any of HLO's three spellings: explicit `{{0,1},{2,3}}`,
    iota `[2,2]<=[4]` (optionally transposed `[2,2]<=[2,2]T(1,0)`), and mesh
    `mesh['axis_0'=2,'axis_1'=2] {'axis_1'}`; a permute's `source_target_pairs` as pairs."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        grouped = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2))]
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in grouped]
        size = math.prod(sizes[i] for i in grouped)
        return ids.transpose(rest + grouped).reshape(-1, size).tolist()
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        src = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(src)).reshape(src)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,{}\s]*\})\}", attrs)
    if m:
        groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
        if groups and groups != [[]]:
            return groups
    return [list(range(n_partitions))]  # {} or absent: all devices


class HloModule:
    """A compiled HLO module's text, parsed into computations with per-step multiplicities."""

    def __init__(self, text: str, slices: int = 1):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = ""
        current: Optional[list[Instruction]] = None
        lines = text.splitlines()
        for k, line in enumerate(lines):
            header = _HEADER.match(line) if current is None else None
            if header:
                current = self.computations.setdefault(header.group(2), [])
                if header.group(1):
                    self.entry = header.group(2)
            elif line == "}" and (k + 1 == len(lines) or not lines[k + 1].strip()):
                current = None  # a computation ends with "}" and a blank line (a kernel's text may hold "}")
            elif current is not None and line.startswith(("  %", "  ROOT %")):
                inst = parse_instruction(line)
                if inst is not None:
                    current.append(inst)
        m = re.search(r"num_partitions=(\d+)", text)
        self.n_partitions = int(m.group(1)) if m else 1
        self.slices = slices
        self._views: dict[str, tuple[dict, dict, dict]] = {}

    def shapes(self, computation: str) -> dict[str, list[Array]]:
        return {i.name: i.shape for i in self.computations.get(computation, [])}

    def trip_count(self, condition: str) -> int:
        """N of a loop whose condition is `counter < N` (a scan); 1 when it cannot be read."""
        insts = self.computations.get(condition, [])
        root = next((i for i in insts if i.root), None)
        if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
            return 1
        consts = {i.name: i for i in insts if i.opcode == "constant"}
        for name in root.operands[1:]:
            if name in consts and re.fullmatch(r"-?\d+", consts[name].args):
                return max(1, int(consts[name].args))
        return 1

    @cached_property
    def multiplicity(self) -> dict[str, int]:
        """How many times each computation runs per execution of the entry: loop bodies x their trip count;
        fusions, calls, branches and async bodies x their caller's."""
        return self._call_graph[0]

    @cached_property
    def fused(self) -> set[str]:
        """The computations that run inside an instruction (fusion bodies, reducers), not on their own."""
        return self._call_graph[1]

    @cached_property
    def _call_graph(self) -> tuple[dict[str, int], set[str]]:
        mult: dict[str, int] = {self.entry: 1}
        fused: set[str] = set()
        order = [self.entry]
        while order:
            comp = order.pop()
            for inst in self.computations.get(comp, []):
                callees = []
                if inst.opcode == "while":
                    body, cond = inst.attr("body"), inst.attr("condition")
                    trips = self.trip_count(cond) if cond else 1
                    callees = [(body, trips), (cond, trips + 1)]
                else:  # fusions, calls, async and custom calls, branches: once per call; reducers: fused
                    for key in ("calls", "to_apply"):
                        if inst.attr(key):
                            callees.append((inst.attr(key), 1))
                            if inst.opcode == "fusion" or key == "to_apply":
                                fused.add(inst.attr(key))
                    for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", inst.attrs):
                        callees += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]
                for callee, times in callees:
                    if callee and callee in self.computations:
                        mult[callee] = mult.get(callee, 0) + mult[comp] * times
                        order.append(callee)
        return mult, fused

    @cached_property
    def _by_name(self) -> dict[str, Instruction]:
        return {i.name: i for insts in self.computations.values() for i in insts}

    # -- FLOPs ------------------------------------------------------------------------------------

    def matmul_flops(self) -> float:
        total = 0.0
        for comp, insts in self.computations.items():
            times = self.multiplicity.get(comp, 0)
            if not times:
                continue
            shapes = None
            for inst in insts:
                if inst.opcode in ("dot", "convolution"):
                    shapes = shapes or self.shapes(comp)
                    flops = dot_flops(inst, shapes) if inst.opcode == "dot" else convolution_flops(inst, shapes)
                    total += times * flops
        return total

    # -- HBM traffic ------------------------------------------------------------------------------

    def hbm_bytes(self) -> float:
        total = 0.0
        for comp, insts in self.computations.items():
            times = self.multiplicity.get(comp, 0)
            if not times or comp in self.fused:
                continue
            shapes = self.shapes(comp)
            for inst in insts:
                if inst.opcode in _FREE or inst.opcode.endswith("-start"):
                    continue
                total += times * self._inst_bytes(inst, shapes)
        return total

    def _inst_bytes(self, inst: Instruction, shapes) -> float:
        operand = lambda k: sum(a.bytes for a in shapes.get(inst.operands[k], []))  # noqa: E731
        if inst.opcode == "dynamic-slice":
            return 2 * inst.result_bytes
        if inst.opcode == "dynamic-update-slice":
            return 2 * operand(1)
        if inst.opcode == "fusion":
            return self._fusion_bytes(inst, shapes)
        return inst.result_bytes + sum(operand(k) for k in range(len(inst.operands)))

    def _view(self, comp: str) -> tuple[dict, dict, dict]:
        """(parameter index -> name, name -> instruction, name -> users) of a fused computation."""
        if comp not in self._views:
            body = self.computations.get(comp, [])
            users: dict[str, list[Instruction]] = {}
            for i in body:
                for o in i.operands:
                    users.setdefault(o, []).append(i)
            params = {int(i.args): i.name for i in body if i.opcode == "parameter" and i.args.isdigit()}
            self._views[comp] = (params, {i.name: i for i in body}, users)
        return self._views[comp]

    def _users(self, comp: str, name: str) -> list[Instruction]:
        """The users of `name` in `comp`, looking through bitcasts and reshapes."""
        found = []
        for u in self._view(comp)[2].get(name, []):
            found += self._users(comp, u.name) if u.opcode in ("bitcast", "reshape") else [u]
        return found

    def _source(self, comp: str, inst: Optional[Instruction]) -> Optional[Instruction]:
        """Through bitcasts and reshapes to the instruction that produced `inst`'s data."""
        by_name = self._view(comp)[1]
        while inst is not None and inst.opcode in ("bitcast", "reshape") and inst.operands:
            inst = by_name.get(inst.operands[0])
        return inst

    def _read_bytes(self, comp: str, name: str, full: float, depth: int = 0) -> float:
        """Bytes a fused computation reads of its parameter `name` (`full` bytes): only the slices when every
        use is a dynamic-slice, in this computation or in fusions nested in it; else all of it."""
        uses = self._users(comp, name)
        if not uses or depth > 4:
            return full
        total = 0.0
        for u in uses:
            if u.opcode == "dynamic-slice" and self._source(comp, self._view(comp)[1].get(u.operands[0])).name == name:
                total += u.result_bytes
            elif u.opcode == "fusion":
                inner = u.attr("calls") or ""
                params = self._view(inner)[0]
                for j, o in enumerate(u.operands):
                    src = self._source(comp, self._view(comp)[1].get(o))
                    if src is not None and src.name == name and j in params:
                        total += self._read_bytes(inner, params[j], full, depth + 1)
            else:
                return full
        return min(total, full)

    def _fusion_bytes(self, inst: Instruction, shapes) -> float:
        """A fusion's operands and results: an operand only sliced inside (also by a nested fusion) counts its
        slices, and an output written in place by a dynamic-update-slice counts the update."""
        comp = inst.attr("calls") or ""
        params, by_name, _ = self._view(comp)
        root = next((i for i in self.computations.get(comp, []) if i.root), None)
        outputs = [by_name.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
        written = [self._source(comp, o) for o in outputs if o is not None]
        updates = [w for w in written if w is not None and w.opcode == "dynamic-update-slice"]
        total = 0.0
        for k, name in params.items():
            if k >= len(inst.operands):
                continue
            uses = self._users(comp, name)
            if uses and all(u in updates and self._source(comp, by_name.get(u.operands[0])) is by_name[name]
                            for u in uses):
                continue  # a buffer updated in place
            total += self._read_bytes(comp, name, sum(a.bytes for a in shapes.get(inst.operands[k], [])))
        for w in written:  # what the fusion writes: the update of an in-place slice, else the whole output
            if w in updates and w.operands[1] in by_name:
                total += sum(a.bytes for a in by_name[w.operands[1]].shape)
            elif w is not None:
                total += w.result_bytes
        return total

    # -- collectives --------------------------------------------------------------------------------

    def collectives(self) -> list[Collective]:
        found = []
        for comp, insts in self.computations.items():
            times = self.multiplicity.get(comp, 0)
            if not times:
                continue
            for inst in insts:
                dcn = _dcn_collective(inst)
                if dcn and self.slices > 1:  # across slices: a host transfer to the Megascale runtime
                    found.append(Collective(dcn, tuple(inst.shape[:1]), inst.shape[0].bytes if inst.shape else 0.0,
                                            self.slices, times, True))
                    continue
                base = inst.opcode.removesuffix("-done")
                if base not in COLLECTIVES:
                    continue
                kind = "reduce-scatter" if base == "all-reduce" and comp.startswith("all-reduce-scatter") else base
                attrs = inst.attrs
                if inst.opcode.endswith("-done"):  # the groups are on the matching -start
                    start = self._by_name.get(inst.operands[0])
                    attrs = start.attrs if start else attrs
                groups = replica_groups(attrs, self.n_partitions)
                shape = inst.shape
                if kind == "collective-permute" and len(shape) > 1:
                    shape = shape[1:2]
                size = 2 if kind == "collective-permute" else max(len(g) for g in groups)
                buffer = sum(a.bytes for a in shape) * (size if inst.opcode.startswith("reduce-scatter") else 1)
                found.append(Collective(kind, tuple(shape), buffer, size, times, False))
        return found


def _dcn_collective(inst: Instruction) -> Optional[str]:
    """The collective kind of a multi-slice program's `send` to the Megascale runtime (its rendezvous names the
    collective it carries across slices over DCN), else None."""
    if inst.opcode != "send" or "xla_megascale_runtime" not in inst.attrs:
        return None
    m = re.search(r'_xla_host_transfer_rendezvous="([a-z\-]+)', inst.attrs)
    return next((k for k in COLLECTIVES if m and m.group(1).startswith(k)), "all-reduce")
