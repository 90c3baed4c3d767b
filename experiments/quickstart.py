"""The README's 2-minute quickstart: a tiny byte-level model, then a 6-point IsoFLOP sweep with its fit.

    ar-lm prepare --source stdlib --max-mb 3 --tokenizer byte --out data/quickstart
    ar-lm train experiments/quickstart.py --data data/quickstart --run-dir runs/quickstart
    ar-lm sweep experiments/quickstart.py --data data/quickstart

`config()` is the single run (a 2-layer GPT-2-style model, 200 steps); `sweep()` is 2 compute budgets x 3
model sizes (IsoFLOP, Hoffmann et al. 2022) around D = 300 N (where these byte-level models of a few
thousand parameters train best), every size at the peak learning rate of the main job's fitted lr rule
(`isoflop_cpu_lr.json`), each point a short cosine run; the sweep then fits Chinchilla's approaches 1-3 into
sweeps/quickstart/fit/. Sized to finish in about two minutes on 2 CPU cores: the fit (6 points, 2 budgets)
shows the pipeline, not a law to trust; experiments/isoflop_cpu.py is the main job.
"""

from pathlib import Path

from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.scaling import DataSpec, ShapeRule, Sweep, isoflop_sweep
from ar_lm.scaling.hparams import HParamRule

BUDGETS = (3e10, 1e11)  # training FLOPs per point
RULE = ShapeRule(aspect=32, head_dim=8)  # the main job's shapes
# each size's peak learning rate from the power law fitted to the main job's lr sweep (experiments/isoflop_cpu_lr.py)
LR_FIT = Path(__file__).with_name("isoflop_cpu_lr.json")


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="quickstart",
        model=ModelConfig(family="gpt2", vocab_size=257, d_model=64, n_layers=2, n_heads=4, max_seq_len=64),
        data=DataConfig(seq_len=64, batch_size=16),
        optim=OptimConfig(lr=6e-3, warmup_frac=0.05, final_lr_frac=0.1, weight_decay=0.1),
        train=TrainConfig(steps=200, eval_every=0, eval_tokens=8192, log_every=20, checkpoint_every=1000,
                          keep_checkpoints=1),
        mesh=MeshConfig(devices=1),
        logging=LoggingConfig(wandb=False),
    )


def sweep() -> Sweep:
    base = config()
    lr_rule = HParamRule.from_fit(LR_FIT)
    points = isoflop_sweep(base, budgets=BUDGETS, sizes_per_budget=3, spread=3.0, rule=RULE,
                           center_tokens_per_param=300, hparams=lr_rule)
    return Sweep(name="quickstart", base=base, points=tuple(points),
                 data=DataSpec(source="stdlib", tokenizer="byte", max_mb=3.0), rule=RULE, hparams=lr_rule)
