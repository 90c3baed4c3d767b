"""Size-aware hyperparameters as data: a `HParamRule` maps a point's (N, D, C) to its learning rate,
batch size, AdamW beta2, warmup and weight decay by formulas, and learning-rate sweeps fit such a rule.

Porian et al. 2024 ("Resolving Discrepancies in Compute-Optimal Scaling of Language Models") show that
hyperparameters not set per size (warmup, lr, batch, beta2) cause most of the Kaplan/Chinchilla gap.

- `porian_2024()`: warmup = N tokens, lr = 0.0047 (N / 1.08e8)^(-1/3), batch = 160 (N / 1.08e8)^(2/3)
  sequences of 2048 tokens (their fits, as OLMo's model ladder uses them).
- `deepseek_2024()`: lr = 0.3118 C^-0.125, batch = 0.2920 C^0.3271 tokens (Bi et al. 2024, "DeepSeek
  LLM", Eq. 1; C in FLOPs).
- `ar_lm.scaling.sweeps.lr_sweep` trains every size at every lr (and batch size); `fit_lr_sweep` finds each size's optimal
  lr (the vertex of a parabola in ln lr through the lowest point and its neighbours; an optimum at the
  grid's edge is an error naming the size) and a power law lr*(N) = k (N / N_ref)^e with a parametric
  bootstrap interval, written as a rule that `HParamRule.from_fit(path)` loads (`ar-lm fit-lr`). Seed
  replicates (`lr_sweep(..., seeds=...)`) are averaged first, their spread in each point's loss_se.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from ar_lm.config import ExperimentConfig
from ar_lm.errors import UserError, require
from ar_lm.io import atomic_write_json
from ar_lm.model.counts import flops_per_token
from ar_lm.scaling.fit import interval
from ar_lm.scaling.isoflop import budget_minimum
from ar_lm.scaling.points import replicate_mean
from ar_lm.training import rundir


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = coef · (x / ref)^exponent, x the point's `of`: "N" (parameters), "D" (tokens) or "C" (FLOPs)."""

    coef: float
    exponent: float
    ref: float = 1.0
    of: str = "N"

    def __call__(self, n: float, d: float, c: float) -> float:
        x = {"N": n, "D": d, "C": c}[self.of]
        return self.coef * (x / self.ref) ** self.exponent


@dataclasses.dataclass(frozen=True)
class HParamRule:
    """What a sweep sets per point; None keeps the base config's value. `batch_tokens` is rounded to
    whole sequences, a multiple of `batch_multiple` (e.g. the data-parallel size)."""

    name: str
    source: str = ""
    lr: Optional[PowerLaw] = None
    batch_tokens: Optional[PowerLaw] = None
    b2: Optional[float] = None
    warmup_tokens_per_param: Optional[float] = None  # warmup = r · N tokens
    weight_decay: Optional[float] = None
    batch_multiple: int = 1

    def resolve(self, cfg: ExperimentConfig, n: float, tokens: float) -> dict:
        """{field: value} this rule sets for a model of N parameters trained on `tokens` (`cfg.model` gives fpt)."""
        c = flops_per_token(cfg.model, cfg.data.seq_len) * tokens
        out = {}
        if self.lr is not None:
            out["lr"] = float(self.lr(n, tokens, c))
        if self.batch_tokens is not None:
            seqs = self.batch_tokens(n, tokens, c) / cfg.data.seq_len
            out["batch_size"] = max(self.batch_multiple, round(seqs / self.batch_multiple) * self.batch_multiple)
        if self.b2 is not None:
            out["b2"] = self.b2
        if self.warmup_tokens_per_param is not None:
            out["warmup_tokens"] = max(1, round(self.warmup_tokens_per_param * n))
        if self.weight_decay is not None:
            out["weight_decay"] = self.weight_decay
        return out

    def apply(self, cfg: ExperimentConfig, n: float, tokens: float) -> tuple[ExperimentConfig, dict]:
        """(`cfg` with the resolved values, the values); warmup in tokens replaces a step or fraction warmup."""
        values = self.resolve(cfg, n, tokens)
        optim = {k: v for k, v in values.items() if k in ("lr", "b2", "weight_decay", "warmup_tokens")}
        if "warmup_tokens" in optim:
            optim["warmup_steps"] = 0
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **optim))
        if "batch_size" in values:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=values["batch_size"]))
        return cfg, values

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "HParamRule":
        laws = {k: PowerLaw(**d[k]) if d.get(k) else None for k in ("lr", "batch_tokens")}
        return cls(**{**d, **laws})

    @classmethod
    def from_fit(cls, path: str | Path) -> "HParamRule":
        """The rule `fit_lr_sweep` wrote (its `rule` entry)."""
        path = Path(path)
        require(path.is_file(), f"hyperparameter fit {path} does not exist: run `ar-lm fit-lr SWEEP_DIR` first")
        return cls.from_json(json.loads(path.read_text())["rule"])


def porian_2024(b2: Optional[float] = None) -> HParamRule:
    return HParamRule("porian_2024", "Porian et al. 2024 (fits as in OLMo's model ladder)",
                      lr=PowerLaw(0.0047, -1 / 3, 1.08e8), batch_tokens=PowerLaw(160 * 2048, 2 / 3, 1.08e8),
                      b2=b2, warmup_tokens_per_param=1.0)


def deepseek_2024() -> HParamRule:
    return HParamRule("deepseek_2024", "Bi et al. 2024, DeepSeek LLM, Eq. 1",
                      lr=PowerLaw(0.3118, -0.1250, 1.0, "C"), batch_tokens=PowerLaw(0.2920, 0.3271, 1.0, "C"))


# ---------------------------------------------------------------------------------------------
# Learning-rate sweeps


def _optimum(x: np.ndarray, loss: np.ndarray, what: str, label: str) -> float:
    """The vertex of a parabola through the lowest point and its two neighbours (in x = ln value)."""
    order = np.argsort(x)
    x, loss = x[order], loss[order]
    best = int(np.argmin(loss))
    require(0 < best < len(x) - 1, f"{label}: the lowest loss is at the {'smallest' if best == 0 else 'largest'} "
            f"{what} ({math.exp(x[best]):.3g}): widen the sweep's {what} grid past it")
    found = budget_minimum(x[best - 1 : best + 2], loss[best - 1 : best + 2], window=float("inf"))
    require("x_min" in found, f"{label}: no {what} optimum ({found.get('reason', '')})")
    return found["x_min"]


def _per_size_optima(rows: list[dict]) -> list[dict]:
    """Per size: the optimal lr at its best batch size and, with >= 3 batch sizes, the optimal batch size
    of the per-batch minima. Raises UserError naming a size whose optimum is at the grid's edge."""
    per_size = []
    for n in sorted({r["N"] for r in rows}):
        mine = [r for r in rows if r["N"] == n]
        batches = sorted({r["batch_size"] for r in mine})
        best_by_batch = []
        for b in batches:
            at_b = [r for r in mine if r["batch_size"] == b]
            x_min = _optimum(np.log([r["lr"] for r in at_b]), np.array([r["loss"] for r in at_b]), "learning rate",
                             f"size N={n:,.0f} (batch {b})")
            best_by_batch.append((b, math.exp(x_min), min(r["loss"] for r in at_b)))
        b_best, lr_best, _ = min(best_by_batch, key=lambda t: t[2])
        entry = {"N": n, "lr_opt": lr_best, "batch_size": b_best, "seeds": min(r.get("seeds", 1) for r in mine)}
        if len(batches) >= 3:
            entry["batch_opt"] = math.exp(_optimum(np.log([t[0] for t in best_by_batch]),
                                                   np.array([t[2] for t in best_by_batch]), "batch size",
                                                   f"size N={n:,.0f}"))
        per_size.append(entry)
    return per_size


def _log_law(n: np.ndarray, y: np.ndarray, ref: float) -> tuple[float, float]:
    """(k, e) of y = k (N / ref)^e by least squares in log space."""
    e, logk = np.polyfit(np.log(n / ref), np.log(y), 1)
    return float(math.exp(logk)), float(e)


def average_seeds(rows: list[dict]) -> list[dict]:
    """The fit's points: rows with a `seed` that share (N, lr, batch_size) (a point's seed replicates) become one
    row with loss = mean(L_i) and loss_se² = mean(se_i²)/k + var(L_i)/k (`replicate_mean`), `seeds` = k; a row
    without a seed stays as it is (`seeds` 1)."""
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["N"], r["lr"], r["batch_size"]) if "seed" in r else i, []).append(r)
    out = []
    for reps in groups.values():
        seeds = [r["seed"] for r in reps if "seed" in r]
        require(len(set(seeds)) == len(seeds), f"size N={reps[0]['N']:,.0f}, lr {reps[0]['lr']:.3g}, batch "
                f"{reps[0]['batch_size']}: seeds {sorted(seeds)} repeat: give each replicate its own seed")
        row = {k: v for k, v in reps[0].items() if k != "seed"}
        if len(reps) > 1:
            row["loss"], row["loss_se"] = replicate_mean([r["loss"] for r in reps],
                                                         [r.get("loss_se") or 0.0 for r in reps])
        out.append({**row, "seeds": len(reps)})
    return out


def _bootstrap(rows: list[dict], n_arr: np.ndarray, ref: float, keys: list[str], n_boot: int,
               seed: int) -> tuple[dict, list[list[float]]]:
    """Per law key the exponents of `n_boot` parametric replicates (each loss redrawn from N(loss, loss_se²)), and
    per size its replicates' lr_opt; a replicate whose optimum leaves the grid is dropped."""
    column = {"lr": "lr_opt", "batch": "batch_opt"}
    rng = np.random.default_rng(seed)
    boots, lr_opts = {k: [] for k in keys}, [[] for _ in n_arr]
    for _ in range(n_boot):
        redrawn = [dict(r, loss=r["loss"] + rng.normal(0, r.get("loss_se") or 0.0)) for r in rows]
        try:
            again = _per_size_optima(redrawn)
        except UserError:
            continue
        for k in keys:
            boots[k].append(_log_law(n_arr, np.array([e[column[k]] for e in again]), ref)[1])
        for opts, e in zip(lr_opts, again):
            opts.append(e["lr_opt"])
    return boots, lr_opts


def fit_lr_sweep(rows: list[dict], n_boot: int = 200, seed: int = 0) -> dict:
    """rows: {N, lr, batch_size, seq_len, loss, loss_se[, seed]} of finished runs, seed replicates averaged
    (`average_seeds`, the result's `points`). Per-size optima (`_per_size_optima`), power laws lr*(N) (and
    batch*(N)) through them, and a parametric bootstrap: every replicate redraws each loss from
    N(loss, loss_se²) and repeats the whole procedure (a replicate whose optimum leaves the grid fails; the
    count of successes is reported), giving the exponents' intervals and each size's `lr_opt_ci`."""
    require(len({r["N"] for r in rows}) >= 2, f"an lr fit needs at least 2 sizes, got {len({r['N'] for r in rows})}")
    rows = average_seeds(rows)
    per_size = _per_size_optima(rows)
    n_arr = np.array([e["N"] for e in per_size])
    ref = float(np.exp(np.mean(np.log(n_arr))))
    keys = ["lr"] + (["batch"] if all("batch_opt" in e for e in per_size) else [])
    column = {"lr": "lr_opt", "batch": "batch_opt"}
    fits = {k: dict(zip(("coef_at_ref", "exponent"), _log_law(n_arr, np.array([e[column[k]] for e in per_size]), ref)))
            for k in keys}
    boots, lr_opts = _bootstrap(rows, n_arr, ref, keys, n_boot, seed)
    for k in keys:
        fits[k]["exponent_ci"] = interval(boots[k])
        fits[k]["bootstrap_ok"] = [len(boots[k]), n_boot]
    for e, opts in zip(per_size, lr_opts):
        e["lr_opt_ci"] = interval(opts)
    lr_law = PowerLaw(fits["lr"]["coef_at_ref"], fits["lr"]["exponent"], ref)
    batch_law = (PowerLaw(fits["batch"]["coef_at_ref"] * rows[0]["seq_len"], fits["batch"]["exponent"], ref)
                 if "batch" in fits else None)
    rule = HParamRule("lr_sweep_fit", "fit_lr_sweep", lr=lr_law, batch_tokens=batch_law)
    return {"sizes": per_size, "fits": fits, "ref_N": ref, "rule": rule.to_json(), "points": rows}


def lr_sweep_rows(sweep_dir: Path) -> list[dict]:
    """{N, lr, batch_size, seq_len, loss, loss_se} of every finished point of an `lr_sweep` sweep directory (of
    the sweep as defined now: sweep.json's `current`)."""
    listing_path = Path(sweep_dir) / "sweep.json"
    require(listing_path.is_file(), f"{sweep_dir} is not a sweep directory (no sweep.json): run `ar-lm sweep` first")
    rows, listing = [], json.loads(listing_path.read_text())
    current = set(listing.get("current", [p["name"] for p in listing["points"]]))
    for p in (p for p in listing["points"] if p["name"] in current):
        c = p["coords"]
        require("lr" in c, f"{sweep_dir} is not an lr sweep: its points have no lr coordinate (use lr_sweep)")
        s = rundir.read_summary(Path(sweep_dir) / "runs" / p["name"])
        if s and s.get("val_loss") is not None and math.isfinite(s["val_loss"]):
            cfg = rundir.load_run_config(Path(sweep_dir) / "runs" / p["name"])
            rows.append({"N": c["N"], "lr": c["lr"], "batch_size": c["batch_size"], "seq_len": cfg.data.seq_len,
                         "loss": s["val_loss"], "loss_se": s.get("val_loss_se") or 0.0,
                         **({"seed": c["seed"]} if "seed" in c else {})})  # a seed replicate (`replicate`)
    return rows


def fit_lr_command(args) -> int:
    """`ar-lm fit-lr SWEEP_DIR [--out FILE]`: per-size optimal lr and the rule, to SWEEP_DIR/lr_fit.json."""
    require(args.bootstrap >= 0, f"--bootstrap must be >= 0, got {args.bootstrap}")
    result = fit_lr_sweep(lr_sweep_rows(Path(args.sweep_dir)), n_boot=args.bootstrap)
    out = Path(args.out or Path(args.sweep_dir) / "lr_fit.json")
    atomic_write_json(out, result)
    for e in result["sizes"]:
        ci_n = e["lr_opt_ci"]
        print(f"[fit-lr] N={e['N']:>12,.0f}: lr* = {e['lr_opt']:.3g}"
              + (f" [{ci_n[0]:.3g}, {ci_n[1]:.3g}]" if ci_n else "")
              + f" (batch {e['batch_size']}" + (f", mean of {e['seeds']} seeds)" if e["seeds"] > 1 else ")")
              + (f", batch* = {e['batch_opt']:.3g}" if "batch_opt" in e else ""))
    lr = result["fits"]["lr"]
    ci = lr["exponent_ci"]
    print(f"[fit-lr] lr*(N) = {lr['coef_at_ref']:.3g} (N / {result['ref_N']:.3g})^{lr['exponent']:.3f}"
          + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f"; rule written to {out}")
    return 0
