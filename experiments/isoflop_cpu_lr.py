"""The learning-rate sweep behind the main job's size-aware learning rate (`isoflop_cpu_lr.json`).

    ar-lm sweep experiments/isoflop_cpu_lr.py --no-fit
    ar-lm fit-lr sweeps/isoflop_cpu_lr --out experiments/isoflop_cpu_lr.json

Three ladder sizes of the main job x eight peak learning rates, each a straight `wsd` run of 100
tokens per parameter (the main job's recipe); `ar-lm fit-lr` finds each size's optimal lr and the
power law lr*(N) that `experiments/isoflop_cpu.py` loads with `HParamRule.from_fit`.
"""

import dataclasses
from pathlib import Path

from ar_lm.config import load_experiment_module
from ar_lm.scaling import DataSpec, Sweep
from ar_lm.scaling.sweeps import lr_sweep

MAIN_JOB = load_experiment_module(Path(__file__).with_name("isoflop_cpu.py"))  # its base config and shape rule

SIZES = (3312, 7272, 19800)
LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1)


def config():
    return MAIN_JOB.config()


def sweep() -> Sweep:
    base = config()
    base = dataclasses.replace(base, name="isoflop_cpu_lr", logging=dataclasses.replace(base.logging, tags=("isoflop_cpu_lr",)),
                               train=dataclasses.replace(base.train, eval_tokens=65536))  # as isoflop_cpu_lr.json was fit
    points = lr_sweep(base, SIZES, LRS, tokens_per_param=100, rule=MAIN_JOB.RULE)
    return Sweep(name="isoflop_cpu_lr", base=base, points=tuple(points), rule=MAIN_JOB.RULE,
                 data=DataSpec(source="stdlib", tokenizer="byte", max_mb=8.0))
