"""Evaluation: mean loss, its standard error, perplexity and bits per byte on a fixed set of val windows.

bits/byte = sum of token losses (nats) / (ln 2 * UTF-8 bytes of the evaluated target tokens),
with each token's byte count from its tokenizer, so runs with different tokenizers compare.
loss_se = std(per-window mean losses, ddof=1) / sqrt(windows) (all windows hold seq_len targets).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ar_lm.config import EVAL_TOKENS_CAP, ExperimentConfig
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.pipeline import eval_batches
from ar_lm.errors import require
from ar_lm.model.backend import cpu_compiler_options
from ar_lm.model.transformer import apply
from ar_lm.parallel.mesh import inference_mesh, logical_rules, logical_sharding, make_mesh, mesh_context, replicated
from ar_lm.training import rundir
from ar_lm.training.checkpoint import restore_latest_params
from ar_lm.training.state import param_shardings


def make_eval_step(cfg: ExperimentConfig, param_shardings, batch_sharding):
    def eval_step(params, batch_BxL1, token_bytes_V):
        inputs_BxL, targets_BxL = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
        logits_BxLxV = apply(cfg.model, params, inputs_BxL)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        return {
            "nll_B": jnp.sum(nll_BxL.astype(jnp.float32), axis=1),  # one sum per window
            "tokens": jnp.asarray(nll_BxL.size, jnp.float32),
            "bytes": jnp.sum(token_bytes_V[targets_BxL]).astype(jnp.float32),
        }

    # replicated outputs: every process reads all windows' sums (B numbers per batch)
    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding, None),
                   out_shardings=replicated(batch_sharding.mesh), compiler_options=cpu_compiler_options())


def evaluate(eval_fn, params, batches: list[np.ndarray], batch_sharding, token_bytes) -> dict:
    outs = []
    for batch in batches:
        global_batch = jax.make_array_from_process_local_data(batch_sharding, batch)
        outs.append(eval_fn(params, global_batch, token_bytes))
    outs = jax.device_get(outs)
    window_nll = np.concatenate([np.asarray(o["nll_B"], np.float64) for o in outs])
    tokens, n_bytes = sum(float(o["tokens"]) for o in outs), sum(float(o["bytes"]) for o in outs)
    nll = float(window_nll.sum())
    loss = nll / tokens
    window_loss = window_nll / (tokens / len(window_nll))  # every window holds seq_len targets
    se = float(np.std(window_loss, ddof=1) / math.sqrt(len(window_loss))) if len(window_loss) > 1 else None
    return {
        "loss": loss,
        "loss_se": se,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nll / (math.log(2) * n_bytes) if n_bytes else float("nan"),
        "eval_tokens": int(tokens),
    }


def evaluate_run(run_dir: str | Path, data_dir: Optional[str | Path] = None, max_tokens: Optional[int] = None) -> dict:
    """`ar-lm eval`: the latest checkpoint of `run_dir` on the val split of its (or another) dataset, on the
    windows its training evaluated (`max_tokens`: another budget, see `eval_window_indices`)."""
    require(max_tokens is None or max_tokens >= 0,
            f"--tokens must be >= 0, got {max_tokens}: use 0 for the whole val split (up to {EVAL_TOKENS_CAP:,})")
    run_dir = Path(run_dir).absolute()
    cfg = rundir.load_run_config(run_dir)
    dataset = TokenDataset(data_dir or cfg.data.path)
    require(
        dataset.vocab_size == cfg.model.vocab_size,
        f"dataset {dataset.path} has {dataset.vocab_size} tokens but the run's model has {cfg.model.vocab_size}: "
        "evaluate on data made with the run's tokenizer",
    )
    mesh_cfg = inference_mesh(cfg.mesh, cfg.data.batch_size)  # the run's mesh may need more devices than here
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    mesh, rules = make_mesh(mesh_cfg), logical_rules(mesh_cfg)
    step, params = restore_latest_params(run_dir, cfg, mesh, rules)
    batch_sharding = logical_sharding(mesh, rules, ("batch", "length"))
    eval_fn = make_eval_step(cfg, param_shardings(cfg, mesh, rules), batch_sharding)
    n = cfg.train.eval_tokens if max_tokens is None else max_tokens
    batches = eval_batches(dataset, cfg.data.seq_len, cfg.data.batch_size, n, cfg.train.seed, "val",
                           jax.process_index(), jax.process_count())
    with mesh_context(mesh, rules):
        result = evaluate(eval_fn, params, batches, batch_sharding, jnp.asarray(dataset.token_bytes()))
    return {"run_dir": str(run_dir), "step": step, "data": str(dataset.path), **result}


def eval_command(args) -> int:
    """`ar-lm eval RUN_DIR [--data DIR] [--tokens N]`: prints the result as JSON."""
    print(json.dumps(evaluate_run(args.run_dir, args.data, args.tokens)))
    return 0
