"""FLOPs of compiled HLO matmuls: `dot` (2 x result elements x contracted size) and `convolution` (TPU lowers
batched matmuls to convolutions), each as XLA's `HloCostAnalysis` counts it. `inst` is an
`ar_lm.plan.hlo.Instruction`, `shapes` its computation's name -> result arrays."""

from __future__ import annotations

import math
import re

import numpy as np


def _dims(text: str, key: str) -> list[int]:
    m = re.search(rf"{key}=\{{([\d,]*)\}}", text)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def dot_flops(inst, shapes) -> float:
    lhs = shapes.get(inst.operands[0], [None])[0] if inst.operands else None
    if lhs is None or not inst.shape:
        return 0.0
    contracted = math.prod(lhs.dims[d] for d in _dims(inst.attrs, "lhs_contracting_dims"))
    return 2.0 * math.prod(inst.shape[0].dims) * contracted


def convolution_flops(inst, shapes) -> float:
    """2 x multiply-adds of a convolution, counting only window positions that land on the (dilated,
    padded) input, as XLA's HloCostAnalysis::GetConvolutionFlops does."""
    if len(inst.operands) < 2 or not inst.shape:
        return 0.0
    lhs, rhs = shapes.get(inst.operands[0], [None])[0], shapes.get(inst.operands[1], [None])[0]
    out = inst.shape[0]
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
    if lhs is None or rhs is None or not m:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    spatial = [c for c in lhs_l if c.isdigit()]
    batch = lhs.dims[lhs_l.index("b")]
    in_feat = lhs.dims[lhs_l.index("f")]
    out_feat = out.dims[out_l.index("f")]
    fgc = int(re.search(r"feature_group_count=(\d+)", inst.attrs).group(1)) if "feature_group_count" in inst.attrs else 1
    bgc = int(re.search(r"batch_group_count=(\d+)", inst.attrs).group(1)) if "batch_group_count" in inst.attrs else 1
    window = re.search(r"window=\{([^}]*)\}", inst.attrs)
    fields = dict(re.findall(r"(\w+)=([\w\-x]+)", window.group(1))) if window else {}

    def per_dim(key: str, default: int, n: int) -> list:
        if key not in fields:
            return [default] * n
        return fields[key].split("x")

    n = len(spatial)
    stride = [int(x) for x in per_dim("stride", 1, n)]
    lhs_dil = [int(x) for x in per_dim("lhs_dilate", 1, n)]
    rhs_dil = [int(x) for x in per_dim("rhs_dilate", 1, n)]
    pads = [int(str(p).split("_")[0]) for p in per_dim("pad", "0_0", n)]
    valid = 1
    for i, d in enumerate(spatial):
        in_lim, out_lim = lhs.dims[lhs_l.index(d)], out.dims[out_l.index(d)]
        k_lim = rhs.dims[rhs_l.index(d)]
        kidx = np.arange(k_lim)[:, None]
        oidx = np.arange(out_lim)[None, :]
        undilated = oidx * stride[i] - pads[i] + kidx * rhs_dil[i]
        lhs_idx = undilated // lhs_dil[i]
        ok = (undilated == lhs_idx * lhs_dil[i]) & (lhs_idx >= 0) & (lhs_idx < in_lim)
        count = int(ok.sum())
        valid *= count
    return 2.0 * (in_feat // fgc) * out_feat * (batch // bgc) * valid
