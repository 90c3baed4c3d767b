"""Metrics: run logging (metrics.jsonl, terminal progress, wandb) and model FLOPs utilisation.

MFU = flops_per_token * tokens_per_second / (peak FLOP/s per device * devices), with
`ar_lm.model.counts.flops_per_token` (6N plus the causal attention term, counted once).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from ar_lm.data.media import METRIC_LABELS
from ar_lm.io import atomic_write_text

# Dense bf16 peak FLOP/s per chip (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}

_measured_cpu_peak: Optional[float] = None


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s on the default device (best of `repeats`)."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops_per_device(configured: float = 0.0) -> float:
    """The configured peak, else the known accelerator figure, else a CPU measurement (cached)."""
    global _measured_cpu_peak
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    if _measured_cpu_peak is None:
        # all host-platform devices share the CPU: the measured peak is the whole machine's
        _measured_cpu_peak = measure_matmul_peak() / max(1, jax.local_device_count())
    return _measured_cpu_peak


def wandb_mode() -> str:
    """`WANDB_MODE` if set; otherwise online only when an API key is configured."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def eval_set_records(step: int, results: dict[str, dict]) -> list[dict]:
    """metrics.jsonl records of the `data.eval_sets` scores (name -> `evaluate` result): split "val/<name>"
    with loss and bpb (wandb: val/<name>/loss, val/<name>/bpb), then "val/macro", their unweighted mean."""
    if not results:
        return []
    records = [{"step": step, "split": f"val/{name}", "loss": r["loss"], "bpb": r["bits_per_byte"],
                "loss_se": r["loss_se"], "eval_tokens": r["eval_tokens"]} for name, r in results.items()]
    macro = {k: float(np.mean([r[k] for r in records])) for k in ("loss", "bpb")}
    return records + [{"step": step, "split": "val/macro", **macro}]


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a crash
    return records


class RunLogger:
    """Writes metrics.jsonl (process 0 only), prints progress, and mirrors to wandb."""

    def __init__(self, run_dir: Path, config: dict, logging_cfg, total_steps: int, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total_steps = total_steps
        self.progress = logging_cfg.progress
        self.tty = sys.stderr.isatty()
        self.wandb = None
        if not self.enabled:
            return
        # drop records past the checkpoint we resume from: they will be produced again
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        if logging_cfg.wandb:
            self.wandb = _start_wandb(Path(run_dir), config, logging_cfg)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            prefix = record.get("split", "train")
            self.wandb.log({f"{prefix}/{k}": v for k, v in record.items() if k not in ("step", "split")},
                           step=record["step"])
        if self.progress:
            self._print(record)

    def _print(self, r: dict) -> None:
        step = r["step"]
        if r.get("split") == "val":
            msg = f"step {step}/{self.total_steps} val loss {r['loss']:.4f} ppl {r['perplexity']:.2f} bpb {r['bits_per_byte']:.4f}"
            msg += "".join(f" {label} {r[name]:.4f}" for name, label in METRIC_LABELS.items() if name in r)
            end = "\n"
        elif r.get("split", "").startswith("val/"):
            msg, end = f"step {step}/{self.total_steps} {r['split']} loss {r['loss']:.4f} bpb {r['bpb']:.4f}", "\n"
        else:
            frac = step / self.total_steps
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            msg = (
                f"[{bar}] step {step}/{self.total_steps} loss {r['loss']:.4f} lr {r['lr']:.2e} "
                f"gnorm {r['grad_norm']:.3f}"
                + (f" {r['tokens_per_s']:,.0f} tok/s mfu {100 * r['mfu']:.1f}%" if "tokens_per_s" in r else "")
            )
            end = "\r" if self.tty and step < self.total_steps else "\n"
        print(("\r" if self.tty else "") + msg, end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _start_wandb(run_dir: Path, config: dict, logging_cfg):
    mode = wandb_mode()
    if mode == "disabled":
        return None
    import wandb

    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    config = dict(config, coords={k: _number(v) for k, _, v in (c.partition("=") for c in logging_cfg.coords)})
    return wandb.init(
        project=logging_cfg.project,
        group=logging_cfg.group or None,
        tags=list(logging_cfg.tags) or None,
        name=run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config,
        mode=mode,
        settings=wandb.Settings(silent=True, console="off"),
    )
