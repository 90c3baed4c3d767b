"""Scale-out: multi-process runs, restore onto other meshes, per-device memory, launchers."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_config

from ar_lm.cli import main
from ar_lm.config import MeshConfig, save_json
from ar_lm.errors import UserError
from ar_lm.parallel.launch import slurm_script, tpu_commands
from ar_lm.parallel.runtime import initialize
from ar_lm.training.loop import train
from ar_lm.training.step import compile_train_step


def _losses(run_dir):
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == "train"]


def test_two_processes_match_one_process(tmp_path, byte_data):
    cfg = tiny_config(byte_data, train={"steps": 6, "checkpoint_every": 3}, mesh={"devices": 0, "data": -1, "fsdp": 2})
    path = tmp_path / "exp.json"
    save_json(cfg, path)
    env = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""}
    code = subprocess.run([sys.executable, "-m", "ar_lm", "launch", "local", "--processes", "2", "--devices-per-process",
                           "4", "--timeout", "240", "--", "train", str(path), "--run-dir", str(tmp_path / "mp")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-2000:]
    single = train(cfg, tmp_path / "single")  # this process: 8 devices, same mesh shape
    # same global batches, same math; only the cross-process reduction order differs
    np.testing.assert_allclose(_losses(tmp_path / "mp"), _losses(tmp_path / "single"), rtol=1e-5)
    summary = json.loads((tmp_path / "mp" / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(single.summary["val_loss"], rel=1e-5)


@pytest.mark.parametrize("first, second", [
    (MeshConfig(devices=0, data=1, fsdp=8, rules="fsdp"), MeshConfig(devices=4, data=4, rules="dp")),
    (MeshConfig(devices=0, data=2, fsdp=2, tensor=2), MeshConfig(devices=1)),
    (MeshConfig(devices=1), MeshConfig(devices=0, data=1, fsdp=4, tensor=2)),
])
def test_restore_onto_another_mesh(tmp_path, byte_data, first, second):
    base = tiny_config(byte_data, train={"steps": 8, "checkpoint_every": 4})
    straight = train(base, tmp_path / "straight")
    train(dataclasses.replace(base, mesh=first), tmp_path / "moved", stop_after=4)
    moved = train(dataclasses.replace(base, mesh=second), tmp_path / "moved")
    np.testing.assert_allclose(_losses(tmp_path / "moved"), _losses(tmp_path / "straight"), rtol=1e-5)
    assert moved.summary["val_loss"] == pytest.approx(straight.summary["val_loss"], rel=1e-5)


def test_a_run_trained_on_8_devices_evaluates_on_2(tmp_path, byte_data):
    cfg = tiny_config(byte_data, train={"steps": 3}, mesh={"devices": 0, "data": 1, "fsdp": 4, "tensor": 2})
    trained = train(cfg, tmp_path / "run")
    env = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": "", "JAX_NUM_CPU_DEVICES": "2",
           "AR_LM_COMPILE_CACHE": "off"}
    out = subprocess.run([sys.executable, "-m", "ar_lm", "eval", str(tmp_path / "run"), "--tokens", "512", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["loss"] == pytest.approx(trained.summary["val_loss"], rel=1e-5)


def _argument_bytes_per_device(cfg):
    compiled, _ = compile_train_step(cfg)
    return compiled.memory_analysis().argument_size_in_bytes


def test_fsdp_holds_an_eighth_of_params_and_optimizer_per_device():
    model = {"vocab_size": 512, "d_model": 128, "n_layers": 2, "n_heads": 4}
    dp = _argument_bytes_per_device(tiny_config(model=model, mesh={"devices": 0, "data": 8, "rules": "dp"}))
    fsdp = _argument_bytes_per_device(tiny_config(model=model, mesh={"devices": 0, "data": 1, "fsdp": 8, "rules": "fsdp"}))
    assert 0.12 < fsdp / dp < 0.16, (fsdp, dp)  # ~1/8, plus replicated norms, biases, the batch


def test_launcher_dry_runs(capsys):
    cmds = tpu_commands(["train", "experiments/x.py"], "pod", "us-central2-b", "v4-32", "tpu-ubuntu2204-base",
                        None, spot=True, queued=False, exists=False)
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-central2-b",
                       "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
    assert cmds[-1][:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-central2-b", "--worker=all"]
    assert cmds[-1][-1] == "cd ~/ar_lm && python3 -m ar_lm train experiments/x.py"
    reuse = tpu_commands(["eval", "r"], "pod", "z", "v4-8", "v", "proj", False, False, exists=True)
    assert not any("create" in c for c in reuse) and all("--project" in c for c in reuse if c[0] == "gcloud")
    script = slurm_script(["train", "experiments/x.py", "--data", "d"], 2, 8, "gpu", "01:00:00", "job", "/work")
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=8\n" in script
    assert "#SBATCH --partition=gpu\n" in script
    assert script.rstrip().endswith("srun --kill-on-bad-exit=1 python3 -m ar_lm train experiments/x.py --data d")
    assert main(["launch", "slurm", "--dry-run", "--nodes", "2", "--", "train", "e.py"]) == 0
    assert "#SBATCH --nodes=2" in capsys.readouterr().out
    assert main(["launch", "tpu", "--dry-run", "--name", "p", "--zone", "z", "--accelerator", "v5litepod-16", "--",
                 "sweep", "e.py"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("gcloud compute tpus tpu-vm create p") and out[-1].endswith("python3 -m ar_lm sweep e.py'")
    assert main(["launch", "tpu", "--dry-run", "--", "train", "e.py"]) == 2
    assert "needs --name, --zone and --accelerator" in capsys.readouterr().err


def test_missing_coordinator_fails_fast_with_one_line(tmp_path, byte_data):
    path = tmp_path / "exp.json"
    save_json(tiny_config(byte_data), path)
    t = time.time()
    out = subprocess.run([sys.executable, "-m", "ar_lm", "train", str(path), "--run-dir", str(tmp_path / "run"),
                          "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1",
                          "--init-timeout", "3"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert time.time() - t < 60 and out.returncode == 2
    err = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "could not start the 2-process run through 127.0.0.1:1 within 3 s" in err[0]
    assert not (tmp_path / "run").exists()


def test_partial_multiprocess_flags_are_refused():
    with pytest.raises(UserError, match="needs --coordinator HOST:PORT, --num-processes N and --process-id I"):
        initialize("127.0.0.1:1234", None, None)
    with pytest.raises(UserError, match="outside"):
        initialize("127.0.0.1:1234", 2, 5)


def _devices_after_configure(mesh_kwargs: dict, micro_batch: int, env: dict | None = None, init_first: bool = False):
    """Run `configure_cpu_devices` in a fresh process (it must act before JAX starts)."""
    code = (
        "import json, jax\n"
        "from ar_lm.config import MeshConfig\n"
        "from ar_lm.parallel.runtime import configure_cpu_devices\n"
        + ("jax.numpy.zeros(1)\n" if init_first else "")
        + f"n = configure_cpu_devices(MeshConfig(**{mesh_kwargs!r}), {micro_batch})\n"
        "print(json.dumps([n, jax.device_count()]))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "JAX_PLATFORMS": "cpu", **(env or {})},
                         capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def test_cpu_devices_auto_and_explicit():
    # auto: one device per core (at most 8) that divides the micro-batch
    n, count = _devices_after_configure({}, micro_batch=12)
    cores = len(os.sched_getaffinity(0))
    assert n == count and 1 <= n <= min(8, max(cores, 1)) and 12 % n == 0
    assert n == max(d for d in range(1, min(cores, 8) + 1) if 12 % d == 0)
    assert _devices_after_configure({}, micro_batch=1) == (1, 1)  # a batch of one is not split
    assert _devices_after_configure({"cpu_devices": 3}, micro_batch=12) == (3, 3)  # explicit
    assert _devices_after_configure({"data": 2, "fsdp": 2}, micro_batch=1) == (4, 4)  # a fixed mesh gets its size
    assert _devices_after_configure({"devices": 5}, micro_batch=12) == (5, 5)
    # not ours to set: the launcher's environment, or JAX already started
    assert _devices_after_configure({"cpu_devices": 3}, 12, env={"JAX_NUM_CPU_DEVICES": "6"}) == (None, 6)
    assert _devices_after_configure({"cpu_devices": 3}, 12, init_first=True) == (None, 1)
