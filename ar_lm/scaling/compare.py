"""`ar-lm compare`: validation perplexity / bits per byte against tokens and FLOPs across runs."""

from __future__ import annotations

from pathlib import Path

from ar_lm.errors import require
from ar_lm.model.counts import flops_per_token
from ar_lm.scaling.plots import plot_compare
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
    cfg = rundir.load_run_config(run)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    val = [r for r in read_jsonl(run / rundir.METRICS) if r.get("split") == "val"]
    return {
        "name": run.name,
        "tokens": [r["step"] * tokens_per_step for r in val],
        "flops": [r["step"] * tokens_per_step * fpt for r in val],
        "perplexity": [r["perplexity"] for r in val],
        "bits_per_byte": [r["bits_per_byte"] for r in val],
        "loss": [r["loss"] for r in val],
    }


def compare(paths: list[str], out: Path) -> str:
    curves = [run_curve(r) for r in collect_runs(paths)]
    curves = [c for c in curves if c["tokens"]]
    require(curves, "none of the runs has validation records yet")
    plot_compare(curves, out)
    head = f"{'run':<24} {'tokens':>12} {'FLOPs':>10} {'val loss':>9} {'ppl':>9} {'bpb':>7}"
    lines = [head, "-" * len(head)]
    for c in curves:
        lines.append(f"{c['name']:<24} {c['tokens'][-1]:>12,} {c['flops'][-1]:>10.3g} {c['loss'][-1]:>9.4f} "
                     f"{c['perplexity'][-1]:>9.3f} {c['bits_per_byte'][-1]:>7.4f}")
    return "\n".join(lines)


def compare_command(args) -> int:
    """`ar-lm compare RUN_OR_SWEEP_DIR ... [--out PNG]`: prints the table, writes the plot."""
    require(args.out.endswith(".png"), f"--out must be a .png file, got {args.out}")
    print(compare(args.runs, Path(args.out)))
    return 0
