"""`ar-lm plan EXPERIMENT.py --target TOPOLOGY`: the run compiled for a TPU topology, before renting it.

Exit 0 when the step fits the chips' HBM, 1 when it does not (one line on stderr naming what to change),
2 on bad input (unknown topology, a mesh that does not divide it, a config error).
"""

from __future__ import annotations

import json
import math
import sys

from ar_lm.errors import EXIT_FAILURE
from ar_lm.plan.planner import Plan, plan
from ar_lm.plan.targets import GIB, parse_target


def _gib(b: float) -> str:
    return "?" if math.isnan(b) else f"{b / GIB:.2f} GiB"


def _si(x: float, unit: str) -> str:
    if math.isnan(x):
        return "?"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _ms(s: float) -> str:
    return "?" if math.isnan(s) else f"{s * 1e3:.2f} ms"


def format_plan(p: Plan) -> str:
    """The human-readable report of one plan."""
    m = p.memory
    mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items() if k != "rules")
    lines = [
        f"target      {p.target} ({p.chips} chips), {p.step} step, mesh {mesh}, rules {p.mesh['rules']}",
        f"settings    attention {p.settings['attention']}, remat {p.settings['remat']}, "
        f"compute {p.settings['compute_dtype']}",
        f"memory      {'fits' if p.fits else 'DOES NOT FIT'} in the {_gib(m['capacity'])} a program may use per device: "
        f"arguments {_gib(m['arguments'])} + temporaries {_gib(m['temporaries'])} + code {_gib(m['code'])} + "
        f"outputs not donated {_gib(m['outputs'] - m['aliased'])} = {_gib(m['total'])} "
        + ("(an upper bound of the peak)" if p.fits else "(the compiler's count)"),
    ]
    if not math.isnan(p.flops["compiled"]):
        ratio = p.flops["compiled"] / p.flops["model"] if p.flops["model"] else float("nan")
        r = p.roofline
        lines += [
            f"flops       {_si(p.flops['compiled'], 'FLOP')} compiled per device and step, "
            f"{_si(p.flops['model'], 'FLOP')} model (flops_per_token x tokens): {ratio:.2f}x",
            f"hbm         {_si(p.hbm_bytes, 'B')} read and written per device and step",
            "collectives " + ("none" if not p.collectives else ""),
        ]
        for c in p.collectives:
            lines.append(f"  {c['kind']:<19} {c['network']}  x{c['count']:<6} {_si(c['bytes'], 'B'):>10} per device, "
                         f"{_si(c['traffic_bytes'], 'B'):>10} sent, {_ms(c['seconds'])}")
        lines += [
            f"roofline    step {_ms(r['step_s'])} ({r['bound']}-bound; compute {_ms(r['compute_s'])}, "
            f"hbm {_ms(r['hbm_s'])}, ici {_ms(r['ici_s'])}, dcn {_ms(r['dcn_s'])})",
            f"throughput  {p.tokens_per_s_per_chip:,.0f} tokens/s per chip, MFU ceiling {p.mfu_ceiling:.1%}",
        ]
    if p.activation_collectives:
        lines.append(f"activations {len(p.activation_collectives)} collectives move activations: "
                     + "; ".join(p.activation_collectives[:4]) + (" ..." if len(p.activation_collectives) > 4 else ""))
    return "\n".join(lines)


def plan_command(args) -> int:
    from ar_lm.data.dataset import TokenDataset
    from ar_lm.training.command import experiment_config
    from ar_lm.training.loop import prepare_config

    target = parse_target(args.target, args.slices)
    cfg = experiment_config(args)
    if cfg.data.path:  # the vocabulary from the dataset, as training takes it
        cfg = prepare_config(cfg, TokenDataset(cfg.data.path, verify=False))
    result = plan(cfg, target, decode=args.decode, hlo_dir=args.hlo_dir)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, default=float, allow_nan=False))
    else:
        print(format_plan(result))
    if not result.fits:
        print(f"error: {result.advice}", file=sys.stderr)
        return EXIT_FAILURE
    return 0
