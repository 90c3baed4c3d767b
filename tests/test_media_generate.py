"""`ar-lm generate --image-out / --audio-out`: media back from a run. The sampler never picks eos under
`vocab_limit`; the sliding continuation past the context scores each token from its window; a grid PNG
of K images whose first R rows are the prompt image's (quantised) rows; a WAV of S * R mono 16-bit frames
that decodes back to the generated codes; bad input is one line, exit 2, nothing written."""

import functools
import json
import wave

import jax
import numpy as np
import pytest
from PIL import Image

from ar_lm.cli import main
from ar_lm.config import DataConfig, ExperimentConfig, MeshConfig, ModelConfig
from ar_lm.data import media as data_media
from ar_lm.data.tokenizers import ByteTokenizer, LevelTokenizer
from ar_lm.decoding import decoder as DD
from ar_lm.decoding import media as DM
from ar_lm.decoding import sampling as DS
from ar_lm.io import atomic_write_json, sha256_file
from ar_lm.model import transformer as M

H, W, C, BITS = 5, 6, 3, 2  # 90 level tokens of 4 levels: longer than the context, so the image slides
RATE = 200
IMAGE_CFG = ModelConfig(family="gpt2", vocab_size=(1 << BITS) + 1, d_model=16, n_layers=1, n_heads=2,
                        max_seq_len=48, init_std=0.5)
AUDIO_CFG = ModelConfig(family="llama", vocab_size=257, d_model=16, n_layers=1, n_heads=2, max_seq_len=32,
                        init_std=0.5)
TEXT_CFG = ModelConfig(family="gpt2", vocab_size=257, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)


@functools.lru_cache(maxsize=None)
def params_of(cfg, seed=0):
    return M.init_params_jit(cfg, jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0)
def log_probs(cfg, params, tokens_BxL):
    return jax.nn.log_softmax(M.apply(cfg, params, tokens_BxL), -1)


def make_run(path, cfg, tokenizer, media_meta=None):
    """A run directory as `ar-lm train` leaves it (config, tokenizer copy, one checkpoint), untrained, on a
    dataset directory that holds only the metadata.json of `prepare --source images|audio`."""
    from ar_lm.training import rundir
    from ar_lm.training.checkpoint import Checkpointer

    data = path / "data"
    data.mkdir(parents=True)
    tok = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
    atomic_write_json(data / "metadata.json", {"tokenizer": tok, **(media_meta or {})})
    run = path / "run"
    run.mkdir()
    rundir.write_config(run, ExperimentConfig(model=cfg, data=DataConfig(path=str(data)), mesh=MeshConfig(devices=1)))
    ckpt = Checkpointer(run / rundir.CHECKPOINTS, async_save=False)
    ckpt.save(1, {"params": params_of(cfg)}, {})
    ckpt.close()
    (run / rundir.TOKENIZER).mkdir()
    tok_file = tokenizer.save(run / rundir.TOKENIZER)
    atomic_write_json(run / rundir.TOKENIZER / "metadata.json",
                      {"tokenizer": {**tok, "file": tok_file.name, "sha256": sha256_file(tok_file)}})
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("media_runs")
    image_meta = {"modality": "image", "image": {"height": H, "width": W, "channels": C, "bits": BITS}}
    audio_meta = {"modality": "audio", "audio": {"sample_rate": RATE, "mu_law": 256}}
    return {"image": make_run(root / "image", IMAGE_CFG, LevelTokenizer(1 << BITS), image_meta),
            "audio": make_run(root / "audio", AUDIO_CFG, LevelTokenizer(256), audio_meta),
            "text": make_run(root / "text", TEXT_CFG, ByteTokenizer())}


def test_vocab_limit_never_samples_eos():
    logits_4xV = np.zeros((4, 5), np.float32)
    logits_4xV[:, 4] = 50.0  # eos is by far the most likely
    for temperature, top_k in ((0.0, None), (1.0, None), (1.0, 2)):
        s = DS.Sampling.create(temperature, top_k, vocab_limit=4)
        tokens = [DS.sample_logits(jax.random.key(i), logits_4xV, s) for i in range(20)]
        assert int(np.max(tokens)) < 4
    assert int(DS.sample_logits(jax.random.key(0), logits_4xV, DS.Sampling.create(0.0))[0]) == 4  # off: eos


def test_sliding_window_equals_decoding_restarted_from_the_last_tokens():
    """Each token past the context is scored (log-prob) from exactly its window: the last `keep` tokens
    before its chunk plus the chunk so far, by teacher forcing the full model on that window."""
    cfg, params = IMAGE_CFG, params_of(IMAGE_CFG)
    ctx, keep, prompt, n = cfg.max_seq_len, 20, [4, 1, 2], 100
    res = DD.generate_sliding(cfg, params, [prompt], n, DS.Sampling.create(1.0, vocab_limit=4), seed=5, keep=keep)
    assert res.tokens.shape == (1, n) and res.tokens.max() < 4
    seq = prompt + res.tokens[0].tolist()
    starts = [len(prompt)] + list(range(ctx, len(seq), ctx - keep))  # chunk c begins at seq index starts[c]
    for c, start in enumerate(starts):
        begin = 0 if c == 0 else start - keep
        window = np.zeros((1, ctx), np.int32)  # one shape for every window (padding after it: causal)
        length = min(len(seq), begin + ctx) - begin
        window[0, :length] = seq[begin: begin + length]
        logp_LxV = np.asarray(log_probs(cfg, params, window)[0])
        for j in range(start, begin + length):
            np.testing.assert_allclose(res.logprobs[0, j - len(prompt)], logp_LxV[j - begin - 1, seq[j]], atol=2e-5)
    greedy = DS.Sampling.create(0.0, vocab_limit=4)
    long = DD.generate_sliding(cfg, params, [prompt], n, greedy, keep=keep).tokens[0].tolist()
    restart = DD.generate(cfg, params, [(prompt + long)[ctx - keep: ctx]], ctx - keep, greedy).tokens[0].tolist()
    assert long[ctx - len(prompt): 2 * ctx - keep - len(prompt)] == restart
    fits = DD.generate(cfg, params, [prompt], ctx - len(prompt), greedy).tokens  # what fits: `generate` itself
    np.testing.assert_array_equal(DD.generate_sliding(cfg, params, [prompt], ctx - len(prompt), greedy).tokens, fits)


def grid_cells(png, k):
    """The K images [H, W, C] of write_png_grid's layout: ceil(sqrt K) columns, 1 pixel apart."""
    grid = np.asarray(Image.open(png))
    cols = int(np.ceil(np.sqrt(k)))
    rows = -(-k // cols)
    assert grid.shape == (rows * H + rows - 1, cols * W + cols - 1, C)
    return [grid[r * (H + 1): r * (H + 1) + H, c * (W + 1): c * (W + 1) + W] for r, c in
            (divmod(i, cols) for i in range(k))]


def test_image_grid_completes_the_prompt_rows(runs, tmp_path, capsys):
    rng = np.random.default_rng(0)
    prompt_png = tmp_path / "prompt.png"
    Image.fromarray(rng.integers(0, 256, (2 * H, 2 * W, 3), dtype=np.uint8), "RGB").save(prompt_png)
    shape = data_media.ImageShape(H, W, C, BITS)
    expected = data_media.levels_to_image(data_media.image_to_levels(data_media.read_image(prompt_png, shape), BITS),
                                          H, W, C, BITS)
    out, k, r = tmp_path / "grid.png", 3, 3  # the prompt (55 tokens) is longer than the context (48)
    assert main(["generate", str(runs["image"]), "--image-out", str(out), "--num-samples", str(k),
                 "--prompt-image", str(prompt_png), "--prompt-rows", str(r), "--seed", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["path"] == str(out) and line["samples"] == k and line["tokens"] == k * (H - r) * W * C
    cells = grid_cells(out, k)
    for cell in cells:
        np.testing.assert_array_equal(cell[:r], expected[:r])
    assert any(not np.array_equal(cells[0][r:], cell[r:]) for cell in cells[1:])  # independent samples


def test_whole_images_are_level_centres(runs, tmp_path, capsys):
    whole = tmp_path / "whole.png"
    assert main(["generate", str(runs["image"]), "--image-out", str(whole), "--num-samples", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == 2 * H * W * C
    levels = {int(v) for cell in grid_cells(whole, 2) for v in np.unique(cell)}
    assert levels <= {(lv << (8 - BITS)) + (1 << (8 - BITS - 1)) for lv in range(1 << BITS)} and len(levels) > 1


def test_audio_wav_has_s_times_rate_frames_and_decodes_to_its_codes(runs, tmp_path, capsys):
    out, seconds = tmp_path / "a.wav", 0.6  # 120 samples: past the context of 32
    assert main(["generate", str(runs["audio"]), "--audio-out", str(out), "--seconds", str(seconds)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["tokens"] == round(seconds * RATE) and line["path"] == str(out)
    with wave.open(str(out), "rb") as f:
        assert (f.getnframes(), f.getframerate(), f.getnchannels(), f.getsampwidth()) == (120, RATE, 1, 2)
    samples, rate = data_media.read_wav(out)
    codes = data_media.mu_law_encode(samples, 256)
    assert rate == RATE and codes.min() >= 0 and codes.max() < 256 and len(np.unique(codes)) > 5


def test_written_audio_decodes_back_to_every_code(runs, tmp_path):
    spec = DM.media_spec(runs["audio"])
    assert (spec.modality, spec.levels, spec.sample_rate) == ("audio", 256, RATE)
    codes = np.random.default_rng(0).permutation(np.repeat(np.arange(256), 2))
    DM.write_audio(tmp_path / "codes.wav", spec, codes)
    samples, rate = data_media.read_wav(tmp_path / "codes.wav")
    assert rate == RATE
    np.testing.assert_array_equal(data_media.mu_law_encode(samples, 256), codes)  # 16-bit PCM keeps every code


@pytest.mark.parametrize("run,extra,fragment", [
    ("text", ["--image-out", "OUT"], "trained on text, not image"),
    ("image", ["--audio-out", "OUT", "--seconds", "1"], "trained on image, not audio"),
    ("image", ["--image-out", "OUT", "--prompt-image", "PROMPT", "--prompt-rows", "9"], "--prompt-rows must lie"),
    ("image", ["--image-out", "OUT", "--prompt-image", "GRAY", "--prompt-rows", "1"], "has 1 channel(s)"),
    ("image", ["--image-out", "OUT", "--prompt-rows", "1"], "go together"),
    ("image", ["--image-out", "OUT", "--prompt", "x"], "drop --prompt"),
    ("image", ["--image-out", "OUT", "--audio-out", "OUT"], "not both"),
    ("audio", ["--audio-out", "OUT"], "needs --seconds"),
    ("audio", ["--audio-out", "OUT", "--seconds", "1", "--num-samples", "2"], "one WAV"),
    ("text", ["--prompt", "x", "--seconds", "1"], "go with --image-out or --audio-out"),
])
def test_bad_media_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, run, extra, fragment):
    Image.fromarray(np.zeros((H, W, 3), np.uint8), "RGB").save(tmp_path / "prompt.png")
    Image.fromarray(np.zeros((H, W), np.uint8), "L").save(tmp_path / "gray.png")
    names = {"OUT": str(tmp_path / "out" / "x.png"), "PROMPT": str(tmp_path / "prompt.png"),
             "GRAY": str(tmp_path / "gray.png")}
    assert main(["generate", str(runs[run])] + [names.get(a, a) for a in extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "out").exists()
