"""Law forms side by side (`ar_lm/scaling/forms.py`), rollout cross-validation and calibrated intervals
(`ar_lm/scaling/rollout.py`), on synthetic IsoFLOP sweeps drawn from known laws."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ar_lm.cli import build_parser, main
from ar_lm.errors import UserError
from ar_lm.scaling.compute import ComputeModel
from ar_lm.scaling.fit import fit_points
from ar_lm.scaling.forms import DEFAULT_FORMS, Data, fit_form, get_form, log_predict, parse_forms
from ar_lm.scaling.points import Points
from ar_lm.scaling.rollout import fit_laws, predict_laws, predict_optimum

KAPLAN = {"theta": [math.log(3e5), math.log(2e7), 0.15, 0.19]}  # N_c, D_c, alpha_N, alpha_D
CHINCHILLA = {"E": 1.2, "A": 60.0, "B": 300.0, "alpha": 0.35, "beta": 0.4}
BUDGETS = np.geomspace(1e13, 1e15, 5)
SPREAD = (0.25, 0.5, 1.0, 2.0, 4.0)


def _loss(form: str, law: dict, n, d, c, epochs=None) -> np.ndarray:
    n, d, c = (np.atleast_1d(np.asarray(v, float)) for v in (n, d, c))
    return np.exp(log_predict(get_form(form), law, Data(n, d, c, n, epochs)))


def _optimum(form: str, law: dict, c: float) -> float:
    ns = np.geomspace(c**0.2, c**0.6, 2000)
    return float(ns[np.argmin(_loss(form, law, ns, c / (6 * ns), np.full_like(ns, c)))])


def sweep(form: str, law: dict, rng, noise: float = 0.01, budgets=BUDGETS) -> Points:
    """5 sizes around each budget's true optimum (C = 6ND), log-normal noise `noise`, its se recorded."""
    rows = [(_optimum(form, law, c) * s, c, g) for g, c in enumerate(budgets) for s in SPREAD]
    n, c, g = (np.array(v) for v in zip(*rows))
    d = c / (6 * n)
    loss = _loss(form, law, n, d, c) * np.exp(rng.normal(0.0, noise, len(n)))
    return Points(n, d, c, loss, group=g.astype(int), se=np.full(len(n), noise) * loss, compute=ComputeModel())


@pytest.mark.parametrize("form,law", [
    ("kaplan", KAPLAN),
    ("gadre", {"theta": [math.log(1.1), math.log(40.0), math.log(900.0), 0.3]}),
    ("frontier:E=0", {"theta": [math.log(30.0), 0.09]}),
    ("frontier", {"theta": [math.log(1.3), math.log(500.0), 0.2]}),
])
def test_each_form_recovers_its_own_law_from_noiseless_points(form, law):
    f = get_form(form)
    rng = np.random.default_rng(0)
    pts = sweep("kaplan" if f.on == "minima" else form, KAPLAN if f.on == "minima" else law, rng, noise=0.0)
    if f.on == "minima":  # frontier forms fit (C, L*): give them their own noiseless minima
        c = np.geomspace(1e13, 1e16, 6)
        x = Data(c, c, c, _loss(form, law, c, c, c))
    else:
        x = Data(pts.N, pts.D, pts.C, pts.L)
    got = fit_form(f, x)
    assert np.allclose(got["theta"], law["theta"], rtol=1e-4, atol=1e-5), (got["theta"], law["theta"])


def test_muennighoff_recovers_the_worth_of_repeated_tokens():
    """Points up to 100 epochs (unique tokens U = D / epochs): R* = 5 is recovered, and the form predicts them
    where chinchilla, fitted to the same points, cannot."""
    law = {"theta": [math.log(60.0), math.log(300.0), math.log(1.2), 0.35, 0.4, math.log(5.0)]}
    n = np.repeat(np.geomspace(1e5, 1e7, 6), 5)
    d = np.tile(np.geomspace(2e6, 2e9, 5), 6)
    epochs = np.maximum(d / 2e7, 1.0)  # 2e7 unique tokens: the larger budgets repeat them
    loss = _loss("muennighoff", law, n, d, 6 * n * d, epochs)
    x = Data(n, d, 6 * n * d, loss, epochs)
    got = fit_form(get_form("muennighoff"), x)
    assert got["R_star"] == pytest.approx(5.0, rel=1e-3)
    chin = fit_form(get_form("chinchilla"), x)
    worst = lambda f, p: np.max(np.abs(log_predict(get_form(f), p, x) - np.log(loss)))  # noqa: E731
    assert worst("muennighoff", got) < 1e-4 < 1e-2 < worst("chinchilla", chin)


def test_rollout_picks_the_form_that_drew_the_data():
    """Drawn from Kaplan's law (no irreducible term), rollout prefers kaplan to chinchilla; drawn from
    Chinchilla's with E, it prefers chinchilla to kaplan and to the pure power law of compute (whose frontier is
    exact for Kaplan's law, not for Chinchilla's)."""
    rng = np.random.default_rng(1)
    kap = fit_laws(sweep("kaplan", KAPLAN, rng, noise=0.002), parse_forms("chinchilla,kaplan"), n_boot=10, seed=0)
    assert kap["selected"] == "kaplan", kap["rollout"]["scores"]
    forms = parse_forms("chinchilla,kaplan,frontier:E=0")
    chin = fit_laws(sweep("chinchilla", CHINCHILLA, rng, noise=0.002), forms, n_boot=10, seed=0)
    assert chin["selected"] == "chinchilla", chin["rollout"]["scores"]
    folds = chin["rollout"]["folds"]
    assert len(folds) == len(BUDGETS) - 1 and all("forms" in f for f in folds)
    s = chin["rollout"]["scores"]
    assert s["chinchilla"]["folds"] == 2  # compared on the folds every form could fit (chinchilla needs 6 runs)
    assert s["chinchilla"]["mean_abs_error"] < min(s["kaplan"]["mean_abs_error"], s["frontier:E=0"]["mean_abs_error"])


def test_intervals_cover_a_held_out_run_at_4x_at_least_90_percent_of_the_time():
    """100 synthetic sweeps (5 budgets x 5 sizes, 1% noise) from Kaplan's law; the selected law's calibrated 95%
    interval at 4x the largest budget holds a new noisy run at the true optimum >= 90 times."""
    rng = np.random.default_rng(2)
    c4 = 4 * BUDGETS[-1]
    n4 = _optimum("kaplan", KAPLAN, c4)
    inside, widths = 0, []
    for i in range(100):
        pts = sweep("kaplan", KAPLAN, rng)
        laws = fit_laws(pts, parse_forms("kaplan"), n_boot=20, seed=i, run_noise=0.01, rollout_boot=10)
        run = float(_loss("kaplan", KAPLAN, n4, c4 / (6 * n4), c4)[0]) * math.exp(rng.normal(0.0, 0.01))
        lo, hi = predict_laws({"laws": laws, "compute": ComputeModel().to_json()}, n4, c4 / (6 * n4), c4)[
            "forms"]["kaplan"]["interval"][0]
        inside += lo <= run <= hi
        widths.append(hi / lo)
    assert inside >= 90, (inside, np.median(widths))
    assert np.median(widths) < 1.15  # and not by being vacuous


def test_fit_points_records_the_forms_and_predicts_with_the_selected_one():
    pts = sweep("kaplan", KAPLAN, np.random.default_rng(3), noise=0.005)
    result = fit_points(pts, n_boot=10, forms=("chinchilla", "kaplan", "frontier:E=0"))
    laws = result["laws"]
    assert set(laws["forms"]) == {"chinchilla", "kaplan", "frontier:E=0"} and laws["selected"] in laws["forms"]
    assert laws["forms"]["chinchilla"]["law"]["E"] == result["approach3"]["E"]  # approach 3's law, not refitted
    json.dumps(result)
    opt = predict_optimum(laws["forms"]["kaplan"], ComputeModel(), 4e15)
    assert opt["interval"][0] < opt["predicted_loss"] < opt["interval"][1]
    assert opt["N_opt"] == pytest.approx(_optimum("kaplan", KAPLAN, 4e15), rel=0.1)


def test_forms_parse_and_refuse_unknown_names():
    assert [f.name for f in parse_forms(",".join(DEFAULT_FORMS))] == list(DEFAULT_FORMS)
    assert build_parser().parse_args(["fit", "SWEEP"]).forms == ",".join(DEFAULT_FORMS)  # the CLI's default
    assert get_form("frontier:E=1.5").unpack([0.0, 0.1])["E"] == 1.5
    for bad in ("chinchila", "frontier:E=-1", "frontier:A=1", ""):
        with pytest.raises(UserError):
            parse_forms(bad)


def test_cli_fit_forms_rollout_and_bad_form(tmp_path, capsys):
    pts = sweep("kaplan", KAPLAN, np.random.default_rng(4), noise=0.005)
    csv = tmp_path / "points.csv"
    csv.write_text("params,tokens,flops,loss\n" + "".join(f"{n},{d},{c},{l}\n"
                                                        for n, d, c, l in zip(pts.N, pts.D, pts.C, pts.L)))
    out = tmp_path / "fit"
    assert main(["fit", "--points", str(csv), "--out", str(out), "--bootstrap", "10", "--approach", "3",
                 "--forms", "chinchilla,kaplan", "--predict-compute", "4e15"]) == 0
    text = capsys.readouterr().out
    assert "[fit] rollout: fit C <=" in text and "[fit] selected law: kaplan" in text
    assert "[predict] C=4e+15" in text
    fit = json.loads((out / "fit.json").read_text())
    assert fit["laws"]["selected"] == "kaplan" and len(fit["laws"]["rollout"]["folds"]) == 4
    assert main(["fit", "--points", str(csv), "--out", str(tmp_path / "bad"), "--forms", "kaplan,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown law form 'nope'")
    assert not (tmp_path / "bad").exists()
