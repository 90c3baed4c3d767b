"""The compute model every fit, frontier, plot and prediction shares: C = fpt(N) · D.

- ``6nd``: fpt(N) = 6 N (Kaplan et al. 2020; what published data usually used).
- ``exact``: fpt(N) measured at the points (`flops_per_token` of each run, or flops / tokens of a
  CSV row), interpolated piecewise-linearly in (log N, log fpt) and extended beyond the measured
  sizes along the end segments (along slope 1, fpt ∝ N, when only one size was measured).

At small scale fpt / 6N is 1.3-2.5 (the attention and output-projection terms), so D_opt = C / 6N
would bias every D exponent; with ``exact`` a frontier spends exactly the compute it is given.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ar_lm.errors import require

KINDS = ("6nd", "exact")


@dataclasses.dataclass(frozen=True)
class ComputeModel:
    kind: str = "6nd"
    log_n: tuple[float, ...] = ()  # measured sizes (exact only), increasing
    log_fpt: tuple[float, ...] = ()

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
        return {"kind": self.kind, "log_n": list(self.log_n), "log_fpt": list(self.log_fpt)}

    @staticmethod
    def from_json(d: dict) -> "ComputeModel":
        return ComputeModel(d["kind"], tuple(d.get("log_n", ())), tuple(d.get("log_fpt", ())))


def measured(n: Sequence[float], fpt: Sequence[float]) -> ComputeModel:
    """The ``exact`` model through measured (N, fpt) pairs (the mean log fpt per distinct N)."""
    n, fpt = np.asarray(n, float), np.asarray(fpt, float)
    require(len(n) > 0 and np.all(fpt > 0), "the exact compute model needs positive FLOPs per token at each size")
    sizes = np.unique(n)
    log_fpt = [float(np.mean(np.log(fpt[n == s]))) for s in sizes]
    return ComputeModel("exact", tuple(float(x) for x in np.log(sizes)), tuple(log_fpt))
