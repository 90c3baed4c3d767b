"""Scaling studies: sweep definitions, the sweep runner, Chinchilla fits, held-out checks, plots.

`shapes` (`ShapeRule`: width -> shape), `sweeps` (ladders, `grid_sweep`, `isoflop_sweep`, `wsd_sweep`, `lr_sweep`, `Sweep`, `DataSpec`),
`hparams` (size-aware hyperparameter rules; `ar-lm fit-lr`), `runner`
(`ar-lm sweep`: one process per point, resumable, summary table), `downstream` (lm-eval tasks on finished
points, their summary columns), `points` (what a fit reads),
`fit` (approaches 1-3 with bootstrap intervals), `report` (`ar-lm fit`), `holdout` (the held-out
check), `plots`, `compare` (`ar-lm compare`). Imports the base layer, `ar_lm.model`, `ar_lm.data`,
`ar_lm.parallel`, `ar_lm.training` and `ar_lm.plan` (`sweep --plan`); not `ar_lm.decoding` or `ar_lm.interop`.

Experiment files import the sweep definitions from here: ``from ar_lm.scaling import Sweep, ...``.
"""

__all__ = ["DataSpec", "ShapeRule", "Sweep", "SweepPoint", "compute_optimal_point", "grid_sweep", "isoflop_sweep",
           "ladder", "ladder_model", "lr_sweep", "wsd_compute", "wsd_sweep"]


def __getattr__(name: str):
    """The sweep definitions of `ar_lm.scaling.sweeps`, imported on first use (PEP 562), so that what
    only needs a submodule (a Ray or Slurm task reading `status.py`, `ar-lm sweep --status`) does not
    import the model and fit code."""
    if name in __all__:
        from ar_lm.scaling import sweeps

        return getattr(sweeps, name)
    raise AttributeError(f"module 'ar_lm.scaling' has no attribute {name!r}")
