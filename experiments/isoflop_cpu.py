"""The main job: an IsoFLOP scaling study sized for a 2-core CPU (about 10 minutes).

    ar-lm sweep experiments/isoflop_cpu.py

It tokenizes the Python standard library (bytes), trains 3 compute budgets x 4 model sizes
(each run's learning-rate schedule fitted to its own token budget), fits Chinchilla approaches
1-3 with bootstrap intervals, writes the plots to sweeps/isoflop_cpu/fit/, then trains one
held-out run at 4x the largest budget at the fitted compute-optimal size and compares the
fitted law's predicted loss with the measured one.
"""

from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.scaling.sweeps import DataSpec, ShapeRule, Sweep, isoflop_sweep

BUDGETS = (1e11, 3e11, 1e12)  # training FLOPs per run
HOLDOUT = (4e12,)  # 4x the largest budget
RULE = ShapeRule(aspect=32, head_dim=8)
# at this scale (byte tokens, 1-4 layers, hundreds of steps) loss-optimal runs see far more than
# Chinchilla's ~20 tokens per parameter: centre each IsoFLOP curve at D = 200 N
TOKENS_PER_PARAM = 200.0
# validation-loss curves for Approach 1: every size is trained at 2-3 budgets (horizons), each
# evaluated 8 times over its run
EVALS_PER_RUN = 8


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="isoflop_cpu",
        model=ModelConfig(family="gpt2", vocab_size=257, max_seq_len=64),  # byte tokenizer
        data=DataConfig(seq_len=64, batch_size=16),
        optim=OptimConfig(lr=4e-3, warmup_frac=0.05, final_lr_frac=0.1, weight_decay=0.1),
        # eval_tokens: a seeded random subset of val windows spread over the whole split (the same at every
        # eval); eval_every is set per point from EVALS_PER_RUN
        train=TrainConfig(eval_every=0, eval_tokens=65536, log_every=10, checkpoint_every=200, keep_checkpoints=1),
        mesh=MeshConfig(devices=1),
        logging=LoggingConfig(wandb=True, project="ar_lm", tags=("isoflop_cpu",), progress=False),
    )


def sweep() -> Sweep:
    base = config()
    points = isoflop_sweep(base, BUDGETS, sizes_per_budget=4, spread=3.0, rule=RULE,
                           center_tokens_per_param=TOKENS_PER_PARAM, evals_per_run=EVALS_PER_RUN)
    return Sweep(name="isoflop_cpu", base=base, points=tuple(points), holdout_budgets=HOLDOUT,
                 data=DataSpec(source="stdlib", tokenizer="byte", max_mb=8.0), rule=RULE)
