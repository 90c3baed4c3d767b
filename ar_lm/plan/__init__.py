"""Planning runs for TPU topologies ahead of time, with the TPU compiler (libtpu) on any machine.

`targets` (chip figures with their sources, topology and accelerator-type names, compile-only devices),
`hlo` (the compiled per-device HLO read for FLOPs, HBM traffic and collectives, loop bodies weighted by their
trip counts), `planner` (`plan`: memory, FLOPs, collectives, roofline, MFU ceiling of one config), `command`
(`ar-lm plan`), `sweep` (`ar-lm sweep --plan`: every point). Imports the base layer, `ar_lm.model`,
`ar_lm.data`, `ar_lm.parallel`, `ar_lm.training` and `ar_lm.decoding` (the steps it compiles); `ar_lm.scaling`
imports it.
"""
