"""Data: text sources, tokenizers, the on-disk dataset format, and grain input pipelines.

`sources` (documents from the standard library or files, split by name hash), `synthetic` (a Markov
source with a known entropy rate), `tokenizers` (lossless sentencepiece, byte, char), `dataset`
(`write_dataset`, `TokenDataset`), `pipeline` (index-based, resumable grain batches), `prepare`
(`ar-lm prepare`). Imports only the base layer (`ar_lm.config`, `ar_lm.errors`, `ar_lm.io`).
"""
