"""Fits that say what they skipped (issue 35): every approach reports or says why not and what to add, in the
printed report and in fit.json; parameters at their bounds and low bootstrap yields are warned about."""

import json

import numpy as np
import pytest

from ar_lm.errors import UserError

from ar_lm.scaling import diagnose
from ar_lm.scaling import fit as F
from ar_lm.scaling import points as P
from ar_lm.scaling.report import format_report, write_fit

LAW = {"E": 0.0, "A": 400.0, "B": 600.0, "alpha": 0.35, "beta": 0.30}  # no floor: approach 3's E goes to its bound
SIZES = 3312 * 3.0 ** np.arange(5)


def law_loss(law, n, d):
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


def isoflop_points(law, budgets, sizes, d_curve=lambda d: np.linspace(d / 10, d, 10), noise=0.0, se=None, seed=0):
    """IsoFLOP points under C = 6ND from a known law (times exp(noise * normal)), one training curve per run
    at the tokens `d_curve(D)` (Approach 1)."""
    rows, curves = [], []
    for j, c in enumerate(budgets):
        for n in sizes:
            d = c / (6 * n)
            rows.append((n, d, c, j))
            d_t = d_curve(d)
            curves.append((n, 6 * n * d_t, law_loss(law, n, d_t)))
    n, d, c, g = (np.array(x) for x in zip(*rows))
    loss = law_loss(law, n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.size))
    return P.Points(n, d, c, loss, group=g.astype(int), curves=curves, se=None if se is None else np.full(n.size, se))


def newcomer_sweep(budgets, sizes=SIZES):
    return isoflop_points(LAW, budgets, sizes)


def test_minima_at_the_smallest_size_say_add_smaller_sizes():
    # the optimum at 1e8 and 3e8 FLOPs is ~1,500 and ~2,400 parameters: below every size
    res = F.fit_points(newcomer_sweep((1e8, 3e8)), n_boot=0, top=4)
    assert "approach1" not in res and "approach2" not in res and res["approaches"]["3"] == {"fitted": True}
    two, one = res["approaches"]["2"]["skipped"], res["approaches"]["1"]["skipped"]
    assert "budgets 1e+08, 3e+08: the lowest loss is at the smallest size, 3,312: add smaller sizes" in two
    assert "the smallest size, N=3,312" in one and one.endswith("add smaller sizes")
    report = format_report(res)
    assert f"[fit] approach 2 skipped: {two}" in report and f"[fit] approach 1 skipped: {one}" in report
    with pytest.raises(UserError, match="approach 2: needs interior minima .* add smaller sizes"):
        F.fit_points(newcomer_sweep((1e8, 3e8)), n_boot=0, approaches=(1, 2))
    assert F.fit_points(newcomer_sweep((1e8, 3e8)), n_boot=0, approaches=(3,), top=4)["approaches"]["2"] == {
        "skipped": "not requested (--approach)"}


def test_minima_at_the_largest_size_say_add_larger_sizes_and_one_budget_add_budgets():
    res = F.fit_points(newcomer_sweep((1e14, 3e14)), n_boot=0, top=4)
    assert "at the largest size, 268,272: add larger sizes" in res["approaches"]["2"]["skipped"]
    assert res["approaches"]["1"]["skipped"].endswith("add larger sizes")
    single = F.fit_points(newcomer_sweep((1e8,)), n_boot=0, top=4)
    assert single["approaches"]["2"]["skipped"].endswith("; add budgets")


def test_csv_points_without_budgets_or_curves_say_so():
    pts = newcomer_sweep((1e8, 3e8))
    res = F.fit_points(P.Points(pts.N, pts.D, pts.C, pts.L), n_boot=0, top=4)
    assert res["approaches"]["2"]["skipped"].startswith("no IsoFLOP budgets")
    assert res["approaches"]["1"]["skipped"].startswith("no training curves")


def test_fit_json_names_what_was_skipped_and_warns_of_e_at_its_bound(tmp_path):
    write_fit(newcomer_sweep((1e8, 3e8)), tmp_path, n_boot=0, top=4)
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert set(fit["approaches"]) == {"1", "2", "3"} and fit["approaches"]["3"] == {"fitted": True}
    assert "add smaller sizes" in fit["approaches"]["2"]["skipped"]
    assert fit["approach3"]["theta"][2] == -10  # E = e^-10: the box, not a measurement
    assert any(w.startswith("approach 3: E = 4.54e-05 sits at its lower bound") for w in fit["warnings"])
    assert "[fit] WARNING: approach 3: E = 4.54e-05 sits at its lower bound" in format_report(fit)


def test_warnings_for_exponents_at_their_edges_low_yield_and_no_frontier():
    p3 = {"E": 1.7, "A": 1.0, "B": 1.0, "alpha": 5.0, "beta": 0.0, "theta": [0.0, 0.0, 0.53, 5.0, 0.0],
          "converged": True, "bootstrap_ok": [25, 100]}
    p2 = {"minima": [{}, {}, {}], "frontier": None, "bootstrap_ok": [100, 100], "excluded": []}
    ws = diagnose.warnings({"approach3": p3, "approach2": p2})
    assert "approach 3: alpha = 5 sits at its upper bound (alpha = 5)" in ws[0]
    assert "approach 3: beta = 0 sits at its lower bound (beta = 0)" in ws[1]
    assert ws[2].startswith("approach 3: only 25 of 100 bootstrap replicates gave a fit (25% < 80%)")
    assert ws[3].startswith("approach 2: no loss frontier") and ws[3].endswith("add budgets")
    assert len(ws) == 4 and diagnose.warnings({"approach3": {**p3, "alpha": 0.4, "theta": [0, 0, 0.53, 0.4, 0.3],
                                                             "bootstrap_ok": [80, 100]}}) == []


def test_an_excluded_budget_says_what_to_add_where_approach_2_fits():
    pts = newcomer_sweep((1e8, 1e11, 1e12))  # 1e8's minimum lies below the sizes, the others' inside them
    res = F.fit_points(pts, n_boot=0, approaches=(2,))
    (ex,) = res["approach2"]["excluded"]
    assert ex["add"] == "smaller sizes" and ex["N_range"][0] == SIZES[0]
    assert ("[fit] approach 2 excludes budget 1e+08: the lowest loss is at the smallest size, 3,312: "
            "add smaller sizes") in format_report(res)


def test_the_cli_names_approach_3_skipped_on_four_points(tmp_path, capsys):
    from ar_lm.cli import main

    rows = [(n, c, float(law_loss(LAW, n, c / (6 * n)) + 1.7)) for c in (1e12, 1e13) for n in (2e4, 2e5)]
    path = tmp_path / "four.csv"
    path.write_text("params,flops,loss\n" + "\n".join(f"{n},{c},{l}" for n, c, l in rows))
    assert main(["fit", "--points", str(path), "--bootstrap", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "approach 2: needs interior minima" in err and "approach 3: fits 5 parameters" in err
    assert "add sizes or budgets" in err
