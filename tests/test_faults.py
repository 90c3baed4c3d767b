"""Fault injection: kill -9 at random moments, SIGTERM, NaN losses, concurrent trainers."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import final_params, tiny_config

from ar_lm.cli import main
from ar_lm.config import save_json
from ar_lm.errors import EXIT_PREEMPTED, NonFiniteError, UserError
from ar_lm.training.checkpoint import Checkpointer, choose_data_state
from ar_lm.training.loop import train

ENV = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": ""}


def _config_file(tmp_path, data, **train_fields):
    cfg = tiny_config(data, train={"steps": 40, "checkpoint_every": 4, "async_checkpoint": True, **train_fields})
    path = tmp_path / "exp.json"
    save_json(cfg, path)
    return cfg, path


def _cmd(config_path, run_dir):
    return [sys.executable, "-m", "ar_lm", "train", str(config_path), "--run-dir", str(run_dir)]


def _train_losses(run_dir):
    recs = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]


def _last_logged_step(run_dir) -> int:
    try:
        return max((step for step, _ in _train_losses(run_dir)), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line being written
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, byte_data):
    tmp = tmp_path_factory.mktemp("ref")
    cfg, path = _config_file(tmp, byte_data)
    subprocess.run(_cmd(path, tmp / "run"), env=ENV, check=True, capture_output=True)
    return cfg, tmp / "run"


def test_kill_9_at_random_moments_loses_nothing(tmp_path, byte_data, reference):
    _, ref_run = reference
    _, path = _config_file(tmp_path, byte_data)
    run = tmp_path / "run"
    rng = random.Random(1234)
    kills, during_write = 0, 0
    for attempt in range(4):
        proc = subprocess.Popen(_cmd(path, run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 0:
            # aim at an async checkpoint write: kill as soon as orbax's temporary directory appears
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None:
                if list((run / "checkpoints").glob("*tmp*")):
                    break
                time.sleep(0.001)
            during_write += bool(list((run / "checkpoints").glob("*tmp*")))
        else:
            # a random moment of the run's progress (not of wall time, which depends on the machine):
            # once the log reaches a random step past where this attempt resumed, plus a random delay
            resumed = _last_logged_step(run)
            target = rng.randint(resumed + 1, resumed + 8)
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None and _last_logged_step(run) < target:
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3 and during_write == 1
    subprocess.run(_cmd(path, run), env=ENV, check=True, capture_output=True)
    assert _train_losses(run) == _train_losses(ref_run)  # bitwise: same program, same device count
    ref, got = final_params(ref_run), final_params(run)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, ref)


def test_sigterm_checkpoints_and_resumes_identically(tmp_path, byte_data, reference):
    _, ref_run = reference
    _, path = _config_file(tmp_path, byte_data)
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(path, run), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(_train_losses(run) if (run / "metrics.jsonl").exists() else []) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preempted"] and not summary["finished"]
    ckpt = Checkpointer(run / "checkpoints", read_only=True)
    assert ckpt.latest_step() == summary["step"] == _train_losses(run)[-1][0]  # a checkpoint at the stop step
    ckpt.close()
    subprocess.run(_cmd(path, run), env=ENV, check=True, capture_output=True)
    assert _train_losses(run) == _train_losses(ref_run)


def test_nan_skip_policy_recovers_and_logs(tmp_path, byte_data):
    cfg = tiny_config(byte_data, train={"steps": 12, "nonfinite_policy": "skip", "debug_nan_steps": (5, 6)})
    result = train(cfg, tmp_path / "run")
    recs = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}
    assert recs[5]["skipped"] and recs[6]["skipped"] and not recs[7]["skipped"]
    assert recs[12]["skipped_total"] == 2 and np.isfinite(recs[12]["loss"])
    assert result.summary["finished"] and np.isfinite(result.summary["val_loss"])


def test_nan_stop_policy_names_the_step_and_keeps_good_checkpoint(tmp_path, byte_data, capsys):
    cfg = tiny_config(byte_data, train={"steps": 12, "checkpoint_every": 4, "debug_nan_steps": (7,)})
    with pytest.raises(NonFiniteError, match="at step 7"):
        train(cfg, tmp_path / "run")
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True)
    assert ckpt.latest_step() == 4
    ckpt.close()
    path = tmp_path / "exp.json"
    save_json(cfg, path)
    code = main(["train", str(path), "--run-dir", str(tmp_path / "run2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and "non-finite loss or gradient at step 7" in err[-1]


def test_second_trainer_on_same_run_dir_is_refused(tmp_path, byte_data, capsys):
    cfg = tiny_config(byte_data, train={"steps": 2})
    path = tmp_path / "exp.json"
    save_json(cfg, path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ar_lm.training.rundir import RunLock; "
        f"l = RunLock({str(tmp_path / 'run')!r}).__enter__(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    try:
        code = main(["train", str(path), "--run-dir", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "is in use by another trainer" in err[-1] and str(holder.pid) in err[-1]
        assert not (tmp_path / "run" / "config.json").exists()
    finally:
        holder.kill()


def test_preemption_is_polled_every_k_steps_across_processes():
    from ar_lm.training.preemption import PreemptionGuard

    gathered = []

    def allgather(flag):  # two processes; the other one never saw a signal
        gathered.append(int(flag))
        return np.array([flag, 0])

    guard = PreemptionGuard(every=10, allgather=allgather, process_count=lambda: 2)
    stops = []
    for step in range(1, 41):
        if step == 13:
            guard.signal = signal.SIGTERM
        if guard(step):
            stops.append(step)
            break
    assert stops == [20] and guard.polls == 2 and gathered == [0, 1]  # a host sync at steps 10 and 20 only
    alone = PreemptionGuard(every=10, allgather=allgather, process_count=lambda: 1)
    alone.signal = signal.SIGTERM
    assert alone(13) and alone.polls == 0  # one process: no collective, it stops at once


def _pid_of(*words):
    """The pid of the process whose command line holds all `words` (None if there is none)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w.encode() in argv for w in words):
            return int(proc.name)
    return None


def _two_processes_until(tmp_path, cfg, step):
    """Launch `cfg` as a 2-process local run; once it has logged `step`, return (launch command, run
    dir, launcher process, pid of process 1)."""
    path = tmp_path / "exp.json"
    save_json(cfg, path)
    run = tmp_path / "mp"
    launch = [sys.executable, "-m", "ar_lm", "launch", "local", "--processes", "2", "--devices-per-process", "4",
              "--timeout", "240", "--", "train", str(path), "--run-dir", str(run)]
    proc = subprocess.Popen(launch, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and _last_logged_step(run) < step:
        time.sleep(0.05)
    return launch, run, proc, _pid_of("train", str(run), "--process-id", "1")


def test_sigterm_to_one_process_stops_all_at_the_same_polled_step(tmp_path, byte_data):
    cfg = tiny_config(byte_data, train={"steps": 48, "log_every": 4, "checkpoint_every": 0},
                      mesh={"devices": 0, "data": -1, "fsdp": 2})
    launch, run, proc, worker = _two_processes_until(tmp_path, cfg, 8)
    assert worker is not None
    os.kill(worker, signal.SIGTERM)  # only process 1 is told; process 0 learns it at the next shared poll
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    ckpt = Checkpointer(run / "checkpoints", read_only=True)
    stopped = ckpt.latest_step()
    ckpt.close()
    assert stopped % 4 == 0 and 8 <= stopped < 48 and not (run / "summary.json").exists()
    assert subprocess.run(launch, env=ENV, capture_output=True, timeout=300).returncode == 0
    single = train(cfg, tmp_path / "single")  # this process: 8 devices, the same mesh
    np.testing.assert_allclose([l for _, l in _train_losses(run)], [l for _, l in _train_losses(tmp_path / "single")],
                               rtol=1e-5)
    assert json.loads((run / "summary.json").read_text())["val_loss"] == pytest.approx(
        single.summary["val_loss"], rel=1e-5)


def test_kill_9_of_one_process_resumes_each_process_from_its_own_data_state(tmp_path, byte_data):
    cfg = tiny_config(byte_data, train={"steps": 24, "checkpoint_every": 4}, mesh={"devices": 0, "data": -1, "fsdp": 2})
    launch, run, proc, worker = _two_processes_until(tmp_path, cfg, 10)
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    t = time.time()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL and time.time() - t < 60, err[-2000:]  # the peer is not waited on
    ckpt = Checkpointer(run / "checkpoints", read_only=True)
    killed_at = ckpt.latest_step()
    ckpt.close()
    assert killed_at % 4 == 0 and 8 <= killed_at < 24 and not (run / "summary.json").exists()
    saved = sorted(p.name for p in (run / "checkpoints" / str(killed_at) / "data").glob("process_*"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]  # one iterator state per process
    shutil.copytree(run, tmp_path / "one")
    assert subprocess.run(launch, env=ENV, capture_output=True, timeout=300).returncode == 0
    single = train(cfg, tmp_path / "single")  # this process: 8 devices, the same mesh
    resumed_alone = train(cfg, tmp_path / "one")  # another process count: the equal states are accepted
    for other in (run, tmp_path / "one"):
        np.testing.assert_allclose([l for _, l in _train_losses(other)],
                                   [l for _, l in _train_losses(tmp_path / "single")], rtol=1e-5)
    assert resumed_alone.summary["val_loss"] == pytest.approx(single.summary["val_loss"], rel=1e-5)


def test_per_process_data_states_are_chosen_by_process_and_count():
    a, b = {"next_index": 3}, {"next_index": 5}
    files = {"process_0-of-2.json": a, "process_1-of-2.json": b}
    assert choose_data_state(files, 1, 2) == b and choose_data_state(files, 0, 2) == a
    with pytest.raises(UserError, match="differ between its 2 processes: resume with 2 processes"):
        choose_data_state(files, 0, 1)
    same = {"process_0-of-2.json": a, "process_1-of-2.json": dict(a)}
    assert choose_data_state(same, 0, 1) == a and choose_data_state(same, 3, 4) == a
    with pytest.raises(UserError, match="holds no data-iterator state"):
        choose_data_state({}, 0, 1)
