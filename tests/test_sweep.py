"""Sweep runner (failures recorded, re-runs skip, killed sweeps resume), fit/compare CLI, and the
synthetic source's entropy-rate floor."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_config

from ar_lm.cli import main
from ar_lm.data.sources import Document
from ar_lm.data.synthetic import MarkovSource, synthetic_splits
from ar_lm.data.writer import write_dataset
from ar_lm.model.counts import param_counts
from ar_lm.scaling import parametric
from ar_lm.scaling.runner import SweepRunner, format_table, warn_repeats
from ar_lm.scaling.sweeps import ShapeRule, Sweep, grid_sweep
from ar_lm.training.loop import train
from ar_lm.training.rundir import load_run_config

EXPERIMENT = '''
import dataclasses
from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.scaling.sweeps import ShapeRule, Sweep, SweepPoint, isoflop_sweep

RULE = ShapeRule(aspect=16, head_dim=8)


def config():
    return ExperimentConfig(
        name="mini", model=ModelConfig(vocab_size=257, max_seq_len=32), data=DataConfig(seq_len=32, batch_size=8, prefetch=0),
        optim=OptimConfig(lr=3e-3), train=TrainConfig(eval_tokens=256, log_every=5, checkpoint_every=10, async_checkpoint=False),
        mesh=MeshConfig(devices=1), logging=LoggingConfig(wandb=False, progress=False))


def sweep():
    base = config()
    points = isoflop_sweep(base, (3e8, 6e8), sizes_per_budget=2, spread=2.0, rule=RULE, min_steps=5, evals_per_run=4)
    broken_cfg = dataclasses.replace(points[0].config, name="broken",
                                     model=dataclasses.replace(points[0].config.model, n_heads=3))
    points.append(SweepPoint("broken", broken_cfg, dict(points[0].coords)))
    return Sweep(name="mini", base=base, points=tuple(points), rule=RULE)
'''


def _status(sweep_dir):
    try:
        return json.loads((sweep_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def test_sweep_failures_reruns_and_kill_resume(tmp_path, byte_data):
    exp = tmp_path / "mini.py"
    exp.write_text(EXPERIMENT)
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ar_lm", "sweep", str(exp), "--sweep-dir", str(sweep_dir), "--data", str(byte_data), "--no-fit"]
    env = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""}

    # 1. kill the sweep once its first run has finished
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(s.get("state") == "done" for s in _status(sweep_dir).values()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_done = [n for n, s in _status(sweep_dir).items() if s.get("state") == "done"]
    assert first_done, "no run finished before the kill"
    kept = {n: (sweep_dir / "runs" / n / "summary.json").read_bytes() for n in first_done}

    # 2. re-run: finishes the rest, the broken point fails with its error recorded, exit 1
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr
    status = _status(sweep_dir)
    assert status["broken"]["state"] == "failed" and "not divisible by model.n_heads=3" in status["broken"]["error"]
    good = [n for n in status if n != "broken"]
    assert len(good) == 4 and all(status[n]["state"] == "done" for n in good)
    for n, blob in kept.items():  # finished runs were skipped, not redone
        assert (sweep_dir / "runs" / n / "summary.json").read_bytes() == blob
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert {r["name"] for r in rows} == set(status) and all(r["val_loss"] for r in rows if r["name"] != "broken")
    assert "val loss" in out.stdout  # the printed table
    listing = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    assert {p["name"] for p in listing} == set(status)

    # 3. re-run again: nothing to redo except the broken point
    mtimes = {n: (sweep_dir / "runs" / n / "summary.json").stat().st_mtime_ns for n in good}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    assert {n: (sweep_dir / "runs" / n / "summary.json").stat().st_mtime_ns for n in good} == mtimes

    # 4. the experiment changes what its points compute: a finished point runs again, with a one-line note,
    # and its old run is kept aside
    exp.write_text(EXPERIMENT.replace("lr=3e-3", "lr=1e-3"))
    again = good[0]
    out = subprocess.run([*cmd, "--only", again], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    notes = [l for l in out.stderr.splitlines() if "its config changed since it finished" in l]
    assert len(notes) == 1 and notes[0].startswith(f"[sweep] {again}:") and "optim.lr 0.003 -> 0.001" in notes[0]
    old = list((sweep_dir / "runs" / ".replaced").glob(f"{again}-*"))
    assert len(old) == 1 and load_run_config(old[0]).optim.lr == 3e-3
    assert load_run_config(sweep_dir / "runs" / again).optim.lr == 1e-3 and _status(sweep_dir)[again]["state"] == "done"
    assert (sweep_dir / "runs" / again / "summary.json").stat().st_mtime_ns > mtimes[again]
    exp.write_text(EXPERIMENT)

    # 5. Approach 1 from the runs' periodic validation curves (4 evals each), and compare the runs
    for n in good:
        steps = load_run_config(sweep_dir / "runs" / n).total_steps
        records = [json.loads(l) for l in (sweep_dir / "runs" / n / "metrics.jsonl").read_text().splitlines()]
        every = steps // 4
        assert [r["step"] for r in records if r.get("split") == "val"] == sorted(set(range(every, steps + 1, every)) | {steps})
    assert main(["fit", str(sweep_dir), "--approach", "1", "--bootstrap", "0", "--out", str(tmp_path / "fit1")]) == 0
    p1 = json.loads((tmp_path / "fit1" / "fit.json").read_text())["approach1"]
    sizes = [p["coords"]["N"] for p in listing if p["name"] in good]
    assert p1["source"] == "val" and p1["indicative"] == (len(set(sizes)) == len(sizes))
    assert main(["compare", str(sweep_dir), "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 10_000


def test_sweep_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty.py"
    empty.write_text(EXPERIMENT.replace("points=tuple(points)", "points=()"))
    single = tmp_path / "single.py"
    single.write_text(EXPERIMENT.replace("points=tuple(points)", "points=tuple(points[:1])"))
    nosweep = tmp_path / "nosweep.py"
    nosweep.write_text("def config():\n    return None\n")
    for path, fragment in ((empty, "is empty"), (single, "single point"), (nosweep, "defines no sweep()")):
        assert main(["sweep", str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err


def test_fit_cli_on_points_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = []
    for c in (1e18, 1e19, 1e20):
        n_star = math.sqrt(c / 120)
        for n in n_star * np.geomspace(0.25, 4, 5):
            d = c / (6 * n)
            rows.append((n, c, (1.7 + 400 / n**0.34 + 410 / d**0.28) * math.exp(rng.normal(0, 0.002))))
    path = tmp_path / "pts.csv"
    path.write_text("params,flops,loss\n" + "\n".join(f"{n},{c},{l}" for n, c, l in rows))
    assert main(["fit", "--points", str(path), "--bootstrap", "20"]) == 0
    report = capsys.readouterr().out
    assert "approach 2" in report and "approach 3" in report
    result = json.loads((tmp_path / "pts" / "fit.json").read_text())
    assert result["approach3"]["a"] == pytest.approx(0.28 / 0.62, abs=0.05)
    assert result["approach2"]["a"] == pytest.approx(0.28 / 0.62, abs=0.05)
    for name in ("isoflop.png", "loss_vs_flops.png", "optimal_vs_compute.png", "parametric_fit.png"):
        assert (tmp_path / "pts" / name).stat().st_size > 10_000
    bad = tmp_path / "bad.csv"
    bad.write_text("params,loss\n1,2\n")
    assert main(["fit", "--points", str(bad)]) == 2
    assert "needs columns" in capsys.readouterr().err


def _law_csv(path, rows):
    path.write_text("params,flops,loss\n" + "\n".join(f"{n:.6g},{c:.6g},{l:.6g}" for n, c, l in rows) + "\n")
    return path


def _isoflop_rows(seed, scale=1.0, budgets=np.geomspace(1e18, 1e21, 4)):
    """Chinchilla's law (sizes and tokens multiplied by `scale`) on 4 budgets x 7 sizes, 0.2% noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        for n in math.sqrt(c / 120) * np.geomspace(1 / 8, 8, 7):
            d = c / (6 * n)
            loss = 1.69 + 406.4 / (scale * n) ** 0.34 + 410.7 / (scale * d) ** 0.28
            rows.append((n, c, loss * math.exp(rng.normal(0, 0.002))))
    return rows


def test_fit_cli_predicts_with_intervals_backtests_and_compares(tmp_path, capsys, monkeypatch):
    pts = _law_csv(tmp_path / "pts.csv", _isoflop_rows(0))
    truth = lambda n, d: 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28  # noqa: E731
    test_rows = [(4e9, 1e22, truth(4e9, 1e22 / 2.4e10)), (1e8, 1e20, truth(1e8, 1e20 / 6e8))]
    test = _law_csv(tmp_path / "test.csv", test_rows)
    out = tmp_path / "fit"
    assert main(["fit", "--points", str(pts), "--test", str(test), "--predict", "1e9:2e10", "--predict-compute", "1e22",
                 "--bootstrap", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "fit.json").read_text())
    assert [r["N"] for r in result["test"]] == [4e9, 1e8]  # the CSV's row order
    for r, (n, c, loss) in zip(result["test"], test_rows):
        assert set(r) >= {"N", "D", "C", "loss", "predicted_loss", "interval", "relative_error"}
        assert r["D"] == pytest.approx(c / (6 * n)) and r["C"] == pytest.approx(c)
        assert r["loss"] == pytest.approx(loss, rel=1e-5)  # as the CSV wrote it (6 digits)
        assert r["relative_error"] == pytest.approx((r["predicted_loss"] - r["loss"]) / r["loss"])
        assert abs(r["relative_error"]) < 0.02 and r["interval"][0] < r["predicted_loss"] < r["interval"][1]
    assert "95% interval" in printed and f"{1.2e20:10.3g}" in printed  # --predict 1e9:2e10 under C = 6ND
    line = next(l for l in printed.splitlines() if l.startswith("[predict] C=1e+22"))
    n_opt = float(line.split("N_opt=")[1].split()[0].replace(",", ""))
    g, a = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62), 0.28 / 0.62  # the true law's closed form
    assert n_opt == pytest.approx(g * (1e22 / 6) ** a, rel=0.1)  # ~5.2e9

    assert main(["fit", "--points", str(pts), "--holdout-above", "2e20", "--bootstrap", "10", "--out",
                 str(tmp_path / "back"), "--approach", "3"]) == 0
    back = json.loads((tmp_path / "back" / "fit.json").read_text())
    assert back["n_points"] == 21 and [r["C"] for r in back["test"]] == [pytest.approx(1e21)] * 7

    # --full-grid starts from every grid point: a 108-point grid here (the 4,500-point one takes ~1 min)
    monkeypatch.setattr(parametric, "INIT_GRID", {"alpha": (0.0, 0.5, 1.0), "beta": (0.0, 0.5, 1.0), "e": (0.0, 0.5),
                                                  "a": (0.0, 5.0), "b": (0.0, 5.0, 10.0)})
    assert main(["fit", "--points", str(pts), "--full-grid", "--bootstrap", "0", "--approach", "3",
                 "--out", str(tmp_path / "grid")]) == 0
    grid = json.loads((tmp_path / "grid" / "fit.json").read_text())["approach3"]
    assert grid["starts"] == "every grid point" and grid["n_starts"] == 108 and grid["converged"]

    b = _law_csv(tmp_path / "b.csv", _isoflop_rows(1, scale=math.sqrt(2)))  # B at C is A at 2C
    assert main(["fit", "--compare", str(pts), str(b), "--bootstrap", "30", "--out", str(tmp_path / "cmp")]) == 0
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert cmp["multiplier"] == pytest.approx(2.0, rel=0.1) and (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000

    capsys.readouterr()
    for extra, fragment in ((["--predict", "1e9"], "--predict takes N:D"),
                            (["--holdout-above", "1e30"], "must leave >= 5 points")):
        assert main(["fit", "--points", str(pts), "--out", str(tmp_path / "bad")] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "bad").exists()


def test_points_record_both_n_and_epochs_warn_when_the_split_repeats(tmp_path, capsys):
    splits = {"train": [Document("t", "some training text " * 16)], "val": [Document("v", "other text " * 20)]}
    write_dataset(tmp_path / "data", [], "byte", splits=splits)  # 9 train windows of 32; val wraps to a batch
    base = tiny_config(tmp_path / "data", model={"vocab_size": 257})
    points = grid_sweep(base, [2e4], [768], ShapeRule(aspect=16, head_dim=8), n_kind="total")
    (p,) = points
    counts = param_counts(p.config.model)
    assert p.coords["n_kind"] == "total" and p.coords["N"] == p.coords["N_total"] == counts["total"]
    assert p.coords["N_non_embedding"] == counts["non_embedding"] < counts["total"]
    runner = SweepRunner(Sweep("mini", base, tuple(points), n_kind="total"), tmp_path / "sweep", tmp_path / "data")
    runner.write_points(points)
    listing = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert listing["n_kind"] == "total" and listing["points"][0]["coords"]["N_non_embedding"] == counts["non_embedding"]

    train(p.config, runner.run_dir(p.name))
    rows = runner.write_summary(points)
    epochs = 3 * 8 * 32 / (9 * 32)
    assert rows[0]["epochs"] == pytest.approx(epochs) and rows[0]["val_loss_se"] > 0
    (csv_row,) = csv.DictReader(open(tmp_path / "sweep" / "summary.csv"))
    assert float(csv_row["epochs"]) == pytest.approx(epochs)
    table = format_table(rows).splitlines()
    assert "epochs" in table[0].split() and f"{epochs:.2f}" in table[2].split()
    capsys.readouterr()
    warn_repeats(rows)
    assert capsys.readouterr().err.splitlines() == [f"[sweep] warning: {p.name} repeats its train split ({epochs:.2f} "
                                                    "epochs): the fit leaves it out (`ar-lm fit --include-repeated` "
                                                    "keeps it)"]
    warn_repeats([dict(rows[0], epochs=0.5), dict(rows[0], epochs=None)])
    assert capsys.readouterr().err == ""


def test_entropy_rate_matches_the_empirical_conditional_entropy():
    src = MarkovSource(vocab=4, order=2, branching=3, seed=3)
    x = src.sample(300_000, seed=1)
    ctx = x[:-2] * 4 + x[1:-1]  # the last two symbols
    counts = np.zeros((16, 4))
    np.add.at(counts, (ctx, x[2:]), 1)
    p_ctx = counts.sum(1) / counts.sum()
    cond = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(p_ctx[:, None] * cond * np.log(cond))
    assert h == pytest.approx(src.entropy_rate, abs=0.01)
    assert 0 < src.entropy_rate < math.log(3)  # at most `branching` successors per context


def test_model_loss_approaches_but_never_beats_the_entropy_rate(tmp_path):
    splits, source = synthetic_splits(60_000, 0.05, vocab=16, order=1, branching=3, seed=0)
    data = tmp_path / "syn"
    write_dataset(data, [], "char", source=source, splits=splits)
    floor = json.loads((data / "metadata.json").read_text())["source"]["entropy_rate_nats"]
    cfg = tiny_config(data, model={"d_model": 64, "max_seq_len": 64}, data={"seq_len": 64, "batch_size": 16},
                      optim={"lr": 1e-2, "warmup_steps": 10}, train={"steps": 300, "eval_tokens": 0, "eval_every": 100})
    train(cfg, tmp_path / "run")
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in records if r["split"] == "val"]
    assert all(v > floor for v in val), (val, floor)
    assert val[-1] < floor + 0.05, (val[-1], floor)  # within 0.05 nats of the floor
    assert val[-1] < val[0]


def test_shapes_data_spec_prepares_procedural_images(tmp_path):
    from ar_lm.config import ExperimentConfig
    from ar_lm.data.dataset import TokenDataset
    from ar_lm.data.synthetic import shape_images
    from ar_lm.scaling.sweep_data import ensure_data
    from ar_lm.scaling.sweeps import DataSpec

    images = shape_images(300, 8, 8, seed=0)
    assert np.array_equal(images, shape_images(300, 8, 8, seed=0)) and not np.array_equal(images, shape_images(300, 8, 8, 1))
    # structure a model can learn: neighbours are far closer than random pixels
    assert np.abs(np.diff(images.astype(int), axis=2)).mean() < 0.3 * np.abs(images[:, :, :1] - images[::-1, :, :1]).mean()
    spec = DataSpec(source="shapes", images=300, image_size=8, bits=4)
    sweep = Sweep(name="pix", base=ExperimentConfig(), points=(), data=spec)
    ds = TokenDataset(ensure_data(sweep, tmp_path, None))
    assert ds.meta["modality"] == "image" and ds.meta["image"]["height"] == 8 and ds.vocab_size == 17
    splits = ds.meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 300
    assert sum(s["tokens"] for s in splits.values()) == 300 * 65  # 64 pixels + end of image each
    first = np.concatenate(ds.shards("train"))[:64]
    assert any(np.array_equal(first, (image >> 4).ravel()) for image in images)  # raster order, 4 bits
