"""Streaming: the decoder in fixed-size jitted chunks, yielding tokens as they are produced."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from ar_lm.config import ModelConfig
from ar_lm.decoding.decoder import decode_chunk_jit, for_decoding, pad_id_for, prepare_prompts, seed_array, start_jit
from ar_lm.decoding.sampling import GREEDY, Sampling
from ar_lm.decoding.speculative import check_draft, speculative_loop_jit, speculative_start_jit
from ar_lm.errors import require


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
    n, pad_id = max_new_tokens, pad_id_for(eos_id, None)
    cfg, params = for_decoding(cfg, params)
    if draft is not None:
        check_draft(cfg, draft[0], draft_tokens)
        draft_cfg, draft_params = for_decoding(*draft)
        state = speculative_start_jit(cfg, params, draft_cfg, draft_params, prompt_1xP, lens_1, seed_array(seed),
                                       max_new_tokens=n, k=draft_tokens, pad_id=pad_id)
        emitted, iters = 0, np.int32(max(1, chunk // (draft_tokens + 1)))
        while emitted < n:
            state = speculative_loop_jit(cfg, params, draft_cfg, draft_params, state, sampling, iters,
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
    state, token_1, logprob_1 = start_jit(cfg, params, prompt_1xP, lens_1, sampling, seed_array(seed),
                                           cache_len=prompt_1xP.shape[1] + steps, eos_id=eos_id)
    tokens, logprobs = jax.device_get((token_1, logprob_1))
    emitted = 1
    yield tokens, logprobs
    while emitted < n and not (eos_id is not None and tokens[-1] == eos_id):
        state, tokens_1xC, logprobs_1xC = decode_chunk_jit(cfg, params, state, sampling, n_steps=chunk,
                                                            eos_id=eos_id, pad_id=pad_id)
        tokens_1xC, logprobs_1xC = jax.device_get((tokens_1xC, logprobs_1xC))
        tokens, logprobs = tokens_1xC[0, : n - emitted], logprobs_1xC[0, : n - emitted]
        if eos_id is not None and np.any(tokens == eos_id):
            cut = int(np.argmax(tokens == eos_id)) + 1
            tokens, logprobs = tokens[:cut], logprobs[:cut]
        emitted += len(tokens)
        yield tokens, logprobs
