"""`ar-lm lm-eval RUN --tasks T[,T2] [--include-path DIR] [--limit N] [--batch-size B] [--num-fewshot K]`:
lm-evaluation-harness tasks on a run's latest checkpoint (`harness.RunLM`), written to
RUN/lm_eval/results.json.

results.json: the request (tasks, few-shot, limit, include path), the checkpoint step, lm-eval's own
`results` / `groups` / `n-shot` / `n-samples` / `versions`, and `metrics`, a flat map
"<task>/<metric>" (and "/<filter>" for filters other than lm-eval's "none") -> number, which is
what a sweep's summary table reads (`scaling/downstream.py`). Each call replaces the file.

Tasks are looked up in --include-path first (the built-in index, which takes seconds to build, only
when a task is not found there); when every task is defined under --include-path the data are taken
to be local and the Hugging Face hub is not contacted (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE = 1 unless
set). lm-eval is the optional extra `ar_lm[eval]`.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional

from ar_lm.errors import UserError, require
from ar_lm.io import atomic_write_json
from ar_lm.training import rundir

_TASK_LINE = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in (text or "").split(",") if t.strip()]
    require(tasks, f"--tasks takes task names separated by commas, got {text!r}")
    return tasks


def local_task_names(include_path: Optional[str]) -> set[str]:
    """The `task:` names of the YAML files under include_path (read as text; lm-eval parses them later)."""
    if not include_path:
        return set()
    names = set()
    for path in sorted(Path(include_path).rglob("*.y*ml")):
        names |= set(_TASK_LINE.findall(path.read_text(errors="replace")))
    return names


def check_request(args) -> dict:
    """The request as results.json records it, every flag checked (before anything is loaded)."""
    tasks = parse_tasks(args.tasks)
    require(args.limit is None or args.limit > 0, f"--limit must be > 0 examples per task, got {args.limit}")
    require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    require(args.num_fewshot is None or args.num_fewshot >= 0, f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    include = None
    if args.include_path:
        include = str(Path(args.include_path).absolute())
        require(Path(include).is_dir(), f"--include-path {args.include_path} is not a directory: give the folder "
                                        "holding the task YAML files")
    rundir.load_run_config(Path(args.run_dir))
    require(importlib.util.find_spec("lm_eval") is not None,
            "`ar-lm lm-eval` needs lm-eval: pip install 'ar_lm[eval]'")
    return {"tasks": tasks, "num_fewshot": args.num_fewshot, "limit": args.limit, "include_path": include}


def task_manager(tasks: list[str], include_path: Optional[str]):
    """lm-eval's TaskManager over include_path, with the built-in tasks only when some task is not there;
    an unknown task is a UserError naming the closest known ones."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(not _known(t, manager.all_tasks) for t in tasks):
        manager = TaskManager(include_path=include_path)
    for t in tasks:
        if not _known(t, manager.all_tasks):
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            where = f" or in {include_path}" if include_path else " (give --include-path DIR for local task YAMLs)"
            raise UserError(f"unknown lm-eval task {t!r}: not among lm-eval's tasks{where}"
                            + (f"; closest: {', '.join(close)}" if close else ""))
    return manager


def _known(task: str, names: list[str]) -> bool:
    return task in names or Path(task).is_file() or any(fnmatch.fnmatchcase(n, task) for n in names)


def flat_metrics(results: dict) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": 0.5, "alias": ...}} -> {"task/acc": 0.5}; numbers only."""
    out = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, sep, filt = key.partition(",")
            if sep and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return out


def run_tasks(run_dir: str | Path, request: dict, batch_size: int = 16) -> dict:
    """Evaluate the request's tasks on the run's latest checkpoint; write and return results.json's content."""
    if request["include_path"] and set(request["tasks"]) <= local_task_names(request["include_path"]):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import evaluator
    from lm_eval.utils import handle_non_serializable

    from ar_lm.decoding.harness import RunLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = task_manager(request["tasks"], request["include_path"])
    lm = RunLM(run_dir, batch_size)
    res = evaluator.simple_evaluate(model=lm, tasks=request["tasks"], num_fewshot=request["num_fewshot"],
                                    limit=request["limit"], task_manager=manager, log_samples=False,
                                    batch_size=batch_size)
    keep = ("results", "groups", "n-shot", "n-samples", "versions", "higher_is_better", "lm_eval_version")
    raw = json.loads(json.dumps({k: res[k] for k in keep if k in res}, default=handle_non_serializable))
    out = {"run_dir": str(lm.run_dir), "step": lm.step, "request": request, "metrics": flat_metrics(res["results"]),
           **raw}
    atomic_write_json(lm.run_dir / rundir.LM_EVAL_RESULTS, out)
    return out


def lm_eval_command(args) -> int:
    """`ar-lm lm-eval RUN --tasks T ...` (see `ar_lm.cli`): one line per metric, or JSON with --json."""
    out = run_tasks(args.run_dir, check_request(args), args.batch_size)
    if args.json:
        print(json.dumps({"step": out["step"], "metrics": out["metrics"]}))
        return 0
    for name, value in out["metrics"].items():
        task, metric, *filt = name.split("/")
        if not metric.endswith("_stderr"):
            se = out["metrics"].get("/".join([task, metric + "_stderr", *filt]))
            print(f"{name} {value:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
    print(f"[lm-eval] step {out['step']}: {Path(out['run_dir']) / rundir.LM_EVAL_RESULTS}", file=sys.stderr)
    return 0
