"""Decoding throughput: ar_lm's KV-cache decoder against the naive recompute loop and `transformers`'
`generate(use_cache=True)` on the same weights, measured in the same run.

    python benchmarks/decode_throughput.py [--batches 1,8,32] [--new-tokens 128,512] [--prompt-len 16]
        [--train-steps 60] [--draft-tokens 4] [--naive-max-batch 8] [--naive-max-new 128]
        [--max-batch-tokens T] [--no-torch] [--json out.json]

Model: nanoGPT's shakespeare-char size (GPT-2 family, 6 layers, 6 heads, width 384, vocab 64), context
1024. Draft: 3 layers, width 272, 4 heads (1/4 of the target's non-embedding parameters). Both are first
trained for a few steps on an order-1 Markov source (`ar_lm.data.synthetic`), so that greedy continuations are
not noise and the draft agrees with the target as a trained pair would; throughput does not depend on it.

Sections (greedy decoding, no EOS, so every row makes exactly N tokens):
1. tokens/s (B * N / wall time) and ms per token (wall time / N: one decoding step of the whole batch),
   prefill included, compile excluded (each program runs once before it is timed):
   - ar_lm: `ar_lm.decoding.generate`, one jitted program (prefill + `lax.scan` over the KV cache);
   - naive: each step a jitted full forward over the sequence so far (padded on the right to a multiple
     of 32, exact by causality, so that XLA compiles one program per 32 positions), argmax of the last
     position; O(N^2), so only up to --naive-max-batch / --naive-max-new;
   - transformers: `GPT2LMHeadModel.generate(do_sample=False, use_cache=True)` on the ar_lm weights
     (`ar_lm.interop.hf_weights.params_to_hf`), torch with 1 thread or all cores, whichever is faster at batch 1 here;
     its greedy tokens are checked equal to ar_lm's.
2. ms per step against position: flat with the cache (every step attends over the same fixed-size
   cache, masked), growing without it.
3. speculative decoding at batch 1 (greedy and T=1 sampling): speedup over plain decoding, acceptance
   rate, tokens per target pass; greedy output checked equal to the target's.
4. int8 weight-only decoding (`ar_lm.model.quantize`, `--quantize int8`): in section 1, the same generate call on
   the quantised target (`int8_s`, the share of its greedy tokens equal to float32's), and the val perplexity of
   the float32 and quantised target on held-out windows of the source (`int8_eval`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from machine import StealMeter

from ar_lm import decoding as D
from ar_lm.config import ExperimentConfig, ModelConfig
from ar_lm.data.synthetic import MarkovSource
from ar_lm.decoding import decoder as DD
from ar_lm.model import counts as MC
from ar_lm.model import quantize as MQ
from ar_lm.model import transformer as M

TARGET = ModelConfig(family="gpt2", vocab_size=64, d_model=384, n_layers=6, n_heads=6, max_seq_len=1024)
DRAFT = ModelConfig(family="gpt2", vocab_size=64, d_model=272, n_layers=3, n_heads=4, max_seq_len=1024)
BUCKET = 32


def train_briefly(cfg: ModelConfig, source: MarkovSource, steps: int, seed: int, batch: int = 8, seq_len: int = 64):
    """AdamW on random windows of the Markov source; returns the params and the last loss."""
    import optax

    from ar_lm.training.step import loss_fn

    exp = ExperimentConfig(model=cfg)
    params = M.init_params_jit(cfg, jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, max(steps // 6, 1), max(steps, 2), 2e-4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.0))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch_BxL1):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch_BxL1, exp)[0])(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    stream = source.sample(steps * batch * (seq_len + 1), seed=seed).reshape(steps, batch, seq_len + 1)
    loss = float("nan")
    for batch_BxL1 in stream:
        params, opt, loss = step(params, opt, batch_BxL1.astype(np.int32))
    return params, float(loss)


def to_hf(cfg: ModelConfig, params):
    """A `transformers` GPT2LMHeadModel with the same weights (mapped by `ar_lm.interop.hf_weights.params_to_hf`), no EOS."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ar_lm.interop.hf_weights import params_to_hf

    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.ff_dim, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=None, pad_token_id=0)).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in params_to_hf(cfg, params).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied to wte
    return hf


def eval_quantised(cfg: ModelConfig, params, source: MarkovSource, windows: int = 16, seq_len: int = 256) -> dict:
    """Val perplexity of the float32 and the int8 model on held-out windows of the source (a seed training did not
    use), and the bytes of both parameter trees."""
    qparams = MQ.quantize_params(cfg, params)
    val = jnp.asarray(source.sample(windows * (seq_len + 1), seed=99).reshape(windows, seq_len + 1), jnp.int32)

    def loss(p):
        logits = M.apply(cfg, p, val[:, :-1])
        return float(jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, val[:, 1:, None], -1)[..., 0]))

    float_loss, int8_loss = loss(params), loss(qparams)
    return {"windows": windows, "seq_len": seq_len, "float_loss": float_loss, "int8_loss": int8_loss,
            "float_ppl": float(np.exp(float_loss)), "int8_ppl": float(np.exp(int8_loss)),
            "ppl_increase": float(np.exp(int8_loss - float_loss) - 1), "float_bytes": MQ.param_bytes(params),
            "int8_bytes": MQ.param_bytes(qparams), "bytes_ratio": MQ.param_bytes(qparams) / MQ.param_bytes(params)}


def timed(fn, repeats: int = 1, warmup=None):
    """Best wall time of `repeats` runs after one untimed run of `warmup` (default: fn) for compilation, caches."""
    out = (warmup or fn)()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def naive_greedy(cfg: ModelConfig, params, prompt_BxP: np.ndarray, n: int) -> np.ndarray:
    """Each step: full forward over the sequence so far (right-padded to a multiple of BUCKET), argmax."""
    b, p = prompt_BxP.shape
    buf = jnp.zeros((b, -(-(p + n) // BUCKET) * BUCKET), jnp.int32).at[:, :p].set(prompt_BxP)
    for t in range(p, p + n):
        buf = _naive_step(cfg, params, buf, jnp.int32(t - 1), length=-(-t // BUCKET) * BUCKET)
    return np.asarray(buf[:, p: p + n])


def _naive_step_impl(cfg, params, buf_BxT, last, length):
    logits_BxLxV = M.apply(cfg, params, buf_BxT[:, :length])
    nxt_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BxLxV, last, axis=1, keepdims=False), axis=-1)
    return jax.lax.dynamic_update_slice(buf_BxT, nxt_B[:, None].astype(jnp.int32), (jnp.int32(0), last + 1))


_naive_step = jax.jit(_naive_step_impl, static_argnums=0, static_argnames="length")


def hf_greedy(hf, prompt_BxP: np.ndarray, n: int) -> np.ndarray:
    import torch

    with torch.inference_mode():
        ids = torch.from_numpy(prompt_BxP.astype(np.int64))
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, use_cache=True)
    return out[:, prompt_BxP.shape[1]:].numpy()


def pick_torch_threads(hf, prompt_1xP: np.ndarray) -> int:
    """The faster of 1 thread and all cores for batch-1 generation (on a shared machine, all cores can be
    many times slower: each op waits for the slowest thread)."""
    import torch

    best = None
    for threads in sorted({1, os.cpu_count()}):
        torch.set_num_threads(threads)
        secs, _ = timed(lambda: hf_greedy(hf, prompt_1xP, 16), repeats=2)
        best = min(best or (secs, threads), (secs, threads))
    torch.set_num_threads(best[1])
    return best[1]


def fmt_row(cols, widths):
    return "  ".join(str(c).rjust(w) for c, w in zip(cols, widths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", default="128,512")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=60,
                    help="training steps for target and draft (0: random weights)")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--naive-max-batch", type=int, default=8)
    ap.add_argument("--naive-max-new", type=int, default=128)
    ap.add_argument("--max-batch-tokens", type=int, default=0,
                    help="skip configs with batch * new tokens above this (0: none)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    new_tokens = [int(x) for x in args.new_tokens.split(",")]
    t_start, steal = time.perf_counter(), StealMeter()
    if not args.no_torch:
        import transformers

        transformers.logging.set_verbosity_error()
    print(f"# devices: {jax.devices()}, cores: {os.cpu_count()}, jax {jax.__version__}", flush=True)

    source = MarkovSource(vocab=TARGET.vocab_size, order=1, branching=2, seed=0)
    t0 = time.perf_counter()
    target, target_loss = train_briefly(TARGET, source, args.train_steps, seed=1)
    draft, draft_loss = train_briefly(DRAFT, source, args.train_steps, seed=2)
    n_target, n_draft = (MC.param_counts(c)["non_embedding"] for c in (TARGET, DRAFT))
    print(f"# trained {args.train_steps} steps in {time.perf_counter() - t0:.1f} s: target loss {target_loss:.3f}, "
          f"draft loss {draft_loss:.3f} (source entropy {source.entropy_rate:.3f} nats); non-embedding params "
          f"target {n_target / 1e6:.2f}M, draft {n_draft / 1e6:.2f}M ({n_draft / n_target:.2f}x)", flush=True)
    hf = None if args.no_torch else to_hf(TARGET, target)
    # the layout the decoder runs (unrolled layers on CPU), converted once as a serving loop would
    int8_eval = eval_quantised(TARGET, target, source)
    print(f"# int8: {int8_eval['bytes_ratio']:.3f} of the float32 parameter bytes; val perplexity "
          f"{int8_eval['float_ppl']:.4f} -> {int8_eval['int8_ppl']:.4f} ({100 * int8_eval['ppl_increase']:+.3f}%)",
          flush=True)
    _, target_int8 = DD.for_decoding(TARGET, MQ.quantize_params(TARGET, target))
    target_cfg, target = DD.for_decoding(TARGET, target)
    draft_cfg, draft = DD.for_decoding(DRAFT, draft)
    prompts = source.sample(max(batches) * args.prompt_len, seed=7).reshape(max(batches), args.prompt_len)
    prompts = prompts.astype(np.int32)
    if hf is not None:
        print(f"# transformers: {pick_torch_threads(hf, prompts[:1])} torch thread(s), the faster of 1 and "
              f"{os.cpu_count()} here", flush=True)
    results = {"throughput": [], "per_step": {}, "speculative": [], "int8_eval": int8_eval}

    # 1. throughput
    widths = (5, 5, 13, 11, 13, 11, 13, 11, 9, 9, 12, 10, 10)
    print("\n## throughput (greedy, tokens/s = batch * new tokens / wall; ms/token = wall / new tokens)")
    print(fmt_row(("batch", "new", "ar_lm tok/s", "ar_lm ms/t", "naive tok/s", "naive ms/t", "hf tok/s", "hf ms/t",
                   "ar/naive", "ar/hf", "int8 tok/s", "int8/ar", "int8/hf"), widths))
    for b in batches:
        for n in new_tokens:
            if args.max_batch_tokens and b * n > args.max_batch_tokens:
                print(fmt_row((b, n, "skipped (--max-batch-tokens)"), widths[:3]))
                continue
            prompt_BxP = prompts[:b]
            rec = {"batch": b, "new_tokens": n}
            secs, out = timed(lambda: D.generate(target_cfg, target, prompt_BxP, n), repeats=2 if b * n <= 4096 else 1)
            rec["ar_lm_s"] = secs
            rec["int8_s"], out8 = timed(lambda: D.generate(target_cfg, target_int8, prompt_BxP, n),
                                        repeats=2 if b * n <= 4096 else 1)
            rec["int8_equal_frac"] = float(np.mean(out8.tokens == out.tokens))
            if b <= args.naive_max_batch and n <= args.naive_max_new:
                rec["naive_s"], naive = timed(lambda: naive_greedy(target_cfg, target, prompt_BxP, n))
                rec["naive_equal"] = bool(np.array_equal(naive, out.tokens))
            if hf is not None:
                rec["hf_s"], hf_tokens = timed(lambda: hf_greedy(hf, prompt_BxP, n), repeats=2 if b * n <= 1024 else 1,
                                               warmup=lambda: hf_greedy(hf, prompt_BxP, 2))
                rec["hf_equal"] = bool(np.array_equal(hf_tokens, out.tokens))
            results["throughput"].append(rec)

            def cols(key):
                s = rec.get(key)
                return ("-", "-") if s is None else (f"{b * n / s:.0f}", f"{1000 * s / n:.2f}")

            ratio = lambda key: f"{rec[key] / rec['ar_lm_s']:.1f}x" if key in rec else "-"  # noqa: E731
            int8 = (f"{b * n / rec['int8_s']:.0f}", f"{rec['ar_lm_s'] / rec['int8_s']:.2f}x",
                    f"{rec['hf_s'] / rec['int8_s']:.2f}x" if "hf_s" in rec else "-")
            print(fmt_row((b, n, *cols("ar_lm_s"), *cols("naive_s"), *cols("hf_s"), ratio("naive_s"), ratio("hf_s"),
                           *int8), widths), flush=True)
    checks = {k: all(r[k] for r in results["throughput"] if k in r) for k in ("naive_equal", "hf_equal")}
    print(f"# same greedy tokens as ar_lm: naive {checks['naive_equal']}, transformers {checks['hf_equal']}")

    # 2. per-step time against position (batch 1)
    n_max, p = max(new_tokens), args.prompt_len
    steps = -(-(n_max - 1) // BUCKET) * BUCKET
    prompt_1xP, lens_1 = DD.prepare_prompts(TARGET, prompts[:1], n_max)
    state, _, _ = DD.start_jit(target_cfg, target, prompt_1xP, lens_1, D.GREEDY, np.uint32(0), cache_len=p + steps,
                               eos_id=None)
    cached = {}
    for start in range(0, steps, BUCKET):
        t0 = time.perf_counter()
        state, toks, _ = DD.decode_chunk_jit(target_cfg, target, state, D.GREEDY, n_steps=BUCKET, eos_id=None, pad_id=0)
        jax.block_until_ready(toks)
        if start:  # the first chunk compiles
            cached[p + start] = 1000 * (time.perf_counter() - t0) / BUCKET
    naive_ms = {}
    buf = jnp.zeros((1, -(-(p + n_max) // BUCKET) * BUCKET), jnp.int32)
    for pos in sorted({64, 128, 256, 512, p + n_max - 1} & set(range(p, p + n_max))):
        length = -(-(pos + 1) // BUCKET) * BUCKET
        secs, _ = timed(lambda: jax.block_until_ready(_naive_step(target_cfg, target, buf, jnp.int32(pos),
                                                                  length=length)), repeats=3)
        naive_ms[pos] = 1000 * secs
    results["per_step"] = {"cached_ms": cached, "naive_ms": naive_ms}
    print("\n## ms per step against position (batch 1)")
    print("position      " + "  ".join(f"{q:>6d}" for q in naive_ms))
    nearest = lambda q: cached[min(cached, key=lambda c: abs(c - q))]  # noqa: E731
    print("ar_lm cached  " + "  ".join(f"{nearest(q):6.2f}" for q in naive_ms))
    print("naive         " + "  ".join(f"{naive_ms[q]:6.2f}" for q in naive_ms))
    print(f"# cached: min {min(cached.values()):.2f} / max {max(cached.values()):.2f} ms over positions "
          f"{min(cached)}..{max(cached)}", flush=True)

    # 3. speculative decoding, batch 1
    print(f"\n## speculative decoding (batch 1, draft {n_draft / n_target:.2f}x the target's non-embedding "
          f"parameters, k = {args.draft_tokens})")
    widths = (8, 5, 12, 12, 9, 11, 12, 7)
    print(fmt_row(("mode", "new", "plain tok/s", "spec tok/s", "speedup", "acceptance", "tok/target", "equal"), widths))
    for mode, sampling in (("greedy", D.GREEDY), ("T=1", D.Sampling.create(temperature=1.0))):
        for n in new_tokens:
            plain_s, plain = timed(lambda: D.generate(target_cfg, target, prompts[:1], n, sampling, seed=3), repeats=2)
            spec_s, spec = timed(lambda: D.speculative_generate(
                target_cfg, target, draft_cfg, draft, prompts[:1], n, sampling, draft_tokens=args.draft_tokens, seed=3),
                repeats=2)
            rec = {"mode": mode, "new_tokens": n, "plain_s": plain_s, "spec_s": spec_s,
                   "acceptance_rate": spec.acceptance_rate, "tokens_per_target_pass": n / spec.target_passes,
                   "equal": bool(np.array_equal(plain.tokens, spec.tokens)) if mode == "greedy" else None}
            results["speculative"].append(rec)
            print(fmt_row((mode, n, f"{n / plain_s:.0f}", f"{n / spec_s:.0f}", f"{plain_s / spec_s:.2f}x",
                           f"{spec.acceptance_rate:.3f}", f"{n / spec.target_passes:.2f}",
                           "-" if rec["equal"] is None else rec["equal"]), widths), flush=True)

    b1 = [r for r in results["throughput"] if r["batch"] == 1 and "hf_s" in r]
    if b1:
        print("\n# ar_lm / transformers tokens/s at batch 1: "
              + ", ".join(f"{r['hf_s'] / r['ar_lm_s']:.1f}x ({r['new_tokens']} new)" for r in b1))
        print("# int8 / float32 ar_lm, int8 / transformers at batch 1: "
              + ", ".join(f"{r['ar_lm_s'] / r['int8_s']:.2f}x, {r['hf_s'] / r['int8_s']:.2f}x ({r['new_tokens']} new)"
                          for r in b1))
    results["cpu_steal_frac"] = steal.frac()
    print(f"# total {time.perf_counter() - t_start:.0f} s; CPU time stolen by the hypervisor: "
          f"{100 * (results['cpu_steal_frac'] or 0):.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": dataclasses.asdict(TARGET), "draft": dataclasses.asdict(DRAFT), **results}, f,
                      indent=1)


if __name__ == "__main__":
    sys.exit(main())
