"""Decoding: exact against the naive loop and teacher forcing, ragged batches, EOS, samplers (by
chi-square tests), beam search against brute force, speculative decoding, no recompilation, sharding,
`ar-lm generate`, and one-line errors on bad input."""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ar_lm import decoding as D
from ar_lm.cli import main
from ar_lm.config import ExperimentConfig, MeshConfig, ModelConfig
from ar_lm.decoding import decoder as DD
from ar_lm.decoding import sampling as DS
from ar_lm.errors import UserError
from ar_lm.model import transformer as M

# init_std 0.3: logits with clear margins, so argmax comparisons are not decided by rounding
CFGS = {
    "gpt2": ModelConfig(family="gpt2", vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=24, init_std=0.3),
    "llama_gqa": ModelConfig(family="llama", vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             max_seq_len=24, tie_embeddings=False, init_std=0.3),
}
DRAFT = ModelConfig(family="llama", vocab_size=61, d_model=16, n_layers=1, n_heads=2, max_seq_len=24, init_std=0.3)
TINY = ModelConfig(family="llama", vocab_size=6, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, init_std=0.5)
TINY_DRAFT = ModelConfig(family="gpt2", vocab_size=6, d_model=16, n_layers=1, n_heads=2, max_seq_len=8, init_std=0.5)
PROMPTS = [[5, 17, 3, 40, 8, 22], [9, 1], [30, 2, 14, 7]]  # ragged: left-padded into one batch
N = 10


@functools.lru_cache(maxsize=None)
def params_of(cfg, seed=0):
    return M.init_params_jit(cfg, jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0)
def full_logits(cfg, params, tokens_BxL):
    return M.apply(cfg, params, tokens_BxL)


def naive_greedy(cfg, params, prompt, n):
    """Re-run the full model on the growing sequence and take the argmax at the last position (the
    sequence sits in a fixed-length buffer, harmless by causality, so that XLA compiles once)."""
    seq = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, cfg.max_seq_len), np.int32)
        buf[0, : len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(full_logits(cfg, params, buf))[0, len(seq) - 1])))
    return seq[len(prompt):]


def teacher_forced_logprobs(cfg, params, prompt, generated):
    buf = np.zeros((1, cfg.max_seq_len), np.int32)
    seq = list(prompt) + list(generated)
    buf[0, : len(seq)] = seq
    logp = np_log_softmax(np.asarray(full_logits(cfg, params, buf))[0])
    return np.array([logp[len(prompt) - 1 + i, t] for i, t in enumerate(generated)])


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_sampling_probs(logits_V, temperature, top_k=None, top_p=1.0, min_p=0.0):
    """Reference for the composed filters: each acts on the renormalised result of the previous one."""
    p = np.exp((logits_V - logits_V.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if top_k is not None:
        p[order[top_k:]] = 0
        p /= p.sum()
    if top_p < 1:
        cut = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
        p[order[cut:]] = 0
        p /= p.sum()
    if min_p > 0:
        p[p < min_p * p.max()] = 0
        p /= p.sum()
    return p


def chi_square_pvalue(counts, probs):
    """Pearson chi-square of counts against probs; cells expecting < 5 are pooled; no mass off the support."""
    counts, probs = np.asarray(counts, float).ravel(), np.asarray(probs, float).ravel()
    expected = probs / probs.sum() * counts.sum()
    assert np.all(counts[expected == 0] == 0), "samples outside the distribution's support"
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    if expected[~big].sum() > 0:
        obs.append(counts[~big].sum())
        exp.append(expected[~big].sum())
    return stats.chisquare(obs, exp).pvalue


def two_token_probs(cfg, params, prompt, **sampling):
    """Exact joint distribution of the first two sampled tokens: P(t1) P(t2 | t1) under the filters."""
    v = cfg.vocab_size
    seqs = np.array([list(prompt) + [t] for t in range(v)], np.int32)
    logits = np.asarray(full_logits(cfg, params, seqs))
    p1 = np_sampling_probs(logits[0, len(prompt) - 1], **sampling)
    return np.stack([p1[t] * np_sampling_probs(logits[t, len(prompt)], **sampling) for t in range(v)])


class CompileCounter:
    """Counts XLA backend compilations while active."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def _on_event(self, name, _secs, **_):
        self.count += name == "/jax/core/compile/backend_compile_duration"

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on_event)


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_greedy_with_cache_equals_naive_loop_and_logprobs_equal_teacher_forcing(name):
    cfg = CFGS[name]
    params = params_of(cfg)
    out = D.generate(cfg, params, PROMPTS, N)
    assert out.tokens.shape == (len(PROMPTS), N) and np.all(out.lengths == N)
    for row, prompt in enumerate(PROMPTS):
        assert out.tokens[row].tolist() == naive_greedy(cfg, params, prompt, N), f"row {row}"
        np.testing.assert_allclose(out.logprobs[row], teacher_forced_logprobs(cfg, params, prompt, out.tokens[row]),
                                   atol=1e-4)


def test_ragged_batch_equals_each_prompt_alone():
    cfg = CFGS["llama_gqa"]
    params = params_of(cfg)
    batch = D.generate(cfg, params, PROMPTS, N)
    alone = D.generate(cfg, params, [PROMPTS[1]], N)  # the row with the most left padding in the batch
    np.testing.assert_array_equal(batch.tokens[1], alone.tokens[0])
    np.testing.assert_allclose(batch.logprobs[1], alone.logprobs[0], atol=1e-5)


def test_eos_rows_stop_and_are_padded_in_every_decoder():
    cfg = CFGS["llama_gqa"]
    params = params_of(cfg)
    free = D.generate(cfg, params, PROMPTS, N).tokens
    # an EOS that row 0 emits first at step `stop` (> 0)
    stop = next(i for i in range(1, N) if free[0, i] not in free[0, :i])
    eos = int(free[0, stop])
    outs = {  # pad_id 0 (default: eos)
        "while": D.generate(cfg, params, PROMPTS, N, eos_id=eos, pad_id=0, loop="while"),
        "speculative": D.speculative_generate(cfg, params, DRAFT, params_of(DRAFT, 1), PROMPTS, N, draft_tokens=3,
                                              eos_id=eos, pad_id=0),
    }
    for kind, out in outs.items():
        for row in range(len(PROMPTS)):
            hits = np.flatnonzero(free[row] == eos)
            length = hits[0] + 1 if hits.size else N
            assert out.lengths[row] == length, (kind, row)
            assert out.tokens[row, :length].tolist() == free[row, :length].tolist(), (kind, row)
            assert np.all(out.tokens[row, length:] == 0), (kind, row)
            assert np.all(out.logprobs[row, length:] == 0), (kind, row)
        assert out.lengths[0] == stop + 1
    np.testing.assert_allclose(outs["while"].logprobs, outs["speculative"].logprobs, atol=1e-4)


def test_stream_in_chunks_equals_one_program():
    cfg = CFGS["gpt2"]
    params = params_of(cfg)
    sampling = D.Sampling.create(temperature=1.0, top_k=20)
    whole = D.generate(cfg, params, [PROMPTS[0]], N, sampling, seed=5)
    parts = list(D.stream(cfg, params, PROMPTS[0], N, sampling, seed=5, chunk=4))
    assert [len(t) for t, _ in parts] == [1, 4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([t for t, _ in parts]), whole.tokens[0])
    np.testing.assert_allclose(np.concatenate([lp for _, lp in parts]), whole.logprobs[0], atol=1e-5)
    with CompileCounter() as compiles:  # the same two programs (prefill, chunk) serve every call
        list(D.stream(cfg, params, PROMPTS[0][::-1], N, D.Sampling.create(temperature=0.5, top_k=3), seed=6, chunk=4))
    assert compiles.count == 0


def test_second_call_with_same_shapes_does_not_recompile():
    cfg = CFGS["gpt2"]
    params = params_of(cfg)
    first = D.generate(cfg, params, PROMPTS, N, D.Sampling.create(temperature=0.9, top_p=0.9), seed=0)
    other_prompts = [[t + 1 for t in p] for p in PROMPTS]  # same lengths
    with CompileCounter() as compiles:
        second = D.generate(cfg, params, other_prompts, N, D.Sampling.create(temperature=0.5, top_p=0.7), seed=1)
    assert compiles.count == 0
    assert not np.array_equal(first.tokens, second.tokens)


# ---------------------------------------------------------------------------------------------
# Samplers


def test_filters_never_leave_their_support():
    logits = jax.random.normal(jax.random.key(0), (2048, 40)) * 2.0
    np_logits = np.asarray(logits)
    sample = jax.jit(DS.sample_logits)
    for settings in [dict(top_k=4), dict(top_p=0.7), dict(min_p=0.3), dict(temperature=0.8, top_k=10, top_p=0.5)]:
        s = D.Sampling.create(**settings)
        tokens = np.asarray(sample(jax.random.key(1), logits, s))
        ref = {"temperature": 1.0, **settings}
        support = np.stack([np_sampling_probs(row, **ref) > 0 for row in np_logits])
        assert support[np.arange(len(tokens)), tokens].all(), settings
        assert support.sum(1).max() > 1 and len(set(tokens.tolist())) > 1, settings  # not degenerate
    top4 = np.argsort(-np_logits, axis=1)[:, :4]
    tokens = np.asarray(sample(jax.random.key(2), logits, D.Sampling.create(top_k=4)))
    assert all(t in top for t, top in zip(tokens, top4))


def test_composed_filters_sample_the_reference_distribution():
    logits_V = np.asarray(jax.random.normal(jax.random.key(3), (12,))) * 1.5
    settings = dict(temperature=0.7, top_k=6, top_p=0.8)
    s = D.Sampling.create(**settings)
    tokens = jax.jit(DS.sample_logits)(jax.random.key(4), jnp.broadcast_to(logits_V, (20000, 12)), s)
    counts = np.bincount(np.asarray(tokens), minlength=12)
    assert chi_square_pvalue(counts, np_sampling_probs(logits_V, **settings)) > 1e-3


def test_temperature_to_zero_equals_greedy():
    cfg = CFGS["gpt2"]
    params = params_of(cfg)
    greedy = D.generate(cfg, params, PROMPTS, N)
    cold = D.generate(cfg, params, PROMPTS, N, D.Sampling.create(temperature=1e-5, top_p=0.9), seed=7)
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)


def test_sampled_tokens_follow_softmax_over_temperature():
    params = params_of(TINY)
    prompt, n_samples, temperature = [1, 2, 3], 4000, 0.7
    out = D.generate(TINY, params, [prompt] * n_samples, 2, D.Sampling.create(temperature=temperature), seed=11)
    counts = np.zeros((TINY.vocab_size,) * 2)
    np.add.at(counts, (out.tokens[:, 0], out.tokens[:, 1]), 1)
    assert chi_square_pvalue(counts, two_token_probs(TINY, params, prompt, temperature=temperature)) > 1e-3
    # log-probs are the model's own (temperature 1, unfiltered): teacher forcing of the sampled sequence
    for row in range(3):
        np.testing.assert_allclose(out.logprobs[row], teacher_forced_logprobs(TINY, params, prompt, out.tokens[row]),
                                   atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Beam search


def test_beam_search_with_one_beam_equals_greedy():
    cfg = CFGS["gpt2"]
    params = params_of(cfg)
    beam = D.beam_search(cfg, params, PROMPTS, N, beams=1, length_penalty_alpha=0.6)
    greedy = D.generate(cfg, params, PROMPTS, N)
    np.testing.assert_array_equal(beam.sequences[:, 0], greedy.tokens)
    np.testing.assert_allclose(beam.logprobs[:, 0], greedy.logprobs, atol=1e-5)


def test_beam_search_finds_the_brute_force_best():
    params = params_of(TINY)
    v, n, eos, alpha = TINY.vocab_size, 3, 0, 1.0
    prompts = [[1, 2, 3], [4, 5, 1]]
    beams = v ** (n - 1)  # enough to keep every live prefix: the search is exact
    res = D.beam_search(TINY, params, prompts, n, beams, length_penalty_alpha=alpha, eos_id=eos)
    for row, prompt in enumerate(prompts):
        hyps = {}
        seqs = np.array([prompt + list(s) for s in itertools.product(range(v), repeat=n)], np.int32)
        logp = np_log_softmax(np.asarray(full_logits(TINY, params, seqs)))
        for seq, lp in zip(seqs, logp):
            gen = seq[len(prompt):].tolist()
            length = gen.index(eos) + 1 if eos in gen else n
            total = sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(gen[:length]))
            hyps[tuple(gen[:length])] = total / ((5 + length) / 6) ** alpha
        best = sorted(hyps.items(), key=lambda kv: -kv[1])[:beams]
        assert res.sequences[row, 0, : res.lengths[row, 0]].tolist() == list(best[0][0])
        np.testing.assert_allclose(res.scores[row], [score for _, score in best], atol=1e-4)
        for i in range(beams):  # every score is log p / lp(length) of its own sequence
            length = res.lengths[row, i]
            assert np.all(res.sequences[row, i, length:] == eos)
            np.testing.assert_allclose(res.logprobs[row, i, :length].sum() / ((5 + length) / 6) ** alpha,
                                       res.scores[row, i], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Speculative decoding


def test_speculative_greedy_equals_target_greedy():
    cfg = CFGS["llama_gqa"]
    params = params_of(cfg)
    target = D.generate(cfg, params, PROMPTS, N)
    spec = D.speculative_generate(cfg, params, DRAFT, params_of(DRAFT, 1), PROMPTS, N, draft_tokens=3)
    np.testing.assert_array_equal(spec.tokens, target.tokens)
    np.testing.assert_allclose(spec.logprobs, target.logprobs, atol=1e-4)
    assert 0 <= spec.acceptance_rate <= 1 and spec.target_passes <= N
    with CompileCounter() as compiles:
        D.speculative_generate(cfg, params, DRAFT, params_of(DRAFT, 1), PROMPTS[::-1], N, draft_tokens=3)
    assert compiles.count == 0
    # alone, a row gets the tokens it gets in the batch (its cache slot is the batch's slot)
    for row, prompt in enumerate(PROMPTS[:2]):
        one = D.speculative_generate(cfg, params, DRAFT, params_of(DRAFT, 1), [prompt], N, draft_tokens=3)
        np.testing.assert_array_equal(one.tokens[0], target.tokens[row])
        np.testing.assert_allclose(one.logprobs[0], target.logprobs[row], atol=1e-4)


def test_speculative_sampling_follows_the_target_distribution():
    target, draft = params_of(TINY), params_of(TINY_DRAFT, 1)
    prompt, n_samples = [1, 2, 3], 4000
    settings = dict(temperature=0.9, top_k=4)
    out = D.speculative_generate(TINY, target, TINY_DRAFT, draft, [prompt] * n_samples, 2,
                                 D.Sampling.create(**settings), draft_tokens=2, seed=3)
    assert 0.05 < out.acceptance_rate < 0.95  # both acceptance and rejection are exercised
    counts = np.zeros((TINY.vocab_size,) * 2)
    np.add.at(counts, (out.tokens[:, 0], out.tokens[:, 1]), 1)
    assert chi_square_pvalue(counts, two_token_probs(TINY, target, prompt, **settings)) > 1e-3


# ---------------------------------------------------------------------------------------------
# Sharding


def test_sharded_decode_matches_single_device():
    from ar_lm.parallel.mesh import logical_rules, make_mesh, mesh_context
    from ar_lm.training.state import param_shardings

    cfg = CFGS["llama_gqa"]
    params = params_of(cfg)
    prompts = PROMPTS + [[11, 12, 13]]  # single-device reference: rows 0-2 as in PROMPTS, row 3 by the naive loop
    single = D.generate(cfg, params, PROMPTS, N)
    mesh_cfg = MeshConfig(data=2, tensor=2, devices=4)
    mesh, rules = make_mesh(mesh_cfg), logical_rules(mesh_cfg)
    sharded_params = jax.device_put(params, param_shardings(ExperimentConfig(model=cfg, mesh=mesh_cfg), mesh, rules))
    with mesh_context(mesh, rules):
        sharded = D.generate(cfg, sharded_params, prompts, N)
        prompt_BxP, lens_B = DD.prepare_prompts(cfg, prompts, N)
        state, _, _ = DD.start_jit(cfg, sharded_params, prompt_BxP, lens_B, D.GREEDY, np.uint32(0), cache_len=16,
                                   eos_id=None)
    np.testing.assert_array_equal(sharded.tokens[:3], single.tokens)
    np.testing.assert_allclose(sharded.logprobs[:3], single.logprobs, atol=1e-4)
    assert sharded.tokens[3].tolist() == naive_greedy(cfg, params, prompts[3], N)
    spec = state.cache["k"].sharding.spec  # [layers, batch, kv_heads, slots, head_dim]
    assert "data" in jax.tree.leaves(spec[1]) and spec[2] == "tensor", spec


# ---------------------------------------------------------------------------------------------
# The CPU decode-attention kernel


@pytest.mark.parametrize("b, l, h, kh, s, dh", [(2, 1, 6, 6, 37, 64), (3, 4, 8, 2, 50, 24), (1, 16, 4, 4, 33, 17)])
def test_decode_attention_kernel_equals_the_masked_softmax(b, l, h, kh, s, dh):
    """`cpu_kernels.decode_attention` over slice `layer` of a 3-layer cache equals `xla_attention` on that slice:
    MHA and GQA, 1 to 16 queries, empty (-1) and future slots, a query that sees no slot (uniform), head dims
    with a tail (17, 24)."""
    from ar_lm.model import attention as MA
    from ar_lm.model import cpu_kernels

    assert cpu_kernels.available()  # CI has a C++ compiler: the kernels must build
    rng = np.random.default_rng(s)
    q = jnp.asarray(rng.normal(size=(b, l, h, dh)), jnp.float32)
    k_cache, v_cache = (jnp.asarray(rng.normal(size=(3, b, kh, s, dh)), jnp.float32) for _ in range(2))
    kv_pos = jnp.asarray(rng.integers(-1, s, size=(b, s)), jnp.int32)
    q_pos = np.asarray(rng.integers(0, s, size=(b, l)), np.int32)
    q_pos[0, 0] = -1  # sees no slot
    q_pos = jnp.asarray(q_pos)
    kernel = jax.jit(cpu_kernels.decode_attention)
    for layer in range(3):
        ref = MA.xla_attention(q, k_cache[layer], v_cache[layer], MA.attention_mask(q_pos, kv_pos))
        out = kernel(q, k_cache, v_cache, layer, q_pos, kv_pos)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_decode_steps_attend_through_the_kernel_and_prefill_and_meshes_do_not():
    """A one-token step with a cache compiles to the kernel's custom call; a prefill of more than
    KERNEL_QUERIES tokens, and a step traced under a mesh of two devices, run XLA's attention."""
    from ar_lm.model import attention as MA
    from ar_lm.parallel.mesh import logical_rules, make_mesh, mesh_context

    cfg = CFGS["llama_gqa"]
    params = params_of(cfg)

    def hlo(length):
        tokens = jnp.zeros((2, length), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (2, length))
        kv_pos = jnp.full((2, cfg.max_seq_len), -1, jnp.int32).at[:, :length].set(positions)
        cache = M.init_cache(cfg, 2, cfg.max_seq_len)
        fn = jax.jit(lambda p: M.apply(cfg, p, tokens, positions_BxL=positions, cache=cache, cache_index=0,
                                       kv_positions_BxS=kv_pos))
        return fn.lower(params).compile().as_text()

    assert "ar_lm_decode_attention" in hlo(1)
    assert MA.KERNEL_QUERIES < cfg.max_seq_len and "ar_lm_decode_attention" not in hlo(MA.KERNEL_QUERIES + 1)
    mesh_cfg = MeshConfig(data=2, devices=2)
    with mesh_context(make_mesh(mesh_cfg), logical_rules(mesh_cfg)):
        assert "ar_lm_decode_attention" not in hlo(1)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_a_one_line_user_error():
    cfg = CFGS["gpt2"]
    params = params_of(cfg)
    cases = [
        (lambda: D.generate(cfg, params, [list(range(24))], 1), "longer than|context is 24"),
        (lambda: D.generate(cfg, params, [[1] * 20], 5), "ask for at most 4 new tokens"),
        (lambda: D.generate(cfg, params, [[1]], 0), "max-new-tokens must be a positive"),
        (lambda: D.generate(cfg, params, [[]], 3), "prompt 0 is empty"),
        (lambda: D.generate(cfg, params, [[99]], 3), "outside \\[0, 61\\)"),
        (lambda: D.Sampling.create(top_p=0.0), "top-p must lie in \\(0, 1\\]"),
        (lambda: D.Sampling.create(top_p=1.5), "top-p must lie in \\(0, 1\\]"),
        (lambda: D.Sampling.create(top_k=0), "top-k must be a positive"),
        (lambda: D.generate(cfg, params, [[1]], 3, D.Sampling.create(top_k=62)), "exceeds the vocabulary of 61"),
        (lambda: D.Sampling.create(temperature=-1.0), "temperature must be >= 0"),
        (lambda: D.Sampling.create(min_p=1.5), "min-p must lie in"),
        (lambda: D.beam_search(cfg, params, [[1]], 3, beams=0), "beams must be a positive"),
        (lambda: D.speculative_generate(cfg, params, TINY, None, [[1]], 3), "draft model has a vocabulary of 6"),
    ]
    for call, fragment in cases:
        with pytest.raises(UserError, match=fragment) as info:
            call()
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# ar-lm generate


def make_run(path, cfg, tokenizer, seed=0, checkpoint=True):
    """A run directory as `ar-lm train` leaves it (config, tokenizer copy, one checkpoint), without training."""
    from ar_lm.io import atomic_write_json, sha256_file
    from ar_lm.training import rundir
    from ar_lm.training.checkpoint import Checkpointer

    path.mkdir(parents=True)
    rundir.write_config(path, ExperimentConfig(model=cfg, mesh=MeshConfig(devices=1)))
    if checkpoint:
        ckpt = Checkpointer(path / rundir.CHECKPOINTS, async_save=False)
        ckpt.save(1, {"params": params_of(cfg, seed)}, {})
        ckpt.close()
    (path / rundir.TOKENIZER).mkdir()
    tok_file = tokenizer.save(path / rundir.TOKENIZER)
    atomic_write_json(path / rundir.TOKENIZER / "metadata.json", {"tokenizer": {
        "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "file": tok_file.name, "sha256": sha256_file(tok_file)}})
    return path


BYTE_CFG = ModelConfig(family="gpt2", vocab_size=257, d_model=32, n_layers=2, n_heads=4, max_seq_len=48, init_std=0.3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ar_lm.data.tokenizers import ByteTokenizer, CharTokenizer

    root = tmp_path_factory.mktemp("gen_runs")
    draft_cfg = ModelConfig(family="gpt2", vocab_size=257, d_model=16, n_layers=1, n_heads=2, max_seq_len=48,
                            init_std=0.3)
    char = CharTokenizer(["a", "b"])
    other_cfg = ModelConfig(family="gpt2", vocab_size=char.vocab_size, d_model=16, n_layers=1, n_heads=2,
                            max_seq_len=48)
    return {"target": make_run(root / "target", BYTE_CFG, ByteTokenizer()),
            "draft": make_run(root / "draft", draft_cfg, ByteTokenizer(), seed=1),
            "other": make_run(root / "other", other_cfg, char, checkpoint=False)}  # only its vocabulary is read


def test_cli_generate_streams_text_and_prints_json(runs, capsys):
    target = str(runs["target"])
    assert main(["generate", target, "--prompt", "the cat", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out.startswith("the cat") and "tokens in" in streamed.err

    assert main(["generate", target, "--prompt", "the cat", "--max-new-tokens", "12", "--temperature", "0",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    prompt_ids = [256] + list(b"the cat")
    assert result["prompt_tokens"] == prompt_ids
    ref = D.generate(BYTE_CFG, params_of(BYTE_CFG), [prompt_ids], 12, eos_id=256)
    sample = result["samples"][0]
    assert sample["tokens"] == ref.tokens[0, : ref.lengths[0]].tolist()
    np.testing.assert_allclose(sample["logprobs"], ref.logprobs[0, : ref.lengths[0]], atol=1e-4)
    assert streamed.out == "the cat" + sample["text"] + "\n"

    assert main(["generate", target, "--prompt", "the cat", "--max-new-tokens", "12", "--temperature", "0",
                 "--draft", str(runs["draft"]), "--draft-tokens", "3"]) == 0
    spec = capsys.readouterr()
    assert spec.out == streamed.out and "acceptance rate" in spec.err

    assert main(["generate", target, "--prompt", "a", "--max-new-tokens", "4", "--beams", "3", "--json"]) == 0
    beams = json.loads(capsys.readouterr().out)["samples"]
    assert len(beams) == 3 and beams[0]["score"] >= beams[1]["score"] >= beams[2]["score"]

    assert main(["generate", target, "--prompt", "a", "--max-new-tokens", "4", "--num-samples", "3",
                 "--top-p", "0.9", "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 3


def test_cli_generate_from_token_ids(runs, capsys, tmp_path):
    """--prompt-ids continues exactly the given ids; a run without a text tokenizer (as an import of a
    model whose tokenizer ar_lm does not read) takes ids and prints ids, and refuses --prompt."""
    import shutil

    target = str(runs["target"])
    prompt_ids = [256] + list(b"the cat")
    args = ["--max-new-tokens", "12", "--temperature", "0", "--json"]
    assert main(["generate", target, "--prompt", "the cat", *args]) == 0
    from_text = json.loads(capsys.readouterr().out)
    assert main(["generate", target, "--prompt-ids", ", ".join(map(str, prompt_ids)), *args]) == 0
    from_ids = json.loads(capsys.readouterr().out)
    assert from_ids["prompt_tokens"] == prompt_ids and "prompt" not in from_ids
    assert from_ids["samples"] == from_text["samples"]  # same tokens, log-probs and text

    bare = tmp_path / "no_tokenizer"
    shutil.copytree(target, bare)
    shutil.rmtree(bare / "tokenizer")
    # no tokenizer, so no end-of-document id unless given: without it the model runs on past EOS
    assert main(["generate", str(bare), "--prompt-ids", " ".join(map(str, prompt_ids)), *args]) == 0
    unstopped = json.loads(capsys.readouterr().out)["samples"][0]["tokens"]
    assert main(["generate", str(bare), "--prompt-ids", " ".join(map(str, prompt_ids)), "--eos-id", "256", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["tokens"] for s in result["samples"]] == [s["tokens"] for s in from_text["samples"]]
    assert "text" not in result["samples"][0]
    stopped = result["samples"][0]["tokens"]
    assert len(unstopped) == 12 and unstopped[: len(stopped)] == stopped
    assert main(["generate", str(bare), "--prompt-ids", "256 116 104", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "--- sample 0 ---" and len(printed[1].split()) == 3 and all(t.isdigit() for t in printed[1].split())
    assert main(["generate", str(bare), "--prompt", "the cat"]) == 2
    err = capsys.readouterr().err
    assert "has no text tokenizer" in err and "give --prompt-ids" in err
    assert main(["generate", str(bare), "--prompt-ids", "256, x"]) == 2
    assert "--prompt-ids takes integers" in capsys.readouterr().err
    assert main(["generate", str(bare), "--prompt-ids", "256 9999"]) == 2  # outside the vocabulary
    assert "outside [0, 257)" in capsys.readouterr().err


@pytest.mark.parametrize("extra, fragment", [
    (["--max-new-tokens", "0"], "max-new-tokens must be a positive"),
    (["--top-p", "1.5"], "top-p must lie in (0, 1]"),
    (["--top-k", "0"], "top-k must be a positive"),
    (["--top-k", "300"], "exceeds the vocabulary of 257"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "x" * 60], "model's context is 48"),
    (["--draft", "OTHER"], "has a vocabulary of 259 tokens but the target has 257"),
    (["--beams", "2", "--temperature", "0.5"], "beam search is deterministic"),
    (["--prompt-ids", "1 2"], "give --prompt TEXT or --prompt-ids IDS"),
])
def test_cli_generate_bad_input(runs, capsys, extra, fragment):
    extra = [str(runs["other"]) if a == "OTHER" else a for a in extra]
    args = ["generate", str(runs["target"]), "--prompt", "hi", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


@pytest.mark.parametrize("kind", ["byte", "char", "sentencepiece"])
def test_streamed_text_never_rewrites_the_screen(kind, corpus_dir):
    """Multi-byte characters split across tokens (byte fallback): what is on the screen only grows, is always
    a prefix of the final text, and ends equal to it."""
    import io

    from ar_lm.data.tokenizers import train_tokenizer
    from ar_lm.decoding.command import TextStream

    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())]
    tok = train_tokenizer(kind, texts, vocab_size=300 if kind == "sentencepiece" else 0)
    ids = tok.encode("déjà vu € 😀 ok")
    assert len(ids) > len("déjà vu € 😀 ok")  # some characters take several tokens
    screen = io.StringIO()
    stream = TextStream(tok, tok.eos_id, out=screen)
    shown = []
    for t in ids:
        stream.add([t])
        shown.append(screen.getvalue())
    stream.add([], final=True)
    assert screen.getvalue() == tok.decode(ids) == "déjà vu € 😀 ok"
    assert all(a == screen.getvalue()[: len(a)] for a in shown)
    assert "\ufffd" not in "".join(shown)
