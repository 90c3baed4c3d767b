"""Run directories: resolved config, tokenizer copy, lock, summary.

    RUN_DIR/config.json        the full resolved ExperimentConfig
    RUN_DIR/tokenizer/         copy of the dataset's tokenizer (+ its metadata) for eval/generate
    RUN_DIR/data.json          the dataset it trained on: path and identity (`TokenDataset.identity`)
    RUN_DIR/metrics.jsonl      one JSON record per logged step (train) and per evaluation (val)
    RUN_DIR/checkpoints/<step> orbax checkpoints (train state + data iterator state)
    RUN_DIR/summary.json       final metrics, written atomically when the run finishes
    RUN_DIR/wall_time.json     seconds of each training segment (summed into wall_time_s, `lifecycle.py`)
    RUN_DIR/init_from.json     lineage of a run started with train.init_from (`lifecycle.py`)
    RUN_DIR/wandb/             wandb files (offline runs can be synced with `wandb sync`)
    RUN_DIR/lm_eval/results.json  downstream task metrics of the latest checkpoint (`ar-lm lm-eval`)
    RUN_DIR/.lock              held while a trainer runs
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from ar_lm.config import ExperimentConfig, load_json, save_json, to_dict
from ar_lm.data.dataset import identity_difference
from ar_lm.errors import UserError, require
from ar_lm.io import atomic_write_json

CONFIG = "config.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
DATA = "data.json"
LM_EVAL_RESULTS = "lm_eval/results.json"  # `ar-lm lm-eval` (decoding/harness_command.py)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def load_run_config(run_dir: Path) -> ExperimentConfig:
    run_dir = Path(run_dir)
    require(run_dir.is_dir(), f"run directory {run_dir} does not exist")
    require(is_run_dir(run_dir), f"{run_dir} is not an ar_lm run directory (no {CONFIG})")
    return load_json(run_dir / CONFIG)


# how fast a run computes, not what: they may change on resume
SPEED_FIELDS = ("model.remat", "model.attention", "model.logits_chunk", "model.scan_layers", "model.compute_dtype")
DATA_ORDER_FIELDS = ("data.seq_len", "data.batch_size", "data.shuffle_seed")
DATA_FUNCTION_FIELDS = ("data.document_mask",)  # what the model computes on the same windows
MEASUREMENT_FIELDS = ("train.eval_tokens", "data.eval_seed", "data.eval_sets")  # which val windows score it
TRAINING_FIELDS = ("train.steps", "train.tokens", "train.seed",  # with all of optim: the updates so far
                   "train.ss_schedule", "train.ss_start", "train.ss_end", "train.ss_k", "train.ss_token")


def _flat(cfg: ExperimentConfig) -> dict:
    return {f"{section}.{k}": v for section, fields in to_dict(cfg).items() if isinstance(fields, dict)
            for k, v in fields.items()}


def function_differences(saved: ExperimentConfig, cfg: ExperimentConfig, trained: bool,
                         measured: bool = False) -> list[tuple]:
    """(field, saved, new) for the fields that change the function a run computes or the order of its data:
    the architecture (with document masking) and the data order; once it has trained, also the optimizer and
    the schedule's length; `measured` (a sweep reusing a finished run as its point): also what its val loss
    was scored on (`MEASUREMENT_FIELDS`)."""
    keys = list(DATA_FUNCTION_FIELDS) + list(DATA_ORDER_FIELDS) + list(MEASUREMENT_FIELDS if measured else ())
    if trained:
        keys += [k for k in _flat(saved) if k.startswith("optim.")] + list(TRAINING_FIELDS)
    return architecture_differences(saved, cfg) + _changed(saved, cfg, keys)


def architecture_differences(saved: ExperimentConfig, cfg: ExperimentConfig) -> list[tuple]:
    """(field, saved, new) for the model fields that differ, but for the speed settings: another architecture."""
    keys = [k for k in _flat(saved) if k.startswith("model.") and k not in SPEED_FIELDS]
    return [(k, was, now) for k, was, now in _changed(saved, cfg, keys)
            if not (k == "model.vocab_size" and now == 0)]  # 0: the dataset's


def _changed(saved: ExperimentConfig, cfg: ExperimentConfig, keys) -> list[tuple]:
    old, new = _flat(saved), _flat(cfg)
    return [(k, old[k], new[k]) for k in keys if old[k] != new[k]]


def check_resume_compatible(run_dir: Path, cfg: ExperimentConfig, trained: bool = True) -> list[tuple]:
    """Refuse to resume `run_dir` with a config that computes another function (see `function_differences`);
    returns the speed settings that differ, (field, saved, new)."""
    saved = load_run_config(run_dir)
    differ = function_differences(saved, cfg, trained)
    if differ:
        (key, was, now), more = differ[0], [k for k, _, _ in differ[1:]]
        raise UserError(
            f"run directory {run_dir} was trained with {key}={was!r}, not {now!r}"
            + (f" (and {', '.join(more)} differ)" if more else "")
            + ": resume with the same settings or use a new --run-dir"
            + (f" (with --set train.init_from={run_dir} to start from its parameters)"
               if {"train.steps", "train.tokens"} & {k for k, _, _ in differ} else "")
        )
    return _changed(saved, cfg, SPEED_FIELDS)


def write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    save_json(cfg, Path(run_dir) / CONFIG)


def copy_tokenizer(run_dir: Path, data_dir: Path, meta: dict) -> None:
    dest = Path(run_dir) / TOKENIZER
    if (dest / "metadata.json").is_file():
        return
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(data_dir) / meta["tokenizer"]["file"], dest / meta["tokenizer"]["file"])
    media = {k: meta[k] for k in ("modality", "image", "audio") if k in meta}  # what generation writes back
    chat = {k: v for k, v in meta.get("source", {}).items() if k == "chat_template"}  # `generate --chat`
    atomic_write_json(dest / "metadata.json", {"tokenizer": meta["tokenizer"], **media, **chat})


def write_data(run_dir: Path, data_path: Path, identity: dict) -> None:
    """Record the dataset a run trains on (once: a resumed run checks it instead, `check_same_data`)."""
    if not (Path(run_dir) / DATA).is_file():
        atomic_write_json(Path(run_dir) / DATA, {"path": str(data_path), **identity})


def recorded_data(run_dir: Path) -> dict | None:
    """RUN_DIR/data.json; for a run from before it was written, its tokenizer copy's checksum only."""
    for path, read in ((Path(run_dir) / DATA, lambda d: d),
                       (Path(run_dir) / TOKENIZER / "metadata.json", lambda d: {"tokenizer": d["tokenizer"]["sha256"]})):
        try:
            return read(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    return None


def check_same_data(run_dir: Path, data_path: Path, identity: dict, role: str = "run directory",
                    tokenizer_only: bool = False) -> None:
    """`data_path` (with `identity`) is the data `run_dir` trained on (only its tokenizer: `tokenizer_only`),
    or a UserError naming both. A run without a record passes."""
    rec = recorded_data(run_dir)
    if rec is None:
        return
    if tokenizer_only or "splits" not in rec:
        rec, identity = {"tokenizer": rec["tokenizer"]}, {"tokenizer": identity["tokenizer"]}
    diff = identity_difference(rec, identity)
    where = f"{rec['path']} (data {rec['id']})" if "path" in rec else "another dataset"
    require(not diff, f"{role} {run_dir} was trained on {where}, and {data_path} holds {diff}: "
            + ("use data made with the run's tokenizer" if tokenizer_only else
               f"resume with --data {rec.get('path', 'DATA_DIR')} (the same data) or use a new --run-dir"))


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_json(Path(run_dir) / SUMMARY, summary)


def read_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


class RunLock:
    """An exclusive advisory lock (flock) on RUN_DIR/.lock; released when the process dies."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="ignore").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise UserError(
                f"run directory {self.path.parent} is in use by another trainer (pid {holder}): wait for it or use another --run-dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
