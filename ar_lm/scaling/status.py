"""SWEEP_DIR/status.json: each point's state, written by whichever process runs it (the coordinator, a
Ray worker, a Slurm job) and read by `ar-lm sweep --status`.

    {"<point>": {"state": pending|submitted|running|done|failed, "attempts": k, "devices": "...",
                 "pid": ..., "host": ..., "started": t, "finished": t, "error": "...", "config_sha": "..."}}

Every update is a read-modify-write under an flock (`ar_lm.io.locked_json_update`), so concurrent
writers never lose each other's fields; readers see whole files only (atomic replace).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ar_lm.io import locked_json_update

TERMINAL = ("done", "failed")


class SweepStatus:
    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def get(self, name: str) -> dict:
        return self.read().get(name, {})

    def update(self, name: str, **fields) -> dict:
        """Merge `fields` into the point's entry; a field given as None is removed."""
        def merge(status: dict) -> None:
            entry = {**status.get(name, {}), **fields}
            status[name] = {k: v for k, v in entry.items() if v is not None}

        return locked_json_update(self.path, merge)[name]

    def start_attempt(self, name: str, **fields) -> dict:
        """The point is running (again): its attempt count goes up by one."""
        def merge(status: dict) -> None:
            entry = status.get(name, {})
            status[name] = {**entry, **fields, "state": "running", "attempts": entry.get("attempts", 0) + 1}

        return locked_json_update(self.path, merge)[name]


def config_sha(config_path: Path) -> str:
    """The hash of a point's resolved config file (what `is_done` compares)."""
    return hashlib.sha256(Path(config_path).read_bytes()).hexdigest()
