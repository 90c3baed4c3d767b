"""The compute model every fit, frontier, plot and prediction shares: C = fpt(N) · D.

- ``6nd``: fpt(N) = 6 N (Kaplan et al. 2020; what published data usually used).
- ``exact`` with the sweep's shapes (`ShapeFamily`): fpt(N) = `flops_per_token` of the shape the sweep's
  width rule gives at N (piecewise-linear in (log N, log fpt) between consecutive shapes), at every N, when
  the runs' measured FLOPs per token lie on it (points made by another rule fall back to the next form).
- ``exact`` without them: fpt(N) measured at the points (`flops_per_token` of each run, or flops / tokens
  of a CSV row), interpolated piecewise-linearly in (log N, log fpt) and extended beyond the measured
  sizes along the end segments (along slope 1, fpt ∝ N, when only one size was measured). That
  extension is a guess: the output-projection share of fpt shrinks with N, so the end slope is < 1.

At small scale fpt / 6N is 1.3-2.5 (the attention and output-projection terms), so D_opt = C / 6N
would bias every D exponent; with ``exact`` a frontier spends exactly the compute it is given.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from ar_lm.config import ModelConfig, from_dict
from ar_lm.errors import require
from ar_lm.model.counts import flops_per_token, param_counts
from ar_lm.scaling.shapes import ShapeRule

KINDS = ("6nd", "exact")
AGREE = 1e-6  # relative: measured FLOPs per token on the shapes' own


@dataclasses.dataclass(frozen=True)
class ShapeFamily:
    """A sweep's models: `base` reshaped by `rule` (`ar_lm.scaling.shapes.ShapeRule`) at every width, run
    with window `seq_len` (max_seq_len raised to it); N counted as `n_kind`; attention FLOPs counted
    `attention` (`flops_per_token`'s causal_halved)."""

    base: ModelConfig
    rule: ShapeRule
    seq_len: int
    n_kind: str = "non_embedding"
    attention: str = "causal"  # attention FLOPs causal-halved (what runs record) or "full" (Hoffmann et al.)

    def shapes(self) -> list[ModelConfig]:
        return [dataclasses.replace(m, max_seq_len=max(self.base.max_seq_len, self.seq_len))
                for m in (self.rule.model(self.base, d) for d in self.rule.widths())]

    def table(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(log N, log fpt) of every shape, by N."""
        halved = self.attention == "causal"
        rows = sorted({(param_counts(m)[self.n_kind], flops_per_token(m, self.seq_len, causal_halved=halved))
                       for m in self.shapes()})
        return tuple(float(np.log(n)) for n, _ in rows), tuple(float(np.log(f)) for _, f in rows)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "base": dataclasses.asdict(self.base),
                "rule": dataclasses.asdict(self.rule)}

    @staticmethod
    def from_json(d: dict) -> "ShapeFamily":
        return ShapeFamily(**{**d, "base": from_dict(ModelConfig, d["base"]), "rule": ShapeRule(**d["rule"])})


@dataclasses.dataclass(frozen=True)
class ComputeModel:
    kind: str = "6nd"
    log_n: tuple[float, ...] = ()  # measured sizes (exact only), increasing
    log_fpt: tuple[float, ...] = ()
    shapes: Optional[ShapeFamily] = None  # exact: log_n, log_fpt are every shape of this family

    def fpt(self, n):
        """Training FLOPs per token of a model with `n` parameters."""
        n = np.asarray(n, float)
        if self.kind == "6nd":
            return 6.0 * n
        x, xs, ys = np.log(n), np.array(self.log_n), np.array(self.log_fpt)
        if len(xs) == 1:
            return np.exp(ys[0] + (x - xs[0]))
        lo = ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
        hi = ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return np.exp(np.where(x < xs[0], lo, np.where(x > xs[-1], hi, np.interp(x, xs, ys))))

    def tokens(self, n, c):
        """D = C / fpt(N): the tokens a size-N model trains on with compute C."""
        return np.asarray(c, float) / self.fpt(n)

    def to_json(self) -> dict:
        out = {"kind": self.kind, "log_n": list(self.log_n), "log_fpt": list(self.log_fpt)}
        return {**out, "shapes": self.shapes.to_json()} if self.shapes is not None else out

    @staticmethod
    def from_json(d: dict) -> "ComputeModel":
        if d.get("shapes") is not None:
            return analytic(ShapeFamily.from_json(d["shapes"]))
        return ComputeModel(d["kind"], tuple(d.get("log_n", ())), tuple(d.get("log_fpt", ())))


def analytic(shapes: ShapeFamily) -> ComputeModel:
    """The ``exact`` model through every shape of `shapes` (`flops_per_token` of each)."""
    log_n, log_fpt = shapes.table()
    return ComputeModel("exact", log_n, log_fpt, shapes)


def measured(n: Sequence[float], fpt: Sequence[float], shapes: Optional[ShapeFamily] = None) -> ComputeModel:
    """The ``exact`` model through measured (N, fpt) pairs (the mean log fpt per distinct N); with the
    sweep's `shapes`, the analytic model of that family when every measured pair lies on it (within `AGREE`),
    else the measured pairs' own."""
    n, fpt = np.asarray(n, float), np.asarray(fpt, float)
    require(len(n) > 0 and np.all(fpt > 0), "the exact compute model needs positive FLOPs per token at each size")
    sizes = np.unique(n)
    log_fpt = [float(np.mean(np.log(fpt[n == s]))) for s in sizes]
    points_only = ComputeModel("exact", tuple(float(x) for x in np.log(sizes)), tuple(log_fpt))
    if shapes is None:
        return points_only
    model = analytic(shapes)
    off = np.abs(model.fpt(sizes) / np.exp(log_fpt) - 1)
    # runs not shaped by the recorded rule (hand-made points, another rule than the Sweep's): the points' own
    return model if np.max(off) <= AGREE else points_only
