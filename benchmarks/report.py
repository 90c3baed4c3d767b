"""Markdown tables for docs/explanation/performance.md, read from the committed results files (no measuring here).

    python benchmarks/report.py --date 2026-12-01 [--results benchmarks/results]

Prints one table per benchmark, each followed by the file it came from, so every figure in the docs
can be regenerated from a file and checked against it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONFIG_NAMES = {
    "nanogpt_cpu": "nanoGPT CPU (4L, 128 wide, ctx 64, batch 12)",
    "gpt_6l_384": "6 layers, 384 wide, ctx 256, batch 8",
    "gpt_50m": "~50M (8L, 640 wide, ctx 256, batch 4, vocab 16k)",
}
ABLATIONS = {  # results-file suffix -> what the run turned off
    "remat=none": "`model.remat=none` (no rematerialisation under the layer scan)",
    "scan=false": "`model.scan_layers=false` (unrolled layers)",
    "devices=1": "`--cpu-devices 1` (one host device using both cores)",
    "attention=dot_product": "`model.attention=dot_product` (`jax.nn.dot_product_attention`)",
    "bf16": "`model.compute_dtype=bfloat16`",
}


def _steal(d: dict) -> str:
    return f"{100 * d['cpu_steal_frac']:.0f}%" if d.get("cpu_steal_frac") is not None else "-"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def train_table(path: Path) -> str:
    d = _load(path)
    rows = ["| config | ar_lm ms/step | tokens/s | MFU | 1st step cold / warm | PyTorch ms/step | tokens/s | MFU "
            "| ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in d["configs"].items():
        j, t = r["jax"], r.get("torch")
        torch = (f"{t['ms_per_step']:,.1f} | {t['tokens_per_s']:,.0f} | {100 * t['mfu']:.1f}% | "
                 f"{r['ratio_tokens_per_s']:.2f}x") if t else "- | - | - | -"
        rows.append(f"| {CONFIG_NAMES.get(name, name)} | {j['ms_per_step']:,.1f} | {j['tokens_per_s']:,.0f} | "
                    f"{100 * j['mfu']:.1f}% | {j['time_to_first_step_s']:.1f} / {j['time_to_first_step_warm_s']:.1f} s | "
                    f"{torch} |")
    steal = f"; {100 * d['cpu_steal_frac']:.0f}% of the CPU time stolen by the hypervisor" if d.get("cpu_steal_frac") else ""
    note = (f"Median of {d['repeats']} alternating runs per side; peak {d['peak_flops'] / 1e9:.0f} GFLOP/s measured "
            f"(float32 matmul){steal}; {d['date']}, {d['machine']}. Runs (ms/step): " + "; ".join(
                f"{n} ar_lm {r['jax']['ms_per_step_runs']}" + (f", PyTorch {r['torch']['ms_per_step_runs']}"
                                                                 if r.get("torch") else "")
                for n, r in d["configs"].items()))
    return "\n".join(rows) + f"\n\n{note}\n\nSource: `{path.as_posix()}`"


def ablation_table(baseline: Path, results: Path, date: str) -> str:
    base = _load(baseline)["configs"]
    configs = [c for c in ("nanogpt_cpu", "gpt_6l_384") if c in base]
    rows = ["| run | " + " | ".join(f"{c} ms/step" for c in configs) + " | CPU stolen | source |",
            "| --- |" + " --- |" * len(configs) + " --- | --- |"]
    rows.append("| all CPU defaults | " + " | ".join(f"{base[c]['jax']['ms_per_step']:,.1f}" for c in configs)
                + f" | {_steal(_load(baseline))} | `{baseline.as_posix()}` |")
    for suffix, what in ABLATIONS.items():
        path = results / f"train_throughput_{date}_cpu2_{suffix}.json"
        if not path.is_file():
            continue
        run_file = _load(path)
        runs = run_file["configs"]
        cells = []
        for c in configs:
            ms = runs[c]["jax"]["ms_per_step"]
            cells.append(f"{ms:,.1f} ({ms / base[c]['jax']['ms_per_step']:.2f}x)")
        rows.append(f"| {what} | " + " | ".join(cells) + f" | {_steal(run_file)} | `{path.as_posix()}` |")
    return "\n".join(rows)


def decode_tables(path: Path) -> str:
    d = _load(path)
    rows = ["| batch | new tokens | ar_lm tokens/s | transformers tokens/s | ratio | naive recompute tokens/s |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in d["throughput"]:
        tps = lambda s: r["batch"] * r["new_tokens"] / s  # noqa: E731
        hf = f"{tps(r['hf_s']):,.0f} | {r['hf_s'] / r['ar_lm_s']:.1f}x" if r.get("hf_s") else "- | -"
        naive = f"{tps(r['naive_s']):,.0f} (ar_lm {r['naive_s'] / r['ar_lm_s']:.1f}x)" if r.get("naive_s") else "-"
        rows.append(f"| {r['batch']} | {r['new_tokens']} | {tps(r['ar_lm_s']):,.0f} | {hf} | {naive} |")
    equal = all(r.get("hf_equal", True) is not False and r.get("naive_equal", True) is not False
                for r in d["throughput"])
    rows.append(f"\nGreedy tokens equal to transformers' and the naive loop's in every row: {equal}.")
    if d.get("cpu_steal_frac"):
        rows.append(f"CPU time stolen by the hypervisor during the run: {100 * d['cpu_steal_frac']:.0f}%.")
    cached = d["per_step"].get("cached_ms", {})
    if cached:
        ms = list(cached.values())
        rows.append(f"Per-step time with the cache from position {min(map(int, cached))} to {max(map(int, cached))}: "
                    f"{min(ms):.1f}-{max(ms):.1f} ms.")
    naive = d["per_step"].get("naive_ms", {})
    if naive:
        rows.append(f"Naive recompute per step: {naive[min(naive, key=int)]:.0f} ms at position {min(map(int, naive))}, "
                    f"{naive[max(naive, key=int)]:.0f} ms at {max(map(int, naive))}.")
    rows += ["", "| sampling | new tokens | plain s | speculative s | speed-up | acceptance | tokens per target pass "
             "| equal to target |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["speculative"]:
        rows.append(f"| {r['mode']} | {r['new_tokens']} | {r['plain_s']:.3f} | {r['spec_s']:.3f} | "
                    f"{r['plain_s'] / r['spec_s']:.2f}x | {r['acceptance_rate']:.2f} | "
                    f"{r['tokens_per_target_pass']:.2f} | {'-' if r['equal'] is None else r['equal']} |")
    return "\n".join(rows) + f"\n\nSource: `{path.as_posix()}`"


def int8_table(path: Path) -> str:
    """The int8 weight-only rows (`--quantize int8`) of a decode results file: speed against float32 ar_lm and
    transformers in the same run, greedy agreement, perplexity and parameter bytes."""
    d = _load(path)
    if not any("int8_s" in r for r in d["throughput"]):
        return f"(no int8 rows in {path.as_posix()})"
    rows = ["| batch | new tokens | float32 ar_lm tokens/s | int8 tokens/s | int8 / float32 ar_lm | int8 / "
            "transformers | greedy tokens equal to float32 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["throughput"]:
        hf = f"{r['hf_s'] / r['int8_s']:.2f}x" if r.get("hf_s") else "-"
        tps = lambda s: r["batch"] * r["new_tokens"] / s  # noqa: E731
        rows.append(f"| {r['batch']} | {r['new_tokens']} | {tps(r['ar_lm_s']):,.0f} | {tps(r['int8_s']):,.0f} | "
                    f"{r['ar_lm_s'] / r['int8_s']:.2f}x | {hf} | {100 * r['int8_equal_frac']:.1f}% |")
    e = d.get("int8_eval")
    if e:
        rows.append(f"\nint8 val perplexity {e['int8_ppl']:.4f} against float32 {e['float_ppl']:.4f} "
                    f"({100 * e['ppl_increase']:+.3f}%, {e['windows']} held-out windows of {e['seq_len']} tokens); "
                    f"parameters {e['int8_bytes'] / 1e6:.1f} MB against {e['float_bytes'] / 1e6:.1f} MB "
                    f"({100 * e['bytes_ratio']:.1f}%).")
    if d.get("cpu_steal_frac"):
        rows.append(f"CPU time stolen by the hypervisor during the run: {100 * d['cpu_steal_frac']:.0f}%.")
    return "\n".join(rows) + f"\n\nSource: `{path.as_posix()}`"


def memory_table(path: Path) -> str:
    d = _load(path)
    rows = ["| model | preset | params MB | optimizer MB | temporaries MB |", "| --- | --- | --- | --- | --- |"]
    for key, r in d.items():
        model, preset = (s.strip() for s in key.split("|"))
        rows.append(f"| {model}, {r['params'] / 1e6:.1f}M | {preset} | {r['params_mb']:,.1f} | "
                    f"{r['optimizer_mb']:,.1f} | {r['temporaries_mb']:,.1f} |")
    return "\n".join(rows) + f"\n\nSource: `{path.as_posix()}`"


def _cell(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']} | | | | |"
    fits = "yes" if r["fits"] else f"no ({r['gib_per_device']:.0f} of {r['capacity_gib']:.2f})"
    if "step_ms" not in r:
        return f"{fits} | {r['gib_per_device']:.1f} | - | - | - |"
    return (f"{fits} | {r['gib_per_device']:.1f} | {r['step_ms']:,.1f} ({r['bound']}) | {100 * r['mfu_ceiling']:.0f}% | "
            f"{r['tokens_per_s_per_chip']:,.0f} |")


def tpu_plan_tables(path: Path) -> str:
    """The grid of `benchmarks/tpu_plan.py`, by slice, then MaxText's published runs planned with their shapes."""
    d = _load(path)
    order = {t: i for i, t in enumerate(("v5e-16", "v5p-8", "v5p-64", "v5p-128", "v6e-64"))}
    sizes = {s: i for i, s in enumerate(("125m", "350m", "1.3b", "7b", "13b", "70b"))}
    presets = {p: i for i, p in enumerate(("fsdp", "fsdp_tp", "dp"))}
    grid, maxtext = [], []
    for key, r in d["cells"].items():
        if key.startswith("maxtext:"):
            maxtext.append((key.removeprefix("maxtext: "), r))
        else:
            size, seq, target, preset = (p.strip() for p in key.split("|"))
            grid.append(((order.get(target, 9), int(seq.split()[1]), presets.get(preset, 9), sizes.get(size, 9)),
                         target, size, seq, preset, r))
    rows = ["| slice | model | seq | preset | fits | args + temps GiB | step ms (bound) | MFU ceiling | tokens/s/chip |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for _, target, size, seq, preset, r in sorted(grid, key=lambda g: g[0]):
        rows.append(f"| {target} | {size} | {seq.split()[1]} | {preset} | {_cell(r)}")
    out = "\n".join(rows)
    if maxtext:
        rows = ["| planned | fits | args + temps GiB | step ms (bound) | MFU ceiling | tokens/s/chip | published |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        rows += [f"| {key.replace(' | ', ', ')} | {_cell(r)} {r.get('reference', '')} |" for key, r in maxtext]
        out += "\n\nMaxText's published runs, planned with their shapes (fsdp over the slice, remat full):\n\n" + "\n".join(rows)
    return out + f"\n\nSource: `{path.as_posix()}` ({d.get('jax', '?')}, libtpu {d.get('libtpu', '?')})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--date", required=True, help="the date in the results file names, e.g. 2026-12-01")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--decode-date", help="the date of the decoding results (float32 and int8 rows), if not --date")
    ap.add_argument("--tpu-date", help="the date of the TPU plan results (benchmarks/tpu_plan.py), if not --date")
    args = ap.parse_args()
    results = Path(args.results)
    train = results / f"train_throughput_{args.date}_cpu2_repeats3.json"
    decode = results / f"decode_throughput_{args.decode_date or args.date}_cpu2.json"
    sections = [("Training throughput", train, lambda p: train_table(p)),
                ("What each CPU default buys", train, lambda p: ablation_table(p, results, args.date)),
                ("Decoding", decode, decode_tables),
                ("Int8 weight-only decoding", decode, int8_table),
                ("Sharding memory", results / f"sharding_memory_{args.date}_cpu8.json", memory_table),
                ("TPU plans from the TPU compiler", results / f"tpu_plan_{args.tpu_date or args.date}_cpu2.json",
                 tpu_plan_tables)]
    for title, path, render in sections:
        print(f"## {title}\n")
        print(render(path) if path.is_file() else f"(no {path.as_posix()})")
        print()


if __name__ == "__main__":
    main()
