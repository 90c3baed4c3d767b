"""Beam search with the GNMT length penalty, EOS handling and an n-best list.

Shapes are in names: B batch, P padded prompt length, N new tokens, S cache slots, W beams, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ar_lm.config import ModelConfig
from ar_lm.decoding.decoder import constrain_cache, for_decoding, pad_id_for, prefill, prepare_prompts
from ar_lm.errors import require
from ar_lm.model.transformer import apply

Array = jax.Array


@dataclasses.dataclass
class BeamResult:
    """n-best lists sorted by score: sequences [B, W, N] (pad after EOS), scores [B, W]
    (log p / GNMT length penalty), token logprobs [B, W, N], lengths [B, W]."""

    sequences: np.ndarray
    scores: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016); score = log p(Y) / lp(Y)."""
    return ((5.0 + length) / 6.0) ** alpha


def _gather(x_BxCx, idx_BxW):
    """x[b, idx[b, j]] for every row b: the entries (beams, candidates) that idx picks per row."""
    return x_BxCx[jnp.arange(x_BxCx.shape[0])[:, None], idx_BxW]


def _update_finished(finished: dict, seq_Bx2WxN, toklp_Bx2WxN, eos_logp_Bx2W, t, alpha) -> dict:
    """The W best of the old finished hypotheses and the candidates ending in EOS at step t (log p, -inf
    for the others), by length-penalised score."""
    b, w = finished["score"].shape
    score_Bx3W = jnp.concatenate([finished["score"], eos_logp_Bx2W / length_penalty(t + 1.0, alpha)], 1)
    fin_score, fsel = jax.lax.top_k(score_Bx3W, w)
    return dict(
        seq=_gather(jnp.concatenate([finished["seq"], seq_Bx2WxN], 1), fsel),
        toklp=_gather(jnp.concatenate([finished["toklp"], toklp_Bx2WxN], 1), fsel), score=fin_score,
        length=_gather(jnp.concatenate([finished["length"], jnp.full((b, 2 * w), t + 1, jnp.int32)], 1), fsel),
    )


def _n_best(finished: dict, alive: dict, t, n: int, alpha):
    """(sequences, scores, token log-probs, lengths) of the W best hypotheses: the finished ones and, when
    the loop ran to max_new_tokens, the live beams too."""
    b, w = finished["score"].shape
    alive_score = jnp.where(t == n, alive["logp"] / length_penalty(float(n), alpha), -jnp.inf)
    scores, sel = jax.lax.top_k(jnp.concatenate([finished["score"], alive_score], 1), w)
    seq, toklp = (_gather(jnp.concatenate([finished[key], alive[key]], 1), sel) for key in ("seq", "toklp"))
    lengths = _gather(jnp.concatenate([finished["length"], jnp.full((b, w), n, jnp.int32)], 1), sel)
    return seq, scores, toklp, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "beams", "max_new_tokens", "eos_id", "pad_id"))
def _beam_search_jit(cfg, params, prompt_BxP, lens_B, alpha, *, beams, max_new_tokens, eos_id, pad_id):
    b, p = prompt_BxP.shape
    w, n, v = beams, max_new_tokens, cfg.vocab_size
    logits_BxV, cache, kv_pos_BxS = prefill(cfg, params, prompt_BxP, lens_B, p + n)
    cache = constrain_cache(jax.tree.map(lambda c: jnp.repeat(c, w, axis=1), cache))  # row b*W + j = beam j
    kv_pos_BWxS = jnp.repeat(kv_pos_BxS, w, axis=0)
    pos_BW = jnp.repeat(lens_B, w)
    rows_Bx1 = jnp.arange(b)[:, None]
    empty_BxWxN = jnp.full((b, w, n), pad_id, jnp.int32)
    zeros_BxWxN = jnp.zeros((b, w, n), jnp.float32)
    alive = dict(seq=empty_BxWxN, toklp=zeros_BxWxN,
                 logp=jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf)[None].repeat(b, 0))  # only beam 0 is live
    finished = dict(seq=empty_BxWxN, toklp=zeros_BxWxN, score=jnp.full((b, w), -jnp.inf),
                    length=jnp.zeros((b, w), jnp.int32))
    logits_BxWxV = jnp.broadcast_to(logits_BxV[:, None], (b, w, v))

    def body(carry):
        t, cache, kv_pos_BWxS, logits_BxWxV, alive, finished = carry
        logp_BxWxV = jax.nn.log_softmax(logits_BxWxV, axis=-1)
        cand_logp_BxWV = (alive["logp"][..., None] + logp_BxWxV).reshape(b, w * v)
        top_logp_Bx2W, idx_Bx2W = jax.lax.top_k(cand_logp_BxWV, 2 * w)  # 2W candidates: W survive any EOS
        origin_Bx2W, tok_Bx2W = idx_Bx2W // v, (idx_Bx2W % v).astype(jnp.int32)
        seq = _gather(alive["seq"], origin_Bx2W).at[:, :, t].set(tok_Bx2W)
        toklp = _gather(alive["toklp"], origin_Bx2W).at[:, :, t].set(_gather(logp_BxWxV.reshape(b, w * v), idx_Bx2W))
        is_eos = tok_Bx2W == eos_id if eos_id is not None else jnp.zeros(tok_Bx2W.shape, bool)

        finished = _update_finished(finished, seq, toklp, jnp.where(is_eos, top_logp_Bx2W, -jnp.inf), t, alpha)
        # alive: the best W candidates not ending in EOS; fetch their parents' caches and feed them
        alive_logp, sel = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top_logp_Bx2W), w)
        alive = dict(seq=_gather(seq, sel), toklp=_gather(toklp, sel), logp=alive_logp)
        parent_BW = (rows_Bx1 * w + _gather(origin_Bx2W, sel)).reshape(-1)
        cache = jax.tree.map(lambda c: jnp.take(c, parent_BW, axis=1), cache)
        kv_pos_BWxS = jax.lax.dynamic_update_slice(kv_pos_BWxS, (pos_BW + t)[:, None], (jnp.int32(0), p + t))
        logits_BWx1xV, cache = apply(
            cfg, params, _gather(tok_Bx2W, sel).reshape(b * w, 1), positions_BxL=(pos_BW + t)[:, None], cache=cache,
            cache_index=p + t, kv_positions_BxS=kv_pos_BWxS,
        )
        return t + 1, constrain_cache(cache), kv_pos_BWxS, logits_BWx1xV.reshape(b, w, v), alive, finished

    def cond(carry):
        t, *_, alive, finished = carry
        # stop once no live beam can beat the W-th finished one: log p only falls and lp(.) grows (alpha >= 0)
        best_possible_B = alive["logp"][:, 0] / length_penalty(float(n), alpha)
        return (t < n) & ~jnp.all(finished["score"][:, -1] >= best_possible_B)

    t, *_, alive, finished = jax.lax.while_loop(
        cond, body, (jnp.int32(0), cache, kv_pos_BWxS, logits_BxWxV, alive, finished))
    return _n_best(finished, alive, t, n, alpha)


def beam_search(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, beams: int, *,
                length_penalty_alpha: float = 0.6, eos_id: Optional[int] = None,
                pad_id: Optional[int] = None) -> BeamResult:
    """Beam search (W beams, 2W candidates per step so that W survive EOS), scored by log p(Y) / lp(Y) with
    the GNMT penalty lp(Y) = ((5 + |Y|) / 6)^alpha, |Y| counting EOS. Returns the W-best list per prompt;
    beams=1 is greedy decoding."""
    prompt_BxP, lens_B = prepare_prompts(cfg, prompts, max_new_tokens)
    require(isinstance(beams, (int, np.integer)) and beams >= 1, f"beams must be a positive integer, got {beams}")
    require(length_penalty_alpha >= 0, f"the length penalty alpha must be >= 0, got {length_penalty_alpha}")
    cfg, params = for_decoding(cfg, params)
    out = _beam_search_jit(cfg, params, prompt_BxP, lens_B, np.float32(length_penalty_alpha), beams=beams,
                           max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id_for(eos_id, pad_id))
    return BeamResult(*jax.device_get(out))
