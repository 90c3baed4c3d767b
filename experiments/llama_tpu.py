"""Llama-family models at the sizes scaling studies and MaxText use, for `ar-lm plan` on TPU topologies.

    ar-lm plan experiments/llama_tpu.py --target v5p:2x2x1                  # 1.3B, seq 2048, fsdp over the slice
    ar-lm plan experiments/llama_tpu.py --target v5p-128 --set model.d_model=8192 --set model.n_layers=80 \
        --set model.n_heads=64 --set model.n_kv_heads=8 --set model.d_ff=28672   # 70B (SIZES["70b"])

`config()` is the 1.3B model; `SIZES` holds the others (Llama 2 shapes: head dim 128, SwiGLU, untied
embeddings, a 32,000-token vocabulary) for scripts such as benchmarks/tpu_plan.py (`config_for(size)`).
The global batch is 4 sequences per chip of a v5p:2x2x1 (16); pass --set data.batch_size for other slices.
"""

import dataclasses

from ar_lm.config import DataConfig, ExperimentConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig

SIZES = {  # d_model, n_layers, n_heads, n_kv_heads, d_ff (0: the family's 8/3 d rounded to 256)
    "125m": (768, 12, 12, 0, 0),
    "350m": (1024, 24, 16, 0, 0),
    "1.3b": (2048, 24, 16, 0, 0),
    "7b": (4096, 32, 32, 0, 0),
    "13b": (5120, 40, 40, 0, 0),
    "70b": (8192, 80, 64, 8, 28672),
}


def config_for(size: str, seq_len: int = 2048, batch_size: int = 16) -> ExperimentConfig:
    d, layers, heads, kv_heads, d_ff = SIZES[size]
    model = ModelConfig(family="llama", vocab_size=32000, d_model=d, n_layers=layers, n_heads=heads,
                        n_kv_heads=kv_heads, d_ff=d_ff, max_seq_len=seq_len, tie_embeddings=False,
                        param_dtype="float32", compute_dtype="bfloat16")
    return ExperimentConfig(
        name=f"llama_{size}",
        model=model,
        data=DataConfig(seq_len=seq_len, batch_size=batch_size),
        optim=OptimConfig(lr=3e-4, schedule="cosine", warmup_frac=0.01, weight_decay=0.1),
        train=TrainConfig(tokens=20 * 1_300_000_000),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1, rules="fsdp"),
    )


def config() -> ExperimentConfig:
    return config_for("1.3b")


def with_size(cfg: ExperimentConfig, size: str) -> ExperimentConfig:
    """`cfg` with the model shape of SIZES[size] (everything else kept)."""
    return dataclasses.replace(cfg, model=config_for(size, cfg.data.seq_len).model)
