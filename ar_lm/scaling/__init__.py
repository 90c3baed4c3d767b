"""Scaling studies: sweep definitions, the sweep runner, Chinchilla fits, held-out checks, plots.

`sweeps` (shape rules, ladders, `grid_sweep`, `isoflop_sweep`, `wsd_sweep`, `lr_sweep`, `Sweep`, `DataSpec`),
`hparams` (size-aware hyperparameter rules; `ar-lm fit-lr`), `runner`
(`ar-lm sweep`: one process per point, resumable, summary table), `points` (what a fit reads),
`fit` (approaches 1-3 with bootstrap intervals), `report` (`ar-lm fit`), `holdout` (the held-out
check), `plots`, `compare` (`ar-lm compare`). Imports the base layer, `ar_lm.model`, `ar_lm.data`,
`ar_lm.parallel` and `ar_lm.training`; not `ar_lm.decoding` or `ar_lm.interop`.

Experiment files import the sweep definitions from here: ``from ar_lm.scaling import Sweep, ...``.
"""

from ar_lm.scaling.sweeps import (
                                  DataSpec,
                                  ShapeRule,
                                  Sweep,
                                  SweepPoint,
                                  compute_optimal_point,
                                  grid_sweep,
                                  isoflop_sweep,
                                  ladder,
                                  ladder_model,
                                  lr_sweep,
                                  wsd_compute,
                                  wsd_sweep,
)

__all__ = ["DataSpec", "ShapeRule", "Sweep", "SweepPoint", "compute_optimal_point", "grid_sweep", "isoflop_sweep",
           "ladder", "ladder_model", "lr_sweep", "wsd_compute", "wsd_sweep"]
