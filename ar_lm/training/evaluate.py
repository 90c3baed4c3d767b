"""Evaluation: mean loss, its standard error, perplexity, bits per byte and per character on val windows.

Each window scores the targets its weights mark (all of them for training's windows; see
`ar_lm.data.pipeline.strided_batches` for whole-split scoring). With nll the summed token losses (nats):
bits/byte = nll / (ln 2 * UTF-8 bytes of the scored targets), bits/char = nll / (ln 2 * their characters),
each token's counts from its tokenizer, so runs with different tokenizers compare; word perplexity =
exp(nll / words of the split), only when all of it was scored. The standard error of the mean loss over
the k windows with s_i nats on n_i targets is the ratio estimator's,
loss_se = sqrt(sum (s_i - loss * n_i)^2 / (k (k - 1))) / mean(n_i) (std(window losses) / sqrt(k) for equal n_i).
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
from ar_lm.data.media import METRIC_LABELS, modality_metric_name
from ar_lm.data.pipeline import eval_batches, require_split, strided_batches
from ar_lm.errors import require
from ar_lm.model import head
from ar_lm.model.backend import cpu_compiler_options
from ar_lm.model.transformer import apply
from ar_lm.parallel.mesh import inference_mesh, logical_rules, logical_sharding, make_mesh, mesh_context, replicated
from ar_lm.training import rundir
from ar_lm.training.checkpoint import restore_latest_params
from ar_lm.training.exposure import exposure, exposure_budget, make_exposure_step
from ar_lm.training.state import param_shardings
from ar_lm.training.step import split_loss_mask, window_segment_ids


def make_eval_step(cfg: ExperimentConfig, param_shardings, batch_sharding, eos_id: Optional[int] = None):
    """The jitted scoring of val windows; `eos_id` (the dataset's) is needed by `data.document_mask`."""
    def eval_step(params, batch_BxL1, weight_BxL, tables):
        batch_BxL1, loss_BxL = split_loss_mask(batch_BxL1)  # a chat dataset's masked targets score nothing
        weight_BxL = weight_BxL * loss_BxL
        inputs_BxL, targets_BxL = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
        x_BxLxD = apply(cfg.model, params, inputs_BxL, segment_ids_BxL=window_segment_ids(cfg, inputs_BxL, eos_id),
                        hidden=True)
        lse_BxL, target_logit_BxL = head.logit_stats(cfg.model, params, x_BxLxD, targets_BxL)
        nll_BxL = lse_BxL - target_logit_BxL
        nll_BxL = jnp.where(weight_BxL > 0, nll_BxL.astype(jnp.float32), 0.0)  # padding scores nothing
        return {
            "nll_B": jnp.sum(nll_BxL, axis=1),  # one sum per window
            "tokens_B": jnp.sum(weight_BxL, axis=1),
            "bytes": jnp.sum(tables["bytes"][targets_BxL] * weight_BxL),
            "chars": jnp.sum(tables["chars"][targets_BxL] * weight_BxL),
        }

    # replicated outputs: every process reads all windows' sums (B numbers per batch)
    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding, batch_sharding, None),
                   out_shardings=replicated(batch_sharding.mesh), compiler_options=cpu_compiler_options())


def token_tables(dataset: TokenDataset) -> dict:
    """Per-token UTF-8 bytes and characters (the eval step's `tables`)."""
    return {"bytes": jnp.asarray(dataset.token_bytes(), jnp.float32),
            "chars": jnp.asarray(dataset.token_chars(), jnp.float32)}


def evaluate(eval_fn, params, batches, batch_sharding, tables) -> dict:
    """Scores of `batches`: token arrays [B, L+1] (every target scored) or (tokens, weights [B, L]) pairs."""
    outs = []
    for batch in batches:
        tokens, weight = batch if isinstance(batch, tuple) else (batch, np.ones_like(batch[:, 1:], np.float32))
        outs.append(eval_fn(params, jax.make_array_from_process_local_data(batch_sharding, tokens),
                            jax.make_array_from_process_local_data(batch_sharding, weight), tables))
    outs = jax.device_get(outs)
    window_nll = np.concatenate([np.asarray(o["nll_B"], np.float64) for o in outs])
    window_n = np.concatenate([np.asarray(o["tokens_B"], np.float64) for o in outs])
    window_nll, window_n = window_nll[window_n > 0], window_n[window_n > 0]  # padding rows hold no window
    n_bytes, n_chars = sum(float(o["bytes"]) for o in outs), sum(float(o["chars"]) for o in outs)
    nll, tokens, k = float(window_nll.sum()), float(window_n.sum()), len(window_n)
    loss = nll / tokens
    se = math.sqrt(np.sum((window_nll - loss * window_n) ** 2) / (k * (k - 1))) / window_n.mean() if k > 1 else None
    return {
        "loss": loss,
        "loss_se": se,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nll / (math.log(2) * n_bytes) if n_bytes else float("nan"),
        "bits_per_char": nll / (math.log(2) * n_chars) if n_chars else float("nan"),
        "eval_tokens": int(tokens),
    }


def evaluate_run(
    run_dir: str | Path,
    data_dir: Optional[str | Path] = None,
    max_tokens: Optional[int] = None,
    split: str = "val",
    stride: Optional[int] = None,
    batches: Optional[int] = None,
    exposure_k: Optional[int] = None,
) -> dict:
    """`ar-lm eval`: the latest checkpoint of `run_dir` on `split` of its (or another) dataset: the whole split
    in strided windows (`stride`, default data.seq_len; see `strided_batches`), or, given `max_tokens` or
    `batches` (of data.batch_size windows), the seeded subset of whole windows that training evaluates with
    that budget (`eval_window_indices`). `exposure_k`: also the exposure-bias gap after K generated tokens
    on the seeded subset (`ar_lm.training.exposure`; budget train.eval_tokens unless given)."""
    require(max_tokens is None or max_tokens >= 0,
            f"--tokens must be >= 0, got {max_tokens}: use 0 for the whole val split (up to {EVAL_TOKENS_CAP:,})")
    require(batches is None or batches >= 1, f"--batches must be >= 1, got {batches}")
    run_dir = Path(run_dir).absolute()
    cfg = rundir.load_run_config(run_dir)
    seq_len, batch = cfg.data.seq_len, cfg.data.batch_size
    if exposure_k is not None:  # scored on whole windows of the seeded subset
        max_tokens = exposure_budget(exposure_k, cfg, stride, max_tokens, batches)
    whole = max_tokens is None and batches is None
    require(whole or stride is None, "--stride applies to whole-split scoring: drop --tokens/--batches (or use --all)")
    stride = seq_len if stride is None else stride
    require(0 < stride <= seq_len, f"--stride must be in [1, data.seq_len={seq_len}], got {stride}")
    dataset = TokenDataset(data_dir or cfg.data.path)
    require(dataset.vocab_size == cfg.model.vocab_size, f"dataset {dataset.path} has {dataset.vocab_size} tokens but "
            f"the run's model has {cfg.model.vocab_size}: evaluate on data made with the run's tokenizer")
    rundir.check_same_data(run_dir, dataset.path, dataset.identity(), "run", tokenizer_only=True)
    info = require_split(dataset, split)
    pidx, pcount = jax.process_index(), jax.process_count()
    if whole:
        data = strided_batches(dataset, split, seq_len, stride, batch, pidx, pcount)
    else:
        budget = max_tokens if batches is None else batches * batch * seq_len
        data = eval_batches(dataset, seq_len, batch, budget, cfg.data.eval_seed, split, pidx, pcount)
    mesh_cfg = inference_mesh(cfg.mesh, batch)  # the run's mesh may need more devices than here
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    mesh, rules = make_mesh(mesh_cfg), logical_rules(mesh_cfg)
    step, params = restore_latest_params(run_dir, cfg, mesh, rules)
    batch_sharding = logical_sharding(mesh, rules, ("batch", "length"))
    eval_fn = make_eval_step(cfg, param_shardings(cfg, mesh, rules), batch_sharding, dataset.eos_id)
    with mesh_context(mesh, rules):
        result = evaluate(eval_fn, params, data, batch_sharding, token_tables(dataset))
        if exposure_k is not None:
            exposure_fn = make_exposure_step(cfg, exposure_k, param_shardings(cfg, mesh, rules), batch_sharding,
                                             dataset.eos_id)
            result |= exposure(exposure_fn, params, data, batch_sharding, exposure_k)
    out = {k: result[k] for k in ("loss", "perplexity", "bits_per_byte", "bits_per_char")}
    out |= {k: v for k, v in result.items() if k.startswith("exposure_")}
    if name := modality_metric_name(dataset.meta):  # images, audio: one byte per dimension
        out[name] = out["bits_per_byte"]
    if whole and info.get("words"):  # every target scored: the split's words cover its tokens
        out["word_perplexity"] = math.exp(min(result["loss"] * result["eval_tokens"] / info["words"], 700.0))
    return {**out, "stderr": result["loss_se"], "eval_tokens": result["eval_tokens"], "split": split,
            "run_dir": str(run_dir), "step": step, "data": str(dataset.path), "stride": stride if whole else seq_len,
            "whole_split": whole}


def format_result(r: dict) -> str:
    """The short human-readable block `ar-lm eval` prints without --json."""
    scope = f"whole split, stride {r['stride']}" if r["whole_split"] else "seeded subset of windows"
    se = f" ± {r['stderr']:.4f}" if r["stderr"] is not None else ""
    lines = [
        f"run         {r['run_dir']} (step {r['step']})",
        f"data        {r['data']} [{r['split']}]: {scope}, {r['eval_tokens']:,} tokens scored",
        f"loss        {r['loss']:.4f}{se} nats/token (perplexity {r['perplexity']:.3f})",
        f"bits/byte   {r['bits_per_byte']:.4f}",
        f"bits/char   {r['bits_per_char']:.4f}",
    ]
    for name, label in METRIC_LABELS.items():
        if name in r:  # a media dataset: bits per byte is per sub-pixel or sample, and there are no characters
            lines[-1] = f"{label:<11} {r[name]:.4f}"
    if "word_perplexity" in r:
        lines.append(f"word ppl    {r['word_perplexity']:.3f}")
    if "exposure_gap" in r:
        lines.append(f"exposure    K={r['exposure_k']}, {r['exposure_windows']} windows: nll "
                     f"{r['exposure_nll_own']:.4f} after own tokens, {r['exposure_nll_teacher']:.4f} after true: "
                     f"gap {r['exposure_gap']:+.4f}")
    return "\n".join(lines)


def eval_command(args) -> int:
    """`ar-lm eval RUN_DIR [--data DIR] [--split val|test] [--all | --batches N | --tokens T] [--stride S]
    [--exposure K] [--json]`: prints the result (one JSON object with --json)."""
    result = evaluate_run(args.run_dir, args.data, args.tokens, args.split, args.stride, args.batches, args.exposure)
    print(json.dumps(result) if args.json else format_result(result))
    return 0
