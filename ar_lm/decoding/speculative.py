"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): a draft model proposes k tokens, the
target verifies them in one pass, and the output follows the target's distribution exactly.

Shapes are in names: B batch, P padded prompt length, N new tokens, S cache slots, V vocab, K k drafts,
K1 = k + 1. Both caches hold the same tokens in the same slots; rows advance by different amounts, so
each row writes the cache at its own slot.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ar_lm.config import ModelConfig
from ar_lm.decoding.decoder import Generation, for_decoding, pad_id_for, prefill, prepare_prompts, seed_array
from ar_lm.decoding.sampling import GREEDY, Sampling, filter_logits, sample_logits, token_logprob
from ar_lm.errors import require
from ar_lm.model.transformer import apply, init_cache

Array = jax.Array


@flax.struct.dataclass
class SpeculativeState:
    target_cache: dict
    draft_cache: dict
    kv_pos_BxS: Array  # shared: both caches hold the same tokens in the same slots
    slot_B: Array  # slot of pending_B, per row
    pos_B: Array  # position of pending_B
    pending_B: Array  # the last emitted (or last prompt) token, not yet in either cache
    n_gen_B: Array  # tokens emitted so far
    done_B: Array
    tokens_BxN: Array
    logprobs_BxN: Array
    rng: Array
    accepted: Array  # draft tokens accepted, summed over rows and iterations
    proposed: Array  # draft tokens proposed
    passes: Array  # target forward passes


@functools.partial(jax.jit, static_argnames=("target_cfg", "draft_cfg", "max_new_tokens", "k", "pad_id"))
def speculative_start_jit(target_cfg, target_params, draft_cfg, draft_params, prompt_BxP, lens_B, seed, *,
                           max_new_tokens, k, pad_id):
    """Prefill both models with all but the last prompt token, which becomes `pending`."""
    b, p = prompt_BxP.shape
    n, cache_len = max_new_tokens, p + max_new_tokens + k
    if p > 1:
        _, target_cache, kv_pos_BxS = prefill(target_cfg, target_params, prompt_BxP[:, :-1], lens_B - 1, cache_len)
        _, draft_cache, _ = prefill(draft_cfg, draft_params, prompt_BxP[:, :-1], lens_B - 1, cache_len)
    else:
        target_cache = init_cache(target_cfg, b, cache_len)
        draft_cache = init_cache(draft_cfg, b, cache_len)
        kv_pos_BxS = jnp.full((b, cache_len), -1, jnp.int32)
    zero = jnp.int32(0)
    return SpeculativeState(
        target_cache, draft_cache, kv_pos_BxS, jnp.full((b,), p - 1, jnp.int32), lens_B - 1, prompt_BxP[:, -1],
        jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), jnp.full((b, n), pad_id, jnp.int32),
        jnp.zeros((b, n), jnp.float32), jax.random.key(seed), zero, zero, zero,
    )


def _draft(draft_cfg, draft_params, sampling, k, draft_key, st: SpeculativeState):
    """k draft tokens per row from the draft model (k + 1 steps: the last only writes d_k into its cache).
    Returns (draft cache, slot positions, drafts [B, k], the draft's sampling logits [k + 1, B, V])."""
    rows_B = jnp.arange(st.pending_B.shape[0])

    def draft_step(carry, i):
        cache, kv_pos_BxS, tok_B = carry
        kv_pos_BxS = kv_pos_BxS.at[rows_B, st.slot_B + i].set(st.pos_B + i)
        logits_Bx1xV, cache = apply(  # a cache slot per row: rows advance by different amounts
            draft_cfg, draft_params, tok_B[:, None], positions_BxL=(st.pos_B + i)[:, None], cache=cache,
            cache_index=st.slot_B + i, kv_positions_BxS=kv_pos_BxS)
        nxt_B = sample_logits(jax.random.fold_in(draft_key, i), logits_Bx1xV[:, 0], sampling)
        q_logits_BxV = logits_Bx1xV[:, 0] if sampling.greedy else filter_logits(logits_Bx1xV[:, 0], sampling)
        return (cache, kv_pos_BxS, nxt_B), (nxt_B, q_logits_BxV)

    (draft_cache, kv_pos_BxS, _), (drafts_K1xB, q_logits_K1xBxV) = jax.lax.scan(
        draft_step, (st.draft_cache, st.kv_pos_BxS, st.pending_B), jnp.arange(k + 1))
    return draft_cache, kv_pos_BxS, drafts_K1xB[:k].T, q_logits_K1xBxV


def _accept(logits_BxK1xV, drafts_BxK, q_logits_K1xBxV, sampling, accept_key, fix_key):
    """(accepted drafts per row, the token emitted after them): the rejection rule, or the greedy match."""
    b, k = drafts_BxK.shape
    if sampling.greedy:
        best_BxK1 = jnp.argmax(logits_BxK1xV, axis=-1).astype(jnp.int32)
        n_acc_B = jnp.sum(jnp.cumprod(drafts_BxK == best_BxK1[:, :k], axis=1), axis=1)
        fix_B = jnp.take_along_axis(best_BxK1, n_acc_B[:, None], axis=1)[:, 0]
    else:
        p_BxK1xV = jax.nn.softmax(filter_logits(logits_BxK1xV, sampling), axis=-1)
        q_BxKxV = jax.nn.softmax(jnp.swapaxes(q_logits_K1xBxV[:k], 0, 1), axis=-1)
        p_d_BxK = jnp.take_along_axis(p_BxK1xV[:, :k], drafts_BxK[..., None], axis=-1)[..., 0]
        q_d_BxK = jnp.take_along_axis(q_BxKxV, drafts_BxK[..., None], axis=-1)[..., 0]
        accept_BxK = jax.random.uniform(accept_key, (b, k)) * q_d_BxK < p_d_BxK  # u < p/q
        n_acc_B = jnp.sum(jnp.cumprod(accept_BxK, axis=1), axis=1)
        q_BxK1xV = jnp.concatenate([q_BxKxV, jnp.zeros_like(q_BxKxV[:, :1])], axis=1)  # q_{k+1} = 0: bonus ~ p
        p_n_BxV = jnp.take_along_axis(p_BxK1xV, n_acc_B[:, None, None], axis=1)[:, 0]
        q_n_BxV = jnp.take_along_axis(q_BxK1xV, n_acc_B[:, None, None], axis=1)[:, 0]
        resid_BxV = jnp.maximum(p_n_BxV - q_n_BxV, 0.0)
        resid_BxV = jnp.where(jnp.sum(resid_BxV, -1, keepdims=True) > 0, resid_BxV, p_n_BxV)
        fix_B = jax.random.categorical(fix_key, jnp.log(resid_BxV), axis=-1).astype(jnp.int32)
    return n_acc_B, fix_B


def _speculative_iteration(target_cfg, target_params, draft_cfg, draft_params, sampling, k, n, eos_id,
                           st: SpeculativeState) -> SpeculativeState:
    """Draft k tokens, verify them with one target pass over [pending, d_1..d_k], accept a prefix.

    Sampling (Leviathan et al. 2023, Alg. 1): accept d_i while u_i < p_i(d_i) / q_i(d_i); at the first
    rejection draw from norm(max(0, p_i - q_i)); if all k pass, draw a bonus token from p_{k+1}. p and q are
    the target's and draft's sampling distributions (same filters), so tokens follow the target's exactly.
    Greedy: accept while d_i = argmax p_i, then emit argmax p at the first mismatch (= target greedy)."""
    b = st.pending_B.shape[0]
    rows_B, j_K1 = jnp.arange(b), jnp.arange(k + 1)
    rng, draft_key, accept_key, fix_key = jax.random.split(st.rng, 4)

    draft_cache, kv_pos_BxS, drafts_BxK, q_logits_K1xBxV = _draft(draft_cfg, draft_params, sampling, k, draft_key, st)

    chunk_BxK1 = jnp.concatenate([st.pending_B[:, None], drafts_BxK], axis=1)
    pos_BxK1 = st.pos_B[:, None] + j_K1
    logits_BxK1xV, target_cache = apply(
        target_cfg, target_params, chunk_BxK1, positions_BxL=pos_BxK1, cache=st.target_cache, cache_index=st.slot_B,
        kv_positions_BxS=kv_pos_BxS)
    n_acc_B, fix_B = _accept(logits_BxK1xV, drafts_BxK, q_logits_K1xBxV, sampling, accept_key, fix_key)

    # emitted this iteration: d_1..d_n then the fix/bonus token (n + 1 tokens), cut at EOS and at N
    drafts_BxK1 = jnp.concatenate([drafts_BxK, jnp.zeros_like(drafts_BxK[:, :1])], axis=1)
    emitted_BxK1 = jnp.where(j_K1 < n_acc_B[:, None], drafts_BxK1, fix_B[:, None])
    n_emit_B = n_acc_B + 1
    hit_eos_B = jnp.zeros((b,), bool)
    if eos_id is not None:
        is_eos_BxK1 = (emitted_BxK1 == eos_id) & (j_K1 <= n_acc_B[:, None])
        hit_eos_B = jnp.any(is_eos_BxK1, axis=1)
        n_emit_B = jnp.where(hit_eos_B, jnp.argmax(is_eos_BxK1, axis=1) + 1, n_emit_B)
    n_emit_B = jnp.where(st.done_B, 0, jnp.minimum(n_emit_B, n - st.n_gen_B))
    col_BxK1 = jnp.where(j_K1 < n_emit_B[:, None], st.n_gen_B[:, None] + j_K1, n)  # n: dropped
    tokens_BxN = st.tokens_BxN.at[rows_B[:, None], col_BxK1].set(emitted_BxK1, mode="drop")
    logprobs_BxN = st.logprobs_BxN.at[rows_B[:, None], col_BxK1].set(
        token_logprob(logits_BxK1xV, emitted_BxK1), mode="drop")

    # the cache keeps pending and the accepted drafts; the rejected slots are free again
    kv_pos_BxS = kv_pos_BxS.at[rows_B[:, None], st.slot_B[:, None] + j_K1].set(
        jnp.where(j_K1 <= n_acc_B[:, None], pos_BxK1, -1))
    active_B = ~st.done_B
    advance_B = jnp.where(active_B, n_acc_B + 1, 0)
    n_gen_B = st.n_gen_B + n_emit_B
    return SpeculativeState(
        target_cache, draft_cache, kv_pos_BxS, st.slot_B + advance_B, st.pos_B + advance_B, fix_B, n_gen_B,
        st.done_B | hit_eos_B | (n_gen_B >= n), tokens_BxN, logprobs_BxN, rng,
        st.accepted + jnp.sum(jnp.where(active_B, n_acc_B, 0)), st.proposed + k * jnp.sum(active_B), st.passes + 1,
    )


@functools.partial(jax.jit, static_argnames=("target_cfg", "draft_cfg", "k", "max_new_tokens", "eos_id"),
                   donate_argnames=("state",))
def speculative_loop_jit(target_cfg, target_params, draft_cfg, draft_params, state, sampling, max_iters, *, k,
                          max_new_tokens, eos_id):
    """Up to `max_iters` (traced) iterations, stopping once every row is done."""
    iteration = functools.partial(_speculative_iteration, target_cfg, target_params, draft_cfg, draft_params,
                                  sampling, k, max_new_tokens, eos_id)
    _, state = jax.lax.while_loop(lambda c: (c[0] < max_iters) & ~jnp.all(c[1].done_B),
                                  lambda c: (c[0] + 1, iteration(c[1])), (jnp.int32(0), state))
    return state


def check_draft(target_cfg: ModelConfig, draft_cfg: ModelConfig, k: int) -> None:
    require(draft_cfg.vocab_size == target_cfg.vocab_size,
            f"the draft model has a vocabulary of {draft_cfg.vocab_size} tokens but the target has "
            f"{target_cfg.vocab_size}: use a draft trained with the same tokenizer")
    require(isinstance(k, (int, np.integer)) and k >= 1, f"draft tokens per step must be >= 1, got {k}")


def speculative_generate(target_cfg: ModelConfig, target_params, draft_cfg: ModelConfig, draft_params,
                         prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = GREEDY, *,
                         draft_tokens: int = 4, seed: int = 0, eos_id: Optional[int] = None,
                         pad_id: Optional[int] = None) -> Generation:
    """Speculative decoding: same outputs in distribution as `generate` with the target (identical when
    greedy), with up to draft_tokens + 1 tokens per target pass. Reports the acceptance rate."""
    check_draft(target_cfg, draft_cfg, draft_tokens)
    prompt_BxP, lens_B = prepare_prompts(target_cfg, prompts, max_new_tokens)
    sampling.check_vocab(target_cfg.vocab_size)
    target_cfg, target_params = for_decoding(target_cfg, target_params)
    draft_cfg, draft_params = for_decoding(draft_cfg, draft_params)
    state = speculative_start_jit(target_cfg, target_params, draft_cfg, draft_params, prompt_BxP, lens_B,
                                   seed_array(seed), max_new_tokens=max_new_tokens, k=draft_tokens,
                                   pad_id=pad_id_for(eos_id, pad_id))
    state = speculative_loop_jit(target_cfg, target_params, draft_cfg, draft_params, state, sampling,
                                  np.int32(max_new_tokens), k=draft_tokens, max_new_tokens=max_new_tokens,
                                  eos_id=eos_id)
    tokens, logprobs, lengths, accepted, proposed, passes = jax.device_get(
        (state.tokens_BxN, state.logprobs_BxN, state.n_gen_B, state.accepted, state.proposed, state.passes))
    return Generation(tokens, logprobs, lengths, float(accepted) / max(int(proposed), 1), int(passes))
