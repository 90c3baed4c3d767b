"""How a target width becomes a whole model shape (`ShapeRule`), so the sizes of a sweep form one monotone
family: depth from a depth-width law, heads of a fixed dimension, grouped-query attention and the MLP width as
options. The rule is recorded in sweep.json (with the exact compute model it implies, `compute.ShapeFamily`)
and each point's shape in its coords."""

from __future__ import annotations

import dataclasses

from ar_lm.config import ModelConfig
from ar_lm.errors import require


@dataclasses.dataclass(frozen=True)
class ShapeRule:
    """d_model a multiple of `head_dim` up to `max_width`, n_heads = d_model / head_dim, and

        n_layers = max(1, round((d_model / aspect) ** depth_exponent))

    `depth_exponent` = 1 keeps the aspect ratio d_model / n_layers = `aspect` at every size (Kaplan et al. 2020
    find the loss flat over aspect 20-200 at fixed N; nanochat's depth dial is aspect 64 with 128-dimensional
    heads, `ShapeRule.nanochat()`); < 1 makes larger models relatively wider, as most published ladders are
    (Llama 3 8B: 4096 / 32 = 128, 70B: 8192 / 80 = 102; Levine et al. 2020). `kv_groups` query heads share a
    key/value head (grouped-query attention, Ainslie et al. 2023; 1: multi-head); `ffn_ratio` sets
    d_ff = round(ffn_ratio * d_model) (0: the family's default, 4 d or 8/3 d)."""

    aspect: float = 64.0
    head_dim: int = 64
    max_width: int = 16384
    depth_exponent: float = 1.0
    kv_groups: int = 1
    ffn_ratio: float = 0.0

    def __post_init__(self):
        require(self.aspect > 0 and self.head_dim >= 1 and self.max_width >= self.head_dim,
                f"ShapeRule needs aspect > 0 and 1 <= head_dim <= max_width, got {self}")
        require(0 < self.depth_exponent <= 1.5, f"ShapeRule.depth_exponent must be in (0, 1.5], got {self.depth_exponent}")
        require(self.kv_groups >= 1 and self.ffn_ratio >= 0, f"ShapeRule needs kv_groups >= 1 and ffn_ratio >= 0, "
                f"got {self.kv_groups}, {self.ffn_ratio}")

    @staticmethod
    def nanochat() -> "ShapeRule":
        """nanochat's single depth dial: d_model = 64 · depth, 128-dimensional heads."""
        return ShapeRule(aspect=64, head_dim=128)

    def shape(self, d_model: int) -> tuple[int, int]:
        """(n_layers, n_heads) at width `d_model`."""
        return max(1, round((d_model / self.aspect) ** self.depth_exponent)), d_model // self.head_dim

    def model(self, base: ModelConfig, d_model: int) -> ModelConfig:
        """`base` at width `d_model` under this rule."""
        n_layers, n_heads = self.shape(d_model)
        kv = n_heads // self.kv_groups if self.kv_groups > 1 and n_heads % self.kv_groups == 0 else 0
        return dataclasses.replace(base, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=kv,
                                   d_ff=round(self.ffn_ratio * d_model) if self.ffn_ratio else 0)

    def widths(self) -> range:
        return range(self.head_dim, self.max_width + 1, self.head_dim)
