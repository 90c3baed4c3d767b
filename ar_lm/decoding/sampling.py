"""How the next token is chosen: temperature, top-k, top-p (nucleus), min-p, greedy.

Shapes are in names: x any leading batch shape, V vocab. Sampler values are traced leaves, so new
values with the same shapes and the same set of enabled filters do not recompile.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ar_lm.errors import require

Array = jax.Array


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
    vocab_limit: int = flax.struct.field(pytree_node=False, default=0)  # > 0: only ids below it (media: no eos)

    @classmethod
    def create(cls, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0, min_p: float = 0.0,
               vocab_limit: int = 0):
        """Validate and build. top_k None = off; top_p 1 = off; min_p 0 = off (filters compose in this order);
        vocab_limit > 0 samples only ids < vocab_limit (their logits renormalised, before the filters)."""
        require(temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}")
        require(top_k is None or top_k > 0,
                f"top-k must be a positive number of tokens, got {top_k}: leave it out to disable")
        require(0 < top_p <= 1, f"top-p must lie in (0, 1], got {top_p}: 1 disables it")
        require(0 <= min_p <= 1, f"min-p must lie in [0, 1], got {min_p}: 0 disables it")
        require(vocab_limit >= 0, f"vocab_limit must be >= 0 (0 = the whole vocabulary), got {vocab_limit}")
        greedy = temperature == 0
        return cls(
            np.float32(temperature), np.int32(top_k or 0), np.float32(top_p), np.float32(min_p), greedy=greedy,
            use_top_k=not greedy and top_k is not None, use_top_p=not greedy and top_p < 1,
            use_min_p=not greedy and min_p > 0, vocab_limit=int(vocab_limit),
        )

    def check_vocab(self, vocab_size: int) -> None:
        require(not self.use_top_k or int(self.top_k) <= vocab_size,
                f"top-k {int(self.top_k)} exceeds the vocabulary of {vocab_size} tokens: use at most {vocab_size}")
        require(self.vocab_limit <= vocab_size,
                f"vocab_limit {self.vocab_limit} exceeds the vocabulary of {vocab_size} tokens: use at most {vocab_size}")


GREEDY = Sampling.create(temperature=0.0)


def filter_logits(logits_xV: Array, s: Sampling) -> Array:
    """Logits of the sampling distribution, -inf outside its support; filters act in turn, each on the
    renormalised result of the previous one:

    temperature: logits / T;  top-k: the k largest;  top-p (Holtzman et al. 2020): the smallest prefix of
    the sorted distribution with mass >= p;  min-p (Nguyen et al. 2024): p_i >= min_p * max_j p_j.
    """
    logits_xV = limit_vocab(logits_xV, s) / s.temperature
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


def limit_vocab(logits_xV: Array, s: Sampling) -> Array:
    """-inf at ids >= s.vocab_limit (when set): e.g. an image's level ids only, never its eos."""
    if not s.vocab_limit:
        return logits_xV
    return jnp.where(jnp.arange(logits_xV.shape[-1]) < s.vocab_limit, logits_xV, -jnp.inf)


def sample_logits(rng: Array, logits_xV: Array, s: Sampling) -> Array:
    """One token per row: argmax when greedy, else a draw from softmax(filter_logits(...))."""
    if s.greedy:
        return jnp.argmax(limit_vocab(logits_xV, s), axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits_xV, s), axis=-1).astype(jnp.int32)


def token_logprob(logits_xV: Array, token_x: Array) -> Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits_xV, axis=-1), token_x[..., None], axis=-1)[..., 0]
