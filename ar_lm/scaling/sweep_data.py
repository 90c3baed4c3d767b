"""A sweep's dataset: made once from its `DataSpec` (or given with --data), remembered in sweep.json, and the
same for every later run of the sweep (a re-run on other data, or without --data after a run on the user's
data, is refused rather than mixing points trained on different data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ar_lm.data.dataset import TokenDataset, identity_difference
from ar_lm.data.media import MediaOptions
from ar_lm.data.prepare import make_dataset
from ar_lm.data.synthetic import shape_images
from ar_lm.errors import require
from ar_lm.io import locked_json_update
from ar_lm.scaling.sweeps import DataSpec, Sweep


def recorded_data(sweep_dir: Path) -> Optional[dict]:
    """sweep.json's `data` ({"path", **`TokenDataset.identity()`}), or None before the sweep first ran."""
    try:
        return json.loads((Path(sweep_dir) / "sweep.json").read_text()).get("data")
    except (OSError, json.JSONDecodeError):
        return None


def ensure_data(sweep: Sweep, sweep_dir: Path, data_dir: Optional[str]) -> Path:
    """The sweep's dataset: --data if given, else the one sweep.json remembers, else SWEEP_DIR/data made once
    from the sweep's DataSpec; a dataset other than the remembered one is a UserError."""
    recorded = recorded_data(sweep_dir)
    if data_dir:
        path = Path(data_dir).absolute()
    elif recorded:
        path = Path(recorded["path"])
        if not (path / "metadata.json").is_file() and (sweep_dir / "data" / "metadata.json").is_file():
            path = sweep_dir / "data"  # the sweep directory was moved with the dataset it made
        require((path / "metadata.json").is_file(), f"sweep directory {sweep_dir} was run on {path} (data "
                f"{recorded['id']}), which is gone: pass --data with that data, or use a new sweep directory")
    else:
        path = _prepare(sweep.data or DataSpec(), sweep_dir)
    if recorded:
        diff = identity_difference(recorded, TokenDataset(path).identity())
        require(not diff, f"sweep directory {sweep_dir} was run on {recorded['path']} (data {recorded['id']}), and "
                f"{path} holds {diff}: pass --data {recorded['path']} (the same data) or use a new sweep directory")
    return path


def record_data(sweep_dir: Path, data: Path) -> None:
    """Remember the sweep's dataset in sweep.json (`ensure_data` holds later runs to it)."""
    identity = {"path": str(data), **TokenDataset(data).identity()}
    locked_json_update(Path(sweep_dir) / "sweep.json", lambda listing: listing.update(data=identity))


def _prepare(spec: DataSpec, sweep_dir: Path) -> Path:
    out = sweep_dir / "data"
    if (out / "metadata.json").is_file():
        return out
    require(spec.source in ("stdlib", "synthetic", "shapes"),
            f"DataSpec.source={spec.source!r} is unknown: use stdlib, synthetic or shapes (or pass --data)")
    print(f"[sweep] preparing the {spec.source} dataset in {out}", file=sys.stderr, flush=True)
    if spec.source == "shapes":  # the images as an array file kept in the sweep directory, prepared from it
        npz = sweep_dir / "shapes.npz"
        np.savez(npz, images=shape_images(spec.images, spec.image_size, spec.image_size, seed=0))
        make_dataset(out, "images", "byte", media=MediaOptions(npz=str(npz), bits=spec.bits))
        return out
    make_dataset(out, spec.source, spec.tokenizer, spec.vocab_size, max_mb=spec.max_mb,
                 synthetic_tokens=spec.synthetic_tokens)
    return out


def scoring(sweep_dir: Path) -> dict:
    """What a sweep's val losses were scored on: its tokenizer and val split (sweep.json's data) and the eval
    windows of its points (window length, token budget, seed: `ar_lm.data.pipeline.eval_window_indices`)."""
    listing = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    data = listing.get("data") or {}
    current = set(listing.get("current", [p["name"] for p in listing["points"]]))
    windows = set()
    for p in listing["points"]:
        if p["name"] in current and Path(p["config"]).is_file():
            d = json.loads(Path(p["config"]).read_text())
            windows.add((d["data"]["seq_len"], d["train"]["eval_tokens"], d["data"].get("eval_seed", 0)))
    return {"tokenizer": data.get("tokenizer"), "val": (data.get("splits") or {}).get("val"),
            "windows (seq_len, eval_tokens, eval_seed)": sorted(windows)}


def check_same_scoring(sweep_a: Path, sweep_b: Path) -> None:
    """Two sweeps compared (`ar-lm fit --compare`) were scored on the same val data and windows, or a
    UserError naming the difference."""
    a, b = scoring(sweep_a), scoring(sweep_b)
    for key in a:
        require(a[key] == b[key], f"{sweep_a} and {sweep_b} were scored on different {key.split(' ')[0]} "
                f"({a[key]} vs {b[key]}): compare sweeps evaluated on the same data and windows")
