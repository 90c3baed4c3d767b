"""ar_lm: autoregressive language-model scaling experiments in JAX/Flax.

One package per layer of the design, lowest first; a module imports its own package and lower layers
only (tests/test_architecture.py checks it, docs/explanation/design.md explains it):

- base: `config` (frozen config dataclasses), `errors` (user errors, exit statuses), `io` (atomic writes)
- `model` (the transformer and its exact counts) and `data` (sources, tokenizers, datasets, pipelines)
- `parallel` (mesh and logical-axis rules, process start-up, launchers)
- `training` (state, step, loop, checkpoints, evaluation, metrics, run directories)
- `scaling` (sweeps, runner, fits, plots), `decoding` (KV-cache generation), `interop` (Hugging Face)
- `cli` (parses `ar-lm ...` and dispatches to the command functions above)
"""

__version__ = "0.1.0"
