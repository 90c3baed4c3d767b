"""Interop with Hugging Face `transformers` checkpoints (GPT-2 and Llama), as safetensors.

`hf_config` (config.json <-> ModelConfig), `hf_weights` (state dict <-> parameters), `hf`
(`ar-lm import-hf` / `ar-lm export-hf`). Imports the base layer, `ar_lm.model`, `ar_lm.data`,
`ar_lm.parallel` and `ar_lm.training`; never torch or transformers.
"""
