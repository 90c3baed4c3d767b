"""Sweep executors: concurrent local runs, a real local Ray instance (with a killed worker), submitit's
local executor and the Slurm array script give the serial runner's losses; packing, status writers,
TPU-pod placements, progress table, the sweep-level wandb run, and bad input."""

import atexit
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ar_lm.cli import main
from ar_lm.errors import UserError
from ar_lm.parallel.placement import Pool, block_size, pack
from ar_lm.parallel.tpu import runtime_version, tpu_layout, wait_active
from ar_lm.scaling.status import SweepStatus

# 4 points (2 sizes x 2 token budgets) on one device each: a run is deterministic, so every executor
# must give the serial runner's losses bit for bit; the 120-step points checkpoint at step 40 and 80
EXPERIMENT = '''
from ar_lm.config import DataConfig, ExperimentConfig, LoggingConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from ar_lm.scaling.sweeps import ShapeRule, Sweep, grid_sweep

RULE = ShapeRule(aspect=16, head_dim=8)


def config():
    return ExperimentConfig(
        name="four", model=ModelConfig(vocab_size=257, max_seq_len=32), data=DataConfig(seq_len=32, batch_size=8, prefetch=0),
        optim=OptimConfig(lr=3e-3), train=TrainConfig(eval_tokens=256, log_every=5, checkpoint_every=40, async_checkpoint=False),
        mesh=MeshConfig(devices=1), logging=LoggingConfig(wandb=False, progress=False))


def sweep():
    base = config()
    return Sweep(name="four", base=base, points=tuple(grid_sweep(base, (3e3, 2e4), (10240, 30720), rule=RULE)), rule=RULE)
'''
# the runs of every sweep here share one compilation cache (compiled programs are the same bits)
_CACHE = tempfile.mkdtemp(prefix="ar_lm_test_executors_cache_")
atexit.register(shutil.rmtree, _CACHE, True)
ENV = {**os.environ, "WANDB_MODE": "disabled", "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": _CACHE}


def _experiment(tmp_path, text=EXPERIMENT, name="four.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _sweep(exp, sweep_dir, data, *extra, check=True, **kw):
    cmd = [sys.executable, "-m", "ar_lm", "sweep", str(exp), "--sweep-dir", str(sweep_dir), "--data", str(data),
           "--no-fit", *extra]
    if not check:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _losses(sweep_dir):
    return {r["name"]: r["val_loss"] for r in csv.DictReader(open(sweep_dir / "summary.csv"))}


def _status(sweep_dir):
    return SweepStatus(sweep_dir / "status.json").read()


def _overlapped(status):
    """Whether two points ran at the same time (one started before another finished)."""
    spans = sorted((s["started"], s["finished"]) for s in status.values())
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


VICTIM = "n1_d1"  # the largest point: every executor starts it first


def _signal_when_checkpointed(proc, sweep_dir, name, sig):
    """Once point `name` runs and has checkpointed, send `sig` to the process that runs it (its status
    pid); wait for the sweep to end. Returns (that pid, the sweep's stderr)."""
    ckpt = sweep_dir / "runs" / name / "checkpoints" / "40"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not (ckpt.is_dir() and _status(sweep_dir).get(name, {}).get("state") == "running"):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        assert ckpt.is_dir(), "the point never checkpointed"
        pid = _status(sweep_dir)[name]["pid"]
        os.kill(pid, sig)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    return pid, err


def _assert_resumed_once(sweep_dir):
    status = _status(sweep_dir)
    assert status[VICTIM]["attempts"] == 2 and status[VICTIM]["state"] == "done"
    assert all(s["attempts"] == 1 for n, s in status.items() if n != VICTIM)
    log = (sweep_dir / "logs" / f"{VICTIM}.log").read_text()
    assert log.count("[train] resuming from the checkpoint at step") == 1


def test_every_executor_gives_the_serial_losses_and_survives_a_lost_worker(tmp_path, byte_data):
    exp = _experiment(tmp_path)
    _sweep(exp, tmp_path / "serial", byte_data)
    serial = _losses(tmp_path / "serial")
    assert len(serial) == 4 and all(serial.values())
    assert not _overlapped(_status(tmp_path / "serial"))

    _sweep(exp, tmp_path / "local2", byte_data, "--max-concurrent", "2", "--devices", "2")
    status = _status(tmp_path / "local2")
    assert _losses(tmp_path / "local2") == serial  # bitwise: the CSV holds repr(float)
    assert _overlapped(status) and {s["devices"] for s in status.values()} == {"cpu:0", "cpu:1"}

    # a real local Ray instance; the worker running the largest point is killed after its first checkpoint
    ray_dir = tmp_path / "ray"
    proc = _sweep(exp, ray_dir, byte_data, "--executor", "ray", "--max-concurrent", "2", check=False,
                  start_new_session=True)
    worker, _ = _signal_when_checkpointed(proc, ray_dir, VICTIM, signal.SIGKILL)
    assert worker != proc.pid  # the Ray worker process running the point, not the coordinator
    _assert_resumed_once(ray_dir)
    assert _overlapped(_status(ray_dir))
    assert _losses(ray_dir) == serial

    # submitit's local executor, one job preempted (USR2, as Slurm signals before preemption or the time
    # limit): it stops its run at a checkpoint, requeues, and the requeued job resumes from it
    sub = tmp_path / "submitit"
    proc = _sweep(exp, sub, byte_data, "--executor", "slurm", "--slurm-cluster", "local", "--slurm-cpu",
                  "--max-concurrent", "2", check=False, start_new_session=True)
    _signal_when_checkpointed(proc, sub, VICTIM, signal.SIGUSR2)
    status = _status(sub)
    assert _losses(sub) == serial
    assert all(s["state"] == "done" and s["job_id"] and s["devices"].startswith("slurm:") for s in status.values())
    assert status[VICTIM].get("requeued")  # PointJob.checkpoint ran: the job was requeued, not restarted by us
    _assert_resumed_once(sub)
    assert list((sub / "slurm").glob("*_result.pkl"))  # submitit's own job files: it really ran the jobs

    # the same directory with another executor: nothing is run again
    stamps = {n: (sub / "runs" / n / "summary.json").stat().st_mtime_ns for n in serial}
    out = _sweep(exp, sub, byte_data, "--executor", "local")
    assert {n: (sub / "runs" / n / "summary.json").stat().st_mtime_ns for n in serial} == stamps
    assert "4/4 done" in out.stderr


def test_runs_see_only_their_devices_and_status_table(tmp_path, byte_data):
    exp = _experiment(tmp_path, EXPERIMENT.replace("mesh=MeshConfig(devices=1), ", ""))
    sweep_dir = tmp_path / "sweep"
    _sweep(exp, sweep_dir, byte_data, "--devices", "4", "--max-concurrent", "2", "--only", "n0_*")
    status = _status(sweep_dir)
    assert {s["devices"] for s in status.values() if s["state"] == "done"} == {"cpu:0,1", "cpu:2,3"}
    for name in ("n0_d0", "n0_d1"):  # jax.device_count() inside the run
        assert json.loads((sweep_dir / "runs" / name / "summary.json").read_text())["devices"] == 2
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file()}
    out = subprocess.run([sys.executable, "-m", "ar_lm", "sweep", str(exp), "--sweep-dir", str(sweep_dir), "--status"],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2/4 done, 0 running" in out.stdout and "ETA" in out.stdout
    lines = {line.split()[1]: line for line in out.stdout.splitlines() if line.startswith("│ n")}
    assert set(lines) == {"n0_d0", "n0_d1", "n1_d0", "n1_d1"} and "pending" in lines["n1_d1"]
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file()} == before  # read only


# -- packing


def _pools():
    return st.builds(lambda slices, hosts, per_host: Pool("tpu", tuple(tuple(f"s{s}h{h}" for h in range(hosts))
                                                                      for s in range(slices)), per_host),
                     st.integers(1, 2), st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4, 8]))


@settings(max_examples=200, deadline=None)
@given(pool=_pools(), data=st.data(), max_concurrent=st.integers(1, 8))
def test_packing_never_oversubscribes_and_is_largest_first(pool, data, max_concurrent):
    n = data.draw(st.integers(1, 10))
    needs = {f"p{i}": data.draw(st.integers(1, pool.largest)) for i in range(n)}
    cost = {name: data.draw(st.floats(1.0, 100.0)) for name in needs}
    plan = pack(needs, cost, pool, max_concurrent)
    assert sorted(r["name"] for r in plan) == sorted(needs)
    for r in plan:
        p, size = r["placement"], block_size(needs[r["name"]])
        hosts = range(len(pool.slices[p.slice])) if p.host is None else (p.host,)
        assert len(p.devices) * len(hosts) == size or (p.host is None and size > pool.devices_per_host)
        assert p.host is None or p.devices[0] % size == 0  # an aligned block
        r["cells"] = {(p.slice, h, d) for h in hosts for d in p.devices}
    for r in plan:  # at every start: the runs in progress hold disjoint devices, at most max_concurrent of them
        live = [o for o in plan if o["start"] <= r["start"] < o["end"]]
        assert len(live) <= max_concurrent
        cells = [c for o in live for c in o["cells"]]
        assert len(cells) == len(set(cells))
    starts = [r for r in plan if r["start"] == 0.0]  # the first wave: largest first, and it starts the largest
    assert starts[0]["name"] == min(needs, key=lambda k: (-needs[k], -cost[k], k))
    assert [needs[r["name"]] for r in starts] == sorted((needs[r["name"]] for r in starts), reverse=True)


def test_packing_follows_the_documented_greedy_plan():
    pool = Pool("gpu", (("",),), 8)
    needs = {"a": 4, "b": 3, "c": 2, "d": 2, "e": 1}
    cost = {"a": 40.0, "b": 8.0, "c": 2.0, "d": 4.0, "e": 1.0}
    plan = {r["name"]: r for r in pack(needs, cost, pool, max_concurrent=8)}
    assert plan["a"]["placement"].devices == (0, 1, 2, 3) and plan["b"]["placement"].devices == (4, 5, 6, 7)
    assert plan["a"]["start"] == plan["b"]["start"] == 0.0  # b (3) takes a block of 4
    assert plan["d"]["start"] == plan["c"]["start"] == plan["b"]["end"] == 2.0  # b's block frees at 8/4
    assert plan["d"]["placement"].devices == (4, 5) and plan["c"]["placement"].devices == (6, 7)  # d: costlier
    assert plan["e"]["start"] == plan["c"]["end"] == 3.0 and plan["e"]["placement"].devices == (6,)  # c's block
    serial = pack(needs, cost, pool, max_concurrent=1)
    assert [r["name"] for r in serial] == ["a", "b", "d", "c", "e"]
    assert all(a["end"] <= b["start"] for a, b in zip(serial, serial[1:]))


# -- concurrent status writers

WRITER = '''
import random, sys, time
from ar_lm.scaling.status import SweepStatus
i, path = int(sys.argv[1]), sys.argv[2]
rng = random.Random(i)
status = SweepStatus(path)
for j in range(25):
    time.sleep(rng.random() * 0.01)
    status.update(f"p{i}", **{f"k{j}": j})
    status.start_attempt("shared")
'''


def test_concurrent_status_writers_lose_no_update(tmp_path):
    path = tmp_path / "status.json"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), str(path)]) for i in range(8)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 8
    status = json.loads(path.read_text())
    assert status["shared"]["attempts"] == 8 * 25
    assert all(status[f"p{i}"] == {f"k{j}": j for j in range(25)} for i in range(8))


# -- TPU pods, Slurm and Ray plans (dry runs)


@pytest.mark.parametrize("accelerator,hosts,chips", [("v4-32", 4, 4), ("v5litepod-16", 4, 4)])
def test_tpu_pod_dry_run_one_coordinator_concurrent_points(tmp_path, capsys, accelerator, hosts, chips):
    exp = _experiment(tmp_path)
    sweep_dir = tmp_path / "abs" / "sweep"
    assert main(["sweep", str(exp), "--launcher", "tpu", "--tpu-name", "pod", "--tpu-zone", "us-central2-b",
                 "--tpu-accelerator", accelerator, "--max-concurrent", "8", "--sweep-dir", str(sweep_dir),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("# coordinator: this machine, ssh to the workers of pod") for line in out) == 1
    assert f"1 slice(s) x {hosts} host(s) x {chips} devices" in next(l for l in out if l.startswith("# coordinator"))
    setup = out.index("# setup of pod: copy and install this project on every worker")
    assert out[setup + 1].startswith("tar czf") and "pip install -q -e ." in out[setup + 3]  # before the points
    placed = [l for l in out if l.startswith("# n") and " of the sweep's time" in l]
    commands = [l for l in out if "gcloud compute tpus tpu-vm ssh pod" in l and "python3 -m ar_lm train" in l]
    assert len(placed) == len(commands) == 4
    assert all("from 0.00 to" in l for l in placed)  # all four at once, one chip each
    workers = [l.split("--worker=")[1].split()[0] for l in commands]
    chip_sets = [(w, l.split("TPU_VISIBLE_CHIPS=")[1].split()[0]) for w, l in zip(workers, commands)]
    assert len(set(chip_sets)) == 4  # distinct chips
    for line in commands:
        assert "TPU_PROCESS_BOUNDS=1,1,1" in line and "TPU_CHIPS_PER_PROCESS_BOUNDS=1,1,1" in line
        assert f"--run-dir {sweep_dir}/runs/n" in line and f"train {sweep_dir}/points/n" in line  # absolute
    assert not sweep_dir.exists()  # a dry run writes nothing


def test_tpu_multislice_whole_slice_points(tmp_path, capsys):
    exp = _experiment(tmp_path, EXPERIMENT.replace("MeshConfig(devices=1)", "MeshConfig(devices=16)"))
    assert main(["sweep", str(exp), "--launcher", "tpu", "--tpu-name", "a,b", "--tpu-zone", "z",
                 "--tpu-accelerator", "v5p-32", "--max-concurrent", "4", "--sweep-dir", str(tmp_path / "s"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    placed = [l for l in out.splitlines() if " of the sweep's time" in l]
    assert sum("from 0.00" in l for l in placed) == 2  # one point per slice at a time
    assert "slice 0 (4 hosts x 4)" in out and "slice 1 (4 hosts x 4)" in out
    assert "# setup of a:" in out and "# setup of b:" in out
    assert "tpu-vm ssh a --zone=z --worker=all" in out and "tpu-vm ssh b --zone=z --worker=all" in out


@pytest.mark.parametrize("accelerator,family,chips,hosts,runtime", [
    ("v4-8", "v4", 4, 1, "tpu-ubuntu2204-base"), ("v4-32", "v4", 16, 4, "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v5e", 8, 1, "v2-alpha-tpuv5-lite"), ("v5litepod-16", "v5e", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5p-16", "v5p", 8, 2, "v2-alpha-tpuv5"), ("v6e-8", "v6e", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-32", "v6e", 32, 8, "v2-alpha-tpuv6e")])
def test_tpu_layout_and_runtime_per_family(accelerator, family, chips, hosts, runtime):
    layout = tpu_layout(accelerator)
    assert (layout.family, layout.chips, layout.hosts) == (family, chips, hosts)
    assert runtime_version(accelerator) == runtime and runtime_version(accelerator, "given") == "given"


def test_tpu_queued_create_waits_until_active(capsys):
    states = iter(["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    wait_active("pod", "z", None, timeout_s=5, poll_s=0.01, describe=lambda: next(states))
    with pytest.raises(UserError, match="is FAILED: see"):
        wait_active("pod", "z", None, timeout_s=5, poll_s=0.01, describe=lambda: "FAILED")
    t0 = time.monotonic()
    with pytest.raises(UserError, match="still WAITING_FOR_RESOURCES after 0 s"):
        wait_active("pod", "z", None, timeout_s=0.05, poll_s=0.01, describe=lambda: "WAITING_FOR_RESOURCES")
    assert time.monotonic() - t0 < 1
    assert main(["launch", "tpu", "--dry-run", "--queued", "--name", "p", "--zone", "z", "--accelerator", "v4-32",
                 "--queued-timeout", "600", "--", "train", "e.py"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("gcloud compute tpus queued-resources create p-qr --node-id=p --zone=z")
    assert "--runtime-version=tpu-ubuntu2204-base" in out[0]
    assert out[1] == "# wait until queued resource p-qr is ACTIVE (at most 600 s)"


def test_slurm_and_ray_dry_runs(tmp_path, capsys):
    exp = _experiment(tmp_path)
    assert main(["sweep", str(exp), "--executor", "slurm", "--slurm-partition", "gpu", "--max-concurrent", "2",
                 "--sweep-dir", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 1  # one array for the four one-GPU points
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --signal=USR2@120", "#SBATCH --open-mode=append"):
        assert line in out
    assert "# points: n1_d1, n1_d0, n0_d1, n0_d0" in out  # largest first
    assert main(["sweep", str(exp), "--executor", "ray", "--ray-address", "10.0.0.2:6379", "--sweep-dir",
                 str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Ray at 10.0.0.2:6379" in out and out.count("1 device(s) as Ray resources") == 4
    assert not (tmp_path / "s").exists()


# -- the sweep-level wandb run


def test_sweep_level_wandb_run_offline(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ar_lm.scaling.runner import load_sweep
    from ar_lm.scaling.wandb_sweep import log_sweep_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = load_sweep(_experiment(tmp_path, EXPERIMENT.replace("wandb=False", "wandb=True")))
    (tmp_path / "fit").mkdir()
    plt.plot([1, 2], [3, 4])
    plt.savefig(tmp_path / "fit" / "isoflop.png")
    (tmp_path / "fit" / "fit.json").write_text(json.dumps({"approach2": {"a": 0.5, "b": 0.5}}))
    rows = [{"name": p.name, "status": "done", "N": p.coords["N"], "D": p.coords["D"], "C": p.coords["C"],
             "val_loss": 2.0 + i} for i, p in enumerate(sweep.points)]
    log_sweep_run(sweep, tmp_path, rows)
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    files = run_dirs[0] / "files"
    table = next((files / "media" / "table").glob("summary_*.table.json"))
    logged = json.loads(table.read_text())
    assert logged["columns"][:3] == ["name", "status", "N"] and [r[0] for r in logged["data"]] == [p.name for p in
                                                                                                   sweep.points]
    assert list((files / "media" / "images" / "fit").glob("isoflop_*.png"))
    meta = json.loads((files / "wandb-metadata.json").read_text()) if (files / "wandb-metadata.json").exists() else {}
    assert meta.get("jobType", "sweep") == "sweep"


# -- bad input: one line, exit 2, nothing started


def test_sweep_executor_bad_input(tmp_path, byte_data, capsys, monkeypatch):
    exp = _experiment(tmp_path)
    big = _experiment(tmp_path, EXPERIMENT.replace("MeshConfig(devices=1)", "MeshConfig(devices=16)"), "big.py")
    sweep_dir = tmp_path / "s"
    common = ["--sweep-dir", str(sweep_dir), "--data", str(byte_data)]

    def fails(args, fragment):
        t0 = time.time()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
        return time.time() - t0

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)  # Ray not installed: importing it raises ImportError
        fails(["sweep", str(exp), "--executor", "ray", *common], "pip install 'ar_lm[ray]'")
    assert fails(["sweep", str(exp), "--executor", "ray", "--ray-address", "127.0.0.1:9", *common],
                 "cannot reach the Ray cluster at 127.0.0.1:9") < 30
    fails(["sweep", str(big), *common], "point n0_d0 needs 16 devices")
    fails(["sweep", str(exp), "--launcher", "tpu", "--tpu-name", "p", "--tpu-zone", "z", "--tpu-accelerator", "v3-8",
           "--dry-run", *common], "unknown TPU accelerator type 'v3-8'")
    fails(["sweep", str(exp), "--max-concurrent", "0", *common], "--max-concurrent must be >= 1")
    assert not sweep_dir.exists()  # nothing was started or written
