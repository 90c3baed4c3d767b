"""Runs the README's main-job command on a fresh clone of the committed code and copies its results
into docs/isoflop_cpu/ (the files the README's results section names), with run.json: the command,
date, machine, exit status, wall time (setup included), hypervisor steal and commit; then renders the
README's results section (between its main-job-results markers) from those files.

    python benchmarks/main_job.py            # from the repository root, on a clean commit
    python benchmarks/main_job.py --render   # only re-render the README section from docs/isoflop_cpu/
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import StealMeter

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "isoflop_cpu"
SWEEP = Path("sweeps") / "isoflop_cpu"
FILES = {SWEEP / "summary.csv": "summary.csv", SWEEP / "fit" / "fit.json": "fit.json",
         SWEEP / "fit" / "holdout.json": "holdout.json", SWEEP / "sweep.json": "sweep.json"}


def readme_command() -> str:
    """The one README line that runs the main job."""
    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if "ar-lm sweep experiments/isoflop_cpu.py" in l
             and l.startswith("python3 -m venv")]
    if len(lines) != 1:
        sys.exit(f"error: README.md has {len(lines)} main-job command lines, expected 1: fix the README")
    return lines[0]


def _ci(p: dict, key: str) -> str:
    lo, hi = p["ci"][key]
    return f"{p[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def results_markdown() -> str:
    """The README's results section, from docs/isoflop_cpu/{fit,holdout,run}.json and summary.csv."""
    fit = json.loads((DOCS / "fit.json").read_text())
    (hold,) = json.loads((DOCS / "holdout.json").read_text())
    run = json.loads((DOCS / "run.json").read_text())
    rows = [l for l in (DOCS / "summary.csv").read_text().splitlines()[1:] if l]
    trunks = sum(l.split(",")[0].endswith("_trunk") for l in rows)
    a1, a2, a3 = fit["approach1"], fit["approach2"], fit["approach3"]
    front = a2.get("frontier")
    n_budgets = len(a2["minima"]) + len(a2["excluded"])
    excluded = "; excluded: " + ", ".join(f"C={e['C']:.0e} ({e['reason']})" for e in a2["excluded"]) if a2["excluded"] else ""
    loc = a3.get("local") or {}
    lo, hi = hold["interval"]
    inside = "inside" if hold["inside_interval"] else "OUTSIDE"
    lines = [
        f"From `docs/isoflop_cpu/` (copied from `sweeps/isoflop_cpu/` by `benchmarks/main_job.py`, run of {run['date']} "
        f"at commit {run['commit']}, `run.json`: {run['wall_time_s'] / 60:.1f} minutes with setup): the {len(rows)} "
        f"runs in `summary.csv` ({trunks} WSD trunks and {len(rows) - trunks} points), the fit in `fit.json`, the "
        "held-out check in `holdout.json`. N is the "
        f"{fit['n_kind'].replace('_', '-')} count; compute is the {fit['compute']['kind']} C = fpt(N) · D.",
        "",
        "![IsoFLOP curves](docs/isoflop_cpu/isoflop.png)",
        "",
        "| approach | N_opt ∝ C^a (95% bootstrap CI) | D_opt ∝ C^b |",
        "| --- | --- | --- |",
        f"| 1: minimum-loss envelope of the {a1['source']} curves{' (indicative)' if a1['indicative'] else ''} "
        f"| {_ci(a1, 'a')} | {_ci(a1, 'b')} |",
        f"| 2: IsoFLOP minima ({len(a2['minima'])} of {n_budgets} budgets interior{excluded}) | {_ci(a2, 'a')} "
        f"| {_ci(a2, 'b')} |",
        f"| 3: L(N,D) = {a3['E']:.2f} + {a3['A']:.3g}/N^{a3['alpha']:.2f} + {a3['B']:.3g}/D^{a3['beta']:.2f} "
        f"({a3['converged_starts']}/{a3['n_starts']} starts converged) | {_ci(a3, 'a')} asymptotically, "
        f"{loc.get('a', float('nan')):.2f} locally | {_ci(a3, 'b')}, {loc.get('b', float('nan')):.2f} locally |",
        "",
    ]
    if front:
        flo, fhi = front["ci"]["alpha"]
        lines += [f"Loss frontier through the IsoFLOP minima: L*(C) = {front['E']:.2f} + {front['A']:.3g} · "
                  f"C^-{front['alpha']:.3f} [{flo:.3f}, {fhi:.3f}].", ""]
    else:
        lines += [f"No loss frontier: {len(a2['minima'])} IsoFLOP minima cannot fit its 3 parameters with a "
                  "degree of freedom left.", ""]
    if fit.get("repeated_excluded"):
        rep = fit["repeated_excluded"]
        lines += [f"Not fitted: {len(rep)} points past one epoch of their train split ("
                  + ", ".join(f"N = {r['N']:,.0f}, D = {r['D'] / 1e6:.1f}M, {r['epochs']:.2f} epochs" for r in rep)
                  + "; `ar-lm fit --include-repeated` fits them).", ""]
    if (DOCS / "sweep.json").is_file():  # a WSD ladder: what its points cost against independent runs
        points = json.loads((DOCS / "sweep.json").read_text())["points"]
        spent = sum(p["coords"].get("C_run", p["coords"]["C"]) for p in points if not p["name"].startswith("holdout"))
        alone = sum(p["coords"]["C"] for p in points if p["coords"].get("role") == "branch")
        if alone:
            lines += [f"The WSD ladder spent {spent:.3g} FLOPs on points that cost {alone:.3g} as independent runs "
                      f"({100 * (1 - spent / alone):.0f}% saved; `sweep.json`, coords `C` and `C_run`).", ""]
    if "skipped" in hold:
        return "\n".join(lines + [f"Held-out run at C = {hold['budget']:.1e}: skipped ({hold['skipped']})."]) + "\n"
    law = hold.get("law", "chinchilla")
    lines += [
        f"Held-out run at C = {hold['C']:.1e} ({hold['beyond_largest_budget']:.1f}x the largest sweep budget) at "
        f"approach 3's N_opt = {hold['N_opt_fitted']:,.0f} [{hold['N_opt_interval'][0]:,.0f}, "
        f"{hold['N_opt_interval'][1]:,.0f}] (the nearest ladder shape: N = {hold['N']:,}, D = {hold['D'] / 1e6:.1f}M "
        f"tokens): the selected law, {law}, predicted {hold['predicted_loss']:.3f} with 95% prediction interval "
        f"[{lo:.3f}, {hi:.3f}] (±{50 * (hi - lo) / hold['predicted_loss']:.1f}%); measured "
        f"{hold['measured_loss']:.3f} nats/token ({100 * hold['relative_error']:+.1f}%, {inside} the interval).",
    ]
    return "\n".join(lines + _forms_table(fit, hold)) + "\n"


def _forms_table(fit: dict, hold: dict) -> list[str]:
    """The law forms side by side: rollout errors per fold (fit budgets <= C_k, predict C_k+1's IsoFLOP minimum),
    and each form's prediction of the held-out run."""
    laws = fit.get("laws")
    if not laws or not laws.get("rollout"):
        return []
    folds = [f for f in laws["rollout"]["folds"] if "forms" in f]
    names = list(laws["rollout"]["scores"])
    cell = lambda v: f"{100 * math.expm1(v['error']):+.1f}%" if "error" in v else "-"  # noqa: E731
    head = "| form | " + " | ".join(f"C={f['C']:.2g}" for f in folds) + " | mean \\|error\\| | held-out |"
    rows = ["", f"Law forms by rollout cross-validation (`fit.json` `laws`; selected: {laws['selected']}):", "",
            head, "|" + " --- |" * (len(folds) + 3)]
    for n in names:
        s = laws["rollout"]["scores"][n]
        mean = f"{100 * s['mean_abs_error']:.2f}%" + ("" if s["compared"] else " (not compared)") \
            if s["mean_abs_error"] is not None else "-"
        h = (hold.get("forms") or {}).get(n)
        held = f"{h['predicted_loss']:.3f} ({100 * h['relative_error']:+.1f}%)" if h else "-"
        rows.append(f"| {n} | " + " | ".join(cell(f["forms"].get(n, {})) for f in folds) + f" | {mean} | {held} |")
    return rows


def _render(path: Path, marker: str, body: str) -> None:
    text = path.read_text()
    start, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
    if start not in text or end not in text:
        sys.exit(f"error: {path} has no {marker} markers: add them around the generated section")
    head, rest = text.split(start, 1)
    path.write_text(head + start + body + end + rest.split(end, 1)[1])
    print(f"[main_job] rendered the {marker} section of {path}")


def render_readme() -> None:
    """The README's results section and the rollout table of docs/explanation/fitting.md."""
    _render(ROOT / "README.md", "main-job-results", results_markdown())
    fit = json.loads((DOCS / "fit.json").read_text())
    (hold,) = json.loads((DOCS / "holdout.json").read_text())
    _render(ROOT / "docs" / "explanation" / "fitting.md", "rollout-table", "\n".join(_forms_table(fit, hold)[1:]) + "\n")


def main() -> int:
    if sys.argv[1:] == ["--render"]:
        render_readme()
        return 0
    command = readme_command()
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip():
        sys.exit("error: the working tree has uncommitted changes: commit them so run.json names the code that ran")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ar_lm_main_job_") as tmp:
        clone = Path(tmp) / "ar_lm"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        steal, t0 = StealMeter(), time.time()
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
        rc = subprocess.run(["bash", "-c", command], cwd=clone, env=env).returncode
        wall = time.time() - t0
        if rc != 0:
            sys.exit(f"error: the main job exited {rc}: see its output above; docs/isoflop_cpu/ left as it was")
        DOCS.mkdir(parents=True, exist_ok=True)
        for src, dst in FILES.items():
            shutil.copy2(clone / src, DOCS / dst)
        for png in sorted((clone / SWEEP / "fit").glob("*.png")):
            shutil.copy2(png, DOCS / png.name)
    run = {"command": command, "date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "exit_status": rc,
           "wall_time_s": round(wall, 1), "cpu_steal_frac": round(steal.frac() or 0.0, 3), "commit": commit}
    (DOCS / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(f"[main_job] {wall:.0f} s; results in {DOCS}")
    render_readme()
    return 0


if __name__ == "__main__":
    sys.exit(main())
