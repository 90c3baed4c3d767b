"""The main job: an IsoFLOP scaling study run as a WSD ladder, sized for a 2-core CPU (about 8 minutes).

    ar-lm sweep experiments/isoflop_cpu.py

It tokenizes the Python standard library (bytes) and trains, per model size, one constant-lr trunk
with a cooldown branched from its checkpoints at each of 5 compute budgets (Hägele et al. 2024), so
5 sizes x 5 budgets cost about what 5 runs at the largest budget would. Each size's peak learning
rate comes from the power law fitted to `experiments/isoflop_cpu_lr.py`'s lr sweep
(`isoflop_cpu_lr.json`). It then fits Chinchilla approaches 1-3 with bootstrap intervals and the law
forms side by side, one chosen by rollout cross-validation over the budgets (`ar_lm/scaling/rollout.py`),
writes the plots to sweeps/isoflop_cpu/fit/, and trains one held-out `wsd` run at 4x the largest budget
at the fitted compute-optimal size, comparing every form's prediction with the measured loss.
"""

from pathlib import Path

from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.scaling import DataSpec, ShapeRule, Sweep, wsd_sweep
from ar_lm.scaling.hparams import HParamRule

BUDGETS = (1e11, 1.8e11, 3.2e11, 5.6e11, 1e12)  # training FLOPs per branch: a quarter-decade apart, so
# rollout cross-validation has 4 folds (fit budgets <= C_k, predict C_k+1)
HOLDOUT = (4e12,)  # 4x the largest budget
RULE = ShapeRule(aspect=32, head_dim=8)
# ladder sizes (non-embedding N) around the compute-optimal sizes of these budgets (~7k at 1e11 to
# ~50k at 1e12 with the size-aware lr): every budget's IsoFLOP curve has sizes on both sides of its minimum
SIZES = (3312, 7272, 19800, 56640, 126432)
COOLDOWN_FRAC = 0.2
EVALS_PER_RUN = 3  # evaluations within the smallest budget of each size (validation curves for Approach 1)
LR_FIT = Path(__file__).with_name("isoflop_cpu_lr.json")


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="isoflop_cpu",
        model=ModelConfig(family="gpt2", vocab_size=257, max_seq_len=64),  # byte tokenizer
        data=DataConfig(seq_len=64, batch_size=16),
        # a straight wsd run is what each branch equals (and what the held-out run is); the warmup is
        # warmup_frac of the smallest budget's run at every size (the same compute, so the same share of each
        # budget along an IsoFLOP curve), shared by a trunk and its branches, and the held-out run's too
        optim=OptimConfig(lr=4e-3, schedule="wsd", cooldown_frac=COOLDOWN_FRAC, warmup_frac=0.05, final_lr_frac=0.1,
                          weight_decay=0.1),
        # eval_tokens: a seeded random subset of val windows spread over the whole split (the same at every eval)
        train=TrainConfig(eval_every=0, eval_tokens=32768, log_every=10, checkpoint_every=2000, keep_checkpoints=1),
        mesh=MeshConfig(devices=1),
        logging=LoggingConfig(wandb=True, project="ar_lm", tags=("isoflop_cpu",), progress=False),
    )


def sweep() -> Sweep:
    base = config()
    lr_rule = HParamRule.from_fit(LR_FIT)
    points = wsd_sweep(base, SIZES, flops=BUDGETS, cooldown_frac=COOLDOWN_FRAC, rule=RULE,
                       evals_per_run=EVALS_PER_RUN, hparams=lr_rule)
    return Sweep(name="isoflop_cpu", base=base, points=tuple(points), holdout_budgets=HOLDOUT,
                 data=DataSpec(source="stdlib", tokenizer="byte", max_mb=8.0), rule=RULE, hparams=lr_rule)
