"""The GPU check: train llama 125M, 350M and 1.3B on one GPU in bf16, then decode, and write what it measured.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu_check_DATE_h100.json   # on one H100/H200
    python benchmarks/gpu_check.py --smoke --json /tmp/gpu_check.json                  # tiny, any backend

For each size (experiments/llama_tpu.py's shapes: head dim 128, SwiGLU, untied, vocab 32,000, seq 2048,
float32 parameters and AdamW state, bf16 compute): the train step with the defaults the run would take
(`model.attention=auto`: cuDNN flash attention; `model.remat=auto`: the fastest policy whose compiled step fits
the GPU's memory; logits chunked), `--steps` timed steps after 3 untimed ones: ms/step (median), tokens/s, MFU
against the device's bf16 dense peak (`ar_lm.training.metrics.PEAK_FLOPS`, 989 TFLOP/s for H100/H200 SXM) with
`flops_per_token` (6N + attention), and whether the compiled HLO calls cuDNN's fused attention (a
`__cudnn$fmha` custom call). Then greedy decoding (`ar_lm.decoding.generate`, one jitted program) of
`--new-tokens` tokens after a 128-token prompt at batch 1 and 32: tokens/s, compile excluded.

Install on the GPU image (jax with CUDA already there): `pip install --no-deps -e .` plus wheels of what is
missing (grain, sentencepiece, ...: see /work/.library/device/README.md). Under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

BATCH = {"125m": 16, "350m": 16, "1.3b": 8}  # sequences of 2048 per step on one GPU
WARMUP = 3


def train_check(cfg, steps: int) -> dict:
    import jax
    import numpy as np

    from ar_lm.model.backend import resolve_attention, resolve_remat
    from ar_lm.model.counts import flops_per_token, param_counts
    from ar_lm.parallel.mesh import logical_rules, logical_sharding, make_mesh, mesh_context
    from ar_lm.training.metrics import peak_flops_per_device
    from ar_lm.training.optimizer import run_optimizer
    from ar_lm.training.state import init_state, state_shardings
    from ar_lm.training.step import compiled_memory, make_train_step, remat_for_device_memory

    t0 = time.perf_counter()
    cfg = remat_for_device_memory(cfg)
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    tx, schedule = run_optimizer(cfg)
    shardings = state_shardings(cfg, tx, mesh, rules)
    batch_sh = logical_sharding(mesh, rules, ("batch", "length"))
    rng = np.random.default_rng(0)
    batches = [jax.device_put(rng.integers(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1),
                                           dtype=np.int32), batch_sh) for _ in range(2)]
    with mesh_context(mesh, rules):
        state = init_state(cfg, tx, shardings, jax.random.key(0))
        step = make_train_step(cfg, tx, schedule, shardings, batch_sh)
        compiled = step.lower(state, batches[0]).compile()
    text = compiled.as_text()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(WARMUP + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    ms = statistics.median(times[WARMUP:]) * 1e3
    tokens_per_s = cfg.data.batch_size * cfg.data.seq_len / (ms / 1e3)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    return {
        "params": param_counts(cfg.model)["total"], "batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
        "attention": resolve_attention(cfg.model), "remat": resolve_remat(cfg.model),
        "cudnn_attention_in_hlo": "__cudnn$fmha" in text,
        "memory_gib": compiled_memory(compiled)["total"] / 2**30,
        "compile_s": compile_s, "ms_per_step": ms, "tokens_per_s": tokens_per_s,
        "mfu": fpt * tokens_per_s / peak_flops_per_device(), "loss_last": float(metrics["loss"]),
    }


def decode_check(cfg, batch: int, new_tokens: int, prompt_len: int) -> dict:
    import jax

    from ar_lm.decoding.decoder import generate
    from ar_lm.model.transformer import init_params_jit

    params = init_params_jit(cfg.model, jax.random.key(0))
    prompts = [[(7 * i + j) % cfg.model.vocab_size for j in range(prompt_len)] for i in range(batch)]
    generate(cfg.model, params, prompts, new_tokens)  # compiles
    start = time.perf_counter()
    out = generate(cfg.model, params, prompts, new_tokens)
    wall = time.perf_counter() - start
    assert out.tokens.shape[0] == batch
    return {"batch": batch, "new_tokens": new_tokens, "prompt_len": prompt_len,
            "tokens_per_s": batch * new_tokens / wall, "ms_per_token": wall / new_tokens * 1e3}


def configs(smoke: bool) -> dict:
    from ar_lm.config import MeshConfig, validate
    from llama_tpu import config_for

    if smoke:  # two tiny layers, seq 256: the same code path in seconds on a CPU
        cfg = config_for("125m", seq_len=256, batch_size=2)
        model = dataclasses.replace(cfg.model, d_model=64, n_layers=2, n_heads=2, vocab_size=512)
        return {"smoke": validate(dataclasses.replace(cfg, model=model, mesh=MeshConfig(devices=1)))}
    one_gpu = MeshConfig(devices=1)
    return {size: validate(dataclasses.replace(config_for(size, seq_len=2048, batch_size=b), mesh=one_gpu))
            for size, b in BATCH.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 2 steps, 8 new tokens (any backend)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    from ar_lm.parallel.runtime import set_backend_xla_flags

    set_backend_xla_flags()  # as `ar-lm train` does, before the backend starts
    import jax

    steps, new_tokens = (2, 8) if args.smoke else (args.steps, args.new_tokens)
    result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "train": {}, "decode": {}}
    for name, cfg in configs(args.smoke).items():
        result["train"][name] = train_check(cfg, steps)
        print(name, json.dumps(result["train"][name]), flush=True)
        result["decode"][name] = [decode_check(cfg, b, new_tokens, 16 if args.smoke else 128) for b in (1, 32)]
        print(name, json.dumps(result["decode"][name]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
