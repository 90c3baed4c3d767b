"""Data: text sources, tokenizers, the on-disk dataset format, and grain input pipelines.

`sources` (documents from the standard library or files, streamed), `synthetic` (a Markov source with a
known entropy rate), `tokenizers` (lossless sentencepiece, byte, char), `writer` (`write_dataset`:
streaming, explicit or hashed splits), `dataset` (`TokenDataset`), `pipeline` (index-based, resumable grain batches), `prepare`
(`ar-lm prepare`). Imports only the base layer (`ar_lm.config`, `ar_lm.errors`, `ar_lm.io`).
"""
