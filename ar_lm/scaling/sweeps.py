"""Sweep definitions for scaling experiments: a model-size ladder, size x tokens grids and
IsoFLOP grids. An experiment file defines ``sweep() -> Sweep``; `ar-lm sweep` runs it.

Every point's token budget D sets its own step count, so its learning-rate schedule (warmup,
cosine to the final fraction at exactly the last step) fits its own length (Hoffmann et al. 2022).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from ar_lm.config import ExperimentConfig, ModelConfig
from ar_lm.errors import UserError, require
from ar_lm.model.counts import flops_per_token, param_counts


@dataclasses.dataclass(frozen=True)
class ShapeRule:
    """How a target size becomes a shape: d_model a multiple of `head_dim` (n_heads = d_model /
    head_dim), depth n_layers = max(1, round(d_model / aspect)), d_ff from the family's default
    (4d or 8/3 d). One width fixes the whole shape, so sizes form a single monotone family."""

    aspect: float = 32.0
    head_dim: int = 16
    max_width: int = 8192

    def shape(self, d_model: int) -> tuple[int, int]:
        return max(1, round(d_model / self.aspect)), d_model // self.head_dim


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    name: str
    config: ExperimentConfig
    coords: dict  # N, D, C and the sweep's own coordinates (budget, size index, ...)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """How the sweep's dataset is made (`ar-lm prepare` arguments), if it is not given with --data."""

    source: str = "stdlib"
    tokenizer: str = "byte"
    vocab_size: int = 0
    max_mb: float = 8.0
    synthetic_tokens: int = 2_000_000


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What `ar-lm sweep` runs: the points, then (optionally) one held-out run per
    `holdout_budgets` entry at the fitted compute-optimal size, to check the fit's prediction."""

    name: str
    base: ExperimentConfig
    points: tuple[SweepPoint, ...]
    holdout_budgets: tuple[float, ...] = ()
    data: Optional[DataSpec] = None
    n_kind: str = "non_embedding"  # which N the fits use: "total" or "non_embedding"
    rule: ShapeRule = ShapeRule()


def count_params(model: ModelConfig, n_kind: str) -> int:
    require(n_kind in ("total", "non_embedding"), f"n_kind must be 'total' or 'non_embedding', got {n_kind!r}")
    return param_counts(model)[n_kind]


def ladder(base: ModelConfig, rule: ShapeRule = ShapeRule(), n_kind: str = "non_embedding",
           max_params: float = 1e12) -> list[ModelConfig]:
    """Every shape under `rule` up to `max_params` (at least the smallest), by parameter count."""
    models = []
    for d_model in range(rule.head_dim, rule.max_width + 1, rule.head_dim):
        n_layers, n_heads = rule.shape(d_model)
        cfg = dataclasses.replace(base, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=0, d_ff=0)
        if count_params(cfg, n_kind) > max_params and models:
            break
        models.append(cfg)
    return sorted(models, key=lambda m: count_params(m, n_kind))


def ladder_model(base: ModelConfig, target: float, rule: ShapeRule = ShapeRule(), n_kind: str = "non_embedding") -> ModelConfig:
    """The shape under `rule` whose parameter count (`n_kind`) is closest to `target` in log space."""
    return min(ladder(base, rule, n_kind, target * 8), key=lambda m: abs(math.log(count_params(m, n_kind) / target)))


def _pick_sizes(models: list[ModelConfig], targets: list[float], n_kind: str) -> list[ModelConfig]:
    """Distinct ladder entries nearest to `targets` (neighbours fill in where two targets collide)."""
    logs = [math.log(count_params(m, n_kind)) for m in models]
    idx = sorted({min(range(len(models)), key=lambda i: abs(logs[i] - math.log(t))) for t in targets})
    while len(idx) < min(len(targets), len(models)):
        lo, hi = idx[0] - 1, idx[-1] + 1
        # grow on the side whose next entry is closer to the requested range
        if hi < len(models) and (lo < 0 or logs[hi] - math.log(targets[-1]) < math.log(targets[0]) - logs[lo]):
            idx.append(hi)
        else:
            idx.insert(0, lo)
        idx = sorted(set(i for i in idx if 0 <= i < len(models)))
    return [models[i] for i in idx]


def with_budget(cfg: ExperimentConfig, model: ModelConfig, tokens: int, evals_per_run: int = 0) -> ExperimentConfig:
    """`cfg` with `model` and a token budget (steps = tokens / (batch * seq_len), at least 1);
    `evals_per_run` > 0 evaluates every steps // evals_per_run steps (Approach 1's validation curves)."""
    model = dataclasses.replace(model, max_seq_len=max(model.max_seq_len, cfg.data.seq_len))
    steps = max(1, round(tokens / (cfg.data.batch_size * cfg.data.seq_len)))
    eval_every = max(1, steps // evals_per_run) if evals_per_run > 0 else cfg.train.eval_every
    train = dataclasses.replace(cfg.train, steps=steps, tokens=0, eval_every=eval_every)
    return dataclasses.replace(cfg, model=model, train=train)


def _coords(cfg: ExperimentConfig, n_kind: str, **extra) -> dict:
    """N (the `n_kind` count, what the fits use), both counts, D = steps * batch * seq_len, C = D * FLOPs/token."""
    tokens = cfg.total_steps * cfg.data.batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    counts = param_counts(cfg.model)
    return {"N": count_params(cfg.model, n_kind), "n_kind": n_kind, "N_total": counts["total"],
            "N_non_embedding": counts["non_embedding"], "D": tokens, "C": fpt * tokens, "flops_per_token": fpt,
            "n_layers": cfg.model.n_layers, "d_model": cfg.model.d_model, **extra}


def grid_sweep(base: ExperimentConfig, sizes: Sequence[float], tokens: Sequence[int], rule: ShapeRule = ShapeRule(),
               n_kind: str = "non_embedding") -> list[SweepPoint]:
    """Every model size x every token budget."""
    points = []
    for i, n in enumerate(sizes):
        model = ladder_model(base.model, n, rule, n_kind)
        for j, d in enumerate(tokens):
            cfg = with_budget(base, model, d)
            name = f"n{i}_d{j}"
            points.append(SweepPoint(name, dataclasses.replace(cfg, name=name), _coords(cfg, n_kind, size_index=i, tokens_index=j)))
    return points


def isoflop_sweep(base: ExperimentConfig, budgets: Sequence[float], sizes_per_budget: int = 4, spread: float = 3.0,
                  center_tokens_per_param: float = 20.0, rule: ShapeRule = ShapeRule(), n_kind: str = "non_embedding",
                  min_steps: int = 20, evals_per_run: int = 0) -> list[SweepPoint]:
    """For each compute budget C, `sizes_per_budget` model sizes spaced log-evenly over a factor of
    `spread` on each side of the D = 20 N guess (N* = sqrt(C / (6 * 20))), with
    D = C / flops_per_token(N) so every point spends C (up to rounding of the step count);
    `evals_per_run` periodic evals per run (see `with_budget`)."""
    require(budgets, "an IsoFLOP sweep needs at least one budget")
    require(base.model.vocab_size > 0, "set model.vocab_size to the tokenizer's vocabulary (e.g. 257 for byte) so FLOPs are exact")
    require(sizes_per_budget >= 1, "sizes_per_budget must be >= 1")
    points = []
    tokens_per_step = base.data.batch_size * base.data.seq_len
    for b, budget in enumerate(sorted(budgets)):
        n_star = math.sqrt(budget / (6 * center_tokens_per_param))
        exps = [0.0] if sizes_per_budget == 1 else [-1 + 2 * k / (sizes_per_budget - 1) for k in range(sizes_per_budget)]
        targets = [n_star * spread**e for e in exps]
        models = _pick_sizes(ladder(base.model, rule, n_kind, max(targets) * 8), targets, n_kind)
        for k, model in enumerate(models):
            fpt = flops_per_token(dataclasses.replace(model, max_seq_len=max(model.max_seq_len, base.data.seq_len)), base.data.seq_len)
            tokens = budget / fpt
            if tokens / tokens_per_step < min_steps:
                raise UserError(
                    f"budget {budget:.3g} FLOPs is too small for a {count_params(model, n_kind):,}-parameter model "
                    f"({tokens / tokens_per_step:.1f} steps < {min_steps}): raise the budget or shrink the models"
                )
            cfg = with_budget(base, model, int(tokens), evals_per_run)
            name = f"c{b}_n{k}"
            points.append(SweepPoint(name, dataclasses.replace(cfg, name=name),
                                     _coords(cfg, n_kind, budget=float(budget), budget_index=b, size_index=k)))
    return points


def compute_optimal_point(base: ExperimentConfig, budget: float, n_opt: float, name: str, rule: ShapeRule = ShapeRule(),
                          n_kind: str = "non_embedding") -> SweepPoint:
    """One run at `budget` with the ladder model closest to `n_opt` parameters."""
    model = ladder_model(base.model, n_opt, rule, n_kind)
    fpt = flops_per_token(dataclasses.replace(model, max_seq_len=max(model.max_seq_len, base.data.seq_len)), base.data.seq_len)
    cfg = with_budget(base, model, int(budget / fpt))
    return SweepPoint(name, dataclasses.replace(cfg, name=name), _coords(cfg, n_kind, budget=float(budget)))
