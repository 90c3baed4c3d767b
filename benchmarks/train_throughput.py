"""Training throughput: ar_lm against a PyTorch reference, measured in the same run.

    python benchmarks/train_throughput.py [--configs nanogpt_cpu,gpt_6l_384,gpt_50m] [--json out.json]
                                          [--peak-flops F] [--cpu-devices N] [--set KEY=VALUE]
                                          [--repeats N] [--no-torch]

For each config: steady-state ms/step, tokens/s, MFU, compile time, time to first step (from a
cold start, and again in a new process with JAX's persistent compilation cache warm) and peak
host memory, for ar_lm (jitted train step, AdamW) and for `transformers`' GPT2LMHeadModel trained
with torch.optim.AdamW (torch threads = cores) on the same shapes and the same random tokens;
then the ratio. Each measurement runs in its own process (clean peak-memory figures).

MFU = flops_per_token * tokens/s / peak, with `ar_lm.model.counts.flops_per_token` (6 x matmul weights
+ causal attention counted once) and the peak either given or measured here by a float32 matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    # nanoGPT's README CPU config (shakespeare_char): 4 layers, 4 heads, width 128, context 64, batch 12
    "nanogpt_cpu": dict(n_layers=4, n_heads=4, d_model=128, seq_len=64, batch=12, vocab=65, steps=40),
    "gpt_6l_384": dict(n_layers=6, n_heads=6, d_model=384, seq_len=256, batch=8, vocab=65, steps=10),
    "gpt_50m": dict(n_layers=8, n_heads=10, d_model=640, seq_len=256, batch=4, vocab=16384, steps=4),
}
WARMUP = 3


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tokens(c, n_batches, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, c["vocab"], (n_batches, c["batch"], c["seq_len"] + 1), dtype=np.int32)


def jax_worker(c: dict, cpu_devices: int, overrides: list[str], first_step_only: bool = False) -> dict:
    t_start = time.perf_counter()
    import jax

    from ar_lm.config import DataConfig, ExperimentConfig, MeshConfig, ModelConfig, OptimConfig, apply_overrides
    from ar_lm.parallel.runtime import configure_cpu_devices, enable_compilation_cache

    cfg = apply_overrides(ExperimentConfig(
        model=ModelConfig(family="gpt2", vocab_size=c["vocab"], d_model=c["d_model"], n_layers=c["n_layers"],
                          n_heads=c["n_heads"], max_seq_len=c["seq_len"]),
        data=DataConfig(seq_len=c["seq_len"], batch_size=c["batch"]),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        mesh=MeshConfig(data=-1, rules="dp", cpu_devices=cpu_devices),
    ), overrides)
    configure_cpu_devices(cfg.mesh, cfg.data.batch_size)  # as `ar-lm train` does (0: auto)
    enable_compilation_cache()  # the directory the parent gave this config (cold, then warm)
    from ar_lm.model.backend import resolve_remat
    from ar_lm.model.counts import flops_per_token, param_counts
    from ar_lm.parallel.mesh import logical_rules, logical_sharding, make_mesh, mesh_context
    from ar_lm.training.optimizer import make_optimizer
    from ar_lm.training.state import init_state, state_shardings
    from ar_lm.training.step import make_train_step

    mesh, rules = make_mesh(cfg.mesh), logical_rules(cfg.mesh)
    tx, schedule = make_optimizer(cfg.optim, 1000)
    shardings = state_shardings(cfg, tx, mesh, rules)
    batch_sh = logical_sharding(mesh, rules, ("batch", "length"))
    step = make_train_step(cfg, tx, schedule, shardings, batch_sh)
    data = _tokens(c, WARMUP + c["steps"])
    with mesh_context(mesh, rules):
        state = init_state(cfg, tx, shardings, jax.random.key(0))
        batches = [jax.device_put(b, batch_sh) for b in data]
        t0 = time.perf_counter()
        compiled = step.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, batches[0])
        jax.block_until_ready(m)
        first_step_s = time.perf_counter() - t_start
        if first_step_only:
            return {"compile_s": compile_s, "time_to_first_step_s": first_step_s}
        for b in batches[1:WARMUP]:
            state, m = compiled(state, b)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for b in batches[WARMUP:]:
            state, m = compiled(state, b)
        jax.block_until_ready(m)
        elapsed = time.perf_counter() - t0
    return {"ms_per_step": 1000 * elapsed / c["steps"], "compile_s": compile_s, "time_to_first_step_s": first_step_s,
            "peak_rss_mb": _peak_rss_mb(), "loss": float(m["loss"]), "devices": jax.device_count(),
            "remat": resolve_remat(cfg.model), "scan_layers": cfg.model.scan_layers,
            "params": param_counts(cfg.model)["total"], "flops_per_token": flops_per_token(cfg.model, c["seq_len"])}


def torch_worker(c: dict) -> dict:
    t_start = time.perf_counter()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=c["vocab"], n_positions=c["seq_len"], n_embd=c["d_model"], n_layer=c["n_layers"], n_head=c["n_heads"],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.from_numpy(_tokens(c, WARMUP + c["steps"])).long()

    def step(batch):
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    step(data[0])
    first_step_s = time.perf_counter() - t_start
    for b in data[1:WARMUP]:
        step(b)
    t0 = time.perf_counter()
    for b in data[WARMUP:]:
        loss = step(b)
    elapsed = time.perf_counter() - t0
    return {"ms_per_step": 1000 * elapsed / c["steps"], "compile_s": 0.0, "time_to_first_step_s": first_step_s,
            "peak_rss_mb": _peak_rss_mb(), "loss": float(loss), "threads": torch.get_num_threads()}


def _run_worker(kind: str, name: str, cpu_devices: int, overrides=(), cache_dir: str = "",
                first_step_only: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--configs", name, "--cpu-devices", str(cpu_devices)]
    cmd += [f"--set={o}" for o in overrides]
    cmd += ["--first-step-only"] if first_step_only else []
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "JAX_COMPILATION_CACHE_DIR": cache_dir,
           "AR_LM_COMPILE_CACHE": "off"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{kind} worker for {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict]) -> dict:
    """The run with the median ms/step (the upper one of an even count), with every run's ms/step."""
    ordered = sorted(runs, key=lambda r: r["ms_per_step"])
    return {**ordered[len(ordered) // 2], "ms_per_step_runs": [round(r["ms_per_step"], 2) for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s of the machine (default: measured)")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="host-platform devices for ar_lm, data parallel (default 0: auto, as `ar-lm train`)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for ar_lm, e.g. model.remat=none (repeatable)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure each side N times, alternating, and report the median run (default 1)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--first-step-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = args.configs.split(",")
    if args.worker:
        c = CONFIGS[names[0]]
        print(json.dumps(jax_worker(c, args.cpu_devices, args.set, args.first_step_only) if args.worker == "jax"
                         else torch_worker(c)))
        return

    from machine import StealMeter

    from ar_lm.training.metrics import measure_matmul_peak

    steal = StealMeter()
    peak = args.peak_flops or measure_matmul_peak(2048)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores", "peak_flops": peak, "overrides": args.set, "repeats": args.repeats, "configs": {}}
    print(f"peak (measured float32 matmul): {peak / 1e9:.0f} GFLOP/s, {os.cpu_count()} cores")
    head = (f"{'config':<12} {'impl':<8} {'ms/step':>9} {'tokens/s':>10} {'MFU':>6} {'compile s':>9} "
            f"{'1st step s':>10} {'warm 1st':>8} {'peak MB':>8} {'loss':>7}")
    print(head)
    print("-" * len(head))
    for name in names:
        c = CONFIGS[name]
        tokens = c["batch"] * c["seq_len"]
        runs = {"jax": [], "torch": []}
        for _ in range(args.repeats):  # alternate the two, so a slow spell of the machine hits both
            with tempfile.TemporaryDirectory() as cache:  # a fresh compilation cache: cold, then warm
                run = _run_worker("jax", name, args.cpu_devices, args.set, cache)
                warm = _run_worker("jax", name, args.cpu_devices, args.set, cache, first_step_only=True)
            runs["jax"].append({**run, "time_to_first_step_warm_s": warm["time_to_first_step_s"],
                                "compile_warm_s": warm["compile_s"]})
            if not args.no_torch:
                runs["torch"].append(_run_worker("torch", name, 1))
        row = {impl: _median_run(rs) for impl, rs in runs.items() if rs}
        fpt = row["jax"]["flops_per_token"]
        for impl, r in row.items():
            r["tokens_per_s"] = tokens / (r["ms_per_step"] / 1000)
            r["mfu"] = r["tokens_per_s"] * fpt / peak
            print(f"{name:<12} {'ar_lm' if impl == 'jax' else 'pytorch':<8} {r['ms_per_step']:>9.1f} "
                  f"{r['tokens_per_s']:>10,.0f} {100 * r['mfu']:>5.1f}% {r['compile_s']:>9.2f} "
                  f"{r['time_to_first_step_s']:>10.2f} {r.get('time_to_first_step_warm_s', float('nan')):>8.2f} "
                  f"{r['peak_rss_mb']:>8.0f} {r['loss']:>7.3f}")
        if "torch" in row:
            row["ratio_tokens_per_s"] = row["jax"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
            print(f"{name:<12} ratio ar_lm / pytorch tokens/s: {row['ratio_tokens_per_s']:.2f}x "
                  f"({row['jax']['params'] / 1e6:.1f}M params; ar_lm on {row['jax']['devices']} host devices, "
                  f"remat={row['jax']['remat']}, scan_layers={row['jax']['scan_layers']})")
        results["configs"][name] = row
    results["cpu_steal_frac"] = steal.frac()
    print(f"CPU time stolen by the hypervisor during the run: {100 * (results['cpu_steal_frac'] or 0):.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
