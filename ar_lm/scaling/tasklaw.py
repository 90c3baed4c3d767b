"""Downstream-task scaling laws in two steps (Bhagia et al. 2024, "Establishing Task Scaling Laws via
Compute-Efficient Model Ladders", arXiv:2412.04403).

Step 1, (N, D) -> task loss: L(N, D) = E + A / N^alpha + B / D^beta, fitted as approach 3 is
(`parametric.fit_parametric`: Huber on log L, L-BFGS-B over a grid of starts).

Step 2, task loss -> accuracy: Acc(L) = a / (1 + exp(-k (L - L0))) + b, with k <= 0 (accuracy rises as
the loss falls), b in [0, 1] (the accuracy as L -> infinity: chance, when it is given it is held there)
and a in [0, 1 - b] (a + b, the accuracy as L -> 0, at most 1). Fitted by least squares on the
points' observed (L, Acc) pairs (a = s (1 - b), s in [0, 1], keeps a + b <= 1 a box bound), from a grid
of starts. The paper fits the same sigmoid with a <= 0, k >= 0; a / (1 + e^-u) = a - a / (1 + e^u) makes
the two forms one. The paper's intermediate loss is a task loss (bits per byte of the correct answer); a
sweep's lm-eval columns hold accuracies only, so the loss here is a summary column the caller names,
`val_loss` by default (Gadre et al. 2024 chain downstream error to the validation loss).

Chained: Acc(N, D) = Acc(L(N, D)). Its interval is the 2.5 and 97.5 percentiles over bootstrap replicates
(points resampled with replacement, both steps refitted, each from the point fit's optimum); the
single-run band adds to each replicate's prediction every chained residual r_j = Acc_j - Acc(L(N_j, D_j)),
inflated by sqrt(n / (n - p)) for the p fitted parameters (as `predict.py` does for the loss).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import optimize, special

from ar_lm.errors import UserError, require
from ar_lm.scaling.downstream import PREFIX
from ar_lm.scaling.fit import CI, bootstrap_stream, interval
from ar_lm.scaling.parametric import PARAMS, fit_parametric, parametric_loss

SIGMOID = ("a", "L0", "k", "b")
K_SPAN = 50.0  # |k| <= K_SPAN / (span of the observed loss): a step no sharper than a fiftieth of the data
L0_SPANS = 3.0  # L0 within the observed loss range widened by 3 spans each side
MIN_POINTS = 6


# ---------------------------------------------------------------------------------------------
# Reading a sweep's summary.csv


def _number(value) -> Optional[float]:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def task_rows(csv_path, metric: str, task_loss: str = "val_loss") -> dict:
    """The finished rows (status done) of a sweep's summary.csv that hold N, D, C, the `task_loss` column and
    the `metric` column (e.g. ``lm_eval/arc_easy/acc``; the ``lm_eval/`` prefix may be left out): {N, D, C, L,
    acc, acc_se (the ``<metric>_stderr`` column, or None), epochs (or None), names, metric, task_loss, skipped:
    [names of done rows without a value]}; arrays as numpy."""
    path = Path(csv_path)
    path = path / "summary.csv" if path.is_dir() else path
    require(path.is_file(), f"{path} does not exist: run `ar-lm sweep` first (it writes SWEEP_DIR/summary.csv)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = list(reader.fieldnames or [])
        rows = list(reader)
    tasks = [c for c in cols if c.startswith(PREFIX)]
    if metric not in cols and PREFIX + metric in cols:
        metric = PREFIX + metric
    require(metric in cols, f"{path} has no column {metric!r}; its lm-eval columns are: "
            f"{', '.join(tasks) or 'none (run the sweep with --lm-eval-tasks)'}")
    require(task_loss in cols, f"{path} has no task-loss column {task_loss!r}; its columns are: {', '.join(cols)}")
    missing = [c for c in ("N", "D", "C") if c not in cols]
    require(not missing, f"{path} lacks column(s) {', '.join(missing)}: is it a sweep's summary.csv?")
    stderr = metric + "_stderr" if metric + "_stderr" in cols else None
    keep, skipped = [], []
    for r in rows:
        if "status" in cols and r.get("status") != "done":
            continue
        vals = [_number(r.get(c)) for c in ("N", "D", "C", task_loss, metric)]
        if any(v is None for v in vals) or min(vals[:4]) <= 0:
            skipped.append(r.get("name", ""))
            continue
        se = _number(r.get(stderr)) if stderr else None
        keep.append((*vals, se, _number(r.get("epochs")), r.get("name", "")))
    require(keep, f"{path}: no finished row has both {task_loss} and {metric}")
    arr = np.array([k[:5] for k in keep], float)
    se, epochs = [k[5] for k in keep], [k[6] for k in keep]
    return {"N": arr[:, 0], "D": arr[:, 1], "C": arr[:, 2], "L": arr[:, 3], "acc": arr[:, 4],
            "acc_se": np.array(se, float) if stderr and None not in se else None,
            "epochs": np.array(epochs, float) if None not in epochs else None,
            "names": [k[7] for k in keep], "metric": metric, "task_loss": task_loss, "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# Step 2: the sigmoid


def sigmoid(p: dict, loss):
    """Acc(L) = a / (1 + exp(-k (L - L0))) + b."""
    return p["a"] * special.expit(p["k"] * (np.asarray(loss, float) - p["L0"])) + p["b"]


def _unpack(x, chance: Optional[float]) -> dict:
    s, l0, k = x[:3]
    b = chance if chance is not None else x[3]
    return {"a": float(s * (1 - b)), "L0": float(l0), "k": float(k), "b": float(b)}


def _sigmoid_bounds(loss, chance: Optional[float]) -> tuple[list, list]:
    lo_l, hi_l = float(np.min(loss)), float(np.max(loss))
    span = max(hi_l - lo_l, 1e-6)
    lo = [0.0, lo_l - L0_SPANS * span, -K_SPAN / span]
    hi = [1.0, hi_l + L0_SPANS * span, 0.0]
    return (lo, hi) if chance is not None else (lo + [0.0], hi + [1.0])


def _sigmoid_starts(loss, acc, chance: Optional[float], bounds) -> list:
    span = max(float(np.ptp(loss)), 1e-6)
    b0 = chance if chance is not None else float(np.clip(np.min(acc) - 0.05, 0.0, 0.95))
    s0 = float(np.clip((np.max(acc) - b0) / max(1 - b0, 1e-6) + 0.05, 0.05, 1.0))
    out = []
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        for k in (-2.0, -8.0, -30.0):
            x = [s0, float(np.quantile(loss, q)), k / span] + ([] if chance is not None else [b0])
            out.append(np.clip(x, bounds[0], bounds[1]))
    return out


def fit_sigmoid(loss, acc, chance: Optional[float] = None, starts: Optional[list] = None, grid: bool = True) -> dict:
    """Least squares of Acc(L) on the points (bounds in the module docstring): {a, L0, k, b, rmse,
    converged, at_bound: [parameters on a bound]}. Starts: `starts` (laws {a, L0, k, b}), and the grid
    (`_sigmoid_starts`) unless `grid` is false."""
    loss, acc = np.asarray(loss, float), np.asarray(acc, float)
    bounds = _sigmoid_bounds(loss, chance)
    x0s = _sigmoid_starts(loss, acc, chance, bounds) if grid or not starts else []
    for p in starts or []:
        b = chance if chance is not None else p["b"]
        x = [p["a"] / max(1 - b, 1e-12), p["L0"], p["k"]] + ([] if chance is not None else [b])
        x0s.insert(0, np.clip(x, bounds[0], bounds[1]))

    def resid(x):
        return sigmoid(_unpack(x, chance), loss) - acc

    def jac(x):
        s, l0, k = x[:3]
        b = chance if chance is not None else x[3]
        g = special.expit(k * (loss - l0))
        dg = s * (1 - b) * g * (1 - g)
        cols = [(1 - b) * g, -k * dg, (loss - l0) * dg] + ([] if chance is not None else [1 - s * g])
        return np.stack(cols, axis=1)

    runs = [optimize.least_squares(resid, x0, jac=jac, bounds=bounds, method="trf", xtol=1e-10, ftol=1e-10,
                                   gtol=1e-10, max_nfev=2000) for x0 in x0s]
    best = min(runs, key=lambda r: r.cost)
    names = ("s", "L0", "k", "b")[: len(best.x)]
    at_bound = [n for n, x, lo, hi in zip(names, best.x, *bounds) if np.isclose(x, lo) or np.isclose(x, hi)]
    return {**_unpack(best.x, chance), "rmse": float(math.sqrt(2 * best.cost / len(acc))),
            "converged": bool(best.status > 0), "at_bound": at_bound, "chance": chance}


# ---------------------------------------------------------------------------------------------
# Both steps, bootstrap, predictions


def _step1(p: dict) -> dict:
    return {k: p[k] for k in (*PARAMS, "theta")}


def _bootstrap(N, D, L, acc, fit: dict, n_boot: int, rng, chance: Optional[float]) -> list[dict]:
    """Replicates: points resampled with replacement, each step refitted from the point fit's optimum; a
    replicate counts when step 1 converged and it holds >= MIN_POINTS distinct points."""
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(N), len(N))
        if len(np.unique(idx)) < MIN_POINTS:
            continue
        s1 = fit_parametric(N[idx], D[idx], L[idx], starts=[fit["step1"]["theta"]])
        if not s1["converged"]:
            continue
        s2 = fit_sigmoid(L[idx], acc[idx], chance, starts=[fit["step2"]], grid=False)
        out.append({"step1": _step1(s1), "step2": {k: s2[k] for k in SIGMOID}})
    return out


def _scatter(N, D, L, acc, step1: dict, step2: dict, n_params: int) -> dict:
    """Residuals of each step and of the chain, per point, and their RMS."""
    r1 = L - parametric_loss(step1, N, D)
    r2 = acc - sigmoid(step2, L)
    rc = acc - sigmoid(step2, parametric_loss(step1, N, D))
    rms = lambda r: float(np.sqrt(np.mean(r**2)))  # noqa: E731
    return {"step1": r1.tolist(), "step2": r2.tolist(), "chained": rc.tolist(), "step1_rms": rms(r1),
            "step2_rms": rms(r2), "chained_rms": rms(rc), "inflation": math.sqrt(len(rc) / max(len(rc) - n_params, 1))}


def fit_task_law(N, D, task_loss, acc, n_boot: int = 100, seed=0, chance: Optional[float] = None,
                 acc_se=None, top: int = 64) -> dict:
    """Both steps on the points (N params, D tokens, task loss, accuracy), with bootstrap replicates;
    `chance` holds b there (e.g. 0.25 for four-way multiple choice); `top`: step 1's starts (the best of
    `fit_parametric`'s grid). JSON-serialisable: {step1 (`fit_parametric`'s output: E, A, B, alpha, beta,
    theta, converged, ...), step2 (a, L0, k, b, rmse, converged, at_bound), ci (each parameter's interval),
    bootstrap [{step1, step2}], bootstrap_ok [replicates, asked], scatter (residuals of each step and of the
    chain, their RMS), points, eval_se (RMS of the accuracies' standard errors `acc_se`, when given)}."""
    N, D, L, acc = (np.asarray(x, float).ravel() for x in (N, D, task_loss, acc))
    require(len({len(N), len(D), len(L), len(acc)}) == 1, "N, D, task loss and accuracy need one value per point")
    require(n_boot >= 0, f"n_boot must be >= 0, got {n_boot}")
    require(len(N) >= MIN_POINTS, f"a task law fits 5 + {3 if chance is not None else 4} parameters and needs at "
            f"least {MIN_POINTS} points, got {len(N)}")
    require(np.all(N > 0) and np.all(D > 0) and np.all(L > 0), "N, D and the task loss must be positive")
    require(np.all((acc >= 0) & (acc <= 1)), "accuracies must lie in [0, 1]")
    require(chance is None or 0 <= chance < 1, f"chance accuracy must lie in [0, 1), got {chance}")
    s1 = fit_parametric(N, D, L, top=top)
    s2 = fit_sigmoid(L, acc, chance)
    fit = {"step1": s1, "step2": s2, "chance": chance,
           "n_points": int(len(N)), "bootstrap_seed": bootstrap_stream(seed),
           "points": [{"N": float(n), "D": float(d), "task_loss": float(l), "accuracy": float(a)}
                      for n, d, l, a in zip(N, D, L, acc)]}
    boots = _bootstrap(N, D, L, acc, fit, n_boot, np.random.default_rng(bootstrap_stream(seed)), chance)
    fit["bootstrap"], fit["bootstrap_ok"] = boots, [len(boots), n_boot]
    fit["ci"] = {**{k: interval([b["step1"][k] for b in boots]) for k in PARAMS},
                 **{k: interval([b["step2"][k] for b in boots]) for k in SIGMOID}}
    fit["scatter"] = _scatter(N, D, L, acc, s1, s2, 5 + (3 if chance is not None else 4))
    fit["eval_se"] = float(np.sqrt(np.mean(np.asarray(acc_se, float) ** 2))) if acc_se is not None else None
    return fit


def predict_accuracy(fit: dict, N: float, D: float) -> dict:
    """At (N, D): {N, D, task_loss, task_loss_interval, accuracy, interval (the law's: bootstrap percentiles),
    run_interval (a single run's: each replicate's prediction plus each inflated chained residual)}."""
    require(N > 0 and D > 0, f"N and D must be positive, got N={N}, D={D}")
    loss = float(parametric_loss(fit["step1"], N, D))
    boots = fit.get("bootstrap") or []
    loss_b = np.array([parametric_loss(b["step1"], N, D) for b in boots], float)
    acc_b = np.array([sigmoid(b["step2"], lb) for b, lb in zip(boots, loss_b)], float)
    r = np.asarray(fit["scatter"]["chained"], float) * fit["scatter"]["inflation"]
    run = None
    if len(acc_b) >= 10:
        lo, hi = np.percentile((acc_b[:, None] + r[None, :]).ravel(), CI)
        run = [float(lo), float(hi)]
    return {"N": float(N), "D": float(D), "task_loss": loss, "task_loss_interval": interval(loss_b.tolist()),
            "accuracy": float(sigmoid(fit["step2"], loss)), "interval": interval(acc_b.tolist()),
            "run_interval": run}


def _span(iv) -> str:
    return f" [{iv[0]:.4g}, {iv[1]:.4g}]" if iv else ""


def format_task_law(result: dict, metric: str = "accuracy", task_loss: str = "task loss",
                    predictions: Optional[list] = None) -> str:
    """Lines starting "[tasks] ": both steps with 95% intervals, the scatter, any `predictions`
    (`predict_accuracy` outputs) and warnings."""
    s1, s2, ci, sc = result["step1"], result["step2"], result.get("ci", {}), result["scatter"]
    ok, asked = result.get("bootstrap_ok", [0, 0])
    lines = [f"{metric} from {task_loss}: {result['n_points']} points, {ok}/{asked} bootstrap replicates",
             f"step 1: {task_loss} = E + A/N^alpha + B/D^beta: " + ", ".join(
                 f"{k}={s1[k]:.4g}{_span(ci.get(k))}" for k in PARAMS)
             + ("" if s1.get("converged") else " (NOT converged)"),
             "step 2: acc = a / (1 + exp(-k (L - L0))) + b: " + ", ".join(
                 f"{k}={s2[k]:.4g}{_span(ci.get(k))}" for k in SIGMOID)
             + (f" (b held at chance {result['chance']:.4g})" if result.get("chance") is not None else ""),
             f"scatter (RMS): step 1 {sc['step1_rms']:.4g} (loss), step 2 {sc['step2_rms']:.4g}, chained "
             f"{sc['chained_rms']:.4g} (accuracy)"
             + (f"; eval stderr {result['eval_se']:.4g}" if result.get("eval_se") is not None else "")]
    for p in predictions or []:
        lines.append(f"predicted at N={p['N']:.4g}, D={p['D']:.4g}: {task_loss} {p['task_loss']:.4g}"
                     f"{_span(p['task_loss_interval'])}, {metric} {p['accuracy']:.4f}{_span(p['interval'])}"
                     + (f", a single run {_span(p['run_interval']).strip()}" if p.get("run_interval") else ""))
    lines += task_warnings(result)
    return "\n".join("[tasks] " + line for line in lines)


def task_warnings(result: dict) -> list[str]:
    """What makes the law less trustworthy: an unconverged step, a flat task (the fitted accuracy moves less than
    twice its residual RMS over the points), a sigmoid on its bounds, few replicates."""
    out = []
    if not result["step1"].get("converged"):
        out.append(f"warning: step 1 did not converge ({result['step1'].get('message')})")
    if not result["step2"].get("converged"):
        out.append("warning: step 2 (the sigmoid) did not converge")
    s2 = result["step2"]
    bound = [n for n in s2.get("at_bound", []) if n in ("L0", "k")]
    change = float(np.ptp(sigmoid(s2, [p["task_loss"] for p in result["points"]])))
    if s2["a"] <= 1e-6 or s2["k"] >= -1e-12 or change < 2 * s2["rmse"]:
        out.append(f"warning: the accuracy does not change with the task loss on these points (the sigmoid moves "
                   f"{change:.3g} over them, its residuals {s2['rmse']:.3g}): the task is flat (at chance?) here, "
                   "so there is no trend to extrapolate")
    elif bound:
        out.append(f"warning: sigmoid parameter(s) {', '.join(bound)} on a bound: the points do not pin the "
                   "sigmoid down (they cover too little of it); predictions beyond them are unreliable")
    ok, asked = result.get("bootstrap_ok", [0, 0])
    if asked and ok < 10:
        out.append(f"warning: only {ok} of {asked} bootstrap replicates succeeded: no intervals")
    return out


def fit_sweep_task(csv_path, metric: str, task_loss: str = "val_loss", n_boot: int = 100, seed=0,
                   chance: Optional[float] = None, top: int = 64, keep_repeated: bool = False) -> dict:
    """`task_rows` then `fit_task_law`, with the metric, loss column, row names and skipped rows recorded.
    Rows past one epoch (epochs > 1: repeated tokens are worth less, as `points.without_repeated_data` says)
    are left out, and listed in `repeated`, unless `keep_repeated`."""
    rows = task_rows(csv_path, metric, task_loss)
    keep = np.ones(len(rows["N"]), bool)
    if rows["epochs"] is not None and not keep_repeated:
        keep = rows["epochs"] <= 1.0 + 1e-9
    repeated = [name for name, k in zip(rows["names"], keep) if not k]
    se = rows["acc_se"][keep] if rows["acc_se"] is not None else None
    try:
        fit = fit_task_law(rows["N"][keep], rows["D"][keep], rows["L"][keep], rows["acc"][keep], n_boot, seed,
                           chance, se, top)
    except UserError as e:
        why = f" ({len(repeated)} rows past one epoch left out: keep them with keep_repeated)" if repeated else ""
        raise UserError(f"{rows['metric']} from {task_loss}: {e}{why}") from None
    return {**fit, "metric": rows["metric"], "task_loss": task_loss,
            "names": [n for n, k in zip(rows["names"], keep) if k], "skipped": rows["skipped"], "repeated": repeated}
