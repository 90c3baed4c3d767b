"""Teacher-forced scoring of continuations, batched: log p(continuation | context) and whether greedy
decoding would produce it.

A row is tokens t_0..t_n whose last k tokens are the continuation, left-truncated to the model's
max_seq_len + 1 tokens (the oldest context goes). With f the model,

    logprob = sum_{i > n-k} log softmax(f(t_<i))[t_i],    greedy = all_{i > n-k} t_i == argmax f(t_<i).

Rows are sorted longest first, right-padded (causal: padding after a row changes nothing before it) to
a power-of-two length (at least `MIN_BUCKET`, at most max_seq_len) and scored `batch_size` at a time,
the last batch filled with empty rows, so the scorer compiles once per length bucket.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ar_lm.config import ModelConfig
from ar_lm.errors import require
from ar_lm.model.transformer import apply

MIN_BUCKET = 16


def bucket_len(n: int, max_len: int) -> int:
    """The padded input length of a row of n inputs: the next power of two >= n, in [MIN_BUCKET, max_len]."""
    return min(max_len, max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_batch(cfg: ModelConfig, params, tokens_BxL1, mask_BxL):
    inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
    logits_BxLxV = apply(cfg, params, inputs_BxL)
    logp_BxL = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV, axis=-1), targets_BxL[..., None], axis=-1)[..., 0]
    greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
    return jnp.sum(jnp.where(mask_BxL, logp_BxL, 0.0), axis=1), jnp.all(greedy_BxL | ~mask_BxL, axis=1)


def _check_rows(cfg: ModelConfig, rows) -> list[tuple[np.ndarray, int]]:
    out = []
    for i, (tokens, n_cont) in enumerate(rows):
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        require(0 <= n_cont < tokens.size, f"row {i}: a continuation of {n_cont} tokens needs at least one context "
                                           f"token before it, got {tokens.size} tokens in all")
        require(n_cont <= cfg.max_seq_len, f"row {i}: a continuation of {n_cont} tokens exceeds the model's context "
                                           f"of {cfg.max_seq_len}: score a shorter one")
        require(bool(np.all((tokens >= 0) & (tokens < cfg.vocab_size))),
                f"row {i} has token ids outside [0, {cfg.vocab_size}): encode it with the run's tokenizer")
        out.append((tokens[-(cfg.max_seq_len + 1):], n_cont))
    return out


def score(cfg: ModelConfig, params, rows: Sequence[tuple[Sequence[int], int]], batch_size: int = 16,
          sharding: Optional[jax.sharding.Sharding] = None) -> tuple[np.ndarray, np.ndarray]:
    """(logprob_R float64, greedy_R bool) of rows (tokens, continuation length); `sharding` places each
    [batch, length] input (e.g. batch over the mesh's data axis; call inside its `mesh_context`)."""
    require(batch_size >= 1, f"batch size must be >= 1, got {batch_size}")
    rows = _check_rows(cfg, rows)
    logprob_R, greedy_R = np.zeros(len(rows), np.float64), np.ones(len(rows), bool)
    order = sorted(range(len(rows)), key=lambda r: -rows[r][0].size)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = bucket_len(rows[chunk[0]][0].size - 1, cfg.max_seq_len)
        tokens_BxL1 = np.zeros((batch_size, width + 1), np.int32)
        mask_BxL = np.zeros((batch_size, width), bool)
        for b, r in enumerate(chunk):
            tokens, n_cont = rows[r]
            tokens_BxL1[b, :tokens.size] = tokens
            mask_BxL[b, tokens.size - 1 - n_cont:tokens.size - 1] = True
        inputs = (tokens_BxL1, mask_BxL) if sharding is None else jax.device_put((tokens_BxL1, mask_BxL), sharding)
        lp_B, greedy_B = jax.device_get(_score_batch(cfg, params, *inputs))
        logprob_R[chunk], greedy_R[chunk] = lp_B[:len(chunk)], greedy_B[:len(chunk)]
    return logprob_R, greedy_R
