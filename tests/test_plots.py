"""Plots a reader of a scaling paper accepts (issue 35): the plotted data are the fit's (points, IsoFLOP minima,
fitted ranges solid, extrapolation dashed beyond them, bands, the held-out run), skipped approaches named on
the plots, and `ar-lm compare` with train and val curves per run and a warning for two tokenizers."""

import json

import numpy as np
import pytest
from conftest import tiny_config
from test_fit_report import isoflop_points

from ar_lm.scaling import compare as CMP
from ar_lm.scaling import fit as F
from ar_lm.scaling.plots import plot_fit
from ar_lm.scaling.plots_axes import log_ticks, plt
from ar_lm.scaling.plots_compare import plot_compare, run_label
from ar_lm.scaling.replot import replot
from ar_lm.training import rundir

LAW = {"E": 1.7, "A": 400.0, "B": 600.0, "alpha": 0.35, "beta": 0.30}
SIZES = 3312 * 2.0 ** np.arange(7)


def _sweep(budgets=(3e10, 1e11, 3e11, 1e12), seed=0):
    """IsoFLOP points under C = 6ND with 0.3% noise and loss_se, one training curve per run."""
    return isoflop_points(LAW, budgets, SIZES, lambda d: np.geomspace(d / 20, d, 12), noise=0.003, se=0.006, seed=seed)


HOLDOUT = [{"name": "holdout0", "N": 60000.0, "D": 1.1e7, "C": 4e12, "measured_loss": 2.4, "predicted_loss": 2.41,
            "relative_error": 0.004, "interval": [2.35, 2.47]}]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    pts = _sweep()
    result = F.fit_points(pts, n_boot=12, top=4)
    (out / "fit.json").write_text(json.dumps(result))
    return result, pts, out, plot_fit(result, out, pts, holdout=HOLDOUT)


def test_every_plot_is_written_with_the_fits_points(fitted):
    result, pts, out, data = fitted
    for name in ("isoflop", "loss_vs_flops", "optimal_vs_compute", "parametric_fit"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    c, l = data["loss_vs_flops"]["points"]
    assert c == [p["C"] for p in result["points"]] and l == [p["loss"] for p in result["points"]]
    assert data["loss_vs_flops"]["holdout"] == [(4e12, 2.4)] and data["loss_vs_flops"]["curves"] == len(pts.curves)
    assert data["isoflop"]["minima"] == [[m["N_opt"], m["loss_min"]] for m in result["approach2"]["minima"]]


def test_the_frontier_is_drawn_over_approach_1s_fitted_range_only(fitted):
    result, _, _, data = fitted
    c, _ = data["loss_vs_flops"]["frontier"]
    lo, hi = result["approach1"]["fit_range"]
    assert min(c) == pytest.approx(lo) and max(c) == pytest.approx(hi)
    assert min(result["approach1"]["envelope"]["C"]) < lo  # the warmup end is left out


def test_laws_are_solid_over_their_fitted_compute_and_dashed_beyond(fitted):
    result, _, _, data = fitted
    opt = data["optimal_vs_compute"]
    budgets = [m["C"] for m in result["approach2"]["minima"]]
    a2 = opt["approach2"]
    assert a2["fit_C"][0] == pytest.approx(min(budgets)) and a2["fit_C"][-1] == pytest.approx(max(budgets))
    below, above = a2["extrapolated_C"]
    assert max(below) == pytest.approx(min(budgets)) and min(above) == pytest.approx(max(budgets))
    assert max(above) == pytest.approx(4e12 * 1.3)  # to the held-out run, not 30x
    assert a2["data_C"] == budgets and a2["band"] and opt["approach3"]["band"]
    pts_c = [p["C"] for p in result["points"]]
    assert opt["approach3"]["fit_C"][0] == pytest.approx(min(pts_c)) and opt["holdout"] == [4e12]


def test_a_skipped_approach_is_named_on_the_plots(tmp_path):
    pts = _sweep(budgets=(1e8, 3e8))  # every minimum at the smallest size
    result = F.fit_points(pts, n_boot=0, top=4)
    data = plot_fit(result, tmp_path, pts)
    assert "approach 2 skipped" in data["loss_vs_flops"]["footer"] and "add smaller sizes" in data["optimal_vs_compute"]["footer"]
    assert (tmp_path / "isoflop.png").is_file()  # the budgets' points, hollow, still drawn
    assert "approach2" not in data["optimal_vs_compute"] and "approach3" in data["optimal_vs_compute"]


def test_replot_from_a_fit_json_and_holdout_json(fitted, tmp_path):
    result, _, out, _ = fitted
    (out / "holdout.json").write_text(json.dumps(HOLDOUT))
    data = replot(out, tmp_path)
    assert (tmp_path / "optimal_vs_compute.png").is_file() and data["optimal_vs_compute"]["holdout"] == [4e12]
    assert data["loss_vs_flops"]["points"][1] == [p["loss"] for p in result["points"]]


@pytest.mark.parametrize("lo, hi", [(1.6, 2.9), (2.0, 30.0), (1e10, 1e13)])
def test_log_axes_have_at_least_three_labelled_ticks(lo, hi):
    fig, ax = plt.subplots()
    ax.plot([lo, hi], [lo, hi])
    ax.set_xscale("log")
    ax.set_yscale("log")
    log_ticks(ax, "y")
    labels = [t for t in ax.get_yticks() if lo <= t <= hi]
    plt.close(fig)
    assert 3 <= len(labels) <= 9


def _run(root, name, tokenizer, steps=(10, 20, 30, 40)):
    run = root / name
    run.mkdir()
    rundir.write_config(run, tiny_config())
    recs = [{"step": s, "split": "train", "loss": 5.0 - 0.05 * s} for s in range(1, 41)]
    recs += [{"step": s, "split": "val", "loss": 5.0 - 0.04 * s, "perplexity": float(np.exp(5.0 - 0.04 * s)),
              "bits_per_byte": 2.0 - 0.01 * s} for s in steps]
    (run / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / rundir.DATA).write_text(json.dumps({"path": "/data", "id": "x", "tokenizer": tokenizer}))
    return run


def test_compare_has_train_and_val_lines_per_run_and_warns_of_two_tokenizers(tmp_path):
    runs = [_run(tmp_path, "a", "aa" * 32), _run(tmp_path, "b", "aa" * 32), _run(tmp_path, "c", "bb" * 32)]
    curves = [CMP.run_curve(r) for r in runs]
    drawn = plot_compare(curves, tmp_path / "lines.png")
    for name in "abc":  # b repeats a exactly: its own lines still
        assert {(l["split"], l["x"]) for l in drawn["lines"] if l["run"] == name} == {
            ("train", "tokens"), ("train", "flops"), ("val", "tokens"), ("val", "flops")}
    assert min(drawn["yticks"]) >= 3
    assert run_label(curves[0]) == f"a (N={curves[0]['N']:,}, C={curves[0]['flops'][-1]:.2g})"
    table = CMP.compare([str(r) for r in runs], tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").is_file() and "tokenizer" in table.splitlines()[0] and "train loss" in table
    assert "aaaaaaaa" in table and "bbbbbbbb" in table
    assert table.splitlines()[-1].startswith("WARNING: these runs use 2 tokenizers (aaaaaaaa, bbbbbbbb)")
    assert "WARNING" not in CMP.compare([str(r) for r in runs[:2]], tmp_path / "two.png")


def test_the_held_out_check_redraws_optimal_vs_compute_with_its_run(fitted, tmp_path):
    result, _, _, _ = fitted
    from ar_lm.scaling.plots import plot_parametric

    unfinished = {**HOLDOUT[0], "name": "holdout1", "measured_loss": None}
    drawn = plot_parametric(result, tmp_path, HOLDOUT + [unfinished])
    assert drawn["observed"] == [p["loss"] for p in result["points"]]
    assert (tmp_path / "parametric_fit.png").is_file() and (tmp_path / "optimal_vs_compute.png").is_file()
