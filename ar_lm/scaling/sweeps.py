"""Sweep definitions for scaling experiments: a model-size ladder, size x tokens grids, IsoFLOP
grids and WSD ladders (a constant-lr trunk per size with branched cooldowns). An experiment file defines ``sweep() -> Sweep``; `ar-lm sweep` runs it.

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
from ar_lm.scaling.hparams import HParamRule
from ar_lm.scaling.shapes import ShapeRule
from ar_lm.training.branch import branch_config
from ar_lm.training.optimizer import cooldown_steps, warmup_steps


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    name: str
    config: ExperimentConfig
    coords: dict  # N, D, C and the sweep's own coordinates (budget, size index, ...)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """How the sweep's dataset is made (`ar-lm prepare` arguments), if it is not given with --data."""

    source: str = "stdlib"  # stdlib | synthetic | shapes (procedural images, `ar_lm.data.synthetic.shape_images`)
    tokenizer: str = "byte"
    vocab_size: int = 0
    max_mb: float = 8.0
    synthetic_tokens: int = 2_000_000
    images: int = 100_000  # shapes: how many, of image_size x image_size grayscale pixels at `bits` bits
    image_size: int = 8
    bits: int = 4


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
    hparams: Optional[HParamRule] = None  # the points' size-aware hyperparameters, also for the held-out runs


def count_params(model: ModelConfig, n_kind: str) -> int:
    require(n_kind in ("total", "non_embedding"), f"n_kind must be 'total' or 'non_embedding', got {n_kind!r}")
    return param_counts(model)[n_kind]


def ladder(base: ModelConfig, rule: ShapeRule = ShapeRule(), n_kind: str = "non_embedding",
           max_params: float = 1e12) -> list[ModelConfig]:
    """Every shape under `rule` up to `max_params` (at least the smallest), by parameter count."""
    models = []
    for d_model in rule.widths():
        cfg = rule.model(base, d_model)
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


def _at_seq_len(model: ModelConfig, seq_len: int) -> ModelConfig:
    """`model` with room for `seq_len` positions (as a run of that window length builds it)."""
    return dataclasses.replace(model, max_seq_len=max(model.max_seq_len, seq_len))


def _run_fpt(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of `model` in a run of window `seq_len`."""
    return flops_per_token(_at_seq_len(model, seq_len), seq_len)


def with_budget(cfg: ExperimentConfig, model: ModelConfig, tokens: int, evals_per_run: int = 0,
                hparams: Optional[HParamRule] = None, n_kind: str = "non_embedding") -> ExperimentConfig:
    """`cfg` with `model`, the values `hparams` resolves for it (N by `n_kind`, D = tokens) and a token
    budget (steps = tokens / (batch * seq_len), at least 1); `evals_per_run` > 0 evaluates every
    steps // evals_per_run steps (Approach 1's validation curves)."""
    cfg = dataclasses.replace(cfg, model=_at_seq_len(model, cfg.data.seq_len))
    if hparams is not None:
        cfg, _ = hparams.apply(cfg, count_params(model, n_kind), tokens)
    steps = max(1, round(tokens / cfg.tokens_per_step))
    eval_every = max(1, steps // evals_per_run) if evals_per_run > 0 else cfg.train.eval_every
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, tokens=0, eval_every=eval_every))


def _coords(cfg: ExperimentConfig, n_kind: str, **extra) -> dict:
    """N (the `n_kind` count, what the fits use), both counts, D = steps * batch * seq_len, C = D * FLOPs/token,
    and the resolved hyperparameters (lr, batch size, beta2, weight decay, warmup steps)."""
    tokens = cfg.total_steps * cfg.tokens_per_step
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    counts = param_counts(cfg.model)
    o = cfg.optim
    return {"N": count_params(cfg.model, n_kind), "n_kind": n_kind, "N_total": counts["total"],
            "N_non_embedding": counts["non_embedding"], "D": tokens, "C": fpt * tokens, "flops_per_token": fpt,
            "n_layers": cfg.model.n_layers, "d_model": cfg.model.d_model, "n_heads": cfg.model.n_heads,
            "n_kv_heads": cfg.model.kv_heads, "d_ff": cfg.model.ff_dim, "lr": o.lr, "batch_size": cfg.data.batch_size,
            "b2": o.b2, "weight_decay": o.weight_decay,
            "warmup_steps": warmup_steps(o, cfg.total_steps, cfg.tokens_per_step), **extra}


def replicate(points: list[SweepPoint], seeds: Sequence[int]) -> list[SweepPoint]:
    """Each point once per seed s: `train.seed` = s, name `<name>_s<s>`, coords `seed` = s and `replicate_of` =
    `<name>` (a fit averages the replicates of one point); a branch's trunk (`train.branch_of`, coords `trunk`)
    becomes its own seed's trunk. No seeds: `points` as they are."""
    if not seeds:
        return points
    require(all(int(s) == s and s >= 0 for s in seeds) and len(set(seeds)) == len(seeds),
            f"seeds must be distinct integers >= 0, got {list(seeds)}: list each seed once")
    names = {p.name for p in points}
    seeded = lambda n, s: f"{n}_s{s}" if n in names else n  # noqa: E731  (a point's name; other text as it is)
    out = []
    for p in points:
        for s in map(int, seeds):
            train = dataclasses.replace(p.config.train, seed=s, branch_of=seeded(p.config.train.branch_of, s))
            coords = {**p.coords, "seed": s, "replicate_of": p.name}
            if "trunk" in coords:
                coords["trunk"] = seeded(coords["trunk"], s)
            name = seeded(p.name, s)
            out.append(SweepPoint(name, dataclasses.replace(p.config, name=name, train=train), coords))
    return out


def grid_sweep(base: ExperimentConfig, sizes: Sequence[float], tokens: Sequence[int], rule: ShapeRule = ShapeRule(),
               n_kind: str = "non_embedding", hparams: Optional[HParamRule] = None,
               seeds: Sequence[int] = ()) -> list[SweepPoint]:
    """Every model size x every token budget (`hparams`: per-point hyperparameters, see `with_budget`;
    `seeds`: each point once per seed, see `replicate`)."""
    points = []
    for i, n in enumerate(sizes):
        model = ladder_model(base.model, n, rule, n_kind)
        for j, d in enumerate(tokens):
            cfg = with_budget(base, model, d, hparams=hparams, n_kind=n_kind)
            name = f"n{i}_d{j}"
            points.append(SweepPoint(name, dataclasses.replace(cfg, name=name), _coords(cfg, n_kind, size_index=i, tokens_index=j)))
    return replicate(points, seeds)


def isoflop_sweep(base: ExperimentConfig, budgets: Sequence[float], sizes_per_budget: int = 4, spread: float = 3.0,
                  center_tokens_per_param: float = 20.0, rule: ShapeRule = ShapeRule(), n_kind: str = "non_embedding",
                  min_steps: int = 20, evals_per_run: int = 0, hparams: Optional[HParamRule] = None,
                  seeds: Sequence[int] = ()) -> list[SweepPoint]:
    """For each compute budget C, `sizes_per_budget` model sizes spaced log-evenly over a factor of
    `spread` on each side of the D = 20 N guess (N* = sqrt(C / (6 * 20))), with
    D = C / flops_per_token(N) so every point spends C (up to rounding of the step count);
    `evals_per_run` periodic evals per run and `hparams` per-point hyperparameters (see `with_budget`);
    `seeds`: each point once per seed (`replicate`)."""
    require(budgets, "an IsoFLOP sweep needs at least one budget")
    require(base.model.vocab_size > 0, "set model.vocab_size to the tokenizer's vocabulary (e.g. 257 for byte) so FLOPs are exact")
    require(sizes_per_budget >= 1, "sizes_per_budget must be >= 1")
    points = []
    for b, budget in enumerate(sorted(budgets)):
        n_star = math.sqrt(budget / (6 * center_tokens_per_param))
        exps = [0.0] if sizes_per_budget == 1 else [-1 + 2 * k / (sizes_per_budget - 1) for k in range(sizes_per_budget)]
        targets = [n_star * spread**e for e in exps]
        models = _pick_sizes(ladder(base.model, rule, n_kind, max(targets) * 8), targets, n_kind)
        for k, model in enumerate(models):
            fpt = _run_fpt(model, base.data.seq_len)
            tokens = budget / fpt
            cfg = with_budget(base, model, int(tokens), evals_per_run, hparams, n_kind)
            if tokens / cfg.tokens_per_step < min_steps:
                raise UserError(
                    f"budget {budget:.3g} FLOPs is too small for a {count_params(model, n_kind):,}-parameter model "
                    f"({tokens / cfg.tokens_per_step:.1f} steps < {min_steps}): raise the budget or shrink the models"
                )
            name = f"c{b}_n{k}"
            points.append(SweepPoint(name, dataclasses.replace(cfg, name=name),
                                     _coords(cfg, n_kind, budget=float(budget), budget_index=b, size_index=k)))
    return replicate(points, seeds)


def wsd_sweep(base: ExperimentConfig, sizes: Sequence[float], tokens: Sequence[int] = (),
              tokens_per_param: Sequence[float] = (), flops: Sequence[float] = (), cooldown_frac: float = 0.2,
              rule: ShapeRule = ShapeRule(), n_kind: str = "non_embedding", evals_per_run: int = 0,
              hparams: Optional[HParamRule] = None, seeds: Sequence[int] = ()) -> list[SweepPoint]:
    """A WSD ladder (Hägele et al. 2024): per size one trunk at constant lr, trained to the first step of
    the largest budget's cooldown with a kept checkpoint at every branch point, then one cooldown branch
    per data budget (`ar_lm.training.branch`). Budgets are `tokens`, `tokens_per_param` (D = r N) or
    `flops` (D = C / fpt(N): the branches of all sizes at one C form an IsoFLOP curve, coords `budget`).

    Points: `n<i>_trunk` (role "trunk", not a fit point) before its branches `n<i>_d<j>`. A branch's C
    counts its whole training, trunk share included, as a straight run of that budget would;
    `C_run` is what running the point costs (the trunk: its steps; a branch: its cooldown). `hparams`
    resolves once per size, at the largest budget (a trunk and its branches share one lr and batch);
    `evals_per_run` evaluations fall within the smallest budget, and the trunk and its branches
    evaluate at that interval (Approach 1's validation curves). `seeds`: the trunk and its branches once
    per seed (`replicate`), each branch on its own seed's trunk."""
    require(sum(map(bool, (tokens, tokens_per_param, flops))) == 1,
            "a WSD sweep takes one kind of budget: tokens, tokens_per_param or flops")
    require(0 < cooldown_frac <= 1, f"cooldown_frac must be in (0, 1], got {cooldown_frac}")
    trunk_base = dataclasses.replace(base, optim=dataclasses.replace(base.optim, schedule="constant"))
    points = []
    for i, n in enumerate(sizes):
        model = ladder_model(base.model, n, rule, n_kind)
        n_actual = count_params(model, n_kind)
        fpt = _run_fpt(model, base.data.seq_len)
        by_tokens = {int(d): None for d in tokens} or {int(r * n_actual): None for r in tokens_per_param} or {
            int(c / fpt): float(c) for c in flops}
        budgets = sorted(by_tokens)
        sized = with_budget(trunk_base, model, budgets[-1], hparams=hparams, n_kind=n_kind)
        per_step = sized.tokens_per_step
        steps = [max(1, round(d / per_step)) for d in budgets]
        cooldown = dataclasses.replace(sized.optim, schedule="wsd", cooldown_steps=0, cooldown_frac=cooldown_frac)
        starts = [t - cooldown_steps(cooldown, t) for t in steps]
        require(min(starts) >= 1, f"size {n_actual:,}: the smallest budget ({steps[0]} steps) is all cooldown: raise it")
        warm = _shared_warmup(sized, steps, starts, n_actual)  # the held-out run's recipe too (coords warmup_flops)
        recipe = {"warmup_flops": sized.optim.warmup_frac * min(flops)} if flops and not _explicit_warmup(sized) else {}
        sized = dataclasses.replace(sized, optim=dataclasses.replace(sized.optim, warmup_steps=warm, warmup_tokens=0,
                                                                      warmup_frac=0.0))
        trunk = with_budget(sized, model, max(starts) * per_step)
        eval_every = max(1, steps[0] // evals_per_run) if evals_per_run > 0 else trunk.train.eval_every
        trunk = dataclasses.replace(trunk, name=f"n{i}_trunk", train=dataclasses.replace(
            trunk.train, checkpoint_at_tokens=tuple(s * per_step for s in starts), eval_every=eval_every))
        coords = _coords(trunk, n_kind, size_index=i, role="trunk")
        points.append(SweepPoint(trunk.name, trunk, {**coords, "C_run": coords["C"]}))
        for j, t in enumerate(steps):
            cfg = branch_config(trunk, t * per_step, cooldown_frac, parent=trunk.name)
            cfg = dataclasses.replace(cfg, name=f"n{i}_d{j}")
            budget = {"budget": by_tokens[budgets[j]], "budget_index": j} if flops else {}
            coords = _coords(cfg, n_kind, size_index=i, tokens_index=j, role="branch", trunk=trunk.name,
                             branch_step=cfg.train.branch_step, **budget, **recipe)
            run_share = (cfg.total_steps - cfg.train.branch_step) / cfg.total_steps
            points.append(SweepPoint(cfg.name, cfg, {**coords, "C_run": coords["C"] * run_share}))
    return replicate(points, seeds)


def _explicit_warmup(cfg: ExperimentConfig) -> bool:
    return bool(cfg.optim.warmup_steps or cfg.optim.warmup_tokens)


def _shared_warmup(sized: ExperimentConfig, steps: list[int], starts: list[int], n: int) -> int:
    """The warmup W (steps) a trunk and all its branches share: the base's explicit `warmup_steps`/`warmup_tokens`,
    else `warmup_frac` of the smallest budget's run, so that with FLOP budgets every size warms up for the same
    share of each budget (the same compute) and the warmup share does not grow with N along an IsoFLOP curve
    (Porian et al. 2024). Every branch must cool down after it: W < its cooldown's first step."""
    o = sized.optim
    explicit = warmup_steps(o, steps[-1], sized.tokens_per_step)
    warm = explicit if _explicit_warmup(sized) else round(o.warmup_frac * steps[0])
    for t, start in zip(steps, starts):
        require(warm == 0 or warm < start, f"size {n:,}: the warmup ({warm} steps) does not end before the cooldown "
                f"of the {t}-step budget starts (step {start}): lower the warmup or raise the smallest budget")
    return warm


def wsd_compute(points: Sequence[SweepPoint]) -> dict:
    """{"spent": sum of C_run over all points, "independent": sum of the branches' C (each budget as its
    own run), "saved_frac": 1 - spent / independent}."""
    spent = sum(p.coords.get("C_run", p.coords["C"]) for p in points)
    independent = sum(p.coords["C"] for p in points if p.coords.get("role") != "trunk")
    return {"spent": spent, "independent": independent, "saved_frac": 1 - spent / independent if independent else 0.0}


def lr_sweep(base: ExperimentConfig, sizes: Sequence[float], lrs: Sequence[float], tokens_per_param: float = 20.0,
             batch_sizes: Sequence[int] = (), rule: ShapeRule = ShapeRule(), n_kind: str = "non_embedding",
             seeds: Sequence[int] = ()) -> list[SweepPoint]:
    """Every ladder size x every lr (x every batch size), each trained on tokens_per_param · N tokens.
    Points `n<i>_lr<j>` (`_b<k>` with several batch sizes); coords carry lr and batch_size, and
    `ar-lm fit-lr` (`ar_lm.scaling.hparams.fit_lr_sweep`) fits the optimal lr per size; `seeds`: each
    point once per seed (`replicate`), averaged by the fit."""
    require(len(lrs) >= 3, f"an lr sweep needs at least 3 learning rates to find an optimum, got {len(lrs)}")
    batches = tuple(batch_sizes) or (base.data.batch_size,)
    points = []
    for i, n in enumerate(sizes):
        model = ladder_model(base.model, n, rule, n_kind)
        tokens = int(tokens_per_param * count_params(model, n_kind))
        for k, b in enumerate(batches):
            for j, lr in enumerate(sorted(lrs)):
                cfg = dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr=float(lr)),
                                          data=dataclasses.replace(base.data, batch_size=int(b)))
                cfg = with_budget(cfg, model, tokens)
                name = f"n{i}_lr{j}" + (f"_b{k}" if len(batches) > 1 else "")
                points.append(SweepPoint(name, dataclasses.replace(cfg, name=name), _coords(cfg, n_kind, size_index=i)))
    return replicate(points, seeds)


def compute_optimal_point(base: ExperimentConfig, budget: float, n_opt: float, name: str, rule: ShapeRule = ShapeRule(),
                          n_kind: str = "non_embedding", hparams: Optional[HParamRule] = None,
                          points: Sequence[SweepPoint] = ()) -> SweepPoint:
    """One run at `budget` with the ladder model closest to `n_opt` parameters, the sweep's `hparams`, and the
    warmup recipe of its fit `points`: a WSD ladder's warmup of a fixed compute (coords `warmup_flops`) becomes
    that many FLOPs here too; otherwise the base's warmup (a fraction of the run, or fixed steps/tokens)."""
    model = ladder_model(base.model, n_opt, rule, n_kind)
    fpt = _run_fpt(model, base.data.seq_len)
    recipes = {p.coords["warmup_flops"] for p in points if "warmup_flops" in p.coords}
    require(len(recipes) <= 1, f"the sweep's points warm up for different compute ({sorted(recipes)}): "
            "build them with one warmup recipe")
    if recipes:
        optim = dataclasses.replace(base.optim, warmup_steps=0, warmup_frac=0.0,
                                    warmup_tokens=max(1, round(recipes.pop() / fpt)))
        base = dataclasses.replace(base, optim=optim)
    cfg = with_budget(base, model, int(budget / fpt), hparams=hparams, n_kind=n_kind)
    return SweepPoint(name, dataclasses.replace(cfg, name=name), _coords(cfg, n_kind, budget=float(budget)))
