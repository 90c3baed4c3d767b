"""`ar-lm plan` and `sweep --plan` against the real TPU compiler (libtpu, compile-only devices on this CPU)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ar_lm.config import MeshConfig, validate
from ar_lm.errors import UserError
from ar_lm.plan.hlo import HloModule, replica_groups
from ar_lm.plan.planner import plan
from ar_lm.plan.targets import parse_target

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from llama_tpu import config_for  # noqa: E402

import libtpu  # noqa: E402,F401  (in the test extra: missing is a failure, not a skip)

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ar_lm", *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=600)


def _small(attention="pallas", mesh=MeshConfig(data=1, fsdp=4, rules="fsdp"), batch=8, seq=512):
    """A 2-layer llama of d 256 (the issue's reproduction of the gathered splash attention)."""
    cfg = config_for("125m", seq_len=seq, batch_size=batch)
    model = dataclasses.replace(cfg.model, d_model=256, n_layers=2, n_heads=4, vocab_size=8192, attention=attention)
    return validate(dataclasses.replace(cfg, model=model, mesh=mesh))


def test_targets_parse_topologies_and_accelerator_types():
    assert parse_target("v5e:2x2").topology == "v5e:2x2"
    assert parse_target("v5p-128").topology == "v5p:4x4x4" and parse_target("v5p-128").chips == 64
    assert parse_target("v5litepod-16").topology == "v5e:4x4"
    assert parse_target("v4-32").topology == "v4:2x2x4"
    assert parse_target("v6e-64").topology == "v6e:8x8"
    assert parse_target("v5p-8", slices=2).chips == 8
    for bad in ("v9:2x2", "v5e", "v5e:2x2x2", "tpu", "v5p-7"):
        with pytest.raises(UserError):
            parse_target(bad)


def test_replica_groups_in_all_three_spellings():
    assert replica_groups("replica_groups={{0,1},{2,3}}", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[2,2]<=[4]", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[2,2]<=[2,2]T(1,0)", 4) == [[0, 2], [1, 3]]
    assert replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}", 4) == [[0, 2], [1, 3]]
    assert replica_groups("replica_groups={}", 4) == [[0, 1, 2, 3]]


def test_scan_loops_count_their_trip_count():
    """A layer scan's body runs n_layers times: the HLO reader multiplies its matmul FLOPs, which XLA's own
    cost_analysis counts once; the compiled FLOPs match flops_per_token x tokens (xla attention computes a
    little more than the causal triangle)."""
    cfg = _small(attention="xla")
    p4 = plan(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=4)), parse_target("v5e:2x2"))
    p2 = plan(cfg, parse_target("v5e:2x2"))
    assert p4.fits and p2.fits
    per_layer = p4.flops["compiled"] - p2.flops["compiled"]
    assert per_layer > 0.2 * p2.flops["compiled"]  # two more layers, not zero more
    assert 0.9 < p4.flops["compiled"] / p4.flops["model"] < 1.35


def test_splash_attention_is_sharded_and_the_plan_names_activation_collectives(tmp_path):
    """With fsdp=4 on v5e:2x2 the splash kernel runs inside shard_map: no collective carries the global batch
    of q/k/v (bf16[8,4,512,64], what the partitioner gathered before), while the activation collectives the
    plan does name (the embedding's all-to-all) are named with their shapes; and the compiled HLO is written."""
    p = plan(_small(), parse_target("v5e:2x2"), hlo_dir=tmp_path)
    assert p.fits and p.settings["attention"] == "pallas"
    text = (tmp_path / "train_step.hlo.txt").read_text()
    assert "tpu_custom_call" in text  # the Mosaic kernel, not the interpreter
    module = HloModule(text)
    gathered = [c for c in module.collectives() if any(a.dims[:1] == (8,) and 512 in a.dims for a in c.shapes)]
    assert gathered == []
    assert p.activation_collectives and all("512" in c for c in p.activation_collectives)
    assert not any("[8,4,512,64]" in c for c in p.activation_collectives)


def test_activation_collectives_are_named_from_compiled_hlo():
    """A program that gathers a batch-sharded activation whole onto every chip (and an fsdp-sharded weight,
    as fsdp does), compiled for v5e:2x2: the helper names the activation's all-gather, not the weight's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from ar_lm.plan.planner import activation_collectives
    from ar_lm.plan.targets import compile_devices

    mesh = Mesh(np.array(compile_devices(parse_target("v5e:2x2"))), ("fsdp",))
    x = jax.ShapeDtypeStruct((8, 512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
    w = jax.ShapeDtypeStruct((256, 384), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))

    def f(x_BxLxD, w_DxF):
        whole_BxLxD = jax.lax.with_sharding_constraint(x_BxLxD * 2, NamedSharding(mesh, P()))
        w_DxF = jax.lax.with_sharding_constraint(w_DxF, NamedSharding(mesh, P()))
        return jnp.tanh(whole_BxLxD @ w_DxF)

    module = HloModule(jax.jit(f).lower(x, w).compile().as_text())
    gathers = [c for c in module.collectives() if c.kind == "all-gather"]
    assert {c.shapes[0].dims for c in gathers} >= {(8, 512, 256), (256, 384)}
    named = activation_collectives(module.collectives(), 512, {256 * 384, 256 * 384 // 4})
    assert [c.shapes[0].dims for c in named] == [(8, 512, 256)]


def test_plan_cli_fits_a_1_3b_on_v5p_2x2x1_and_writes_json(tmp_path):
    r = _cli("plan", "experiments/llama_tpu.py", "--target", "v5p:2x2x1", "--json", "--hlo-dir", str(tmp_path),
             "--set", "model.remat=full")
    assert r.returncode == 0, r.stderr[-2000:]
    p = json.loads(r.stdout)
    assert p["fits"] and p["chips"] == 4 and p["mesh"]["fsdp"] == 4
    assert 0 < p["memory"]["total"] < p["memory"]["capacity"]
    assert p["roofline"]["step_s"] > 0 and 0 < p["mfu_ceiling"] < 1
    assert (tmp_path / "train_step.hlo.txt").is_file()


def test_plan_cli_says_a_7b_does_not_fit_v5e_2x2_and_what_to_change():
    r = _cli("plan", "experiments/llama_tpu.py", "--target", "v5e:2x2", "--set", "model.d_model=4096",
             "--set", "model.n_layers=32", "--set", "model.n_heads=32", "--set", "data.batch_size=4", "--json")
    assert r.returncode == 1, r.stderr[-2000:]
    p = json.loads(r.stdout, parse_constant=pytest.fail)  # strict JSON: what the refused compile could not tell is null
    assert p["fits"] is False and p["memory"]["total"] > p["memory"]["capacity"] and p["roofline"]["step_s"] is None
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "does not fit" in error[0] and "GiB" in error[0]
    assert any(w in error[0] for w in ("more chips", "remat", "grad_accum", "tensor"))


@pytest.mark.parametrize("args, needle", [
    (("--target", "v9:2x2"), "unknown TPU family"),
    (("--target", "v5p-7"), "v5p-7"),
    (("--target", "v5e:2x2", "--set", "mesh.fsdp=3"), "does not match the 4 devices"),
    (("--target", "v5e:2x2", "--set", "data.batch_size=6"), "not divisible"),
])
def test_plan_cli_bad_input_is_one_line_exit_2(args, needle):
    r = _cli("plan", "experiments/llama_tpu.py", *args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_sweep_plan_tables_every_point_and_writes_plan_json(tmp_path):
    r = _cli("sweep", "experiments/isoflop_cpu.py", "--plan", "v5e:2x2", "--only", "n4_*", "--sweep-dir",
             str(tmp_path / "sw"))
    assert r.returncode == 0, r.stderr[-2000:]
    plan_json = json.loads((tmp_path / "sw" / "plan.json").read_text())
    names = [row["point"] for row in plan_json["points"]]
    assert names and all(n.startswith("n4_") for n in names) and all(row["fits"] for row in plan_json["points"])
    assert plan_json["total_chip_hours"] > 0 and "chip-hours" in r.stdout
    assert not (tmp_path / "sw" / "runs").exists()  # nothing ran


def test_multi_slice_plans_count_collectives_across_slices_as_dcn():
    """Two v5p:2x2x1 slices, data parallel across them: the gradient all-reduce crosses DCN (the per-slice
    program hands it to the Megascale runtime), and the roofline charges it at DCN bandwidth."""
    p = plan(_small(mesh=MeshConfig(data=1, fsdp=4, rules="fsdp")), parse_target("v5p:2x2x1", slices=2))
    assert p.chips == 8 and p.mesh["data"] == 2
    dcn = [c for c in p.collectives if c["network"] == "dcn"]
    assert dcn and all(c["traffic_bytes"] > 0 for c in dcn) and p.roofline["dcn_s"] > 0


def test_matmul_flops_are_counted_as_xla_counts_them():
    """Outside loops the HLO reader's dot/convolution FLOPs equal XLA's own cost_analysis (TPU lowers these
    batched matmuls, and their gradients, to convolutions)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from ar_lm.plan.targets import compile_devices

    mesh = Mesh(np.array(compile_devices(parse_target("v5e:2x2"))), ("d",))
    sh = NamedSharding(mesh, P("d"))
    x = jax.ShapeDtypeStruct((8, 256, 128), jnp.bfloat16, sharding=sh)
    w = jax.ShapeDtypeStruct((4, 128, 512), jnp.bfloat16, sharding=sh)
    scores = lambda q, k: jnp.einsum("bld,bsd->bls", q, k)  # noqa: E731
    for f, args in ((jax.grad(lambda x, w: jnp.sum(x @ w[0]), argnums=(0, 1)), (x, w)), (scores, (x, x))):
        compiled = jax.jit(f).lower(*args).compile()
        ours, xla = HloModule(compiled.as_text()).matmul_flops(), compiled.cost_analysis()["flops"]
        assert ours > 0 and abs(ours - xla) <= 0.01 * xla


def test_sweep_plan_fails_when_a_point_does_not_fit(tmp_path, capsys):
    """A 7B point on v5e:2x2 (the compiler refuses it for HBM): exit 1 with one error line naming the point,
    plan.json written (strict JSON) with the point marked as not fitting."""
    from ar_lm.plan.sweep import plan_points

    big = config_for("7b", seq_len=2048, batch_size=4)
    small = _small(attention="xla")
    assert plan_points([("small", small), ("big", big)], parse_target("v5e:2x2"), None, tmp_path) == 1
    rows = {r["point"]: r for r in json.loads((tmp_path / "plan.json").read_text(), parse_constant=pytest.fail)["points"]}
    assert rows["small"]["fits"] and not rows["big"]["fits"] and rows["big"]["step_ms"] is None
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "big" in error[0] and "does not fit" in error[0]


def test_plan_decode_step_reads_the_cache_sharded(tmp_path):
    """`--decode`: one decode step of batch data.batch_size over a cache of max_seq_len slots; the plan
    counts its weights as the model FLOPs (2N per token) and is HBM-bound, as decoding is."""
    p = plan(_small(attention="xla"), parse_target("v5e:2x2"), decode=True, hlo_dir=tmp_path)
    assert p.fits and p.step == "decode" and (tmp_path / "decode_step.hlo.txt").is_file()
    assert p.flops["compiled"] > 0 and p.roofline["bound"] == "hbm" and p.tokens_per_s_per_chip > 0


def test_remat_policies_trade_temporaries_on_the_tpu_compiler(tmp_path):
    """A 4-layer llama at seq 512 on v5p:2x2x1: saving less for the backward pass needs less HBM
    (none > dots_no_batch > full), and offload moves the saved matmuls to host memory (fewer device
    temporaries than dots_no_batch, host transfers in the HLO). On CPU, offload is refused in one line."""
    from ar_lm.model.backend import resolve_remat

    base = _small(attention="xla", seq=512, batch=16)
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, n_layers=4))
    temps, texts = {}, {}
    for remat in ("none", "dots_no_batch", "full", "offload"):
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, remat=remat))
        p = plan(cfg, parse_target("v5p:2x2x1"), hlo_dir=tmp_path / remat)
        assert p.fits and p.settings["remat"] == remat
        temps[remat] = p.memory["temporaries"]
        texts[remat] = (tmp_path / remat / "train_step.hlo.txt").read_text()
    assert temps["none"] > temps["dots_no_batch"] > temps["full"]
    assert temps["offload"] < temps["dots_no_batch"] and "S(5)" in texts["offload"] and "S(5)" not in texts["none"]
    with pytest.raises(UserError, match="offload"):
        resolve_remat(dataclasses.replace(base.model, remat="offload"))


def test_cross_entropy_over_chunks_cuts_the_logits_memory_on_the_tpu_compiler():
    """Vocab 32,000 at seq 2048, batch 8 on v5e:2x2 (fsdp=4): float32 logits of all positions are 500 MiB per
    chip (and their gradient as much again); in chunks of 512 positions the step's temporaries fall by more than
    half of that (measured 832 -> 491 MiB), and the chunked step moves no more bytes in collectives (the
    weight is gathered once, not once per chunk: measured 548 -> 539 MB)."""
    base = _small(seq=2048, batch=8)
    plans = {}
    for chunk in (0, 512):
        plans[chunk] = plan(dataclasses.replace(base, model=dataclasses.replace(
            base.model, vocab_size=32000, logits_chunk=chunk)), parse_target("v5e:2x2"))
        assert plans[chunk].fits
    logits_per_chip = 8 // 4 * 2048 * 32000 * 4
    assert plans[0].memory["temporaries"] - plans[512].memory["temporaries"] > 0.5 * logits_per_chip
    moved = {c: sum(r["bytes"] for r in p.collectives) for c, p in plans.items()}
    assert moved[512] <= moved[0]
    gathers = {c: sum(r["count"] for r in p.collectives if r["kind"] == "all-gather") for c, p in plans.items()}
    assert gathers[512] <= gathers[0]


_COMPILE_FOR_V5E_AND_V5P = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
for name in ("v5e:2x2", "v5p:2x2x1"):  # newer libtpus refuse some flags on some chips only
    devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    x = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=NamedSharding(Mesh(np.array(devices), ("x",)), P("x")))
    jax.jit(lambda a: (a @ a.T).sum()).lower(x).compile()
print("compiled")
"""


def test_backend_xla_flags_are_accepted_by_libtpu_and_xla_and_the_users_win():
    """Our TPU flags reach libtpu (LIBTPU_INIT_ARGS, read by the compile-only client too: an unknown flag fails
    it) and it accepts them all; our GPU flags are known to this jaxlib's XLA (XLA_FLAGS is parsed on every
    backend: an unknown flag aborts); a flag the user set keeps its value."""
    from ar_lm.parallel.runtime import GPU_XLA_FLAGS, TPU_XLA_FLAGS, merged_flags, set_backend_xla_flags

    env = {k: v for k, v in ENV.items() if k not in ("LIBTPU_INIT_ARGS", "XLA_FLAGS")}
    set_now = set_backend_xla_flags(env)
    assert set(set_now) == {"LIBTPU_INIT_ARGS"} and env["LIBTPU_INIT_ARGS"] == " ".join(TPU_XLA_FLAGS)
    run = lambda code, **extra: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                               env={**env, **extra}, timeout=300)
    ok = run(_COMPILE_FOR_V5E_AND_V5P)
    assert ok.returncode == 0 and "compiled" in ok.stdout, ok.stderr[-2000:]
    bad = run(_COMPILE_FOR_V5E_AND_V5P, LIBTPU_INIT_ARGS=env["LIBTPU_INIT_ARGS"] + " --xla_tpu_no_such_flag=true")
    assert bad.returncode != 0 and "xla_tpu_no_such_flag" in bad.stderr
    gpu = run("import jax.numpy as jnp; print(float(jnp.ones(3).sum()))", XLA_FLAGS=" ".join(GPU_XLA_FLAGS))
    assert gpu.returncode == 0 and gpu.stdout.strip() == "3.0", gpu.stderr[-2000:]
    user = "--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/x"
    merged = merged_flags(user, GPU_XLA_FLAGS)
    assert merged.startswith(user) and merged.count("xla_gpu_enable_triton_gemm") == 1
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in merged


def _moves_qkv(module: HloModule) -> list:
    """Collectives of an array with both a length (512) and a head-dim (32, under 8 heads of d 256) axis: q, k,
    v or attention's output (weights have no length axis; the other activations, the embedding's all-to-all of
    d 256 split over the chips among them, no axis of 32)."""
    return [c for c in module.collectives() if any(512 in a.dims and 32 in a.dims for a in c.shapes)]


def _eight_heads(cfg):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_heads=8))


def test_splash_attention_stays_sharded_under_fsdp_x_tensor_and_its_memory_falls_with_the_chips(tmp_path):
    """On v5e:2x2 as fsdp 2 x tensor 2 the kernel runs per (batch shard, head shard): no collective moves q, k,
    v or attention's output. With a global batch of 16, the step's temporaries per chip on 16 chips (v5e:4x4) are
    under half of those on 4 (measured 111 -> 18 MiB; the attention of a gathered batch would not shrink)."""
    p = plan(_eight_heads(_small(mesh=MeshConfig(data=1, fsdp=2, tensor=2, rules="fsdp_tp"))), parse_target("v5e:2x2"),
             hlo_dir=tmp_path)
    assert p.fits and p.mesh["tensor"] == 2
    assert _moves_qkv(HloModule((tmp_path / "train_step.hlo.txt").read_text())) == []
    temps = {}
    for topology in ("v5e:2x2", "v5e:4x4"):
        p = plan(_eight_heads(_small(batch=16, mesh=MeshConfig(data=1, fsdp=-1, rules="fsdp"))), parse_target(topology),
                 hlo_dir=tmp_path / topology)
        assert _moves_qkv(HloModule((tmp_path / topology / "train_step.hlo.txt").read_text())) == []
        temps[topology] = p.memory["temporaries"]
    assert temps["v5e:4x4"] < 0.5 * temps["v5e:2x2"]
