"""In-training validation on which windows? One small run (experiments/tiny.py on the standard library,
byte tokenizer), its final checkpoint scored three ways with the same budget (train.eval_tokens):

- first windows: the first eval_tokens / seq_len windows of val in file order (what training read before);
- seeded subset: the windows `eval_window_indices` spreads over the whole split (what training reads now);
- whole split: every val token scored once (`ar-lm eval`'s default, stride = seq_len).

Writes benchmarks/results/eval_subsets_<date>_cpu<cores>.json.

    python benchmarks/eval_subsets.py [--max-mb 8] [--steps 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import tempfile
from pathlib import Path

from machine import StealMeter, ar_lm_cli, write_result

ROOT = Path(__file__).resolve().parent.parent


def _first_windows_loss(run_dir: Path) -> dict:
    """The run's final checkpoint on the first windows of val in file order (the old in-training subset)."""
    import numpy as np

    from ar_lm.data.dataset import TokenDataset
    from ar_lm.data.pipeline import WindowSource, eval_window_indices
    from ar_lm.parallel.mesh import inference_mesh, logical_rules, logical_sharding, make_mesh, mesh_context
    from ar_lm.training import rundir
    from ar_lm.training.checkpoint import restore_latest_params
    from ar_lm.training.evaluate import evaluate, make_eval_step, token_tables
    from ar_lm.training.state import param_shardings

    cfg = rundir.load_run_config(run_dir)
    cfg = dataclasses.replace(cfg, mesh=inference_mesh(cfg.mesh, cfg.data.batch_size))
    dataset = TokenDataset(cfg.data.path)
    source = WindowSource(dataset.shards("val"), cfg.data.seq_len)
    n = len(eval_window_indices(len(source), cfg.data.seq_len, cfg.train.eval_tokens, 0))
    n -= n % cfg.data.batch_size  # whole batches of the split's first windows
    rows = np.stack([source[i] for i in range(n)]).reshape(-1, cfg.data.batch_size, cfg.data.seq_len + 1)
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    _, params = restore_latest_params(run_dir, cfg, mesh, rules)
    sharding = logical_sharding(mesh, rules, ("batch", "length"))
    eval_fn = make_eval_step(cfg, param_shardings(cfg, mesh, rules), sharding, dataset.eos_id)
    with mesh_context(mesh, rules):
        out = evaluate(eval_fn, params, list(rows), sharding, token_tables(dataset))
    return {"loss": out["loss"], "stderr": out["loss_se"], "eval_tokens": out["eval_tokens"],
            "windows": f"0..{n - 1} of {len(source)}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    steal = StealMeter()
    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        ar_lm_cli("prepare", "--source", "stdlib", "--tokenizer", "byte", "--max-mb", str(args.max_mb), "--out", str(data))
        ar_lm_cli("train", str(ROOT / "experiments" / "tiny.py"), "--data", str(data), "--run-dir", str(run),
               "--set", f"train.steps={args.steps}", "--set", "logging.wandb=false")
        in_training = json.loads((run / "summary.json").read_text())
        seeded = json.loads(ar_lm_cli("eval", str(run), "--tokens", str(json.loads(
            (run / "config.json").read_text())["train"]["eval_tokens"]), "--json"))
        whole = json.loads(ar_lm_cli("eval", str(run), "--json"))
        first = _first_windows_loss(run)
    result = {
        "date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "steal_frac": steal.frac(),
        "command": f"python benchmarks/eval_subsets.py --max-mb {args.max_mb:g} --steps {args.steps}",
        "data": f"stdlib, byte tokenizer, --max-mb {args.max_mb:g}",
        "first_windows": first,
        "seeded_subset": {"loss": seeded["loss"], "stderr": seeded["stderr"], "eval_tokens": seeded["eval_tokens"],
                          "in_training_val_loss": in_training["val_loss"]},
        "whole_split": {"loss": whole["loss"], "stderr": whole["stderr"], "eval_tokens": whole["eval_tokens"]},
    }
    write_result("eval_subsets", result)


if __name__ == "__main__":
    main()
