"""Exposure bias with and without scheduled sampling: experiments/tiny.py on the standard library (byte
tokenizer) trained twice from the same seed and data order, once with teacher forcing and once with
scheduled sampling (Bengio et al. 2015; `train.ss_schedule`, the probability of feeding the model's own
argmax token rising linearly from 0 to `--ss-end` over the run), then `ar-lm eval RUN --exposure K` on
the same seeded val windows: NLL of the true tokens K+1.. after the model's own greedy first K tokens
versus after the true ones.

Writes benchmarks/results/exposure_bias_<date>_cpu<cores>.json.

    python benchmarks/exposure_bias.py [--max-mb 4] [--steps 300] [--exposure 16] [--ss-end 0.25]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

from machine import StealMeter, ar_lm_cli, write_result

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("loss", "exposure_nll_teacher", "exposure_nll_own", "exposure_gap", "exposure_gap_se", "exposure_windows",
        "exposure_tokens")


def _train_and_score(data: Path, run: Path, steps: int, k: int, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    ar_lm_cli("train", str(ROOT / "experiments" / "tiny.py"), "--data", str(data), "--run-dir", str(run),
              "--set", f"train.steps={steps}", "--set", "logging.wandb=false", *extra)
    train_s = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text())
    scored = json.loads(ar_lm_cli("eval", str(run), "--exposure", str(k), "--json"))
    return {"settings": extra, "train_s": round(train_s, 1), "val_loss_in_training": summary["val_loss"],
            **{key: scored[key] for key in KEYS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--exposure", type=int, default=16)
    parser.add_argument("--ss-end", type=float, default=0.25)
    args = parser.parse_args()
    steal = StealMeter()
    ss = ["--set", "train.ss_schedule=linear", "--set", "train.ss_start=0", "--set", f"train.ss_end={args.ss_end}",
          "--set", f"train.ss_k={args.steps}", "--set", "train.ss_token=argmax"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        ar_lm_cli("prepare", "--source", "stdlib", "--tokenizer", "byte", "--max-mb", str(args.max_mb),
                  "--out", str(data))
        teacher = _train_and_score(data, Path(tmp) / "teacher", args.steps, args.exposure, [])
        scheduled = _train_and_score(data, Path(tmp) / "ss", args.steps, args.exposure, ss)
    result = {
        "date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "steal_frac": steal.frac(),
        "command": f"python benchmarks/exposure_bias.py --max-mb {args.max_mb:g} --steps {args.steps} "
                   f"--exposure {args.exposure} --ss-end {args.ss_end:g}",
        "data": f"stdlib, byte tokenizer, --max-mb {args.max_mb:g}; eval: the seeded subset of train.eval_tokens",
        "exposure_k": args.exposure,
        "teacher_forcing": teacher,
        "scheduled_sampling": scheduled,
        "gap_change": scheduled["exposure_gap"] - teacher["exposure_gap"],
    }
    write_result("exposure_bias", result)


if __name__ == "__main__":
    main()
