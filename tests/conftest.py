"""Test setup: 8 fake CPU devices (before the first JAX op), wandb off, small shared datasets."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
# libtpu (the test extra brings it for `ar-lm plan`) must not claim the backend, nor its lockfile, on a CPU machine
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# the CLI's persistent compilation cache goes to a per-process temporary directory, not ~/.cache
_jax_cache = tempfile.mkdtemp(prefix="ar_lm_test_jax_cache_")
atexit.register(shutil.rmtree, _jax_cache, True)
os.environ.setdefault("AR_LM_COMPILE_CACHE", _jax_cache)

import jax  # noqa: E402
import submitit  # noqa: E402,F401  (binds its log handlers to sys.stdout at import: before pytest captures it)

jax.config.update("jax_num_cpu_devices", 8)

import dataclasses  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402


def make_corpus(directory: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """Small text files with structure a model can learn (no network, no ../shared)."""
    rng = random.Random(seed)
    words = "the cat dog sat on mat ran to a big red house and then slept in sun".split()
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(rng.randint(20, 40)):
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + ".")
        (directory / f"doc_{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory, corpus_dir) -> Path:
    from ar_lm.data.sources import FileCorpus
    from ar_lm.data.writer import write_dataset

    out = tmp_path_factory.mktemp("data") / "byte"
    write_dataset(out, FileCorpus([str(corpus_dir)]), "byte", val_fraction=0.1)
    return out


def final_params(run_dir):
    """The parameters of `run_dir`'s latest checkpoint, on the host."""
    from ar_lm.parallel.mesh import logical_rules, make_mesh
    from ar_lm.training import rundir
    from ar_lm.training.checkpoint import Checkpointer
    from ar_lm.training.state import abstract_params

    cfg = rundir.load_run_config(run_dir)
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", read_only=True)
    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    params = ckpt.restore_params(ckpt.latest_step(), abstract_params(cfg, mesh, rules))
    ckpt.close()
    return jax.device_get(params)


def tiny_config(data_path: Path | str = "", **sections) -> ExperimentConfig:
    """A tiny single-device experiment; `sections` maps section name -> dict of field overrides."""
    cfg = ExperimentConfig(
        name="test",
        model=ModelConfig(family="gpt2", d_model=32, n_layers=2, n_heads=4, max_seq_len=32),
        data=DataConfig(path=str(data_path), seq_len=32, batch_size=8, prefetch=0),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(steps=20, eval_every=0, eval_tokens=512, log_every=1, checkpoint_every=0, async_checkpoint=False),
        mesh=MeshConfig(devices=1),
        logging=LoggingConfig(wandb=False, progress=False),
    )
    for name, fields in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
    return cfg
