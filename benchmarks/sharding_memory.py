"""Per-device memory of the train step on an 8-device CPU mesh, per sharding preset and model size.

    python benchmarks/sharding_memory.py [--json out.json]

From `compiled.memory_analysis()` of the jitted train step: parameter bytes and optimizer-state
bytes held per device (from the actual shardings), and the temporaries (activations, gradients)
XLA allocates per device. These are the figures that tell which preset fits a model.
"""

from __future__ import annotations

import argparse
import json

import jax

jax.config.update("jax_num_cpu_devices", 8)


from ar_lm.config import DataConfig, ExperimentConfig, MeshConfig, ModelConfig, OptimConfig  # noqa: E402
from ar_lm.model.counts import param_counts  # noqa: E402
from ar_lm.plan.planner import per_device_bytes  # noqa: E402
from ar_lm.training.step import compile_train_step  # noqa: E402

PRESETS = {
    "dp (data=8)": MeshConfig(data=8, rules="dp"),
    "fsdp (fsdp=8)": MeshConfig(data=1, fsdp=8, rules="fsdp"),
    "fsdp_tp (fsdp=4, tensor=2)": MeshConfig(data=1, fsdp=4, tensor=2, rules="fsdp_tp"),
    "fsdp_tp (data=2, fsdp=2, tensor=2)": MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"),
}
SIZES = {
    "small (d=256, 4 layers)": ModelConfig(family="llama", vocab_size=8192, d_model=256, n_layers=4, n_heads=8, max_seq_len=256),
    "medium (d=512, 8 layers)": ModelConfig(family="llama", vocab_size=8192, d_model=512, n_layers=8, n_heads=8, max_seq_len=256),
    "large (d=1024, 12 layers)": ModelConfig(family="llama", vocab_size=8192, d_model=1024, n_layers=12, n_heads=16, max_seq_len=256),
}


def measure(model: ModelConfig, mesh_cfg: MeshConfig) -> dict:
    cfg = ExperimentConfig(model=model, data=DataConfig(seq_len=256, batch_size=16), optim=OptimConfig(), mesh=mesh_cfg)
    compiled, state = compile_train_step(cfg)
    mem = compiled.memory_analysis()
    return {"params_mb": per_device_bytes(state["params"]) / 2**20,
            "optimizer_mb": per_device_bytes(state["opt_state"]) / 2**20,
            "temporaries_mb": mem.temp_size_in_bytes / 2**20,
            "arguments_mb": mem.argument_size_in_bytes / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {}
    head = f"{'model':<26} {'params':>8} {'preset':<36} {'params MB':>10} {'optim MB':>9} {'temps MB':>9}"
    print("per-device memory of the train step, 8 CPU devices, batch 16 x 256 tokens, float32")
    print(head)
    print("-" * len(head))
    for size_name, model in SIZES.items():
        n = param_counts(model)["total"]
        for preset_name, mesh_cfg in PRESETS.items():
            r = measure(model, mesh_cfg)
            results[f"{size_name} | {preset_name}"] = {"params": n, **r}
            print(f"{size_name:<26} {n / 1e6:>7.1f}M {preset_name:<36} {r['params_mb']:>10.1f} "
                  f"{r['optimizer_mb']:>9.1f} {r['temporaries_mb']:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
