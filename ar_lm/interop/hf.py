"""Hugging Face interop commands: GPT-2 / Llama checkpoints in as ar_lm runs, ar_lm runs out as checkpoints.

`import_hf(HF_DIR, RUN_DIR)` reads ``config.json`` + ``*.safetensors`` of a ``GPT2LMHeadModel`` or
``LlamaForCausalLM`` and writes a run directory: the resolved config, a step-0 checkpoint (imported
parameters, fresh optimizer state) and the tokenizer when ar_lm can read it. `export_hf(RUN_DIR,
OUT_DIR)` writes ``config.json`` + ``model.safetensors`` that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. Neither direction imports torch or
transformers (only the `hf` extra's safetensors).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax

from ar_lm.config import DataConfig, ExperimentConfig, MeshConfig, validate
from ar_lm.data.pipeline import TrainIterator
from ar_lm.data.tokenizers import load_tokenizer
from ar_lm.errors import UserError, require
from ar_lm.interop.hf_config import ARCH_OF_FAMILY, check_exportable, hf_config_dict, model_config_from_hf
from ar_lm.interop.hf_weights import ensure_safetensors, params_from_hf, params_to_hf, read_safetensors
from ar_lm.io import atomic_write_json, sha256_file
from ar_lm.parallel.mesh import logical_rules, make_mesh, mesh_context
from ar_lm.training import rundir
from ar_lm.training.checkpoint import Checkpointer, restore_latest_params
from ar_lm.training.optimizer import run_optimizer
from ar_lm.training.state import state_from_params, state_shardings

TOKENIZER_DIR = "ar_lm_tokenizer"  # an exported run's ar_lm tokenizer (byte, char or sentencepiece)


def _require_fresh(path: Path, what: str) -> None:
    require(not path.exists() or (path.is_dir() and not any(path.iterdir())),
            f"{what} {path} already exists and is not empty: choose a new directory (nothing was changed)")


def _publish(tmp: Path, dest: Path) -> None:
    """Move a fully written temporary directory to `dest` (missing or empty)."""
    if dest.is_dir():
        dest.rmdir()
    os.replace(tmp, dest)


def _staging_dir(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp"))


def find_tokenizer(hf_dir: Path, vocab_size: int, bos_id: int | None = None) -> tuple[dict | None, Path | None, str]:
    """(metadata, file, note) of a tokenizer ar_lm reads in HF_DIR: an ar_lm export's
    ar_lm_tokenizer/ (byte, char or sentencepiece), else a sentencepiece tokenizer.model with the
    model's vocabulary; (None, None, why) when there is none. `bos_id` (config.json's bos_token_id) is
    recorded as the id that starts a document, which generation puts before a prompt."""
    candidates = []  # (kind, directory, file)
    if (hf_dir / TOKENIZER_DIR / "metadata.json").is_file():
        meta = json.loads((hf_dir / TOKENIZER_DIR / "metadata.json").read_text())["tokenizer"]
        candidates.append((meta["kind"], hf_dir / TOKENIZER_DIR, hf_dir / TOKENIZER_DIR / meta["file"]))
        bos_id = meta.get("bos_id", bos_id)
    if (hf_dir / "tokenizer.model").is_file():
        candidates.append(("sentencepiece", hf_dir, hf_dir / "tokenizer.model"))
    for kind, directory, file in candidates:
        try:
            tok = load_tokenizer(directory, kind)
        except Exception:  # noqa: BLE001 - e.g. a tokenizer.model that sentencepiece cannot read
            continue
        if tok.vocab_size != vocab_size:
            return None, None, (f"the {kind} tokenizer in {directory} has {tok.vocab_size} tokens but the model has "
                                f"{vocab_size}: the run has no text tokenizer; give token ids")
        meta = {"kind": kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "file": file.name,
                "sha256": sha256_file(file)}
        if isinstance(bos_id, int) and 0 <= bos_id < vocab_size:
            meta["bos_id"] = bos_id
        return meta, file, f"{kind} tokenizer carried over"
    return None, None, (f"{hf_dir} holds no tokenizer ar_lm reads (an ar_lm export's {TOKENIZER_DIR}/ or a "
                        "sentencepiece tokenizer.model): the run has no text tokenizer; give token ids")


def _copy_tokenizer(meta: dict, file: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(file, dest / meta["file"])
    atomic_write_json(dest / "metadata.json", {"tokenizer": meta})


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> dict:
    """Write RUN_DIR (config.json, checkpoints/0 with the imported parameters and a fresh optimizer
    state, tokenizer/ when ar_lm reads HF_DIR's tokenizer). Checks everything before writing."""
    hf_dir, run_dir = Path(hf_dir).absolute(), Path(run_dir).absolute()
    require(hf_dir.is_dir(), f"Hugging Face directory {hf_dir} does not exist")
    config_path = hf_dir / "config.json"
    require(config_path.is_file(), f"{hf_dir} has no config.json: pass a directory written by save_pretrained")
    _require_fresh(run_dir, "run directory")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    model = model_config_from_hf(hf)
    params = params_from_hf(model, read_safetensors(hf_dir))
    cfg = validate(ExperimentConfig(name=run_dir.name, model=model, mesh=MeshConfig(devices=1),
                                    data=DataConfig(seq_len=min(model.max_seq_len, 1024), batch_size=8)))
    tok_meta, tok_file, tok_note = find_tokenizer(hf_dir, model.vocab_size, hf.get("bos_token_id"))

    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    tx, _ = run_optimizer(cfg)
    shardings = state_shardings(cfg, tx, mesh, rules)

    with mesh_context(mesh, rules):
        state = state_from_params(tx, shardings, params)
    tmp = _staging_dir(run_dir)
    try:
        ckpt = Checkpointer(tmp / rundir.CHECKPOINTS, keep=1, async_save=False)
        ckpt.save(0, state, TrainIterator.initial_state())
        ckpt.close()
        rundir.write_config(tmp, cfg)
        if tok_meta:
            _copy_tokenizer(tok_meta, tok_file, tmp / rundir.TOKENIZER)
        _publish(tmp, run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    return {"run_dir": str(run_dir), "architecture": ARCH_OF_FAMILY[model.family], "params": n_params,
            "tokenizer": tok_meta["kind"] if tok_meta else None, "note": tok_note}


def load_run_params(run_dir: str | Path) -> tuple[ExperimentConfig, int, dict]:
    """(config, step, params as numpy) of a run's latest checkpoint, restored on one device."""
    run_dir = Path(run_dir).absolute()
    cfg = rundir.load_run_config(run_dir)
    one_device = dataclasses.replace(cfg, mesh=MeshConfig(devices=1))
    mesh, rules = make_mesh(one_device.mesh), logical_rules(one_device.mesh)
    step, params = restore_latest_params(run_dir, one_device, mesh, rules)
    return cfg, step, jax.device_get(params)


def export_hf(run_dir: str | Path, out_dir: str | Path) -> dict:
    """Write OUT_DIR/config.json + model.safetensors (+ the run's tokenizer in ar_lm_tokenizer/, and
    a sentencepiece tokenizer.model at the top) from the run's latest checkpoint."""
    ensure_safetensors()
    from safetensors.numpy import save_file

    run_dir, out_dir = Path(run_dir).absolute(), Path(out_dir).absolute()
    cfg = rundir.load_run_config(run_dir)
    check_exportable(cfg.model)
    _require_fresh(out_dir, "output directory")
    _, step, params = load_run_params(run_dir)
    weights = params_to_hf(cfg.model, params)
    tok_dir = run_dir / rundir.TOKENIZER
    tok_meta = json.loads((tok_dir / "metadata.json").read_text())["tokenizer"] if (tok_dir / "metadata.json").is_file() else None
    eos_id = tok_meta["eos_id"] if tok_meta else None
    bos_id = tok_meta.get("bos_id", eos_id) if tok_meta else None
    tmp = _staging_dir(out_dir)
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg.model, eos_id, bos_id), indent=2) + "\n")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tok_meta:
            _copy_tokenizer(tok_meta, tok_dir / tok_meta["file"], tmp / TOKENIZER_DIR)
            if tok_meta["kind"] == "sentencepiece":
                shutil.copy2(tok_dir / tok_meta["file"], tmp / "tokenizer.model")
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": str(out_dir), "architecture": ARCH_OF_FAMILY[cfg.model.family], "step": step,
            "tensors": len(weights), "tokenizer": tok_meta["kind"] if tok_meta else None}


def import_hf_command(args) -> int:
    """`ar-lm import-hf HF_DIR RUN_DIR`: prints the result as JSON, the tokenizer note on stderr."""
    result = import_hf(args.hf_dir, args.run_dir)
    print(json.dumps(result))
    print(f"[import-hf] {result['note']}", file=sys.stderr)  # says when the run has no text tokenizer
    return 0


def export_hf_command(args) -> int:
    """`ar-lm export-hf RUN_DIR OUT_DIR`: prints the result as JSON."""
    print(json.dumps(export_hf(args.run_dir, args.out_dir)))
    return 0
