"""Run directories: resolved config, tokenizer copy, lock, summary.

    RUN_DIR/config.json        the full resolved ExperimentConfig
    RUN_DIR/tokenizer/         copy of the dataset's tokenizer (+ its metadata) for eval/generate
    RUN_DIR/metrics.jsonl      one JSON record per logged step (train) and per evaluation (val)
    RUN_DIR/checkpoints/<step> orbax checkpoints (train state + data iterator state)
    RUN_DIR/summary.json       final metrics, written atomically when the run finishes
    RUN_DIR/wandb/             wandb files (offline runs can be synced with `wandb sync`)
    RUN_DIR/.lock              held while a trainer runs
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from ar_lm.config import ExperimentConfig, load_json, save_json, to_dict
from ar_lm.errors import UserError, require
from ar_lm.io import atomic_write_json

CONFIG = "config.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def load_run_config(run_dir: Path) -> ExperimentConfig:
    run_dir = Path(run_dir)
    require(run_dir.is_dir(), f"run directory {run_dir} does not exist")
    require(is_run_dir(run_dir), f"{run_dir} is not an ar_lm run directory (no {CONFIG})")
    return load_json(run_dir / CONFIG)


def check_resume_compatible(run_dir: Path, cfg: ExperimentConfig) -> None:
    """A run directory may only be resumed with the same architecture and data shape."""
    saved = load_run_config(run_dir)
    for section, fields in (("model", None), ("data", ("seq_len", "batch_size", "shuffle_seed"))):
        old, new = to_dict(getattr(saved, section)), to_dict(getattr(cfg, section))
        for key in fields or old:
            if old.get(key) != new.get(key):
                raise UserError(
                    f"run directory {run_dir} was trained with {section}.{key}={old.get(key)!r}, not "
                    f"{new.get(key)!r}: resume with the same setting or use a new --run-dir"
                )


def write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    save_json(cfg, Path(run_dir) / CONFIG)


def copy_tokenizer(run_dir: Path, data_dir: Path, meta: dict) -> None:
    dest = Path(run_dir) / TOKENIZER
    if (dest / "metadata.json").is_file():
        return
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(data_dir) / meta["tokenizer"]["file"], dest / meta["tokenizer"]["file"])
    atomic_write_json(dest / "metadata.json", {"tokenizer": meta["tokenizer"]})


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
