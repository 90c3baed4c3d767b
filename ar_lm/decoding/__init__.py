"""Decoding: sampling, KV-cache generation, beam search, speculative decoding, streaming, `ar-lm generate`.

`sampling` (the `Sampling` filters), `generate` (prefill + scan/while decoding; `generate_sliding` past the
context), `media` (images and audio out of a run), `beam` (beam search),
`speculative` (draft and verify), `streaming` (chunked decoding that yields tokens), `command`
(`ar-lm generate`), `scoring` (batched teacher-forced scoring), `harness` and `harness_command` (the
lm-evaluation-harness adapter and `ar-lm lm-eval`; they need the extra `ar_lm[eval]`). Imports the base
layer, `ar_lm.model`, `ar_lm.data` (tokenizers), `ar_lm.parallel` (meshes) and `ar_lm.training` (run
directories and checkpoints).

The Python API: ``from ar_lm.decoding import generate, beam_search, speculative_generate, stream, Sampling``;
``quantize_params`` (int8 weight-only, from `ar_lm.model.quantize`) turns params into ones any of them decode.
"""

from ar_lm.decoding.beam import BeamResult, beam_search
from ar_lm.decoding.decoder import Generation, generate, generate_sliding
from ar_lm.decoding.sampling import GREEDY, Sampling
from ar_lm.decoding.speculative import speculative_generate
from ar_lm.decoding.streaming import stream
from ar_lm.model.quantize import quantize_params

__all__ = ["BeamResult", "GREEDY", "Generation", "Sampling", "beam_search", "generate", "generate_sliding",
           "quantize_params", "speculative_generate", "stream"]
