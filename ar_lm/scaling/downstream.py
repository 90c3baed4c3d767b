"""Downstream tasks in a sweep: once its points have finished, `ar-lm lm-eval` on each of them, and the
task metrics as summary columns `lm_eval/<task>/<metric>`, so downstream scaling can be plotted and fitted.

Each point's evaluation is its own process (`python -m ar_lm lm-eval RUN --tasks ...`, output appended
to the point's log, the sweep's compilation cache), run on this machine one point at a time. It runs
once: RUN/lm_eval/results.json that holds the same request for the run's final step is kept, so a
re-run of the sweep skips it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ar_lm.errors import require
from ar_lm.training import rundir

PREFIX = "lm_eval/"


@dataclasses.dataclass(frozen=True)
class LmEvalSpec:
    """The lm-eval tasks a sweep runs on each finished point (`ar-lm sweep --lm-eval-tasks ...`)."""

    tasks: tuple[str, ...]
    include_path: str = ""
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 16

    @classmethod
    def create(cls, tasks: str, include_path: Optional[str] = None, limit: Optional[int] = None,
               num_fewshot: Optional[int] = None, batch_size: int = 16) -> "LmEvalSpec":
        names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        require(names, f"--lm-eval-tasks takes task names separated by commas, got {tasks!r}")
        require(limit is None or limit > 0, f"--lm-eval-limit must be > 0 examples per task, got {limit}")
        include = str(Path(include_path).absolute()) if include_path else ""
        require(not include or Path(include).is_dir(),
                f"--lm-eval-include-path {include_path} is not a directory: give the folder of task YAML files")
        require(importlib.util.find_spec("lm_eval") is not None,
                "--lm-eval-tasks needs lm-eval: pip install 'ar_lm[eval]'")
        return cls(names, include, limit, num_fewshot, batch_size)

    def request(self) -> dict:
        """What `ar-lm lm-eval` records as its request in results.json."""
        return {"tasks": list(self.tasks), "num_fewshot": self.num_fewshot, "limit": self.limit,
                "include_path": self.include_path or None}

    def argv(self, run_dir: Path) -> list[str]:
        out = [sys.executable, "-m", "ar_lm", "lm-eval", str(run_dir), "--tasks", ",".join(self.tasks),
               "--batch-size", str(self.batch_size)]
        out += ["--include-path", self.include_path] if self.include_path else []
        out += ["--limit", str(self.limit)] if self.limit is not None else []
        return out + (["--num-fewshot", str(self.num_fewshot)] if self.num_fewshot is not None else [])


def read_results(run_dir: Path) -> Optional[dict]:
    """RUN/lm_eval/results.json when it belongs to the run's final step (None when missing or stale)."""
    path, summary = Path(run_dir) / rundir.LM_EVAL_RESULTS, rundir.read_summary(run_dir) or {}
    try:
        results = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None
    return results if results and results.get("step") == summary.get("step") else None


def columns(run_dir: Path) -> dict[str, float]:
    """The summary columns of a run: {"lm_eval/<task>/<metric>": value} from its current results."""
    results = read_results(run_dir) or {}
    return {PREFIX + k: v for k, v in results.get("metrics", {}).items()}


def run_points(spec: LmEvalSpec, run_dirs: dict[str, Path], logs: Path, env: dict) -> dict[str, str]:
    """Evaluate each finished run whose results are not those of `spec`; {name: "done" | "cached" | error}."""
    out = {}
    for name, run in run_dirs.items():
        current = read_results(run)
        if current is not None and current.get("request") == spec.request():
            out[name] = "cached"
            continue
        log = logs / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[sweep] {name}: lm-eval {','.join(spec.tasks)}", file=sys.stderr, flush=True)
        with open(log, "a") as f:
            code = subprocess.run(spec.argv(run), stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, **env}).returncode
        if code == 0:
            out[name] = "done"
            continue
        errors = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error:")]
        out[name] = errors[-1] if errors else f"lm-eval exited with status {code} (see {log})"
        print(f"[sweep] {name}: lm-eval failed: {out[name]}", file=sys.stderr, flush=True)
    return out
