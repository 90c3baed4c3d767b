"""Seeded synthetic data: a stationary source with an exactly known entropy rate (the loss floor), and
procedurally generated images (`shape_images`, the pixel example sweep's data).

A sparse order-k Markov chain over `vocab` symbols: each context (the last k symbols) has
`branching` possible successors with probabilities drawn from a Dirichlet(`concentration`).
Its stationary distribution pi over contexts is found by (lazy) power iteration; sampling starts
from pi, so the process is stationary and its entropy rate is

    H = sum_c pi(c) * H(next | c)     (nats per symbol)

No model can predict the next symbol better than H on average, so a model's loss approaches
but never goes below it (the first k positions of a window, with less context, cost more).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from ar_lm.data.sources import Document
from ar_lm.errors import require

ALPHABET = string.ascii_letters + string.digits + "+/"  # 64 single-byte symbols


@dataclass
class MarkovSource:
    vocab: int
    order: int
    branching: int
    seed: int
    concentration: float = 0.5

    def __post_init__(self):
        require(2 <= self.vocab <= len(ALPHABET), f"synthetic vocab must lie in [2, {len(ALPHABET)}], got {self.vocab}")
        require(1 <= self.order <= 4, f"synthetic order must lie in [1, 4], got {self.order}")
        require(1 <= self.branching <= self.vocab, f"synthetic branching must lie in [1, vocab], got {self.branching}")
        rng = np.random.default_rng(self.seed)
        n_ctx = self.vocab**self.order
        self.successors = np.stack(
            [rng.choice(self.vocab, self.branching, replace=False) for _ in range(n_ctx)]
        ).astype(np.int64)
        probs = rng.dirichlet(np.full(self.branching, self.concentration), size=n_ctx)
        self.probs = np.maximum(probs, 1e-3)
        self.probs /= self.probs.sum(axis=1, keepdims=True)
        self.cdf = np.cumsum(self.probs, axis=1)
        self.stationary = self._stationary()

    def next_context(self, ctx: np.ndarray, symbol: np.ndarray) -> np.ndarray:
        return (ctx * self.vocab + symbol) % (self.vocab**self.order)

    def _stationary(self, iters: int = 5000, tol: float = 1e-13) -> np.ndarray:
        n_ctx = self.vocab**self.order
        ctx = np.arange(n_ctx)
        nxt = self.next_context(ctx[:, None], self.successors)  # [C, branching]
        pi = np.full(n_ctx, 1.0 / n_ctx)
        for _ in range(iters):  # lazy power iteration: same fixed point, no periodic oscillation
            new = 0.5 * pi + 0.5 * np.bincount(nxt.ravel(), weights=(pi[:, None] * self.probs).ravel(), minlength=n_ctx)
            if np.abs(new - pi).sum() < tol:
                return new
            pi = new
        return pi

    @property
    def entropy_rate(self) -> float:
        """Nats per symbol."""
        h_ctx = -(self.probs * np.log(self.probs)).sum(axis=1)
        return float((self.stationary * h_ctx).sum())

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n symbols from the chain, starting from its stationary distribution."""
        rng = np.random.default_rng(seed)
        ctx = int(rng.choice(len(self.stationary), p=self.stationary / self.stationary.sum()))
        out = np.empty(n, np.int64)
        u = rng.random(n)
        for i in range(n):
            j = int(np.searchsorted(self.cdf[ctx], u[i]))
            s = int(self.successors[ctx, min(j, self.branching - 1)])
            out[i] = s
            ctx = (ctx * self.vocab + s) % len(self.stationary)
        return out

    def text(self, n: int, seed: int) -> str:
        return "".join(ALPHABET[i] for i in self.sample(n, seed))


def synthetic_splits(tokens: int, val_fraction: float, vocab: int, order: int, branching: int, seed: int):
    """Train and val samples of one `MarkovSource` (one long document each) and its description."""
    require(tokens >= 1000, f"--synthetic-tokens must be at least 1000, got {tokens}")
    source = MarkovSource(vocab, order, branching, seed)
    n_val = max(1000, int(tokens * val_fraction))
    splits = {
        "train": [Document("synthetic-train", source.text(tokens, seed=2 * seed + 1))],
        "val": [Document("synthetic-val", source.text(n_val, seed=2 * seed + 2))],
    }
    info = {"kind": "synthetic", "vocab": vocab, "order": order, "branching": branching, "seed": seed,
            "entropy_rate_nats": source.entropy_rate}
    return splits, info


def shape_images(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """[n, H, W] uint8 grayscale images made procedurally: a linear gradient background and up to three
    filled rectangles or ellipses of random intensity, position and size (each present with probability
    0.7, later ones on top), so a pixel is mostly predictable from its neighbours above and to the left."""
    require(n >= 1 and height >= 2 and width >= 2, f"shape images need n >= 1 and sides >= 2, got {n}x{height}x{width}")
    rng = np.random.default_rng([seed, 0x5EA9E5])
    y_HxW, x_HxW = np.mgrid[0:height, 0:width] / max(height - 1, width - 1)
    base, gy, gx = rng.uniform(0, 255, (n, 1, 1)), *rng.uniform(-96, 96, (2, n, 1, 1))
    image_NxHxW = base + gx * x_HxW + gy * y_HxW
    for _ in range(3):
        present, ellipse = rng.random((n, 1, 1)) < 0.7, rng.random((n, 1, 1)) < 0.5
        cy, cx = rng.uniform(0, 1, (2, n, 1, 1))
        ry, rx = rng.uniform(0.12, 0.4, (2, n, 1, 1))
        rectangle = (np.abs(y_HxW - cy) <= ry) & (np.abs(x_HxW - cx) <= rx)
        disc = ((y_HxW - cy) / ry) ** 2 + ((x_HxW - cx) / rx) ** 2 <= 1
        inside = present & np.where(ellipse, disc, rectangle)
        image_NxHxW = np.where(inside, rng.uniform(0, 255, (n, 1, 1)), image_NxHxW)
    return np.clip(np.rint(image_NxHxW), 0, 255).astype(np.uint8)
