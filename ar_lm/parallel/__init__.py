"""Parallelism: the device mesh and logical-axis rules, process start-up, and launchers.

`mesh` (mesh axes data/fsdp/tensor, rule presets, shardings, `mesh_context`), `runtime`
(`jax.distributed` start-up, host CPU devices, the persistent compilation cache), `launch`
(`ar-lm launch` on N local processes, a TPU pod or Slurm). Imports the base layer, `ar_lm.model`
and `ar_lm.data`; nothing above.
"""
