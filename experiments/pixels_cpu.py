"""A pixel-level IsoFLOP study (Henighan et al. 2020 did it for images at scale), sized for a 2-core CPU
(a few minutes): autoregression over 8x8 grayscale images in raster order, 4 bits per pixel (16 levels),
procedurally generated (`ar_lm.data.synthetic.shape_images`: gradients with rectangles and ellipses), so
nothing is downloaded.

    ar-lm sweep experiments/pixels_cpu.py

Per model size one constant-lr trunk with a cooldown branched at each compute budget (a WSD ladder, as
the main job); the peak learning rate of each size comes from the main job's fitted rule (a text fit,
used here as a prior). Losses are reported in nats per token and as bits per dimension (per pixel); the
fit is Chinchilla approaches 1-3 over the ladder.
"""

from pathlib import Path

from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.scaling import DataSpec, ShapeRule, Sweep, wsd_sweep
from ar_lm.scaling.hparams import HParamRule

BUDGETS = (3e10, 1e11, 3e11)  # training FLOPs per branch
RULE = ShapeRule(aspect=32, head_dim=8)
SIZES = (888, 3312, 7272, 19800, 56640)  # non-embedding N of the ladder: minima inside at every budget
COOLDOWN_FRAC = 0.2
EVALS_PER_RUN = 3
LR_FIT = Path(__file__).with_name("isoflop_cpu_lr.json")
IMAGE_TOKENS = 8 * 8 + 1  # pixels and the end-of-image token


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="pixels_cpu",
        model=ModelConfig(family="gpt2", vocab_size=17, max_seq_len=IMAGE_TOKENS),  # 16 levels + end of image
        data=DataConfig(seq_len=IMAGE_TOKENS, batch_size=16),
        optim=OptimConfig(lr=4e-3, schedule="wsd", cooldown_frac=COOLDOWN_FRAC, warmup_frac=0.05, final_lr_frac=0.1,
                          weight_decay=0.1),
        train=TrainConfig(eval_every=0, eval_tokens=32768, log_every=10, checkpoint_every=2000, keep_checkpoints=1),
        mesh=MeshConfig(devices=1),
        logging=LoggingConfig(wandb=True, project="ar_lm", tags=("pixels_cpu",), progress=False),
    )


def sweep() -> Sweep:
    base = config()
    lr_rule = HParamRule.from_fit(LR_FIT)
    points = wsd_sweep(base, SIZES, flops=BUDGETS, cooldown_frac=COOLDOWN_FRAC, rule=RULE,
                       evals_per_run=EVALS_PER_RUN, hparams=lr_rule)
    return Sweep(name="pixels_cpu", base=base, points=tuple(points),
                 data=DataSpec(source="shapes", images=600_000, image_size=8, bits=4), rule=RULE, hparams=lr_rule)
