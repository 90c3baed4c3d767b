"""Downstream-task scaling laws (`scaling/tasklaw.py`): a known two-step law recovered, a sweep's summary.csv
read and fitted, and bad input refused with a one-line UserError."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ar_lm.errors import UserError
from ar_lm.scaling import tasklaw
from ar_lm.scaling.parametric import parametric_loss
from ar_lm.scaling.runner import SUMMARY_FIELDS

# step 1 at small N, D (task loss 3.2 .. 9.2 over the grid), step 2 crossing its midpoint inside that range
STEP1 = {"E": 1.8, "A": 250.0, "B": 700.0, "alpha": 0.34, "beta": 0.30}
STEP2 = {"a": 0.55, "L0": 4.2, "k": -2.5, "b": 0.25}
SIZES = np.geomspace(2e6, 6e7, 6)
TOKENS_PER_PARAM = np.array([5, 10, 20, 40, 80])


def ladder(seed: int = 1, loss_noise: float = 0.003, acc_noise: float = 0.005):
    """The grid's (N, D), the task loss with log-normal noise, the accuracy of that loss with normal noise."""
    rng = np.random.default_rng(seed)
    n = np.repeat(SIZES, len(TOKENS_PER_PARAM))
    d = n * np.tile(TOKENS_PER_PARAM, len(SIZES))
    loss = parametric_loss(STEP1, n, d) * np.exp(rng.normal(0.0, loss_noise, len(n)))
    acc = tasklaw.sigmoid(STEP2, loss) + rng.normal(0.0, acc_noise, len(n))
    return n, d, loss, acc


@pytest.fixture(scope="module")
def recovered():
    n, d, loss, acc = ladder()
    return tasklaw.fit_task_law(n, d, loss, acc, n_boot=60, seed=0, top=16)


def test_a_known_two_step_law_is_recovered(recovered):
    s1, s2 = recovered["step1"], recovered["step2"]
    assert s1["converged"] and s2["converged"] and s2["at_bound"] == []
    # the sigmoid: k < 0, so accuracy rises as the loss falls
    assert s2["a"] == pytest.approx(STEP2["a"], abs=0.03)
    assert s2["L0"] == pytest.approx(STEP2["L0"], abs=0.05)
    assert s2["k"] == pytest.approx(STEP2["k"], abs=0.3)
    assert s2["b"] == pytest.approx(STEP2["b"], abs=0.01)
    assert s2["rmse"] < 0.008  # the accuracy noise is 0.005
    # step 1: exponents and floor (A, B trade off against them), and the law through the points
    assert s1["alpha"] == pytest.approx(STEP1["alpha"], abs=0.04)
    assert s1["beta"] == pytest.approx(STEP1["beta"], abs=0.02)
    assert s1["E"] == pytest.approx(STEP1["E"], abs=0.15)
    for key in ("alpha", "beta", "a", "L0", "k", "b"):
        lo, hi = recovered["ci"][key]
        assert lo <= (s1 | s2)[key] <= hi
    ok, asked = recovered["bootstrap_ok"]
    assert asked == 60 and ok >= 50
    assert recovered["scatter"]["chained_rms"] < 0.01 and len(recovered["scatter"]["chained"]) == 30
    json.dumps(recovered)  # JSON-serialisable as it is


def test_the_chained_prediction_at_4x_compute_holds_the_truth(recovered):
    n, d = 2 * SIZES[-1], 2 * SIZES[-1] * TOKENS_PER_PARAM[-1]  # 4x the largest point's compute
    true_loss = float(parametric_loss(STEP1, n, d))
    true_acc = float(tasklaw.sigmoid(STEP2, true_loss))
    p = tasklaw.predict_accuracy(recovered, n, d)
    assert p["task_loss"] == pytest.approx(true_loss, rel=0.01)
    assert p["task_loss_interval"][0] <= p["task_loss"] <= p["task_loss_interval"][1]
    assert p["accuracy"] == pytest.approx(true_acc, abs=0.01)
    lo, hi = p["interval"]
    assert lo <= true_acc <= hi and hi - lo < 0.05
    run_lo, run_hi = p["run_interval"]
    assert run_lo <= lo and hi <= run_hi  # a single run scatters more than the law
    json.dumps(p)
    text = tasklaw.format_task_law(recovered, "lm_eval/x/acc", "val_loss", [p])
    assert all(line.startswith("[tasks] ") for line in text.splitlines())
    assert f"lm_eval/x/acc {p['accuracy']:.4f} [" in text and "warning" not in text


def test_the_sigmoid_keeps_its_bounds_and_chance():
    loss = np.linspace(1.0, 4.0, 25)
    near_one = 0.02 + 0.98 / (1 + np.exp(4.0 * (loss - 2.0)))  # a + b = 1.0: at the bound
    fit = tasklaw.fit_sigmoid(loss, np.minimum(near_one + 0.02, 1.0))
    assert fit["a"] + fit["b"] <= 1.0 + 1e-9 and fit["k"] < 0 and 0 <= fit["b"] <= 1
    held = tasklaw.fit_sigmoid(loss, tasklaw.sigmoid(STEP2 | {"L0": 2.5}, loss), chance=0.25)
    assert held["b"] == 0.25 and held["a"] == pytest.approx(STEP2["a"], abs=1e-4)
    assert held["L0"] == pytest.approx(2.5, abs=1e-4) and held["k"] == pytest.approx(STEP2["k"], abs=1e-3)


def write_summary(path, rows: list[dict]) -> None:
    """A summary.csv as `SweepRunner.write_summary` writes it (its fields, then the lm_eval columns sorted)."""
    extra = sorted({k for r in rows for k in r} - set(SUMMARY_FIELDS))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS + tuple(extra))
        writer.writeheader()
        writer.writerows(rows)


def sweep_rows() -> list[dict]:
    n, d, loss, acc = ladder(seed=2, acc_noise=0.01)
    rows = [{"name": f"p{i}", "status": "done", "N": int(n[i]), "D": int(d[i]), "C": 6 * n[i] * d[i],
             "val_loss": loss[i], "val_loss_se": 0.002, "epochs": 0.5, "lm_eval/arc_easy/acc": acc[i],
             "lm_eval/arc_easy/acc_stderr": 0.01, "lm_eval/piqa/acc": 0.5} for i in range(len(n))]
    rows.append({"name": "p_failed", "status": "failed", "N": 10, "D": 10, "C": 600})
    rows.append({"name": "p_pending", "status": "pending", "N": 10, "D": 10, "C": 600})
    rows.append({"name": "p_noeval", "status": "done", "N": 1e9, "D": 2e10, "C": 1.2e20, "val_loss": 2.5})
    rows.append(rows[0] | {"name": "p_repeat", "epochs": 2.0, "lm_eval/arc_easy/acc": 0.9})  # past one epoch
    return rows


def test_a_sweep_summary_round_trips(tmp_path):
    write_summary(tmp_path / "summary.csv", sweep_rows())
    rows = tasklaw.task_rows(tmp_path, "arc_easy/acc")  # the folder, and the metric without its prefix
    assert rows["metric"] == "lm_eval/arc_easy/acc" and rows["task_loss"] == "val_loss"
    assert len(rows["N"]) == 31 and rows["skipped"] == ["p_noeval"]  # failed and pending rows are not read
    assert rows["names"][0] == "p0" and rows["acc_se"] is not None and np.all(rows["acc_se"] == 0.01)
    assert rows["names"][-1] == "p_repeat" and rows["epochs"][-1] == 2.0 and rows["acc"][-1] == 0.9
    n, d, loss, acc = ladder(seed=2, acc_noise=0.01)
    assert np.allclose(rows["L"][:30], loss) and np.allclose(rows["acc"][:30], acc)
    assert np.allclose(rows["C"][:30], 6 * n * d)

    fit = tasklaw.fit_sweep_task(tmp_path / "summary.csv", "lm_eval/arc_easy/acc", n_boot=20, seed=3, top=16)
    assert fit["metric"] == "lm_eval/arc_easy/acc" and fit["n_points"] == 30 and fit["bootstrap_ok"][1] == 20
    assert fit["repeated"] == ["p_repeat"] and "p_repeat" not in fit["names"]  # left out: past one epoch
    assert fit["eval_se"] == pytest.approx(0.01)
    assert fit["step2"]["k"] < 0 and fit["step2"]["L0"] == pytest.approx(STEP2["L0"], abs=0.15)
    back = json.loads(json.dumps(fit))  # the fit survives JSON and still predicts
    p = tasklaw.predict_accuracy(back, rows["N"][29], rows["D"][29])  # the largest fitted point
    assert p["accuracy"] == pytest.approx(rows["acc"][29], abs=0.04)
    assert p["interval"] is not None and p["interval"][0] <= p["accuracy"] <= p["interval"][1]
    lines = tasklaw.format_task_law(fit, fit["metric"], fit["task_loss"]).splitlines()
    assert lines[0] == "[tasks] lm_eval/arc_easy/acc from val_loss: 30 points, " \
                       f"{fit['bootstrap_ok'][0]}/20 bootstrap replicates"
    assert any("eval stderr 0.01" in line for line in lines)


def test_a_missing_column_names_the_ones_there_are(tmp_path):
    write_summary(tmp_path / "summary.csv", sweep_rows())
    with pytest.raises(UserError) as e:
        tasklaw.task_rows(tmp_path / "summary.csv", "lm_eval/hellaswag/acc")
    msg = str(e.value)
    assert "\n" not in msg and "'lm_eval/hellaswag/acc'" in msg
    assert "lm_eval/arc_easy/acc, lm_eval/arc_easy/acc_stderr, lm_eval/piqa/acc" in msg and "val_loss" not in msg
    with pytest.raises(UserError, match=r"no task-loss column 'task_bpb'; its columns are: name, status, N"):
        tasklaw.task_rows(tmp_path / "summary.csv", "lm_eval/piqa/acc", task_loss="task_bpb")
    write_summary(tmp_path / "plain.csv", [{"name": "p0", "status": "done", "N": 1, "D": 1, "C": 6,
                                            "val_loss": 3.0}])
    with pytest.raises(UserError, match=r"lm-eval columns are: none \(run the sweep with --lm-eval-tasks\)"):
        tasklaw.task_rows(tmp_path / "plain.csv", "lm_eval/piqa/acc")


def test_too_few_points_or_bad_accuracies_are_refused():
    n, d, loss, acc = ladder()
    with pytest.raises(UserError, match="needs at least 6 points, got 5"):
        tasklaw.fit_task_law(n[:5], d[:5], loss[:5], acc[:5], n_boot=0)
    with pytest.raises(UserError, match=r"accuracies must lie in \[0, 1\]"):
        tasklaw.fit_task_law(n, d, loss, acc * 100, n_boot=0)


def test_a_flat_task_is_flagged():
    n, d, loss, _ = ladder()
    flat = 0.25 + np.random.default_rng(4).normal(0.0, 0.01, len(n))  # at chance whatever the loss
    fit = tasklaw.fit_task_law(n, d, loss, flat, n_boot=0, top=8)
    assert fit["bootstrap_ok"] == [0, 0] and fit["ci"]["a"] is None
    p = tasklaw.predict_accuracy(fit, 1e9, 2e10)
    assert p["interval"] is None and p["run_interval"] is None and abs(p["accuracy"] - 0.25) < 0.02
    text = tasklaw.format_task_law(fit, predictions=[p])
    assert "[tasks] warning: the accuracy does not change with the task loss" in text
