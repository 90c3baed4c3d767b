"""A language model as a compressor (Deletang et al. 2024): experiments/tiny.py trained on the standard library
(byte tokenizer, --max-mb 4), then `ar-lm compress` / `ar-lm decompress` (separate processes) of a held-out
standard-library file of 20-50 KB whose text is not in the train split; its size against gzip -9, bz2 -9 and
xz -9e. Writes benchmarks/results/compression_<date>_cpu<cores>.json.

    python benchmarks/compression.py [--max-mb 4] [--steps 300]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import StealMeter, ar_lm_cli, write_result

ROOT = Path(__file__).resolve().parent.parent


def _train_bytes(data: Path) -> bytes:
    """The train split's text as bytes (byte tokenizer: ids < 256 are bytes, documents joined by NUL)."""
    meta = json.loads((data / "metadata.json").read_text())
    dtype = np.uint16 if meta["tokenizer"]["vocab_size"] <= 65536 else np.uint32
    tokens = np.concatenate([np.fromfile(data / s["file"], dtype) for s in meta["splits"]["train"]["shards"]])
    return np.where(tokens < 256, tokens, 0).astype(np.uint8).tobytes()


def _held_out(train: bytes) -> Path:
    """The last standard-library file (sorted) of 20-50 KB none of whose 256-byte pieces is in `train`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py"), reverse=True):
        data = path.read_bytes()
        if 20_000 <= len(data) <= 50_000 and not any(data[i:i + 256] in train for i in range(0, len(data), 4096)):
            return path
    sys.exit("error: no held-out standard-library file of 20-50 KB found")


def _timed(*args: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    out = ar_lm_cli(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    steal, load_before = StealMeter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        ar_lm_cli("prepare", "--source", "stdlib", "--tokenizer", "byte", "--max-mb", str(args.max_mb), "--out", str(data))
        ar_lm_cli("train", str(ROOT / "experiments" / "tiny.py"), "--data", str(data), "--run-dir", str(run),
                  "--set", f"train.steps={args.steps}", "--set", "logging.wandb=false")
        held_out = _held_out(_train_bytes(data))
        packed, back = Path(tmp) / "file.arlz", Path(tmp) / "file.out"
        out, compress_s = _timed("compress", str(run), str(held_out), str(packed))
        _, decompress_s = _timed("decompress", str(run), str(packed), str(back))
        report = json.loads(out)
        exact = back.read_bytes() == held_out.read_bytes()
        val_bpb = json.loads((run / "summary.json").read_text()).get("val_bits_per_byte")
    result = {
        "date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "steal_frac": steal.frac(),
        "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},  # other work on the shared cores
        "command": f"python benchmarks/compression.py --max-mb {args.max_mb:g} --steps {args.steps}",
        "run": f"experiments/tiny.py, {args.steps} steps on stdlib (byte tokenizer, --max-mb {args.max_mb:g})",
        "file": held_out.name, "round_trip_exact": exact, "val_bits_per_byte": val_bpb,
        "compress": report, "compress_s": round(compress_s, 2), "decompress_s": round(decompress_s, 2),
        "note": "compress_s / decompress_s: whole commands (process start, restore, compilation, coding); "
                "compress.tokens_per_s: the coding loop (with its step's compilation)",
    }
    write_result("compression", result)


if __name__ == "__main__":
    main()
