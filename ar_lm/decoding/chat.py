"""Chat decoding (`ar-lm generate RUN --chat`): a conversation whose KV cache persists across turns.

`ChatSession` holds one row's cache of max_seq_len slots, and slot i holds position i. A turn writes only its
new tokens (the last reply's end-of-turn token, still outside the cache, then the rendered new user turn) at
the next free slots: one forward pass over a chunk right-padded to a power of two (padding slots hold position
-1 and are overwritten later), then the reply is decoded step by step until the template's end-of-turn token
(`decoder._step` in a `lax.while_loop`). The conversation so far is never re-prefilled, so turn k costs its own
tokens, not the conversation's; the tokens equal those of re-prefilling the whole conversation.
The text of each turn is the template's rendering of the whole conversation minus what the cache holds
(`chat_turn_text`); a template whose rendering does not extend the previous one is refused. A conversation
that outgrows the context keeps its most recent whole turns (and the system message) in a new cache.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ar_lm.config import ModelConfig
from ar_lm.data.chat import ChatTemplate, render_text
from ar_lm.decoding.decoder import DecodeState, _step, constrain_cache, for_decoding, seed_array
from ar_lm.decoding.sampling import GREEDY, Sampling, sample_logits
from ar_lm.errors import UserError, require
from ar_lm.model.transformer import apply, init_cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _extend_jit(cfg, params, cache, kv_pos_1xS, ids_1xT, n_real, slot):
    """Write the chunk's first `n_real` tokens at slots slot.. (the rest is padding, position -1); the logits
    after its last real token."""
    t = ids_1xT.shape[1]
    pos_1xT = slot + jnp.arange(t, dtype=jnp.int32)[None]
    kv_pos_1xS = jax.lax.dynamic_update_slice(kv_pos_1xS, jnp.where(pos_1xT < slot + n_real, pos_1xT, -1),
                                              (jnp.int32(0), slot))
    logits_1xTxV, cache = apply(cfg, params, ids_1xT, positions_BxL=pos_1xT, cache=cache, cache_index=slot,
                                kv_positions_BxS=kv_pos_1xS)
    return jax.lax.dynamic_index_in_dim(logits_1xTxV, n_real - 1, 1, keepdims=False), constrain_cache(cache), kv_pos_1xS


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eot_id"), donate_argnames=("cache",))
def _reply_jit(cfg, params, cache, kv_pos_1xS, logits_1xV, slot, sampling, seed, *, max_new_tokens, eot_id):
    """Tokens [1, N] from `logits_1xV` on, stopping after `eot_id`, or at N, or when the cache is full; each
    emitted token but the last goes into the cache at slot, slot + 1, ... Returns (tokens, count, cache, kv_pos)."""
    rng, key = jax.random.split(jax.random.key(seed))
    token_1 = sample_logits(key, logits_1xV, sampling)
    state = DecodeState(cache, kv_pos_1xS, slot, slot[None], token_1, token_1 == eot_id, rng)
    room = kv_pos_1xS.shape[1] - slot  # the step emitting token t writes token t-1 at slot + t - 1
    tokens_1xN = jnp.full((1, max_new_tokens), eot_id, jnp.int32).at[:, 0].set(token_1)
    step = functools.partial(_step, cfg, params, sampling, eot_id, eot_id)

    def body(carry):
        t, st, toks = carry
        st, (tok_1, _) = step(st)
        return t + 1, st, toks.at[:, t].set(tok_1)

    def cond(carry):
        return (carry[0] < max_new_tokens) & (carry[0] <= room) & ~carry[1].done_B[0]

    n, state, tokens_1xN = jax.lax.while_loop(cond, body, (jnp.int32(1), state, tokens_1xN))
    return tokens_1xN, n, state.cache, state.kv_pos_BxS


class ChatSession:
    """One conversation's cache: `turn(ids)` feeds new tokens and returns the reply's ids (ending with the
    end-of-turn id unless cut by `max_new_tokens` or the context). `history`: every token fed or emitted."""

    def __init__(self, cfg: ModelConfig, params, eot_id: int, sampling: Sampling = GREEDY, seed: int = 0):
        self.cfg, self.params = for_decoding(cfg, params)
        self.eot_id, self.sampling, self.seed = eot_id, sampling, seed
        self.turns = 0
        self.restart()

    def restart(self) -> None:
        """An empty cache (a new document); the turn count, which seeds sampling, goes on."""
        ctx = self.cfg.max_seq_len
        self.cache = constrain_cache(init_cache(self.cfg, 1, ctx))
        self.kv_pos_1xS = jnp.full((1, ctx), -1, jnp.int32)
        self.history: list[int] = []
        self.slot, self.pending = 0, []

    def turn(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        ctx = self.cfg.max_seq_len
        chunk = self.pending + [int(i) for i in ids]
        require(chunk, "a chat turn needs at least one new token")
        require(self.slot + len(chunk) < ctx, f"the conversation ({self.slot + len(chunk)} tokens) no longer fits "
                f"the model's context of {ctx} tokens: start a new conversation")
        width = min(1 << (len(chunk) - 1).bit_length(), ctx - self.slot)  # one compilation per power of two
        ids_1xT = np.zeros((1, width), np.int32)
        ids_1xT[0, : len(chunk)] = chunk
        logits_1xV, self.cache, self.kv_pos_1xS = _extend_jit(self.cfg, self.params, self.cache, self.kv_pos_1xS,
                                                              ids_1xT, np.int32(len(chunk)), np.int32(self.slot))
        self.slot += len(chunk)
        seed = seed_array(int(np.random.SeedSequence([self.seed % (1 << 32), self.turns]).generate_state(1)[0]))
        tokens_1xN, n, self.cache, self.kv_pos_1xS = _reply_jit(
            self.cfg, self.params, self.cache, self.kv_pos_1xS, logits_1xV, np.int32(self.slot), self.sampling, seed,
            max_new_tokens=max_new_tokens, eot_id=self.eot_id)
        reply = [int(t) for t in jax.device_get(tokens_1xN)[0, : int(n)]]
        self.slot += len(reply) - 1  # the last token is fed with the next turn
        self.history += chunk[len(self.pending):] + reply  # the pending token is in it already
        self.pending, self.turns = reply[-1:], self.turns + 1
        return reply


def chat_turn_text(template: ChatTemplate, messages: list[dict], consumed: str) -> str:
    """The rendering of `messages` (with the assistant's generation prompt) past `consumed`, the text the
    cache already holds; a UserError when the rendering does not extend it."""
    text = render_text(template, messages, add_generation_prompt=True)
    if not text.startswith(consumed):
        raise UserError(f"chat template {template.name} does not render the conversation as an extension of the "
                        "previous turn (it rewrites earlier turns): the KV cache cannot be reused with it")
    return text[len(consumed):]


def _window(template: ChatTemplate, tokenizer, system: list[dict], turns: list[dict], room: int):
    """The longest suffix of `turns` (whole turns: it starts at a user message) that, after `system`, renders
    with the generation prompt (after the end of document) to at most `room` tokens: (turns kept, their text,
    turns dropped); None if even the last user turn does not fit."""
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"]
    for dropped, i in enumerate(starts):
        text = render_text(template, system + turns[i:], add_generation_prompt=True)
        if 1 + len(tokenizer.encode(text)) <= room:
            return turns[i:], text, dropped
    return None


def chat_loop(cfg: ModelConfig, params, tokenizer, template: ChatTemplate, max_new_tokens: int,
              sampling: Sampling = GREEDY, seed: int = 0, lines=None, out=None,
              system: Optional[str] = None, err=None) -> list[dict]:
    """The terminal conversation: each line of `lines` (default stdin) is a user turn, each reply is printed
    on its own line; returns the messages. When a turn and min(max_new_tokens, context / 2) reply tokens no
    longer fit the context, the oldest whole turns are dropped (the system message stays), a note goes to
    `err` (default stderr) and a new cache is prefilled with what is left."""
    lines, out, err = lines or sys.stdin, out or sys.stdout, err or sys.stderr
    eot = tokenizer.encode(template.end_of_turn)
    require(len(eot) == 1, f"the run's tokenizer holds the end-of-turn string {template.end_of_turn!r} as "
            f"{len(eot)} tokens, not one: train on data prepared with --chat-template {template.name}")
    ctx = cfg.max_seq_len
    reserve = min(max_new_tokens, ctx // 2)
    session = ChatSession(cfg, params, eot[0], sampling, seed)
    system_msgs = [{"role": "system", "content": system}] if system else []
    messages, consumed = list(system_msgs), ""
    start = len(system_msgs)  # the cache holds the system message and messages[start:]
    for line in lines:
        user = line.rstrip("\n")
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        turns = messages[start:]
        new_text = chat_turn_text(template, system_msgs + turns, consumed)
        ids = ([] if consumed else [tokenizer.eos_id]) + list(tokenizer.encode(new_text))  # a document starts after eos
        if session.slot + len(session.pending) + len(ids) + reserve > ctx:
            window = _window(template, tokenizer, system_msgs, turns, ctx - reserve)
            require(window is not None, f"the system message and the last user turn no longer fit the model's "
                    f"context of {ctx} tokens with {reserve} for the reply: shorten them or lower --max-new-tokens")
            kept, new_text, dropped = window
            start, consumed = start + len(turns) - len(kept), ""
            ids = [tokenizer.eos_id] + list(tokenizer.encode(new_text))
            err.write(f"note: at user turn {session.turns + 1} the conversation outgrew the context of {ctx} "
                      f"tokens: dropped its oldest {dropped} turn(s); the cache is prefilled again with the rest "
                      f"({len(ids)} tokens)\n")
            session.restart()
        reply = session.turn(ids, max_new_tokens)
        reply_text = tokenizer.decode(reply)
        content = reply_text[: -len(template.end_of_turn)] if reply[-1] == eot[0] else reply_text
        out.write(content + "\n")
        out.flush()
        messages.append({"role": "assistant", "content": content})
        consumed += new_text + reply_text
    return messages
