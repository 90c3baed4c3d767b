"""Whole-loss-curve laws: the multi-power law (MPL) of Luo et al. 2025, "A Multi-Power Law for Loss Curve
Prediction Across Learning Rate Schedules" (arXiv 2503.12811), fitted per model size to its runs' loss
curves with their lr schedules, to predict a run's loss under another schedule (a WSD ladder's later
cooldown branches from its trunk and earliest branch).

    L(t) = L0 + A (S1(t) + S_W)^(-alpha) - LD(t),       S1(t) + S_W = sum_{tau <= t} eta_tau
    LD(t) = B sum_{k=1}^{t} (eta_{k-1} - eta_k) G(eta_k^(-gamma) S_k(t)),   S_k(t) = sum_{tau=k}^{t} eta_tau
    G(x) = 1 - (C x + 1)^(-beta)

t counts the updates applied before the loss was measured; eta_tau is the lr of update tau (1-based; the
arrays here are 0-based: `lrs[i]` is update i+1's). A train record at logged step s measured the batch loss
before update s, so t = s - 1; a val record at step s has t = s. The warmup (the updates up to the first
peak of the lr) counts in the lr sum (S_W) but not in LD, and only post-warmup losses are fitted. Fits
minimise the Huber loss (delta 1e-3, as the paper) of log loss residuals, each curve weighted equally,
by L-BFGS-B from the best starts of a grid whose linear parameters (L0, A, B) are solved exactly, with a
weak log-normal prior on beta and gamma (centre 0.5, sd 0.5 in log units; one cooldown hardly tells them
apart) and C bounded to the saturating regime (`_bounds`); lrs are scaled by the peak lr inside the fit,
the parameters returned in the units of the lrs given. Train losses of single batches are noisy: Huber residuals fit their
median, and a run's final train loss is the mean of its last `LAST_K` logged ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import minimize

from ar_lm.config import load_json
from ar_lm.errors import require
from ar_lm.training import rundir
from ar_lm.training.metrics import read_jsonl

HUBER_DELTA = 1e-3
PRIOR_CENTER, PRIOR_SD = 0.5, 0.5  # weak log-normal prior on beta and gamma (sd in log units)
START_FRAC = 0.1  # a sweep's fits leave out the first 10% of the trunk (the fast early phase is no power law)
MIN_POINTS = 4  # logged train losses a fitted branch needs in its cooldown
LAST_K = 5  # logged train losses averaged for a run's final train loss (single batches are noisy)
NAMES = ("L0", "A", "alpha", "B", "C", "beta", "gamma")


@dataclasses.dataclass(frozen=True)
class MPLParams:
    L0: float
    A: float
    alpha: float
    B: float
    C: float
    beta: float
    gamma: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Design:
    """One curve's fixed quantities: lr sums s at the fitted t, S_k(t) for every k with a drop, drops d, log eta_k."""

    s: np.ndarray
    S: np.ndarray  # (points, drops)
    d: np.ndarray
    log_eta: np.ndarray
    y: np.ndarray  # log loss
    w: float  # weight of each point (1 / points: curves count equally)


def warmup_end(lrs: np.ndarray) -> int:
    """Index of the first update at the peak lr (the warmup is the updates before it)."""
    return int(np.argmax(np.asarray(lrs) >= np.max(lrs) * (1 - 1e-6)))


def _drops(lrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices j > warmup with eta[j-1] != eta[j], the drops eta[j-1] - eta[j])."""
    j = np.arange(warmup_end(lrs) + 1, len(lrs))
    d = lrs[j - 1] - lrs[j]
    keep = d != 0
    return j[keep], d[keep]


def _design(lrs, t, loss, scale: float, t_min: int = 0) -> Optional[_Design]:
    lrs = np.asarray(lrs, float) / scale
    t, loss = np.asarray(t, int), np.asarray(loss, float)
    require(len(t) == len(loss) and np.all((t >= 0) & (t <= len(lrs))), "curve steps must lie in 0..len(lrs)")
    keep = (t > warmup_end(lrs)) & (t >= t_min) & np.isfinite(loss) & (loss > 0)
    t, loss = t[keep], loss[keep]
    if not len(t):
        return None
    cum = np.concatenate([[0.0], np.cumsum(lrs)])
    j, d = _drops(lrs)
    S = np.clip(cum[t][:, None] - cum[j][None, :], 0.0, None)
    return _Design(cum[t], S, d, np.log(lrs[j]), np.log(loss), 1.0 / len(t))


def _terms(th: np.ndarray, g: _Design):
    """(prediction, its derivatives) of one curve at theta = (L0, log A, log alpha, log B, log C, log beta, log gamma)."""
    L0, A, alpha, B, C, beta, gamma = th[0], *np.exp(th[1:])
    p = g.s ** -alpha
    z = C * g.S * np.exp(-gamma * g.log_eta)[None, :]
    lu = np.log1p(z)
    v = np.exp(-beta * lu)
    LD = (1 - v) @ g.d
    W = beta * v / (1 + z) * z
    jac = np.stack([np.ones_like(p), A * p, -A * p * alpha * np.log(g.s), -B * LD, -B * (W @ g.d),
                    -B * ((beta * v * lu) @ g.d), -B * (W @ (g.d * -gamma * g.log_eta))], axis=1)
    return L0 + A * p - B * LD, jac


def _objective(th: np.ndarray, designs: Sequence[_Design], delta: float, prior: float) -> tuple[float, np.ndarray]:
    """Huber loss of the log residuals / delta^2 (each curve's mean) plus the prior on log beta, log gamma."""
    dev = (th[5:] - np.log(PRIOR_CENTER)) / PRIOR_SD
    total, grad = 0.5 * prior * float(dev @ dev), np.zeros(len(th))
    grad[5:] = prior * dev / PRIOR_SD
    for g in designs:
        pred, jac = _terms(th, g)
        if np.any(~np.isfinite(pred)) or np.any(pred <= 0):
            return 1e12, np.zeros(len(th))
        r = g.y - np.log(pred)
        a = np.abs(r)
        total += g.w * np.sum(np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))) / delta**2
        grad += g.w * (np.clip(r, -delta, delta) / -pred) @ jac / delta**2
    return float(total), grad


def _linear_start(nonlin: tuple, designs: Sequence[_Design]) -> np.ndarray:
    """theta with (L0, A, B) solved by weighted least squares on the loss for fixed (alpha, C, beta, gamma)
    (A and B at least 1e-6)."""
    th = np.array([0.0, 0.0, np.log(nonlin[0]), 0.0, *np.log(nonlin[1:])])
    rows, ys = [], []
    for g in designs:
        _, jac = _terms(th, g)  # with A = B = 1: columns 1, p, -LD
        rows.append(jac[:, [0, 1, 3]] * np.sqrt(g.w))
        ys.append(np.exp(g.y) * np.sqrt(g.w))
    coef = np.linalg.lstsq(np.concatenate(rows), np.concatenate(ys), rcond=None)[0]
    return np.array([coef[0], np.log(max(coef[1], 1e-6)), th[2], np.log(max(coef[2], 1e-6)), *th[4:]])


def _bounds(designs: Sequence[_Design]) -> list:
    """Box bounds on theta: B at most the largest loss over the largest total drop (LD <= L); C x at least 1 at the
    longest fitted decay (G >= 1 - 2^-beta there, the saturating regime of the paper's fits: below it G is
    linear in C and B C is all one decay can fit, which extrapolates without limit)."""
    s_ref = max(float(g.S.max()) for g in designs if g.S.size)
    lmax = max(float(np.exp(g.y).max()) for g in designs)
    drop = max(float(g.d.sum()) for g in designs if g.d.size)
    return [(0.0, lmax), (-20, 20), (np.log(0.01), np.log(5)), (-20, np.log(lmax / drop)),
            (np.log(1.0 / s_ref), np.log(1e4 / s_ref)), (np.log(0.01), np.log(20)), (np.log(1e-3), np.log(3))]


def fit_mpl(curves: Sequence[tuple], t_min: int = 0, delta: float = HUBER_DELTA, prior: float = 1.0,
            starts: int = 4) -> dict:
    """Fit the MPL to curves (lr_per_step, t, loss) of one model size: `lr_per_step` the lr of every update,
    `t` the updates applied before each `loss`. At least one curve must decay its lr after the warmup.
    Losses at t < `t_min` are left out; `prior` weighs the prior on beta and gamma (0: none).
    Returns {"params": MPLParams.to_dict(), "objective", "rmse_log", "points", "converged"} (JSON-serialisable)."""
    require(len(curves) >= 1, "fit_mpl needs at least one curve")
    scale = max(float(np.max(c[0])) for c in curves)
    designs = [d for d in (_design(lrs, t, loss, scale, t_min) for lrs, t, loss in curves) if d is not None]
    require(any(g.d.size for g in designs), "fit_mpl needs a curve whose lr decays after its warmup (B, C, beta, "
            "gamma are fitted from the decay): add a cooldown or decaying run")
    bounds = _bounds(designs)
    (lo, hi), s_ref = np.array(bounds).T, np.exp(bounds[4][0])
    grid = [(a, c / s_ref, b, gm) for a in (0.15, 0.3, 0.5, 0.8) for c in (1.0, 3.0, 10.0, 100.0)
            for b in (0.3, 0.6, 1.2) for gm in (0.25, 0.6)]
    fun = lambda th: _objective(th, designs, delta, prior)  # noqa: E731
    cands = [np.clip(_linear_start(n, designs), lo, hi) for n in grid]
    cands.sort(key=lambda th: fun(th)[0])
    best = min((minimize(fun, th0, jac=True, method="L-BFGS-B", bounds=bounds,
                         options={"maxiter": 3000, "ftol": 1e-13, "gtol": 1e-9}) for th0 in cands[:starts]),
               key=lambda res: res.fun)
    resid = np.concatenate([g.y - np.log(_terms(best.x, g)[0]) for g in designs])
    return {"params": _unscale(best.x, scale).to_dict(), "objective": float(best.fun),
            "rmse_log": float(np.sqrt(np.mean(resid**2))), "points": int(len(resid)), "converged": bool(best.success)}


def _unscale(th: np.ndarray, scale: float) -> MPLParams:
    """Parameters for raw lrs from theta fitted on lrs / scale."""
    L0, A, alpha, B, C, beta, gamma = th[0], *np.exp(th[1:])
    return MPLParams(float(L0), float(A * scale**alpha), float(alpha), float(B / scale),
                     float(C * scale ** (gamma - 1)), float(beta), float(gamma))


def predict_mpl(params, lr_per_step, steps=None) -> np.ndarray:
    """The MPL's loss after t updates of `lr_per_step` for every t in `steps` (default 1..T); `params` an
    MPLParams or its dict. The final loss is `predict_mpl(params, lrs, [len(lrs)])[0]`."""
    p = params if isinstance(params, MPLParams) else MPLParams(**{k: params[k] for k in NAMES})
    lrs = np.asarray(lr_per_step, float)
    t = np.arange(1, len(lrs) + 1) if steps is None else np.asarray(steps, int)
    require(np.all((t >= 1) & (t <= len(lrs))), f"steps must lie in 1..{len(lrs)}")
    cum = np.concatenate([[0.0], np.cumsum(lrs)])
    j, d = _drops(lrs)
    e = p.C * lrs[j] ** -p.gamma
    out = np.empty(len(t))
    chunk = max(1, 4_000_000 // max(1, len(j)))
    for a in range(0, len(t), chunk):  # rows in chunks: (points x drops) stays small for long schedules
        S = np.clip(cum[t[a:a + chunk]][:, None] - cum[j][None, :], 0.0, None)
        LD = (1 - (1 + e[None, :] * S) ** -p.beta) @ d
        out[a:a + chunk] = p.L0 + p.A * cum[t[a:a + chunk]] ** -p.alpha - p.B * LD
    return out


@dataclasses.dataclass(frozen=True)
class RunCurve:
    """A run of a WSD ladder: its lr per update (from its config), its own train losses (a branch's from its
    branch point on; the trunk's history it copied is left out) and its final val loss."""

    name: str
    role: str  # "trunk" or "branch"
    lrs: np.ndarray
    t: np.ndarray
    loss: np.ndarray
    branch_step: int
    final_val_loss: Optional[float]
    finished: bool

    @property
    def steps(self) -> int:
        return len(self.lrs)


def schedule_lrs(cfg) -> np.ndarray:
    """The lr of every update of the run `cfg` (its optimizer's schedule, exactly)."""
    from ar_lm.training.optimizer import lr_schedule

    sched = lr_schedule(cfg.optim, cfg.total_steps, cfg.tokens_per_step)
    return np.asarray(sched(np.arange(cfg.total_steps)), float)


def _run_curve(sweep_dir: Path, point: dict) -> RunCurve:
    run = sweep_dir / "runs" / point["name"]
    ran = rundir.is_run_dir(run)
    cfg = rundir.load_run_config(run) if ran else load_json(sweep_dir / "points" / f"{point['name']}.json")
    start = int(point["coords"].get("branch_step", 0) or 0)
    records = read_jsonl(run / rundir.METRICS) if ran else []
    train = [r for r in records if r.get("split") == "train" and r.get("loss") is not None and r["step"] > start]
    summary = rundir.read_summary(run) if ran else None
    arr = lambda rs, key, off=0: np.array([r[key] - off for r in rs], float if key == "loss" else int)  # noqa: E731
    return RunCurve(point["name"], point["coords"].get("role", ""), schedule_lrs(cfg), arr(train, "step", 1),
                    arr(train, "loss"), start, (summary or {}).get("val_loss"), bool(summary))


def curves_from_sweep(sweep_dir) -> dict:
    """{trunk name: {"N": params, "trunk": RunCurve, "branches": [RunCurve by length]}} for each WSD trunk of the
    sweep (sweep.json); a branch not yet run has empty curves and finished False."""
    sweep_dir = Path(sweep_dir)
    require((sweep_dir / "sweep.json").is_file(), f"{sweep_dir} is no sweep directory (no sweep.json): run `ar-lm sweep`")
    points = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    groups = {p["name"]: {"N": p["coords"].get("N"), "trunk": _run_curve(sweep_dir, p), "branches": []}
              for p in points if p["coords"].get("role") == "trunk"}
    require(groups, f"{sweep_dir} has no WSD trunk: whole-curve fits need a WSD ladder (`wsd_sweep`)")
    for p in points:
        if p["coords"].get("role") == "branch" and p["coords"].get("trunk") in groups:
            groups[p["coords"]["trunk"]]["branches"].append(_run_curve(sweep_dir, p))
    for g in groups.values():
        g["branches"].sort(key=lambda c: c.steps)
    return groups


def _branch_row(params: dict, b: RunCurve, trunk: RunCurve, fitted: RunCurve, gap: float) -> dict:
    """Predicted vs measured final loss of branch `b`, and two naive baselines: the trunk's loss at that step,
    and the trunk's at b's branch point minus the drop `fitted` (branch) made over its cooldown."""
    tail = b.t[-LAST_K:]
    pred = float(np.mean(predict_mpl(params, b.lrs, tail)))
    meas = float(np.mean(b.loss[-len(tail):]))
    trunk_at = lambda step: float(np.mean(trunk.loss[np.argsort(np.abs(trunk.t - step))[:len(tail)]]))  # noqa: E731
    base_trunk = trunk_at(tail[-1])  # constant lr at (about) that step: no cooldown credit
    base_drop = trunk_at(b.branch_step) - (trunk_at(fitted.branch_step) - float(np.mean(fitted.loss[-len(tail):])))
    end = float(predict_mpl(params, b.lrs, [b.steps])[0])
    row = {"name": b.name, "steps": b.steps, "branch_step": b.branch_step, "tail_t": [int(x) for x in tail],
           "predicted_train": pred, "measured_train": meas, "rel_err_train": pred / meas - 1,
           "baseline_trunk": base_trunk, "rel_err_baseline_trunk": base_trunk / meas - 1,
           "baseline_same_drop": base_drop, "rel_err_baseline_same_drop": base_drop / meas - 1,
           "trunk_reaches_step": bool(trunk.t.size and trunk.t.max() >= tail[-1]), "predicted_train_at_end": end}
    if b.final_val_loss is not None:
        v = float(b.final_val_loss)
        row |= {"measured_val": v, "rel_err_val_raw": end / v - 1, "predicted_val_shifted": end + gap,
                "rel_err_val_shifted": (end + gap) / v - 1}
    return row


def _fit_group(trunk: RunCurve, fit_on: Sequence[RunCurve], start_frac: float = START_FRAC, **kw) -> dict:
    """`fit_mpl` on the trunk and `fit_on`, from `start_frac` of the trunk's logged steps on."""
    curves = [(c.lrs, c.t, c.loss) for c in (trunk, *fit_on) if c.t.size]
    return fit_mpl(curves, t_min=int(start_frac * trunk.t.max()), **kw)


def _measured(g: dict) -> list[RunCurve]:
    return [b for b in g["branches"] if b.finished and b.t.size]


def _val_gap(params: dict, run: RunCurve) -> Optional[float]:
    """The run's final val loss minus the law's (train) loss at its end (None without a val loss)."""
    if run.final_val_loss is None:
        return None
    return float(run.final_val_loss) - float(predict_mpl(params, run.lrs, [run.steps])[0])


def _check_group(name: str, g: dict, fit_branches: int, fit_kw: dict) -> dict:
    """One size of `check_sweep_curves`: the fit on the trunk and the earliest branches, rows for the later ones."""
    done = _measured(g)
    entry = {"trunk": name, "N": g["N"], "fit_on": [name] + [b.name for b in done[:fit_branches]]}
    if not g["trunk"].t.size or len(done) <= fit_branches:
        return entry | {"skipped": f"needs a trained trunk and more than {fit_branches} finished branches"}
    few = [b.name for b in done[:fit_branches] if len(b.t) < MIN_POINTS]
    if few:
        return entry | {"skipped": f"{', '.join(few)} logged fewer than {MIN_POINTS} train losses in its cooldown "
                                   "(the decay terms are fitted from them): log more often (train.log_every)"}
    fit = _fit_group(g["trunk"], done[:fit_branches], **fit_kw)
    last = done[fit_branches - 1]
    gap = _val_gap(fit["params"], last)
    rows = [_branch_row(fit["params"], b, g["trunk"], last, gap or 0.0) for b in done[fit_branches:]]
    return entry | {"fit": fit, "val_gap": gap, "branches": rows}


def _abs_errs(sizes: list, key: str) -> dict:
    errs = [abs(r[key]) for e in sizes for r in e.get("branches", []) if key in r]
    return {"median": float(np.median(errs)), "max": float(max(errs)), "n": len(errs)} if errs else {}


def check_sweep_curves(sweep_dir, fit_branches: int = 1, **fit_kw) -> dict:
    """Per size: fit the MPL on the trunk plus the earliest `fit_branches` finished branches and predict the
    final loss of every later finished branch. Compared: the mean train loss of the branch's last `LAST_K`
    logged batches with the law's mean at those t (the law is fitted to train loss); and the final val loss
    with the law's loss at the end, raw and shifted by the last fitted branch's val - law gap (`val_gap`)."""
    sizes = [_check_group(name, g, fit_branches, fit_kw) for name, g in curves_from_sweep(sweep_dir).items()]
    return {"law": "multi-power law (Luo et al. 2025, arXiv 2503.12811)", "sweep": str(sweep_dir),
            "compared": f"train: mean of the last {LAST_K} logged train batches vs the law at the same steps; "
                        "val: final val loss vs the law at the last step + the fitted branch's val gap",
            "sizes": sizes, "abs_rel_err_train": _abs_errs(sizes, "rel_err_train"),
            "abs_rel_err_val_shifted": _abs_errs(sizes, "rel_err_val_shifted")}


def predictable_branches(sweep_dir, tolerance: float = 0.01, **fit_kw) -> dict:
    """Per size, which branches not yet run the MPL can stand in for, so that a sweep could skip them. The
    check: `check_sweep_curves`'s predictions of the measured branches after the earliest (val shifted where
    every one has a val loss, else train); a branch is predictable when their worst relative error is within
    `tolerance` and it extrapolates no further (steps / the longest measured branch's) than the check did
    (the longest measured / the earliest). Its predicted loss comes from a fit on the trunk and every measured
    branch, plus the longest one's val gap. {"tolerance", "sizes": [...], "skippable": [names]}."""
    sizes, skippable = [], []
    for name, g in curves_from_sweep(sweep_dir).items():
        done, todo = _measured(g), [b for b in g["branches"] if not b.finished]
        check = _check_group(name, g, 1, fit_kw)
        entry = {"trunk": name, "N": g["N"], "tolerance": tolerance, "measured": [b.name for b in done]}
        if "skipped" in check:
            sizes.append(entry | {"predictable": [], "reason": check["skipped"]})
            continue
        key = "rel_err_val_shifted" if all("rel_err_val_shifted" in r for r in check["branches"]) else "rel_err_train"
        err = max(abs(r[key]) for r in check["branches"])
        horizon = done[-1].steps / done[0].steps
        params = _fit_group(g["trunk"], done, **fit_kw)["params"]
        gap = _val_gap(params, done[-1]) if key == "rel_err_val_shifted" else 0.0
        rows = []
        for b in todo:
            ratio = b.steps / done[-1].steps
            end = float(predict_mpl(params, b.lrs, [b.steps])[0])
            rows.append({"name": b.name, "steps": b.steps, "predicted_train_at_end": end, "predicted_loss": end + gap,
                         "horizon_ratio": ratio, "predictable": bool(err <= tolerance and ratio <= horizon)})
        skippable += [r["name"] for r in rows if r["predictable"]]
        sizes.append(entry | {"validation_error": err, "validated_on": key, "validated_horizon": horizon, "params": params,
                              "branches": rows, "predictable": [r["name"] for r in rows if r["predictable"]]})
    return {"tolerance": tolerance, "sizes": sizes, "skippable": skippable}


def format_curves(result: dict) -> str:
    """`check_sweep_curves`'s result as "[curves] " lines: per size the fit and each branch's errors."""
    lines = [f"[curves] {result['law']}; compared: {result['compared']}"]
    for e in result["sizes"]:
        if "skipped" in e:
            lines.append(f"[curves] {e['trunk']} (N={e['N']}): skipped: {e['skipped']}")
            continue
        p = e["fit"]["params"]
        lines.append(f"[curves] {e['trunk']} (N={e['N']}) fit on {', '.join(e['fit_on'])}: "
                     + " ".join(f"{k}={p[k]:.4g}" for k in NAMES) + f" (rmse log {e['fit']['rmse_log']:.4f})")
        for r in e["branches"]:
            val = (f"; val {r['measured_val']:.4f} vs {r['predicted_val_shifted']:.4f} shifted "
                   f"({100 * r['rel_err_val_shifted']:+.2f}%)") if "measured_val" in r else ""
            lines.append(f"[curves]   {r['name']} ({r['steps']} steps): train {r['measured_train']:.4f} predicted "
                         f"{r['predicted_train']:.4f} ({100 * r['rel_err_train']:+.2f}%; trunk baseline "
                         f"{100 * r['rel_err_baseline_trunk']:+.2f}%, same-drop baseline "
                         f"{100 * r['rel_err_baseline_same_drop']:+.2f}%){val}")
    for what, e in (("train", result["abs_rel_err_train"]), ("val (shifted)", result["abs_rel_err_val_shifted"])):
        if e:
            lines.append(f"[curves] |rel err| of the {what} predictions over {e['n']} branches: median "
                         f"{100 * e['median']:.2f}%, max {100 * e['max']:.2f}%")
    return "\n".join(lines)

