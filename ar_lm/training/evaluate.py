"""Evaluation: mean loss, perplexity and bits per byte on a fixed set of val batches.

bits/byte = sum of token losses (nats) / (ln 2 * UTF-8 bytes of the evaluated target tokens),
with each token's byte count from its tokenizer, so runs with different tokenizers compare.
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

from ar_lm.config import ExperimentConfig
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.pipeline import eval_batches
from ar_lm.errors import require
from ar_lm.model.backend import cpu_compiler_options
from ar_lm.model.transformer import apply
from ar_lm.parallel.mesh import inference_mesh, logical_rules, logical_sharding, make_mesh, mesh_context
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
            "nll": jnp.sum(nll_BxL),
            "tokens": jnp.asarray(nll_BxL.size, jnp.float32),
            "bytes": jnp.sum(token_bytes_V[targets_BxL]).astype(jnp.float32),
        }

    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding, None),
                   compiler_options=cpu_compiler_options())


def evaluate(eval_fn, params, batches: list[np.ndarray], batch_sharding, token_bytes) -> dict:
    totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    outs = []
    for batch in batches:
        global_batch = jax.make_array_from_process_local_data(batch_sharding, batch)
        outs.append(eval_fn(params, global_batch, token_bytes))
    for out in jax.device_get(outs):
        for k in totals:
            totals[k] += float(out[k])
    loss = totals["nll"] / totals["tokens"]
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": totals["nll"] / (math.log(2) * totals["bytes"]) if totals["bytes"] else float("nan"),
        "eval_tokens": int(totals["tokens"]),
    }


def evaluate_run(run_dir: str | Path, data_dir: Optional[str | Path] = None, max_batches: Optional[int] = None) -> dict:
    """`ar-lm eval`: the latest checkpoint of `run_dir` on the val split of its (or another) dataset."""
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
    n = cfg.train.eval_batches if max_batches is None else max_batches
    batches = eval_batches(dataset, cfg.data.seq_len, cfg.data.batch_size, n, "val", jax.process_index(), jax.process_count())
    with mesh_context(mesh, rules):
        result = evaluate(eval_fn, params, batches, batch_sharding, jnp.asarray(dataset.token_bytes()))
    return {"run_dir": str(run_dir), "step": step, "data": str(dataset.path), **result}


def eval_command(args) -> int:
    """`ar-lm eval RUN_DIR [--data DIR] [--batches N]`: prints the result as JSON."""
    print(json.dumps(evaluate_run(args.run_dir, args.data, args.batches)))
    return 0
