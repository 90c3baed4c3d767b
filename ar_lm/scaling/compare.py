"""`ar-lm compare`: train and val loss, val perplexity / bits per byte against tokens and FLOPs across runs, with
each run's N and tokenizer (a warning where the tokenizers differ: losses per token then do not compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ar_lm.errors import require
from ar_lm.model.counts import flops_per_token, param_counts
from ar_lm.scaling.plots_compare import plot_compare
from ar_lm.training import rundir
from ar_lm.training.metrics import read_jsonl


def collect_runs(paths: list[str]) -> list[Path]:
    """Run directories named directly, or every run under a sweep directory's runs/."""
    runs = []
    for p in map(Path, paths):
        require(p.exists(), f"{p} does not exist")
        if rundir.is_run_dir(p):
            runs.append(p)
        elif (p / "runs").is_dir():
            runs += sorted(r for r in (p / "runs").iterdir() if rundir.is_run_dir(r))
        else:
            require(False, f"{p} is neither a run directory nor a sweep directory")
    require(runs, "no run directories found")
    return runs


def run_curve(run: Path) -> dict:
    """A run's val records (loss, perplexity, bits per byte) and train losses against tokens and FLOPs, its
    parameter count N (non-embedding) and the tokenizer's sha256 (RUN_DIR/data.json: `rundir.recorded_data`)."""
    cfg = rundir.load_run_config(run)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    records = read_jsonl(run / rundir.METRICS)
    val = [r for r in records if r.get("split") == "val"]
    train = [r for r in records if r.get("split", "train") == "train" and r.get("loss") is not None and r.get("step")]
    counts = param_counts(cfg.model)
    return {
        "name": run.name,
        "N": counts.get("non_embedding", counts.get("total")),
        "tokenizer": (rundir.recorded_data(run) or {}).get("tokenizer"),
        "tokens": [r["step"] * tokens_per_step for r in val],
        "flops": [r["step"] * tokens_per_step * fpt for r in val],
        "perplexity": [r["perplexity"] for r in val],
        "bits_per_byte": [r["bits_per_byte"] for r in val],
        "loss": [r["loss"] for r in val],
        "train_tokens": [r["step"] * tokens_per_step for r in train],
        "train_flops": [r["step"] * tokens_per_step * fpt for r in train],
        "train_loss": [r["loss"] for r in train],
    }


def tokenizer_warning(curves: list[dict]) -> Optional[str]:
    """A warning when the runs' tokenizers differ: their losses count nats per token of different tokens
    (compare bits per byte instead)."""
    shas = sorted({c["tokenizer"] for c in curves if c.get("tokenizer")})
    if len(shas) < 2:
        return None
    return (f"WARNING: these runs use {len(shas)} tokenizers ({', '.join(s[:8] for s in shas)}): loss and perplexity "
            "are per token of different tokenizers and do not compare; bits per byte does")


def compare(paths: list[str], out: Path) -> str:
    curves = [run_curve(r) for r in collect_runs(paths)]
    curves = [c for c in curves if c["tokens"]]
    require(curves, "none of the runs has validation records yet")
    plot_compare(curves, out)
    head = (f"{'run':<24} {'N':>12} {'tokenizer':>9} {'tokens':>12} {'FLOPs':>10} {'train loss':>10} {'val loss':>9} "
            f"{'ppl':>9} {'bpb':>7}")
    lines = [head, "-" * len(head)]
    for c in curves:
        train = f"{c['train_loss'][-1]:>10.4f}" if c["train_loss"] else f"{'-':>10}"
        lines.append(f"{c['name']:<24} {c['N'] or 0:>12,} {(c['tokenizer'] or '-')[:8]:>9} {c['tokens'][-1]:>12,} "
                     f"{c['flops'][-1]:>10.3g} {train} {c['loss'][-1]:>9.4f} {c['perplexity'][-1]:>9.3f} "
                     f"{c['bits_per_byte'][-1]:>7.4f}")
    warning = tokenizer_warning(curves)
    return "\n".join(lines + ([warning] if warning else []))


def compare_command(args) -> int:
    """`ar-lm compare RUN_OR_SWEEP_DIR ... [--out PNG]`: prints the table, writes the plot."""
    require(args.out.endswith(".png"), f"--out must be a .png file, got {args.out}")
    print(compare(args.runs, Path(args.out)))
    return 0
