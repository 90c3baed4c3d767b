"""Evaluation: the loss's standard error over windows, the seeded window subset, epochs in the summary."""

import json
import math

import jax
import numpy as np
import pytest
from conftest import tiny_config

from ar_lm.cli import main
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.pipeline import eval_batches, split_windows
from ar_lm.model.transformer import apply
from ar_lm.training.evaluate import evaluate_run
from ar_lm.training.loop import train
from ar_lm.training.rundir import load_run_config


def _window_losses(cfg, params, windows_BxL1) -> np.ndarray:
    """Mean token loss of each window, from the model applied directly (float64 log-softmax)."""
    logits = np.asarray(apply(cfg.model, params, windows_BxL1[:, :-1]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, windows_BxL1[:, 1:, None], -1)[..., 0].mean(1)


def test_loss_se_matches_per_window_losses_and_shrinks_with_more_tokens(tmp_path, byte_data, capsys):
    cfg = tiny_config(byte_data, train={"steps": 4, "eval_every": 2, "eval_tokens": 1024})
    result = train(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    params = jax.device_get(result.state["params"])
    ds = TokenDataset(byte_data)
    windows = np.concatenate(eval_batches(ds, 32, 8, 1024, cfg.data.eval_seed))
    n_val = split_windows(ds, "val", 32)
    assert windows.shape == (32, 33) and n_val >= 64, n_val  # 4 of the split's 8 whole batches: a subset
    losses = _window_losses(load_run_config(tmp_path / "run"), params, windows)
    assert summary["val_loss"] == pytest.approx(losses.mean(), rel=1e-5)
    assert summary["val_loss_se"] == pytest.approx(np.std(losses, ddof=1) / math.sqrt(32), rel=1e-3)
    assert summary["val_loss_se"] > 0
    train_windows = sum((len(s) - 1) // 32 for s in ds.shards("train"))
    assert summary["epochs"] == pytest.approx(4 * 8 * 32 / (train_windows * 32))

    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert len(val) == 2 and all(r["eval_tokens"] == 1024 and r["loss_se"] > 0 for r in val)
    assert val[-1]["loss_se"] == summary["val_loss_se"]

    again = evaluate_run(tmp_path / "run", max_tokens=1024)  # training's budget: the windows it evaluated
    assert again["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert again["stderr"] == pytest.approx(summary["val_loss_se"], rel=1e-5)
    one = evaluate_run(tmp_path / "run", max_tokens=256)
    whole = evaluate_run(tmp_path / "run", max_tokens=0)
    assert (one["eval_tokens"], whole["eval_tokens"]) == (256, n_val * 32)  # every window, not whole batches only
    assert whole["stderr"] < again["stderr"] < one["stderr"]

    assert main(["eval", str(tmp_path / "run"), "--tokens", "-5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --tokens must be >= 0, got -5: "), err
