"""Decoding with a KV cache: prefill, jitted scan/while loops, samplers, beam search, speculative decoding.

Shapes are in names as in `ar_lm.model`: B batch, P padded prompt length, N new tokens, S cache slots,
W beams, V vocab, k draft tokens.

Prompts of different lengths share one batch by LEFT padding: row b's prompt fills the last len_b of the
P prompt slots with positions 0..len_b-1 and the padding slots hold position -1 (never attended to), so
every row writes its next token to the same cache slot and gets exactly what it gets alone.

- `generate`: prefill (one forward pass over the prompts into a cache of P + N - 1 slots), then
  `lax.scan` over N - 1 one-token steps (or `lax.while_loop` that stops once every row has emitted EOS),
  all in one jitted program. The cache is a loop carry that each layer updates in place; every step
  attends over all S slots (masked by slot position), so its cost depends on S, not on the position.
  Sampler values (temperature, top-k, ...) and the seed are traced: new values with the same shapes and
  the same set of enabled filters do not recompile.
- `stream`: the same decoder in fixed-size jitted chunks, yielding tokens as they are produced.
- `beam_search`: beam search with the GNMT length penalty, EOS handling and an n-best list.
- `speculative_generate`: a draft model proposes k tokens, the target verifies them in one pass
  (Leviathan et al. 2023, Chen et al. 2023); the output follows the target's distribution exactly.

Returned log-probabilities are the model's own: log softmax of the unfiltered logits at temperature 1
(what teacher-forced scoring of the generated sequence gives), whatever sampler picked the token.

Sharding: call inside `ar_lm.train.mesh_context(mesh, rules)` with parameters placed by
`ar_lm.train.param_shardings`; the cache is constrained to `model.CACHE_AXES` (batch over data,
kv heads over tensor) and activations follow the model's own logical constraints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ar_lm import model as model_lib
from ar_lm.config import ModelConfig
from ar_lm.errors import require

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Samplers


@flax.struct.dataclass
class Sampling:
    """How the next token is chosen. Values are traced leaves; which filters are on is static.

    Build with `Sampling.create`; `temperature=0` is greedy (argmax).
    """

    temperature: Array
    top_k: Array
    top_p: Array
    min_p: Array
    greedy: bool = flax.struct.field(pytree_node=False)
    use_top_k: bool = flax.struct.field(pytree_node=False)
    use_top_p: bool = flax.struct.field(pytree_node=False)
    use_min_p: bool = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0, min_p: float = 0.0):
        """Validate and build. top_k None = off; top_p 1 = off; min_p 0 = off (filters compose in this order)."""
        require(temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}")
        require(top_k is None or top_k > 0,
                f"top-k must be a positive number of tokens, got {top_k}: leave it out to disable")
        require(0 < top_p <= 1, f"top-p must lie in (0, 1], got {top_p}: 1 disables it")
        require(0 <= min_p <= 1, f"min-p must lie in [0, 1], got {min_p}: 0 disables it")
        greedy = temperature == 0
        return cls(
            np.float32(temperature), np.int32(top_k or 0), np.float32(top_p), np.float32(min_p), greedy=greedy,
            use_top_k=not greedy and top_k is not None, use_top_p=not greedy and top_p < 1,
            use_min_p=not greedy and min_p > 0,
        )

    def check_vocab(self, vocab_size: int) -> None:
        require(not self.use_top_k or int(self.top_k) <= vocab_size,
                f"top-k {int(self.top_k)} exceeds the vocabulary of {vocab_size} tokens: use at most {vocab_size}")


GREEDY = Sampling.create(temperature=0.0)


def filter_logits(logits_xV: Array, s: Sampling) -> Array:
    """Logits of the sampling distribution, -inf outside its support; filters act in turn, each on the
    renormalised result of the previous one:

    temperature: logits / T;  top-k: the k largest;  top-p (Holtzman et al. 2020): the smallest prefix of
    the sorted distribution with mass >= p;  min-p (Nguyen et al. 2024): p_i >= min_p * max_j p_j.
    """
    logits_xV = logits_xV / s.temperature
    if s.use_top_k or s.use_top_p:
        sorted_xV = -jnp.sort(-logits_xV, axis=-1)
        keep_xV = jnp.ones(sorted_xV.shape, bool)
        if s.use_top_k:
            keep_xV = keep_xV & (jnp.arange(sorted_xV.shape[-1]) < s.top_k)
        if s.use_top_p:
            probs_xV = jax.nn.softmax(jnp.where(keep_xV, sorted_xV, -jnp.inf), axis=-1)
            mass_before_xV = jnp.cumsum(probs_xV, axis=-1) - probs_xV
            keep_xV = keep_xV & (mass_before_xV < s.top_p)
        n_keep_x = jnp.sum(keep_xV, axis=-1, keepdims=True)  # the kept tokens are a prefix of the sort
        threshold_x = jnp.take_along_axis(sorted_xV, n_keep_x - 1, axis=-1)
        logits_xV = jnp.where(logits_xV >= threshold_x, logits_xV, -jnp.inf)
    if s.use_min_p:  # p_i >= min_p * p_max  <=>  logit_i >= max logit + log(min_p)
        floor_x = jnp.max(logits_xV, axis=-1, keepdims=True) + jnp.log(s.min_p)
        logits_xV = jnp.where(logits_xV >= floor_x, logits_xV, -jnp.inf)
    return logits_xV


def sample_logits(rng: Array, logits_xV: Array, s: Sampling) -> Array:
    """One token per row: argmax when greedy, else a draw from softmax(filter_logits(...))."""
    if s.greedy:
        return jnp.argmax(logits_xV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits_xV, s), axis=-1).astype(jnp.int32)


def _token_logprob(logits_xV: Array, token_x: Array) -> Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits_xV, axis=-1), token_x[..., None], axis=-1)[..., 0]


# ---------------------------------------------------------------------------------------------
# Prompts, results


@dataclasses.dataclass
class Generation:
    """tokens [B, N] (pad after EOS), logprobs [B, N] (model log-probs, 0 after EOS), lengths [B]
    (tokens up to and including EOS). Speculative decoding adds the acceptance rate (accepted / proposed
    draft tokens) and the number of target forward passes."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    acceptance_rate: Optional[float] = None
    target_passes: Optional[int] = None


@dataclasses.dataclass
class BeamResult:
    """n-best lists sorted by score: sequences [B, W, N] (pad after EOS), scores [B, W]
    (log p / GNMT length penalty), token logprobs [B, W, N], lengths [B, W]."""

    sequences: np.ndarray
    scores: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray


def prepare_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    """Left-pad token-id prompts into (prompt_BxP int32, lens_B int32), checking them against the context."""
    require(isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens > 0,
            f"max-new-tokens must be a positive integer, got {max_new_tokens}")
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    require(len(rows) > 0, "no prompts given: pass at least one prompt")
    ctx, vocab = cfg.max_seq_len, cfg.vocab_size
    for i, row in enumerate(rows):
        require(row.size > 0, f"prompt {i} is empty: give at least one token (e.g. the EOS id as document start)")
        require(bool(np.all((row >= 0) & (row < vocab))),
                f"prompt {i} has token ids outside [0, {vocab}): encode it with the run's tokenizer")
    longest = max(row.size for row in rows)
    require(longest < ctx, f"prompt has {longest} tokens but the model's context is {ctx}: "
                           f"shorten the prompt to at most {ctx - 1} tokens")
    require(longest + max_new_tokens <= ctx,
            f"prompt ({longest} tokens) + max-new-tokens ({max_new_tokens}) exceeds the model's context of {ctx} "
            f"tokens: ask for at most {ctx - longest} new tokens")
    prompt_BxP = np.zeros((len(rows), longest), np.int32)
    for i, row in enumerate(rows):
        prompt_BxP[i, longest - row.size:] = row
    return prompt_BxP, np.asarray([row.size for row in rows], np.int32)


def _pad_id(eos_id: Optional[int], pad_id: Optional[int]) -> int:
    return pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)


def _seed(seed: int) -> np.ndarray:
    return np.uint32(seed % (1 << 32))


def _lengths(tokens_xN: Array, eos_id: Optional[int]) -> Array:
    n = tokens_xN.shape[-1]
    if eos_id is None:
        return jnp.full(tokens_xN.shape[:-1], n, jnp.int32)
    is_eos = tokens_xN == eos_id
    return jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1) + 1, n).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Prefill and one decode step


def _constrain_cache(cache):
    return jax.tree.map(lambda c: nn.with_logical_constraint(c, model_lib.CACHE_AXES), cache)


def _prefill(cfg: ModelConfig, params, prompt_BxP: Array, lens_B: Array, cache_len: int):
    """One forward pass over the left-padded prompts into a fresh cache of `cache_len` slots.

    Returns (logits_BxV at each row's last prompt token, cache, kv_pos_BxS)."""
    b, p = prompt_BxP.shape
    pos_BxP = jnp.arange(p, dtype=jnp.int32)[None, :] - (p - lens_B)[:, None]  # < 0 on padding
    kv_pos_BxS = jnp.full((b, cache_len), -1, jnp.int32).at[:, :p].set(jnp.where(pos_BxP >= 0, pos_BxP, -1))
    kv_pos_BxS = nn.with_logical_constraint(kv_pos_BxS, ("batch", None))
    cache = _constrain_cache(model_lib.init_cache(cfg, b, cache_len))
    prompt_BxP = nn.with_logical_constraint(prompt_BxP, ("batch", "length"))
    logits_BxPxV, cache = model_lib.apply(
        cfg, params, prompt_BxP, positions_BxL=jnp.maximum(pos_BxP, 0), cache=cache, cache_index=0,
        kv_positions_BxS=kv_pos_BxS,
    )
    return logits_BxPxV[:, -1], _constrain_cache(cache), kv_pos_BxS


def for_decoding(cfg: ModelConfig, params):
    """(cfg, params) as the decoder runs them. On CPU the layers run unrolled: in a layer scan XLA:CPU copies
    each stacked weight slice before multiplying by it (about 1.7x slower per token at batch 1). Same weights,
    unstacked outside the jit; every entry point does this per call (a copy of the weights), so a serving
    loop converts once and passes the result."""
    if not cfg.scan_layers or jax.default_backend() != "cpu":
        return cfg, params
    return dataclasses.replace(cfg, scan_layers=False), _unstack_layers(params, n_layers=cfg.n_layers)


@functools.partial(jax.jit, static_argnames="n_layers")
def _unstack_layers(params, n_layers: int):
    """{"layers": stacked} -> {"layer_0": ..., "layer_1": ...}: the parameters of `scan_layers=False`."""
    params = dict(params)
    stacked = params.pop("layers")
    return params | {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n_layers)}


@flax.struct.dataclass
class DecodeState:
    """Everything the decoder carries between steps (and between streamed chunks)."""

    cache: dict  # {"k", "v"}: [n_layers, B, K, S, Dh]
    kv_pos_BxS: Array  # position held by each cache slot, -1 = empty or padding
    slot: Array  # cache slot that token_B goes to (the same for every row)
    pos_B: Array  # position of token_B
    token_B: Array  # the last emitted token, not yet in the cache
    done_B: Array  # the row has emitted EOS
    rng: Array


def _start(cfg, params, prompt_BxP, lens_B, sampling, seed, cache_len, eos_id):
    """Prefill, then choose the first new token. Returns (state, token_B, logprob_B)."""
    logits_BxV, cache, kv_pos_BxS = _prefill(cfg, params, prompt_BxP, lens_B, cache_len)
    rng, key = jax.random.split(jax.random.key(seed))
    token_B = sample_logits(key, logits_BxV, sampling)
    done_B = token_B == eos_id if eos_id is not None else jnp.zeros(token_B.shape, bool)
    state = DecodeState(cache, kv_pos_BxS, jnp.int32(prompt_BxP.shape[1]), lens_B, token_B, done_B, rng)
    return state, token_B, _token_logprob(logits_BxV, token_B)


def _step(cfg, params, sampling, eos_id, pad_id, state: DecodeState):
    """Feed token_B at `slot` (attention over valid slots only), choose the next token; rows that have
    emitted EOS get pad_id and log-prob 0."""
    kv_pos_BxS = jax.lax.dynamic_update_slice(state.kv_pos_BxS, state.pos_B[:, None], (jnp.int32(0), state.slot))
    logits_Bx1xV, cache = model_lib.apply(
        cfg, params, state.token_B[:, None], positions_BxL=state.pos_B[:, None], cache=state.cache,
        cache_index=state.slot, kv_positions_BxS=kv_pos_BxS,
    )
    rng, key = jax.random.split(state.rng)
    token_B = sample_logits(key, logits_Bx1xV[:, 0], sampling)
    logprob_B = _token_logprob(logits_Bx1xV[:, 0], token_B)
    done_B = state.done_B
    if eos_id is not None:
        token_B = jnp.where(done_B, pad_id, token_B)
        logprob_B = jnp.where(done_B, 0.0, logprob_B)
        done_B = done_B | (token_B == eos_id)
    state = DecodeState(_constrain_cache(cache), kv_pos_BxS, state.slot + 1, state.pos_B + 1, token_B, done_B, rng)
    return state, (token_B, logprob_B)


# ---------------------------------------------------------------------------------------------
# Sampling / greedy decoding


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_id", "pad_id", "loop"))
def _generate_jit(cfg, params, prompt_BxP, lens_B, sampling, seed, *, max_new_tokens, eos_id, pad_id, loop):
    n = max_new_tokens
    state, token_B, logprob_B = _start(cfg, params, prompt_BxP, lens_B, sampling, seed,
                                       prompt_BxP.shape[1] + n - 1, eos_id)
    step = functools.partial(_step, cfg, params, sampling, eos_id, pad_id)
    if loop == "scan":
        _, (tokens_NxB, logprobs_NxB) = jax.lax.scan(lambda st, _: step(st), state, length=n - 1)
        tokens_BxN = jnp.concatenate([token_B[:, None], tokens_NxB.T], axis=1)
        logprobs_BxN = jnp.concatenate([logprob_B[:, None], logprobs_NxB.T], axis=1)
    else:  # while: stop as soon as every row has emitted EOS
        b = token_B.shape[0]
        tokens_BxN = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(token_B)
        logprobs_BxN = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logprob_B)

        def body(carry):
            t, st, toks, lps = carry
            st, (tok_B, lp_B) = step(st)
            return t + 1, st, toks.at[:, t].set(tok_B), lps.at[:, t].set(lp_B)

        def cond(carry):
            return (carry[0] < n) & ~jnp.all(carry[1].done_B)

        _, _, tokens_BxN, logprobs_BxN = jax.lax.while_loop(cond, body, (jnp.int32(1), state, tokens_BxN, logprobs_BxN))
    return tokens_BxN, logprobs_BxN, _lengths(tokens_BxN, eos_id)


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = GREEDY, *, seed: int = 0, eos_id: Optional[int] = None,
             pad_id: Optional[int] = None, loop: Optional[str] = None) -> Generation:
    """Generate `max_new_tokens` per prompt (token-id lists of any lengths) in one jitted program.

    loop: "scan" (fixed N steps) or "while" (stops once every row has emitted EOS); default while when
    `eos_id` is given. After EOS a row holds `pad_id` (default: eos_id, else 0)."""
    prompt_BxP, lens_B = prepare_prompts(cfg, prompts, max_new_tokens)
    sampling.check_vocab(cfg.vocab_size)
    loop = loop or ("while" if eos_id is not None else "scan")
    require(loop in ("scan", "while"), f"loop must be 'scan' or 'while', got {loop!r}")
    cfg, params = for_decoding(cfg, params)
    out = _generate_jit(cfg, params, prompt_BxP, lens_B, sampling, _seed(seed), max_new_tokens=max_new_tokens,
                        eos_id=eos_id, pad_id=_pad_id(eos_id, pad_id), loop=loop)
    return Generation(*jax.device_get(out))


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "eos_id"))
def _start_jit(cfg, params, prompt_BxP, lens_B, sampling, seed, *, cache_len, eos_id):
    return _start(cfg, params, prompt_BxP, lens_B, sampling, seed, cache_len, eos_id)


@functools.partial(jax.jit, static_argnames=("cfg", "n_steps", "eos_id", "pad_id"), donate_argnames=("state",))
def _decode_chunk_jit(cfg, params, state, sampling, *, n_steps, eos_id, pad_id):
    step = functools.partial(_step, cfg, params, sampling, eos_id, pad_id)
    state, (tokens_NxB, logprobs_NxB) = jax.lax.scan(lambda st, _: step(st), state, length=n_steps)
    return state, tokens_NxB.T, logprobs_NxB.T


# ---------------------------------------------------------------------------------------------
# Beam search


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT length penalty lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016); score = log p(Y) / lp(Y)."""
    return ((5.0 + length) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("cfg", "beams", "max_new_tokens", "eos_id", "pad_id"))
def _beam_search_jit(cfg, params, prompt_BxP, lens_B, alpha, *, beams, max_new_tokens, eos_id, pad_id):
    b, p = prompt_BxP.shape
    w, n, v = beams, max_new_tokens, cfg.vocab_size
    logits_BxV, cache, kv_pos_BxS = _prefill(cfg, params, prompt_BxP, lens_B, p + n)
    cache = _constrain_cache(jax.tree.map(lambda c: jnp.repeat(c, w, axis=1), cache))  # row b*W + j = beam j
    kv_pos_BWxS = jnp.repeat(kv_pos_BxS, w, axis=0)
    pos_BW = jnp.repeat(lens_B, w)
    rows_Bx1 = jnp.arange(b)[:, None]

    def gather(x_BxCx, idx_BxW):
        return x_BxCx[rows_Bx1, idx_BxW]

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
        seq = gather(alive["seq"], origin_Bx2W).at[:, :, t].set(tok_Bx2W)
        toklp = gather(alive["toklp"], origin_Bx2W).at[:, :, t].set(gather(logp_BxWxV.reshape(b, w * v), idx_Bx2W))
        is_eos = tok_Bx2W == eos_id if eos_id is not None else jnp.zeros(tok_Bx2W.shape, bool)

        # finished: the old n-best and the candidates ending in EOS, by length-penalised score
        score_Bx3W = jnp.concatenate(
            [finished["score"], jnp.where(is_eos, top_logp_Bx2W / length_penalty(t + 1.0, alpha), -jnp.inf)], 1)
        fin_score, fsel = jax.lax.top_k(score_Bx3W, w)
        finished = dict(
            seq=gather(jnp.concatenate([finished["seq"], seq], 1), fsel),
            toklp=gather(jnp.concatenate([finished["toklp"], toklp], 1), fsel), score=fin_score,
            length=gather(jnp.concatenate([finished["length"], jnp.full((b, 2 * w), t + 1, jnp.int32)], 1), fsel),
        )
        # alive: the best W candidates not ending in EOS; fetch their parents' caches and feed them
        alive_logp, sel = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top_logp_Bx2W), w)
        alive = dict(seq=gather(seq, sel), toklp=gather(toklp, sel), logp=alive_logp)
        parent_BW = (rows_Bx1 * w + gather(origin_Bx2W, sel)).reshape(-1)
        cache = jax.tree.map(lambda c: jnp.take(c, parent_BW, axis=1), cache)
        kv_pos_BWxS = jax.lax.dynamic_update_slice(kv_pos_BWxS, (pos_BW + t)[:, None], (jnp.int32(0), p + t))
        logits_BWx1xV, cache = model_lib.apply(
            cfg, params, gather(tok_Bx2W, sel).reshape(b * w, 1), positions_BxL=(pos_BW + t)[:, None], cache=cache,
            cache_index=p + t, kv_positions_BxS=kv_pos_BWxS,
        )
        return t + 1, _constrain_cache(cache), kv_pos_BWxS, logits_BWx1xV.reshape(b, w, v), alive, finished

    def cond(carry):
        t, *_, alive, finished = carry
        # stop once no live beam can beat the W-th finished one: log p only falls and lp(.) grows (alpha >= 0)
        best_possible_B = alive["logp"][:, 0] / length_penalty(float(n), alpha)
        return (t < n) & ~jnp.all(finished["score"][:, -1] >= best_possible_B)

    t, *_, alive, finished = jax.lax.while_loop(
        cond, body, (jnp.int32(0), cache, kv_pos_BWxS, logits_BxWxV, alive, finished))
    # beams that reached max_new_tokens without EOS are hypotheses too
    alive_score = jnp.where(t == n, alive["logp"] / length_penalty(float(n), alpha), -jnp.inf)
    scores, sel = jax.lax.top_k(jnp.concatenate([finished["score"], alive_score], 1), w)
    both = lambda key: gather(jnp.concatenate([finished[key], alive[key]], 1), sel)  # noqa: E731
    lengths = gather(jnp.concatenate([finished["length"], jnp.full((b, w), n, jnp.int32)], 1), sel)
    return both("seq"), scores, both("toklp"), lengths


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
                           max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=_pad_id(eos_id, pad_id))
    return BeamResult(*jax.device_get(out))


# ---------------------------------------------------------------------------------------------
# Speculative decoding


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
def _speculative_start_jit(target_cfg, target_params, draft_cfg, draft_params, prompt_BxP, lens_B, seed, *,
                           max_new_tokens, k, pad_id):
    """Prefill both models with all but the last prompt token, which becomes `pending`."""
    b, p = prompt_BxP.shape
    n, cache_len = max_new_tokens, p + max_new_tokens + k
    if p > 1:
        _, target_cache, kv_pos_BxS = _prefill(target_cfg, target_params, prompt_BxP[:, :-1], lens_B - 1, cache_len)
        _, draft_cache, _ = _prefill(draft_cfg, draft_params, prompt_BxP[:, :-1], lens_B - 1, cache_len)
    else:
        target_cache = model_lib.init_cache(target_cfg, b, cache_len)
        draft_cache = model_lib.init_cache(draft_cfg, b, cache_len)
        kv_pos_BxS = jnp.full((b, cache_len), -1, jnp.int32)
    zero = jnp.int32(0)
    return SpeculativeState(
        target_cache, draft_cache, kv_pos_BxS, jnp.full((b,), p - 1, jnp.int32), lens_B - 1, prompt_BxP[:, -1],
        jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), jnp.full((b, n), pad_id, jnp.int32),
        jnp.zeros((b, n), jnp.float32), jax.random.key(seed), zero, zero, zero,
    )


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

    def draft_step(carry, i):  # k + 1 steps: the last only writes d_k into the draft cache
        cache, kv_pos_BxS, tok_B = carry
        kv_pos_BxS = kv_pos_BxS.at[rows_B, st.slot_B + i].set(st.pos_B + i)
        logits_Bx1xV, cache = model_lib.apply(  # a cache slot per row: rows advance by different amounts
            draft_cfg, draft_params, tok_B[:, None], positions_BxL=(st.pos_B + i)[:, None], cache=cache,
            cache_index=st.slot_B + i, kv_positions_BxS=kv_pos_BxS)
        nxt_B = sample_logits(jax.random.fold_in(draft_key, i), logits_Bx1xV[:, 0], sampling)
        q_logits_BxV = logits_Bx1xV[:, 0] if sampling.greedy else filter_logits(logits_Bx1xV[:, 0], sampling)
        return (cache, kv_pos_BxS, nxt_B), (nxt_B, q_logits_BxV)

    (draft_cache, kv_pos_BxS, _), (drafts_K1xB, q_logits_K1xBxV) = jax.lax.scan(
        draft_step, (st.draft_cache, st.kv_pos_BxS, st.pending_B), jnp.arange(k + 1))
    drafts_BxK = drafts_K1xB[:k].T

    chunk_BxK1 = jnp.concatenate([st.pending_B[:, None], drafts_BxK], axis=1)
    pos_BxK1 = st.pos_B[:, None] + j_K1
    logits_BxK1xV, target_cache = model_lib.apply(
        target_cfg, target_params, chunk_BxK1, positions_BxL=pos_BxK1, cache=st.target_cache, cache_index=st.slot_B,
        kv_positions_BxS=kv_pos_BxS)
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
        _token_logprob(logits_BxK1xV, emitted_BxK1), mode="drop")

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
def _speculative_loop_jit(target_cfg, target_params, draft_cfg, draft_params, state, sampling, max_iters, *, k,
                          max_new_tokens, eos_id):
    """Up to `max_iters` (traced) iterations, stopping once every row is done."""
    iteration = functools.partial(_speculative_iteration, target_cfg, target_params, draft_cfg, draft_params,
                                  sampling, k, max_new_tokens, eos_id)
    _, state = jax.lax.while_loop(lambda c: (c[0] < max_iters) & ~jnp.all(c[1].done_B),
                                  lambda c: (c[0] + 1, iteration(c[1])), (jnp.int32(0), state))
    return state


def _check_draft(target_cfg: ModelConfig, draft_cfg: ModelConfig, k: int) -> None:
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
    _check_draft(target_cfg, draft_cfg, draft_tokens)
    prompt_BxP, lens_B = prepare_prompts(target_cfg, prompts, max_new_tokens)
    sampling.check_vocab(target_cfg.vocab_size)
    target_cfg, target_params = for_decoding(target_cfg, target_params)
    draft_cfg, draft_params = for_decoding(draft_cfg, draft_params)
    state = _speculative_start_jit(target_cfg, target_params, draft_cfg, draft_params, prompt_BxP, lens_B,
                                   _seed(seed), max_new_tokens=max_new_tokens, k=draft_tokens,
                                   pad_id=_pad_id(eos_id, pad_id))
    state = _speculative_loop_jit(target_cfg, target_params, draft_cfg, draft_params, state, sampling,
                                  np.int32(max_new_tokens), k=draft_tokens, max_new_tokens=max_new_tokens,
                                  eos_id=eos_id)
    tokens, logprobs, lengths, accepted, proposed, passes = jax.device_get(
        (state.tokens_BxN, state.logprobs_BxN, state.n_gen_B, state.accepted, state.proposed, state.passes))
    return Generation(tokens, logprobs, lengths, float(accepted) / max(int(proposed), 1), int(passes))


# ---------------------------------------------------------------------------------------------
# Streaming


def stream(cfg: ModelConfig, params, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling = GREEDY, *,
           seed: int = 0, eos_id: Optional[int] = None, chunk: int = 16, draft=None,
           draft_tokens: int = 4, stats: Optional[dict] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens, logprobs) of one prompt's new tokens as they are produced, decoding in jitted chunks
    of `chunk` steps (speculative: chunk // (draft_tokens + 1) iterations); ends after EOS or N tokens.

    The concatenation equals `generate` (or `speculative_generate` with draft=(draft_cfg, draft_params))
    for the same arguments. `stats`, if given, receives the acceptance rate and target passes."""
    require(chunk >= 1, f"chunk must be >= 1, got {chunk}")
    prompt_1xP, lens_1 = prepare_prompts(cfg, [prompt], max_new_tokens)
    sampling.check_vocab(cfg.vocab_size)
    n, pad_id = max_new_tokens, _pad_id(eos_id, None)
    cfg, params = for_decoding(cfg, params)
    if draft is not None:
        _check_draft(cfg, draft[0], draft_tokens)
        draft_cfg, draft_params = for_decoding(*draft)
        state = _speculative_start_jit(cfg, params, draft_cfg, draft_params, prompt_1xP, lens_1, _seed(seed),
                                       max_new_tokens=n, k=draft_tokens, pad_id=pad_id)
        emitted, iters = 0, np.int32(max(1, chunk // (draft_tokens + 1)))
        while emitted < n:
            state = _speculative_loop_jit(cfg, params, draft_cfg, draft_params, state, sampling, iters,
                                          k=draft_tokens, max_new_tokens=n, eos_id=eos_id)
            n_gen_1, done_1, tokens_1xN, logprobs_1xN, accepted, proposed, passes = jax.device_get(
                (state.n_gen_B, state.done_B, state.tokens_BxN, state.logprobs_BxN, state.accepted, state.proposed,
                 state.passes))
            if stats is not None:
                stats.update(acceptance_rate=float(accepted) / max(int(proposed), 1), target_passes=int(passes))
            yield tokens_1xN[0, emitted : n_gen_1[0]], logprobs_1xN[0, emitted : n_gen_1[0]]
            emitted = int(n_gen_1[0])
            if done_1[0]:
                return
        return
    steps = -(-(n - 1) // chunk) * chunk  # whole chunks; the cache has room for all of them
    state, token_1, logprob_1 = _start_jit(cfg, params, prompt_1xP, lens_1, sampling, _seed(seed),
                                           cache_len=prompt_1xP.shape[1] + steps, eos_id=eos_id)
    tokens, logprobs = jax.device_get((token_1, logprob_1))
    emitted = 1
    yield tokens, logprobs
    while emitted < n and not (eos_id is not None and tokens[-1] == eos_id):
        state, tokens_1xC, logprobs_1xC = _decode_chunk_jit(cfg, params, state, sampling, n_steps=chunk,
                                                            eos_id=eos_id, pad_id=pad_id)
        tokens_1xC, logprobs_1xC = jax.device_get((tokens_1xC, logprobs_1xC))
        tokens, logprobs = tokens_1xC[0, : n - emitted], logprobs_1xC[0, : n - emitted]
        if eos_id is not None and np.any(tokens == eos_id):
            cut = int(np.argmax(tokens == eos_id)) + 1
            tokens, logprobs = tokens[:cut], logprobs[:cut]
        emitted += len(tokens)
        yield tokens, logprobs


# ---------------------------------------------------------------------------------------------
# Runs and `ar-lm generate`


@dataclasses.dataclass
class LoadedRun:
    cfg: ModelConfig
    params: object
    tokenizer: object
    tokenizer_meta: dict


def decode_mesh(run_dir: str | Path):
    """Mesh and rules for decoding a run: no data/fsdp split (one prompt), the run's tensor parallelism
    when this host has enough devices."""
    from ar_lm import rundir
    from ar_lm.sharding import logical_rules, make_mesh

    mesh_cfg = rundir.load_run_config(Path(run_dir)).mesh
    tensor = mesh_cfg.tensor if 1 <= mesh_cfg.tensor <= jax.device_count() else 1
    mesh_cfg = dataclasses.replace(mesh_cfg, data=1, fsdp=1, tensor=tensor, devices=tensor,
                                   dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    return make_mesh(mesh_cfg), logical_rules(mesh_cfg)


def load_run(run_dir: str | Path, mesh=None, rules=None) -> LoadedRun:
    """The model config and tokenizer of a run (None for an imported model whose tokenizer ar_lm does
    not read), and with a mesh its latest-checkpoint parameters placed on it."""
    from ar_lm import rundir
    from ar_lm.tokenizer import load_tokenizer
    from ar_lm.train import restore_latest_params

    run_dir = Path(run_dir).absolute()
    cfg = rundir.load_run_config(run_dir)
    tok_meta_path = run_dir / rundir.TOKENIZER / "metadata.json"
    tokenizer, tok_meta = None, {}
    if tok_meta_path.is_file():
        tok_meta = json.loads(tok_meta_path.read_text())["tokenizer"]
        tokenizer = load_tokenizer(run_dir / rundir.TOKENIZER, tok_meta["kind"])
        require(tokenizer.vocab_size == cfg.model.vocab_size,
                f"run {run_dir} has a tokenizer of {tokenizer.vocab_size} tokens but a model of {cfg.model.vocab_size}")
    if mesh is None:
        return LoadedRun(cfg.model, None, tokenizer, tok_meta)
    _, params = restore_latest_params(run_dir, cfg, mesh, rules)
    return LoadedRun(cfg.model, params, tokenizer, tok_meta)


def parse_token_ids(text: str) -> list[int]:
    """'1, 2 3' -> [1, 2, 3] (commas and/or spaces)."""
    parts = text.replace(",", " ").split()
    require(parts and all(p.lstrip("-").isdigit() for p in parts),
            f"--prompt-ids takes integers separated by commas or spaces, got {text!r}")
    return [int(p) for p in parts]


def _check_same_tokenizer(target: LoadedRun, draft: LoadedRun, draft_dir) -> None:
    require(draft.cfg.vocab_size == target.cfg.vocab_size,
            f"draft run {draft_dir} has a vocabulary of {draft.cfg.vocab_size} tokens but the target has "
            f"{target.cfg.vocab_size}: use a draft trained with the same tokenizer")
    require(draft.tokenizer_meta.get("sha256") == target.tokenizer_meta.get("sha256"),
            f"draft run {draft_dir} uses a different tokenizer than the target (same size, other contents): "
            "use a draft trained with the same tokenizer")


class _TextStream:
    """Prints the decoded text of a growing token list, holding back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer, eos_id):
        self.tokenizer, self.eos_id, self.tokens, self.printed = tokenizer, eos_id, [], ""

    def add(self, tokens, final: bool = False) -> None:
        self.tokens += [int(t) for t in tokens if int(t) != self.eos_id]
        text = self.tokenizer.decode(self.tokens)
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.printed) or final:  # (a re-decoded prefix is not reprinted)
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def generate_command(args) -> int:
    """`ar-lm generate RUN_DIR --prompt TEXT | --prompt-ids IDS ...` (see `ar_lm.cli`)."""
    from ar_lm.train import mesh_context

    sampling_flags = {"--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p,
                      "--min-p": args.min_p}
    sampling = Sampling.create(1.0 if args.temperature is None else args.temperature, args.top_k,
                               1.0 if args.top_p is None else args.top_p, 0.0 if args.min_p is None else args.min_p)
    require(args.num_samples >= 1, f"--num-samples must be >= 1, got {args.num_samples}")
    require(args.beams >= 1, f"--beams must be >= 1, got {args.beams}")
    if args.beams > 1:
        given = [flag for flag, value in sampling_flags.items() if value is not None]
        require(not given, f"beam search is deterministic: drop {', '.join(given)} or --beams")
        require(args.draft is None, "beam search and speculative decoding do not combine: drop --draft or --beams")
        require(args.num_samples == 1, "beam search returns --beams hypotheses: drop --num-samples")

    require((args.prompt is None) != (args.prompt_ids is None), "give --prompt TEXT or --prompt-ids IDS (one of them)")
    target = load_run(args.run_dir)  # config and tokenizer: check everything before restoring anything
    if args.draft is not None:
        _check_same_tokenizer(target, load_run(args.draft), args.draft)
    tok = target.tokenizer
    require(tok is not None or args.prompt is None,
            f"run {args.run_dir} has no text tokenizer (an imported model's tokenizer ar_lm does not read): "
            "give --prompt-ids")
    mesh, rules = decode_mesh(args.run_dir)
    target = load_run(args.run_dir, mesh, rules)  # now with its parameters
    draft = None if args.draft is None else load_run(args.draft, mesh, rules)
    cfg = target.cfg
    eos_id = args.eos_id if args.eos_id is not None else (tok.eos_id if tok is not None else None)
    if args.prompt_ids is not None:  # ids as given, e.g. from the model's own (Hugging Face) tokenizer
        prompt_ids = parse_token_ids(args.prompt_ids)
    else:  # EOS separates documents: the prompt starts one
        prompt_ids = [eos_id] + list(tok.encode(args.prompt))
    text = (lambda ids: tok.decode([t for t in ids if t != eos_id])) if tok is not None else None
    n = args.max_new_tokens
    if n is None:
        n = max(1, min(64, cfg.max_seq_len - len(prompt_ids)))

    t0 = time.perf_counter()
    with mesh_context(mesh, rules):
        if args.beams > 1:
            res = beam_search(cfg, target.params, [prompt_ids], n, args.beams,
                              length_penalty_alpha=args.length_penalty, eos_id=eos_id)
            samples = [dict(tokens=res.sequences[0, i, : res.lengths[0, i]],
                            logprobs=res.logprobs[0, i, : res.lengths[0, i]], score=float(res.scores[0, i]))
                       for i in range(args.beams)]
            extra = {}
        elif args.json or args.num_samples > 1 or args.prompt is None:
            prompts = [prompt_ids] * args.num_samples
            if draft is None:
                res = generate(cfg, target.params, prompts, n, sampling, seed=args.seed, eos_id=eos_id)
                extra = {}
            else:
                res = speculative_generate(cfg, target.params, draft.cfg, draft.params, prompts, n, sampling,
                                           draft_tokens=args.draft_tokens, seed=args.seed, eos_id=eos_id)
                extra = {"acceptance_rate": res.acceptance_rate, "target_passes": res.target_passes}
            samples = [dict(tokens=res.tokens[i, : res.lengths[i]], logprobs=res.logprobs[i, : res.lengths[i]])
                       for i in range(args.num_samples)]
        else:  # one sample, streamed to the terminal as it is produced
            out, extra = _TextStream(tok, eos_id), {}
            sys.stdout.write(args.prompt)
            parts = stream(cfg, target.params, prompt_ids, n, sampling, seed=args.seed, eos_id=eos_id,
                           draft=None if draft is None else (draft.cfg, draft.params),
                           draft_tokens=args.draft_tokens, stats=extra)
            n_tokens = 0
            for tokens, _ in parts:
                out.add(tokens)
                n_tokens += len(tokens)
            out.add([], final=True)
            sys.stdout.write("\n")
            _report(n_tokens, 1, time.perf_counter() - t0, extra, args.draft_tokens)
            return 0

    if args.json:
        print(json.dumps({
            **({"prompt": args.prompt} if args.prompt is not None else {}), "prompt_tokens": prompt_ids, **extra,
            "samples": [{**({"text": text(s["tokens"].tolist())} if text else {}),
                         "tokens": s["tokens"].tolist(), "logprobs": [round(float(x), 6) for x in s["logprobs"]],
                         **({"score": s["score"]} if "score" in s else {})} for s in samples],
        }))
        return 0
    for i, s in enumerate(samples):
        label = f"beam {i} (score {s['score']:.4f})" if "score" in s else f"sample {i}"
        print(f"--- {label} ---")
        if args.prompt is not None:
            print(args.prompt + text(s["tokens"].tolist()))
        else:  # ids in, ids out (and the text too when the run has a tokenizer)
            print(" ".join(str(t) for t in s["tokens"].tolist()))
            if text:
                print(text(prompt_ids + s["tokens"].tolist()))
    _report(sum(len(s["tokens"]) for s in samples), len(samples), time.perf_counter() - t0, extra, args.draft_tokens)
    return 0


def _report(n_tokens: int, rows: int, seconds: float, extra: dict, k: int) -> None:
    line = f"[generate] {n_tokens} tokens in {seconds:.2f} s (including compilation)"
    if "acceptance_rate" in extra:
        line += (f"; speculative: acceptance rate {extra['acceptance_rate']:.3f} with {k} draft tokens, "
                 f"{n_tokens / rows / max(extra['target_passes'], 1):.2f} tokens per row per target pass")
    print(line, file=sys.stderr)
