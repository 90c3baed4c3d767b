"""A run directory as an lm-evaluation-harness model (Gao et al., `lm_eval.api.model.TemplateLM`).

Tokenization is lm-eval's causal one (`TemplateLM._encode_pair`): trailing spaces of the context move to
the continuation, context + continuation is encoded whole, and the continuation is what follows the
context's own tokens (byte and char tokenizers make that split exact). Every context starts a document:
after the run's begin-of-document token (an imported Llama's `bos_id`, else EOS), as in `ar-lm
generate`; an empty context is that token alone.

- `loglikelihood`: (sum of continuation log-probs, greedy) from `scoring.score`, left-truncated to the
  model's context.
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows (`get_rolling_token_windows` with
  context_len 1, `make_disjoint_window`): the first window predicts max_seq_len tokens after the prefix
  token, each later one the next ones with the full context before them; every token is scored once.
- `generate_until`: `decoder.generate` (KV cache), greedy unless `do_sample` with temperature > 0;
  the text is cut at EOS and at the first `until` string. A request gets N = min(max_gen_toks,
  max_seq_len - min(prompt, max_seq_len // 2)) new tokens, so at least half the context stays prompt
  (its oldest tokens go); all N are generated, stop strings are found in the text afterwards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ar_lm.decoding.command import load_run
from ar_lm.decoding.decoder import for_decoding, generate
from ar_lm.decoding.sampling import GREEDY, Sampling
from ar_lm.decoding.scoring import bucket_len, score
from ar_lm.errors import require
from ar_lm.parallel.mesh import inference_mesh, logical_rules, logical_sharding, make_mesh, mesh_context
from ar_lm.training import rundir
from ar_lm.training.checkpoint import restore_latest_params

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "min_p")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default


class RunLM(TemplateLM):
    """The latest checkpoint of `run_dir`, batch_size rows per forward pass (data parallel over the
    devices here that divide it, the run's tensor parallelism when there are enough)."""

    def __init__(self, run_dir: str | Path, batch_size: int = 16):
        super().__init__()
        require(int(batch_size) >= 1, f"--batch-size must be >= 1, got {batch_size}")
        self.run_dir, self.batch_size = Path(run_dir).absolute(), int(batch_size)
        run = load_run(self.run_dir)  # config and tokenizer, checked before restoring anything
        require(run.tokenizer is not None, f"run {self.run_dir} has no text tokenizer (an imported model's "
                                           "tokenizer ar_lm does not read): lm-eval needs one")
        cfg = rundir.load_run_config(self.run_dir)
        mesh_cfg = inference_mesh(cfg.mesh, self.batch_size)
        self.mesh, self.rules = make_mesh(mesh_cfg), logical_rules(mesh_cfg)
        self.step, params = restore_latest_params(self.run_dir, cfg, self.mesh, self.rules)
        with mesh_context(self.mesh, self.rules):
            self.cfg, self.params = for_decoding(run.cfg, params)
        self.tok, self.eos_id = run.tokenizer, run.tokenizer.eos_id
        self.bos_id = int(run.tokenizer_meta.get("bos_id", self.eos_id))
        self.sharding = logical_sharding(self.mesh, self.rules, ("batch", "length"))

    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.bos_id

    @property
    def max_length(self) -> int:
        return self.cfg.max_seq_len

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """The string's ids, after the begin-of-document token unless add_special_tokens is False."""
        return ([] if add_special_tokens is False else [self.bos_id]) + list(self.tok.encode(string))

    def tok_decode(self, ids) -> str:
        return self.tok.decode([int(t) for t in ids if int(t) != self.eos_id])

    def score_rows(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """`scoring.score` of (tokens, continuation length) rows on this run's mesh."""
        with mesh_context(self.mesh, self.rules):
            return score(self.cfg, self.params, rows, self.batch_size, self.sharding)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        logprob_R, greedy_R = self.score_rows([(ctx + cont, len(cont)) for _, ctx, cont in requests])
        out = [(float(lp), bool(g)) for lp, g in zip(logprob_R, greedy_R)]
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, self.bos_id, self.max_length, 1)):
                rows.append((ctx + cont, len(cont)))
                owner.append(r)
        logprob_R, _ = self.score_rows(rows) if rows else (np.zeros(0), None)
        total = np.zeros(len(requests), np.float64)
        np.add.at(total, np.asarray(owner, np.int64), logprob_R)
        for req, value in zip(requests, total):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), float(value))
        return [float(v) for v in total]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[tuple[int, list[int], list[str]]]] = {}
        for r, req in enumerate(requests):
            context, gen_kwargs = req.args
            n, sampling, until = self._generation_budget(dict(gen_kwargs or {}))
            prompt = self.tok_encode(context)
            n = min(n, self.max_length - min(len(prompt), self.max_length // 2))
            groups.setdefault((n, sampling), []).append((r, prompt[-(self.max_length - n):], until))
        out = [""] * len(requests)
        for (n, sampling), items in groups.items():
            items.sort(key=lambda item: -len(item[1]))
            for start in range(0, len(items), self.batch_size):
                batch = items[start:start + self.batch_size]
                prompts = [p for _, p, _ in batch] + [[self.bos_id]] * (self.batch_size - len(batch))
                with mesh_context(self.mesh, self.rules):
                    res = generate(self.cfg, self.params, prompts, n, sampling.create(), seed=start,
                                   eos_id=self.eos_id, pad_to=bucket_len(len(prompts[0]), self.max_length - n))
                for b, (r, _, until) in enumerate(batch):
                    out[r] = cut_at(self.tok_decode(res.tokens[b, :res.lengths[b]]), until)
                    self.cache_hook.add_partial("generate_until", requests[r].args, out[r])
        return out

    def _generation_budget(self, kwargs: dict) -> tuple[int, SamplingSpec, list[str]]:
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        require(not unknown, f"generation_kwargs {unknown} are not supported by ar_lm's decoder: use only "
                             f"{', '.join(GEN_KWARGS)}")
        until = kwargs.get("until", [])
        until = [until] if isinstance(until, str) else list(until)
        n = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        require(n >= 1, f"max_gen_toks must be >= 1, got {n}")
        temperature = float(kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0))
        if not kwargs.get("do_sample") or temperature == 0:
            return n, SamplingSpec(), until
        top_k = kwargs.get("top_k")
        return n, SamplingSpec(temperature, None if top_k is None else int(top_k), float(kwargs.get("top_p", 1.0)),
                               float(kwargs.get("min_p", 0.0))), until


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How a group of requests samples (hashable: it groups them); greedy by default."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    min_p: float = 0.0

    def create(self) -> Sampling:
        return GREEDY if self.temperature == 0 else Sampling.create(self.temperature, self.top_k, self.top_p,
                                                                    self.min_p)


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cuts = [text.find(s) for s in until if s]
    return text[:min([c for c in cuts if c >= 0], default=len(text))]
