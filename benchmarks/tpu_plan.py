"""Memory and speed of Llama 125M-70B on TPU slices, from the TPU compiler (`ar-lm plan`), no TPU needed.

    JAX_PLATFORMS=cpu python benchmarks/tpu_plan.py [--json FILE] [--sizes 125m,...] [--seqs 2048,4096]
        [--targets v5e-16,...] [--presets fsdp,...]

For every (size, seq, target, rule preset): the train step compiled for the slice (`ar_lm.plan.planner.plan`):
fits or not, GiB per device, the collectives' traffic, the roofline step time and MFU ceiling. Global batch:
2 sequences per chip at seq 2048 and 1 at 4096; remat full from 7B up, none below; attention and dtypes as the
run resolves them on TPU (splash attention, bfloat16, logits in chunks of 512 positions), under the TPU XLA
flags a run takes (`ar_lm.parallel.runtime.TPU_XLA_FLAGS`). Results are written as each cell finishes (a rerun
with the same --json skips the cells it holds), so a partial run still records what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from llama_tpu import config_for  # noqa: E402

from ar_lm.config import MeshConfig, validate  # noqa: E402
from ar_lm.errors import UserError  # noqa: E402
from ar_lm.model.counts import param_counts  # noqa: E402
from ar_lm.plan.planner import plan  # noqa: E402
from ar_lm.plan.targets import GIB, parse_target  # noqa: E402

PRESETS = {
    "dp": MeshConfig(data=-1, fsdp=1, tensor=1, rules="dp"),
    "fsdp": MeshConfig(data=1, fsdp=-1, tensor=1, rules="fsdp"),
    "fsdp_tp": MeshConfig(data=1, fsdp=-1, tensor=4, rules="fsdp_tp"),
}
TARGETS = ("v5e-16", "v5p-8", "v5p-64", "v5p-128", "v6e-64")
SIZES = ("125m", "350m", "1.3b", "7b", "13b", "70b")
# MaxText's published runs, planned with their shapes: (size, seq, sequences per chip, target, what they report)
MAXTEXT = (
    ("70b", 4096, 4, "v5p-128", "MaxText configs/v5p/llama2_70b.sh: Llama2-70B, seq 4096, per_device_batch_size=4 "
     "(on v5p-512); configs/v5p/README.md: a 64B model on 1x v5p-128 at 323 TFLOP/s/chip, 70.3% MFU"),
    ("70b", 4096, 4, "v6e-256", "tpu-recipes training/trillium/Llama2-70B-MaxText: Llama2-70B, seq 4096, 4M-token "
     "batch (4 per chip) on v6e-256: 419 TFLOP/s/chip (45.7% of 918), 943 tokens/s/chip"),
)


def cell_config(size: str, seq: int, chips: int, preset: str, per_chip: int = 0):
    cfg = config_for(size, seq_len=seq, batch_size=chips * (per_chip or (2 if seq <= 2048 else 1)))
    remat = "full" if param_counts(cfg.model)["total"] > 5e9 else "none"
    return validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat), mesh=PRESETS[preset]))


def run_cell(size: str, seq: int, target_name: str, preset: str, per_chip: int = 0) -> dict:
    target = parse_target(target_name)
    cfg = cell_config(size, seq, target.chips, preset, per_chip)
    t0 = time.perf_counter()
    try:
        p = plan(cfg, target)
    except UserError as e:
        return {"error": str(e)}
    r = {"fits": p.fits, "gib_per_device": p.memory["total"] / GIB, "capacity_gib": p.memory["capacity"] / GIB,
         "arguments_gib": p.memory["arguments"] / GIB, "temporaries_gib": p.memory["temporaries"] / GIB,
         "mesh": p.mesh, "settings": p.settings, "compile_s": round(time.perf_counter() - t0, 1)}
    if not math.isnan(p.roofline["step_s"]):
        r |= {"step_ms": p.roofline["step_s"] * 1e3, "bound": p.roofline["bound"], "mfu_ceiling": p.mfu_ceiling,
              "tokens_per_s_per_chip": p.tokens_per_s_per_chip,
              "roofline_ms": {k.removesuffix("_s"): v * 1e3 for k, v in p.roofline.items() if k.endswith("_s")},
              "collective_gb": {f"{c['kind']} ({c['network']})": c["traffic_bytes"] / 1e9 for c in p.collectives},
              "compiled_vs_model_flops": (p.flops["compiled"] + p.flops["kernels"]) / p.flops["model"],
              "activation_collectives": len(p.activation_collectives)}
    if not p.fits:
        r["advice"] = p.advice
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="results file (default benchmarks/results/tpu_plan_<date>_cpu<cores>.json)")
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--seqs", default="2048,4096")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--presets", default="fsdp,fsdp_tp,dp")
    ap.add_argument("--maxtext", action="store_true", help="also plan MaxText's published configurations (MAXTEXT)")
    args = ap.parse_args()
    from ar_lm.parallel.runtime import set_backend_xla_flags

    flags = set_backend_xla_flags()  # the TPU flags a run takes (LIBTPU_INIT_ARGS), before libtpu starts
    import jax
    import libtpu

    date = datetime.date.today().isoformat()
    out = Path(args.json or Path(__file__).resolve().parent / "results" / f"tpu_plan_{date}_cpu{os.cpu_count()}.json")
    result = json.loads(out.read_text()) if out.is_file() else {
        "date": date, "cores": os.cpu_count(), "jax": jax.__version__, "libtpu": getattr(libtpu, "__version__", "?"),
        "libtpu_init_args": flags.get("LIBTPU_INIT_ARGS", ""), "command": "python " + " ".join(sys.argv), "cells": {}}
    for preset in args.presets.split(","):
        for seq in (int(s) for s in args.seqs.split(",")):
            for target in args.targets.split(","):
                for size in args.sizes.split(","):
                    key = f"{size} | seq {seq} | {target} | {preset}"
                    if key in result["cells"]:
                        continue
                    result["cells"][key] = run_cell(size, seq, target, preset)
                    print(key, json.dumps(result["cells"][key]), flush=True)
                    out.write_text(json.dumps(result, indent=2) + "\n")
    for size, seq, per_chip, target, reference in MAXTEXT if args.maxtext else ():
        key = f"maxtext: {size} | seq {seq} | {per_chip} per chip | {target} | fsdp"
        if key not in result["cells"]:
            result["cells"][key] = {**run_cell(size, seq, target, "fsdp", per_chip), "reference": reference}
            print(key, json.dumps(result["cells"][key]), flush=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
