"""The model: a decoder-only transformer (GPT-2 and Llama families) and its exact sizes.

`transformer` (the module, `init_params`, `apply`, the KV cache), `attention` (masks, causal
attention implementations, the cache write), `layers` (norms, RoPE, MLP), `backend` (per-backend
`auto` defaults), `counts` (exact parameter counts and FLOPs). Imports only the base layer
(`ar_lm.config`, `ar_lm.errors`, `ar_lm.io`), jax and flax.
"""
