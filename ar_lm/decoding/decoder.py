"""Decoding with a KV cache: prompts, prefill, one decode step, and `generate` (scan or while loop).

Shapes are in names as in `ar_lm.model`: B batch, P padded prompt length, N new tokens, S cache slots,
V vocab.

Prompts of different lengths share one batch by LEFT padding: row b's prompt fills the last len_b of the
P prompt slots with positions 0..len_b-1 and the padding slots hold position -1 (never attended to), so
every row writes its next token to the same cache slot and gets exactly what it gets alone.

`generate`: prefill (one forward pass over the prompts into a cache of P + N - 1 slots), then `lax.scan`
over N - 1 one-token steps (or `lax.while_loop` that stops once every row has emitted EOS), all in one
jitted program. The cache is a loop carry that each layer updates in place; every step attends over all
S slots (masked by slot position), so its cost depends on S, not on the position, except on one CPU device,
where the decode-attention kernel reads only the valid slots (`ar_lm.model.cpu_kernels`). `generate_sliding` goes
past the context: once it is full, re-prefill each row's last max_seq_len // 2 tokens and go on.

Returned log-probabilities are the model's own: log softmax of the unfiltered logits at temperature 1
(what teacher-forced scoring of the generated sequence gives), whatever sampler picked the token.

Sharding: call inside `ar_lm.parallel.mesh.mesh_context(mesh, rules)` with parameters placed by
`ar_lm.training.state.param_shardings`; the cache is constrained to `CACHE_AXES` (batch over data,
kv heads over tensor) and activations follow the model's own logical constraints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ar_lm.config import ModelConfig
from ar_lm.decoding.sampling import GREEDY, Sampling, sample_logits, token_logprob
from ar_lm.errors import require
from ar_lm.model import head
from ar_lm.model.backend import platform
from ar_lm.model.transformer import CACHE_AXES, apply, init_cache, relayout_layers

Array = jax.Array


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


def prepare_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_to: int = 0):
    """Left-pad token-id prompts into (prompt_BxP int32, lens_B int32), checking them against the context;
    P is the longest prompt, or `pad_to` where that is longer and fits (callers bucket P: fewer compilations)."""
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
    width = max(longest, min(pad_to, ctx - max_new_tokens))
    prompt_BxP = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        prompt_BxP[i, width - row.size:] = row
    return prompt_BxP, np.asarray([row.size for row in rows], np.int32)


def pad_id_for(eos_id: Optional[int], pad_id: Optional[int]) -> int:
    return pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)


def seed_array(seed: int) -> np.ndarray:
    return np.uint32(seed % (1 << 32))


def _lengths(tokens_xN: Array, eos_id: Optional[int]) -> Array:
    n = tokens_xN.shape[-1]
    if eos_id is None:
        return jnp.full(tokens_xN.shape[:-1], n, jnp.int32)
    is_eos = tokens_xN == eos_id
    return jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1) + 1, n).astype(jnp.int32)


def constrain_cache(cache):
    return jax.tree.map(lambda c: nn.with_logical_constraint(c, CACHE_AXES), cache)


def prefill(cfg: ModelConfig, params, prompt_BxP: Array, lens_B: Array, cache_len: int):
    """One forward pass over the left-padded prompts into a fresh cache of `cache_len` slots, attention by
    the model's training kernels (flash attention on GPU/TPU), logits at the last position only.

    Returns (logits_BxV at each row's last prompt token, cache, kv_pos_BxS)."""
    b, p = prompt_BxP.shape
    pos_BxP = jnp.arange(p, dtype=jnp.int32)[None, :] - (p - lens_B)[:, None]  # < 0 on padding
    kv_pos_BxS = jnp.full((b, cache_len), -1, jnp.int32).at[:, :p].set(jnp.where(pos_BxP >= 0, pos_BxP, -1))
    kv_pos_BxS = nn.with_logical_constraint(kv_pos_BxS, ("batch", None))
    cache = constrain_cache(init_cache(cfg, b, cache_len))
    prompt_BxP = nn.with_logical_constraint(prompt_BxP, ("batch", "length"))
    x_BxPxD, cache = apply(  # segment ids: padding 0, prompt 1, so the prompt attends through the kernels
        cfg, params, prompt_BxP, positions_BxL=jnp.maximum(pos_BxP, 0), cache=cache, cache_index=0,
        kv_positions_BxS=kv_pos_BxS, segment_ids_BxL=(pos_BxP >= 0).astype(jnp.int32), hidden=True,
    )
    return head.logits(cfg, params, x_BxPxD[:, -1:])[:, 0], constrain_cache(cache), kv_pos_BxS


def for_decoding(cfg: ModelConfig, params):
    """(cfg, params) as the decoder runs them. On CPU the layers run unrolled: in a layer scan XLA:CPU copies
    each stacked weight slice before multiplying by it (docs/explanation/performance.md). Same weights, unstacked outside
    the jit; every entry point does this per call (a copy of the weights), so a serving
    loop converts once and passes the result."""
    if not cfg.scan_layers or platform() != "cpu":
        return cfg, params
    return dataclasses.replace(cfg, scan_layers=False), _relayout_jit(params, n_layers=cfg.n_layers, scanned=False)


_relayout_jit = jax.jit(relayout_layers, static_argnames=("n_layers", "scanned"))


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
    logits_BxV, cache, kv_pos_BxS = prefill(cfg, params, prompt_BxP, lens_B, cache_len)
    rng, key = jax.random.split(jax.random.key(seed))
    token_B = sample_logits(key, logits_BxV, sampling)
    done_B = token_B == eos_id if eos_id is not None else jnp.zeros(token_B.shape, bool)
    state = DecodeState(cache, kv_pos_BxS, jnp.int32(prompt_BxP.shape[1]), lens_B, token_B, done_B, rng)
    return state, token_B, token_logprob(logits_BxV, token_B)


def _step(cfg, params, sampling, eos_id, pad_id, state: DecodeState):
    """Feed token_B at `slot` (attention over valid slots only), choose the next token; rows that have
    emitted EOS get pad_id and log-prob 0."""
    kv_pos_BxS = jax.lax.dynamic_update_slice(state.kv_pos_BxS, state.pos_B[:, None], (jnp.int32(0), state.slot))
    logits_Bx1xV, cache = apply(
        cfg, params, state.token_B[:, None], positions_BxL=state.pos_B[:, None], cache=state.cache,
        cache_index=state.slot, kv_positions_BxS=kv_pos_BxS,
    )
    rng, key = jax.random.split(state.rng)
    token_B = sample_logits(key, logits_Bx1xV[:, 0], sampling)
    logprob_B = token_logprob(logits_Bx1xV[:, 0], token_B)
    done_B = state.done_B
    if eos_id is not None:
        token_B = jnp.where(done_B, pad_id, token_B)
        logprob_B = jnp.where(done_B, 0.0, logprob_B)
        done_B = done_B | (token_B == eos_id)
    state = DecodeState(constrain_cache(cache), kv_pos_BxS, state.slot + 1, state.pos_B + 1, token_B, done_B, rng)
    return state, (token_B, logprob_B)


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
             pad_id: Optional[int] = None, loop: Optional[str] = None, pad_to: int = 0) -> Generation:
    """Generate `max_new_tokens` per prompt (token-id lists of any lengths) in one jitted program.

    loop: "scan" (fixed N steps) or "while" (stops once every row has emitted EOS); default while when
    `eos_id` is given. After EOS a row holds `pad_id` (default: eos_id, else 0). `pad_to`: left-pad the
    prompts to at least this length (as fits the context), one compilation for many prompt lengths."""
    prompt_BxP, lens_B = prepare_prompts(cfg, prompts, max_new_tokens, pad_to)
    sampling.check_vocab(cfg.vocab_size)
    loop = loop or ("while" if eos_id is not None else "scan")
    require(loop in ("scan", "while"), f"loop must be 'scan' or 'while', got {loop!r}")
    cfg, params = for_decoding(cfg, params)
    out = _generate_jit(cfg, params, prompt_BxP, lens_B, sampling, seed_array(seed), max_new_tokens=max_new_tokens,
                        eos_id=eos_id, pad_id=pad_id_for(eos_id, pad_id), loop=loop)
    return Generation(*jax.device_get(out))


def generate_sliding(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     sampling: Sampling = GREEDY, *, seed: int = 0, keep: int = 0,
                     eos_id: Optional[int] = None) -> Generation:
    """`generate` past the model's context: decode what fits after the prompts; while more is asked,
    re-prefill each row's last `keep` tokens (default max_seq_len // 2) and decode max_seq_len - keep
    more (one compiled shape for all continuations, the last one cut); a prompt that fills the context starts
    from its last `keep` tokens. Chunk 0 uses `seed` (so a request that fits equals `generate`), chunk i a seed
    drawn from (seed, i). `eos_id`: stop once every row has emitted it; after its EOS a row holds eos_id
    (log-prob 0) and its length counts up to the EOS; without it no row stops."""
    parts, done_B = [], np.zeros(len(prompts), bool)
    for part in sliding_chunks(cfg, params, prompts, max_new_tokens, sampling, seed=seed, keep=keep):
        parts.append(part)
        done_B |= eos_id is not None and np.any(part.tokens == eos_id, axis=1)
        if done_B.all():
            break
    tokens = np.concatenate([g.tokens for g in parts], axis=1)
    logprobs = np.concatenate([g.logprobs for g in parts], axis=1)
    if eos_id is None:
        return Generation(tokens, logprobs, np.full(len(tokens), max_new_tokens, np.int32))
    pad = ((0, 0), (0, max_new_tokens - tokens.shape[1]))
    tokens, logprobs = np.pad(tokens, pad, constant_values=eos_id), np.pad(logprobs, pad)
    lengths_B = np.asarray(_lengths(tokens, eos_id))
    after_BxN = np.arange(max_new_tokens)[None, :] >= lengths_B[:, None]
    return Generation(np.where(after_BxN, eos_id, tokens), np.where(after_BxN, 0.0, logprobs), lengths_B)


def sliding_chunks(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   sampling: Sampling = GREEDY, *, seed: int = 0, keep: int = 0) -> Iterator[Generation]:
    """`generate_sliding`'s chunks (no EOS stop) as each is decoded: their tokens together are its tokens."""
    ctx = cfg.max_seq_len
    keep = keep or ctx // 2
    require(0 < keep < ctx, f"keep must lie in [1, {ctx - 1}] (the context is {ctx}), got {keep}")
    require(isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens > 0,
            f"max-new-tokens must be a positive integer, got {max_new_tokens}")
    cfg, params = for_decoding(cfg, params)  # once, not per chunk
    rows = [[int(t) for t in (p if len(p) < ctx else p[-keep:])] for p in prompts]
    longest = max((len(r) for r in rows), default=0)
    part = generate(cfg, params, rows, min(max_new_tokens, ctx - longest), sampling, seed=seed, loop="scan")
    yield part
    left, i = max_new_tokens - part.tokens.shape[1], 1
    while left > 0:
        rows = [(r + t.tolist())[-keep:] for r, t in zip(rows, part.tokens)]
        chunk_seed = int(np.random.SeedSequence([seed % (1 << 32), i]).generate_state(1)[0])
        part = generate(cfg, params, rows, ctx - keep, sampling, seed=chunk_seed, loop="scan", pad_to=keep)
        part = Generation(part.tokens[:, :left], part.logprobs[:, :left], np.minimum(part.lengths, left))
        yield part
        left, i = left - part.tokens.shape[1], i + 1


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "eos_id"))
def start_jit(cfg, params, prompt_BxP, lens_B, sampling, seed, *, cache_len, eos_id):
    return _start(cfg, params, prompt_BxP, lens_B, sampling, seed, cache_len, eos_id)


@functools.partial(jax.jit, static_argnames=("cfg", "n_steps", "eos_id", "pad_id"), donate_argnames=("state",))
def decode_chunk_jit(cfg, params, state, sampling, *, n_steps, eos_id, pad_id):
    step = functools.partial(_step, cfg, params, sampling, eos_id, pad_id)
    state, (tokens_NxB, logprobs_NxB) = jax.lax.scan(lambda st, _: step(st), state, length=n_steps)
    return state, tokens_NxB.T, logprobs_NxB.T


def lower_decode_step(cfg, mesh, rules):
    """Lower one decode step (`decode_chunk_jit`, one token for `cfg.data.batch_size` rows over a cache of
    `model.max_seq_len` slots) on `mesh` from abstract arrays only, for ahead-of-time compilation: returns
    (lowered, abstract params, abstract arguments (params, decode state))."""
    from ar_lm.parallel.mesh import logical_sharding, mesh_context, replicated
    from ar_lm.training.state import abstract_params

    model, b, s = cfg.model, cfg.data.batch_size, cfg.model.max_seq_len
    params = abstract_params(cfg, mesh, rules)
    with mesh_context(mesh, rules):
        shapes = jax.eval_shape(lambda: DecodeState(init_cache(model, b, s), jnp.zeros((b, s), jnp.int32),
                                                    jnp.int32(0), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32),
                                                    jnp.zeros(b, bool), jax.random.key(0)))
        cache_sh = logical_sharding(mesh, rules, CACHE_AXES)
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), shapes)
        state = state.replace(cache=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cache_sh),
                                                 shapes.cache))
        sampling = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                               sharding=replicated(mesh)), GREEDY)
        lowered = decode_chunk_jit.lower(model, params, state, sampling, n_steps=1, eos_id=None, pad_id=0)
    return lowered, params, (params, state)
