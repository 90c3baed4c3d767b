"""The smallest useful experiment: a 2-layer GPT-2-style model that trains in under a minute on a CPU.

    ar-lm prepare --source stdlib --tokenizer byte --out data/stdlib-byte
    ar-lm train experiments/tiny.py --data data/stdlib-byte
"""

from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="tiny",
        model=ModelConfig(family="gpt2", vocab_size=0, d_model=128, n_layers=2, n_heads=4, max_seq_len=128),
        data=DataConfig(seq_len=128, batch_size=16),
        optim=OptimConfig(lr=3e-3, warmup_frac=0.05, final_lr_frac=0.1, weight_decay=0.1),
        train=TrainConfig(steps=300, eval_every=100, eval_tokens=16384, log_every=25, checkpoint_every=100),
        logging=LoggingConfig(wandb=True, project="ar_lm", tags=("tiny",)),
    )
