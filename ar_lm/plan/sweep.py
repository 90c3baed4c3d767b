"""`ar-lm sweep EXPERIMENT.py --plan TOPOLOGY`: every point of a sweep compiled for a TPU slice before renting it.

Each point's train step is planned on the whole target (`ar_lm.plan.planner.plan`): fits or not, GiB per
device, the roofline step time, and from its steps the hours and chip-hours it would take; the table is
printed and written to SWEEP_DIR/plan.json. Exit 1 (one line naming the points) when any point does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from ar_lm.config import ExperimentConfig
from ar_lm.errors import EXIT_FAILURE
from ar_lm.io import atomic_write_text
from ar_lm.plan.planner import jsonable, plan
from ar_lm.plan.targets import GIB, Target


def plan_points(points: Sequence[tuple[str, ExperimentConfig]], target: Target, vocab_size: Optional[int],
                out: Path) -> int:
    rows, plans = [], {}
    for name, cfg in points:
        if cfg.model.vocab_size == 0 and vocab_size:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
        key = dataclasses.replace(cfg, name="", train=type(cfg.train)(), logging=type(cfg.logging)())
        if key not in plans:  # points of one shape (a trunk and its branches) compile to one program
            plans[key] = plan(cfg, target)
        p = plans[key]
        hours = p.roofline["step_s"] * cfg.total_steps / 3600
        rows.append({"point": name, "fits": p.fits, "gib_per_device": p.memory["total"] / GIB,
                     "step_ms": p.roofline["step_s"] * 1e3, "bound": p.roofline["bound"], "steps": cfg.total_steps,
                     "hours": hours, "chip_hours": hours * target.chips, "mfu_ceiling": p.mfu_ceiling,
                     "mesh": p.mesh, "advice": p.advice})
    total = sum(r["chip_hours"] for r in rows if not math.isnan(r["chip_hours"]))
    print(f"plan on {target} ({target.chips} chips, {target.chip.name})")
    print(f"{'point':<24} {'fits':>5} {'GiB/dev':>8} {'step ms':>9} {'bound':>8} {'steps':>8} {'hours':>9} "
          f"{'chip-h':>9} {'MFU ceil':>8}")
    for r in rows:
        print(f"{r['point']:<24} {'yes' if r['fits'] else 'NO':>5} {r['gib_per_device']:>8.2f} {r['step_ms']:>9.3f} "
              f"{r['bound']:>8} {r['steps']:>8,} {r['hours']:>9.4f} {r['chip_hours']:>9.4f} {r['mfu_ceiling']:>8.1%}")
    print(f"total: {total:.4g} chip-hours (roofline ceiling: real runs take longer)")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"target": str(target), "chips": target.chips, "total_chip_hours": total, "points": rows}
    atomic_write_text(out / "plan.json", json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    print(f"[sweep] plan written to {out / 'plan.json'}", file=sys.stderr)
    bad = [r["point"] for r in rows if not r["fits"]]
    if bad:
        print(f"error: {len(bad)} point(s) do not fit {target}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: "
              f"{next(r['advice'] for r in rows if not r['fits'])}", file=sys.stderr)
        return EXIT_FAILURE
    return 0
