"""The sweep-level wandb run: job type `sweep`, in the points' group, holding the summary table
(a `wandb.Table`, one row per point) and the fit's plots (SWEEP_DIR/fit/*.png) as images, so the
scaling curves sit next to the points' runs. Offline without an API key, as the points' runs are
(`WANDB_MODE` wins; `disabled` or `logging.wandb=False` on the base config: no run)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from ar_lm.scaling.sweeps import Sweep
from ar_lm.training.metrics import wandb_mode

COLUMNS = ("name", "status", "N", "D", "C", "val_loss", "val_loss_se", "val_perplexity", "val_bits_per_byte",
           "epochs", "wall_time_s", "mfu")


def log_sweep_run(sweep: Sweep, sweep_dir: Path, rows: list[dict]) -> None:
    logging = sweep.base.logging
    mode = wandb_mode()
    if not logging.wandb or mode == "disabled":
        return
    import wandb

    id_file = sweep_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    fit_path = sweep_dir / "fit" / "fit.json"
    run = wandb.init(project=logging.project, group=logging.group or sweep.name, job_type="sweep",
                     name=f"{sweep.name}-sweep", id=run_id, resume="allow", dir=str(sweep_dir), mode=mode,
                     config={"sweep": sweep.name, "points": len(rows), "n_kind": sweep.n_kind},
                     settings=wandb.Settings(silent=True, console="off"))
    try:
        table = wandb.Table(columns=list(COLUMNS), data=[[r.get(c) for c in COLUMNS] for r in rows])
        images = {f"fit/{p.stem}": wandb.Image(str(p)) for p in sorted((sweep_dir / "fit").glob("*.png"))}
        run.log({"summary": table, **images})
        if fit_path.is_file():
            run.summary.update(_fit_numbers(json.loads(fit_path.read_text())))
    finally:
        run.finish()
    print(f"[sweep] wandb ({mode}): sweep run {run_id} with the summary table and {len(images)} plots",
          file=sys.stderr)


def _fit_numbers(fit: dict) -> dict:
    """The fitted exponents as run summary values (a = N_opt exponent, b = D_opt exponent)."""
    out = {}
    for approach in ("approach1", "approach2", "approach3"):
        for key in ("a", "b"):
            value = fit.get(approach, {}).get(key)
            if isinstance(value, (int, float)):
                out[f"{approach}/{key}"] = value
    return out
