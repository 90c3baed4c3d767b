"""Exposure bias: the true continuation of a window scored after the model's own first K tokens versus after
the true ones (`ar-lm eval RUN --exposure K`).

For a window w_0..w_{L-1} (L = data.seq_len): (a) teacher forcing feeds w_0..w_{L-1}; (b) the model first
generates g_1..g_K greedily from w_0 (g_t = argmax p(. | w_0, g_1..g_{t-1}), K full causal forward passes in
one jitted loop), then is fed w_0, g_1..g_K, w_{K+1}..w_{L-2}. Both score the true targets w_{K+1}..w_{L-1}:
exposure_gap = mean NLL(b) - mean NLL(a) over those (L - 1 - K) positions of every window (nats/token); on a
chat dataset only those targets that carry loss (assistant tokens) are scored, c_w of them in window w.
exposure_gap_se is the ratio estimator's: sqrt(n / (n - 1) * sum_w (d_w - gap * c_w)^2) / sum_w c_w over the n
windows with scored targets, d_w = NLL(b) - NLL(a) summed over window w (paired: both score the same targets);
with equal c_w it is std(per-window gaps) / sqrt(n). K = 0 feeds the same inputs twice, so the gap is exactly 0.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ar_lm.config import ExperimentConfig
from ar_lm.errors import require
from ar_lm.model.backend import cpu_compiler_options
from ar_lm.model.transformer import apply
from ar_lm.parallel.mesh import replicated
from ar_lm.training.step import split_loss_mask, window_segment_ids


def check_exposure(k: int, seq_len: int) -> None:
    require(0 <= k < seq_len - 1,
            f"--exposure must be in [0, data.seq_len - 1 = {seq_len - 1}), got {k}: K true or generated tokens "
            "must leave at least one target of the window to score")


def exposure_budget(k: int, cfg: ExperimentConfig, stride: Optional[int], max_tokens: Optional[int],
                    batches: Optional[int]) -> Optional[int]:
    """`ar-lm eval --exposure K`'s token budget: the given one, else training's (`train.eval_tokens`); K is
    checked first."""
    check_exposure(k, cfg.data.seq_len)
    require(stride is None, "--stride applies to whole-split scoring, not to --exposure: drop --stride")
    return cfg.train.eval_tokens if max_tokens is None and batches is None else max_tokens


def greedy_prefix(cfg: ExperimentConfig, params, inputs_BxL: jax.Array, k: int, eos_id: Optional[int] = None):
    """`inputs_BxL` with positions 1..k replaced by the model's greedy continuation of position 0 (k full
    forward passes: position t only sees positions < t, so the tokens after it do not matter)."""
    def body(t, x_BxL):
        logits_BxLxV = apply(cfg.model, params, x_BxL, segment_ids_BxL=window_segment_ids(cfg, x_BxL, eos_id))
        next_B = jnp.argmax(logits_BxLxV[:, t - 1], axis=-1).astype(x_BxL.dtype)
        return x_BxL.at[:, t].set(next_B)

    return jax.lax.fori_loop(1, k + 1, body, inputs_BxL)


def make_exposure_step(cfg: ExperimentConfig, k: int, param_shardings, batch_sharding, eos_id: Optional[int] = None):
    """The jitted scoring of windows [B, L+1]: per window the summed NLL (nats) of targets w_{k+1}..w_{L-1}
    that carry loss after the true prefix and after the greedy one, and their count."""
    seq_len = cfg.data.seq_len
    check_exposure(k, seq_len)
    scored_L = (jnp.arange(seq_len) >= k) & (jnp.arange(seq_len) < seq_len - 1)  # input positions k..L-2

    def nll_B(params, inputs_BxL, targets_BxL, scored_BxL):
        logits_BxLxV = apply(cfg.model, params, inputs_BxL,
                             segment_ids_BxL=window_segment_ids(cfg, inputs_BxL, eos_id))
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(scored_BxL, nll_BxL, 0.0), axis=1)

    def step(params, batch_BxL1):
        batch_BxL1, loss_BxL = split_loss_mask(batch_BxL1)  # a chat dataset's masked targets score nothing
        scored_BxL = scored_L[None, :] & (loss_BxL > 0)
        inputs_BxL, targets_BxL = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
        own_BxL = greedy_prefix(cfg, params, inputs_BxL, k, eos_id)
        return {"teacher_B": nll_B(params, inputs_BxL, targets_BxL, scored_BxL),
                "own_B": nll_B(params, own_BxL, targets_BxL, scored_BxL), "count_B": jnp.sum(scored_BxL, axis=1)}

    return jax.jit(step, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=replicated(batch_sharding.mesh), compiler_options=cpu_compiler_options())


def exposure(step_fn, params, batches, batch_sharding, k: int) -> dict:
    """Mean NLL per scored token after the true (`exposure_nll_teacher`) and the model's own
    (`exposure_nll_own`) first k tokens over the windows of `batches`, their difference `exposure_gap`."""
    outs = jax.device_get([step_fn(params, jax.make_array_from_process_local_data(batch_sharding, b))
                           for b in batches])
    teacher, own, count = (np.concatenate([np.asarray(o[f"{name}_B"], np.float64) for o in outs])
                           for name in ("teacher", "own", "count"))
    n_tokens = int(count.sum())
    require(n_tokens > 0, f"no target after the first {k} tokens of the {len(count)} windows carries loss: "
            "score more windows (--tokens/--batches) or a smaller --exposure")
    nll_teacher, nll_own = teacher.sum() / n_tokens, own.sum() / n_tokens
    gap = nll_own - nll_teacher
    scored = count > 0
    d, c, n = (own - teacher)[scored], count[scored], int(scored.sum())  # paired: the same targets in both
    se = float(np.sqrt(n / (n - 1) * np.sum((d - gap * c) ** 2)) / c.sum()) if n > 1 else None
    return {"exposure_k": k, "exposure_windows": len(count), "exposure_tokens": n_tokens,
            "exposure_nll_teacher": nll_teacher, "exposure_nll_own": nll_own, "exposure_gap": gap,
            "exposure_gap_se": se}
