"""Host helpers: atomic writes (write to a temp file, fsync, rename), checksums, the cores we may use."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def user_cache_dir(name: str) -> Path:
    """~/.cache/ar_lm/<name> (under $XDG_CACHE_HOME if set): what ar_lm keeps between runs on this machine."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ar_lm" / name


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def locked_json_update(path: Path, update) -> dict:
    """Read-modify-write of a JSON object shared by several processes: under an exclusive flock on
    PATH.lock, `update(obj)` changes the object read from PATH (an empty dict if missing), which then
    replaces PATH atomically; readers never need the lock and never see a torn file. Returns the object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            obj = {}
        update(obj)
        atomic_write_json(path, obj)
        return obj
    finally:
        os.close(fd)  # closing the descriptor releases the lock
