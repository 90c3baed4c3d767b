"""Images and audio as token sequences: prepare -> tokens -> PNG / WAV round trips, mu-law, bits per dimension."""

import json
import math
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ar_lm.cli import main
from ar_lm.data.dataset import TokenDataset
from ar_lm.data.media import (
    levels_to_image,
    modality_metric_name,
    mu_law_decode,
    mu_law_encode,
    read_wav,
    write_png_grid,
    write_wav,
)
from ar_lm.data.tokenizers import LevelTokenizer, load_tokenizer


def prepare(args, capsys) -> tuple[int, list[str]]:
    code = main(["prepare", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def documents(dataset: TokenDataset, split: str) -> list[np.ndarray]:
    """The split's documents: its token stream cut at (and without) each eos."""
    tokens = np.concatenate(dataset.shards(split)).astype(np.int64)
    ends = np.flatnonzero(tokens == dataset.eos_id)
    assert ends[-1] == len(tokens) - 1
    return [doc[:-1] for doc in np.split(tokens, ends + 1)[:-1]]


def test_level_tokenizer_counts_one_byte_per_level_and_round_trips(tmp_path):
    tok = LevelTokenizer(16)
    assert (tok.vocab_size, tok.eos_id) == (17, 16)
    assert tok.token_bytes().tolist() == [1] * 16 + [0] and not tok.token_chars().any()
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"kind": "levels", "levels": 16}
    loaded = load_tokenizer(tmp_path, "levels")
    assert (loaded.kind, loaded.vocab_size, loaded.decode([3, 15, 16])) == ("levels", 17, "3 15")
    assert modality_metric_name({"modality": "image"}) == "bits_per_dim"
    assert modality_metric_name({"modality": "audio"}) == "bits_per_sample" and modality_metric_name({}) is None


def test_image_round_trip_pixel_for_pixel(tmp_path, capsys):
    """Colour images of two sizes -> --size 6x5 --bits 5 -> tokens -> PNG equals the resized, quantised input."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        (tmp_path / split).mkdir()
        for i in range(n):
            shape = (9, 7, 3) if i % 2 else (12, 10, 4)  # RGB and RGBA
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / split / f"im{i}.png")
    code, err = prepare(["--source", "images", "--files", str(tmp_path / "train"), "--val-files", str(tmp_path / "val"),
                         "--size", "6x5", "--bits", "5", "--out", str(tmp_path / "data")], capsys)
    assert code == 0, err
    dataset = TokenDataset(tmp_path / "data")
    assert dataset.meta["modality"] == "image"
    assert dataset.meta["image"] == {"height": 6, "width": 5, "channels": 3, "bits": 5}
    assert (dataset.vocab_size, dataset.eos_id, dataset.tokenizer.kind) == (33, 32, "levels")
    assert dataset.split_info("train")["bytes"] == 5 * 6 * 5 * 3 and dataset.split_info("train")["words"] == 0
    for split in ("train", "val"):
        docs = documents(dataset, split)
        sources = sorted((tmp_path / split).iterdir())
        assert len(docs) == len(sources)
        for doc, src in zip(docs, sources):
            assert len(doc) == 6 * 5 * 3 and doc.max() < 32
            png = tmp_path / f"{split}_{src.stem}_out.png"
            write_png_grid(png, levels_to_image(doc, 6, 5, 3, 5)[None])
            expected = np.asarray(Image.open(src).convert("RGB").resize((5, 6), Image.Resampling.BOX))
            assert np.array_equal(np.asarray(Image.open(png)), ((expected >> 3) << 3) + 4)  # the level's centre


def test_npz_images_and_png_grid(tmp_path, capsys):
    """8-bit grayscale arrays from --npz are their tokens exactly; a grid PNG puts image i at row i // cols."""
    images = np.random.default_rng(1).integers(0, 256, (12, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", other=np.zeros(3, np.uint8), digits=images)
    code, err = prepare(["--source", "images", "--npz", str(tmp_path / "x.npz"), "--npz-key", "digits",
                         "--val-fraction", "0.25", "--out", str(tmp_path / "data")], capsys)
    assert code == 0, err
    dataset = TokenDataset(tmp_path / "data")
    assert dataset.meta["image"] == {"height": 4, "width": 3, "channels": 1, "bits": 8}
    docs = documents(dataset, "train") + documents(dataset, "val")
    flat = {images[i].reshape(-1).tobytes() for i in range(12)}
    assert len(docs) == 12 and {d.astype(np.uint8).tobytes() for d in docs} == flat
    write_png_grid(tmp_path / "grid.png", images[:5, :, :, None], columns=3)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 4 + 1, 3 * 3 + 2)
    assert np.array_equal(grid[5:9, 4:7], images[4]) and not grid[4].any() and not grid[5:, 8:].any()


def test_mu_law_error_is_within_its_step():
    x = np.linspace(-1, 1, 200_001)
    codes = mu_law_encode(x)
    assert codes.min() == 0 and codes.max() == 255 and len(np.unique(codes)) == 256 and np.all(np.diff(codes) >= 0)
    # x lies in its code's bin: between the decodes of the bin edges c - 1/2 and c + 1/2 (mu-law's step there)
    lo, hi = mu_law_decode(codes - 0.5), mu_law_decode(codes + 0.5)
    assert np.all((lo - 1e-12 <= x) & (x <= hi + 1e-12))
    x_hat = mu_law_decode(codes)
    assert np.all(np.abs(x_hat - x) <= hi - lo)
    assert x[100_000] == 0 and 0 < x_hat[100_000] < 1e-4  # the finest step is at 0: (256^(1/255) - 1) / 255


def _write_pcm(path: Path, frames_NxC: np.ndarray, width: int, rate: int) -> None:
    """Integer samples [N, C] as a PCM WAV of `width` bytes per sample, written with the stdlib."""
    ints = frames_NxC.astype(np.int64) + (128 if width == 1 else 0)
    raw = b"".join(int(v).to_bytes(width, "little", signed=width > 1) for v in ints.reshape(-1))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(frames_NxC.shape[1])
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)


def chirp(rate: int, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.8 * np.sin(2 * np.pi * (100 * t + 900 * t**2))  # 100 Hz rising to 1 kHz


def test_chirp_wav_survives_prepare_tokens_wav(tmp_path, capsys):
    x = chirp(8000)
    pcm16 = np.round(x * 2**15).astype(np.int64)
    _write_pcm(tmp_path / "chirp.wav", pcm16[:, None], 2, 8000)
    x16 = chirp(16000)
    _write_pcm(tmp_path / "stereo24.wav", np.round(np.stack([x16, -x16 / 2], 1) * 2**23).clip(-2**23, 2**23 - 1), 3, 16000)
    assert np.max(np.abs(read_wav(tmp_path / "stereo24.wav")[0] - x16 / 4)) <= 2**-23  # 24-bit, channels averaged
    code, err = prepare(["--source", "audio", "--files", str(tmp_path / "chirp.wav"), "--val-files",
                         str(tmp_path / "stereo24.wav"), "--sample-rate", "8000", "--out", str(tmp_path / "data")], capsys)
    assert code == 0, err
    dataset = TokenDataset(tmp_path / "data")
    assert dataset.meta["modality"] == "audio" and dataset.meta["audio"] == {"sample_rate": 8000, "mu_law": 256}
    [codes] = documents(dataset, "train")
    assert np.array_equal(codes, mu_law_encode(pcm16 / 2**15))
    write_wav(tmp_path / "back.wav", mu_law_decode(codes), 8000)
    back, rate = read_wav(tmp_path / "back.wav")
    lo, hi = mu_law_decode(codes - 0.5), mu_law_decode(codes + 0.5)
    assert rate == 8000 and np.all((lo - 2**-14 <= x) & (x <= hi + 2**-14))  # within the step (+ 16-bit rounding)
    assert np.all(np.abs(back - mu_law_decode(codes)) <= 2**-15)
    [resampled] = documents(dataset, "val")  # 16 kHz -> 8 kHz: every other sample of a chirp far below 4 kHz
    assert len(resampled) == len(x)
    inner = slice(50, -50)  # the filter's edges
    assert np.corrcoef(mu_law_decode(resampled)[inner], x[inner] / 4)[0, 1] > 0.999
    eight = (np.round(x * 127)).astype(np.int64)
    _write_pcm(tmp_path / "u8.wav", eight[:, None], 1, 8000)
    assert np.allclose(read_wav(tmp_path / "u8.wav")[0], eight / 128)


def test_constant_images_train_to_near_zero_loss_with_bits_per_dim(tmp_path, capsys):
    """20 constant 8x8 gray images are trivially predictable: a tiny model gets there in 40 steps; bits per
    dimension = loss / ln 2 per sub-pixel (eos targets carry loss but no dimension)."""
    from conftest import tiny_config

    from ar_lm.scaling.runner import format_table
    from ar_lm.training.evaluate import evaluate_run, format_result
    from ar_lm.training.loop import train

    (tmp_path / "imgs").mkdir()
    for i in range(20):
        Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "imgs" / f"{i:02d}.png")
    code, err = prepare(["--source", "images", "--files", str(tmp_path / "imgs"), "--val-fraction", "0.2",
                         "--out", str(tmp_path / "data")], capsys)
    assert code == 0, err
    cfg = tiny_config(tmp_path / "data", model={"vocab_size": 257}, optim={"lr": 1e-2},
                      train={"steps": 40, "eval_tokens": 0})
    summary = train(cfg, tmp_path / "run").summary
    assert summary["val_loss"] < 0.1, summary
    assert summary["val_bits_per_dim"] == summary["val_bits_per_byte"] and summary["val_bits_per_dim"] < 0.2
    val_record = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert val_record["split"] == "val" and val_record["bits_per_dim"] == summary["val_bits_per_dim"]
    result = evaluate_run(tmp_path / "run")  # the whole val split: every token but the first scored once
    info = TokenDataset(tmp_path / "data").split_info("val")
    dims = info["tokens"] - info["documents"] - 1  # scored targets that are pixels (the first pixel is not scored)
    assert result["eval_tokens"] == info["tokens"] - 1
    assert result["bits_per_dim"] == pytest.approx(result["loss"] * result["eval_tokens"] / (math.log(2) * dims),
                                                   rel=1e-6)
    assert result["bits_per_dim"] < 0.2
    assert f"bits/dim    {result['bits_per_dim']:.4f}" in format_result(result).splitlines()
    row = {"name": "px", "status": "done", "N": 1, "D": 2, "C": 3.0, "epochs": 1.0, "wall_time_s": 1.0, "mfu": None,
           **{k: v for k, v in summary.items() if k.startswith("val_")}}
    head, _, line = format_table([row]).splitlines()
    assert head.split()[-1] == "bits/dim" and line.split()[-1] == f"{summary['val_bits_per_dim']:.4f}"
    # the run keeps the dataset's modality and shape: it samples images with its dataset gone
    (tmp_path / "data").rename(tmp_path / "moved")
    assert main(["generate", str(tmp_path / "run"), "--image-out", str(tmp_path / "s.png"), "--num-samples", "1",
                 "--temperature", "0"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), np.full((8, 8), 200, np.uint8))


def _float_wav(path: Path) -> None:
    """A WAV of IEEE float samples (format tag 3), which the PCM reader refuses."""
    data = np.zeros(100, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE" + b"fmt "
                     + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def test_bad_media_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "mixed").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "mixed" / "b.png")
    (tmp_path / "notes.txt").write_text("not an image\n")
    _float_wav(tmp_path / "float.wav")
    img = ["--source", "images", "--files", str(tmp_path / "mixed" / "a.png")]
    cases = [
        (["--source", "images", "--files", str(tmp_path / "notes.txt")], "is not an image"),
        (["--source", "audio", "--files", str(tmp_path / "float.wav")], "is not a PCM WAV file"),
        (["--source", "audio", "--files", str(tmp_path / "notes.txt")], "is not a PCM WAV file"),
        ([*img, "--bits", "0"], "--bits must be in 1..8"),
        ([*img, "--size", "4by4"], "--size must be HxW"),
        ([*img, "--channels", "2"], "--channels must be 1 (grayscale) or 3"),
        ([*img, "--sample-rate", "8000"], "belong to --source audio"),
        ([*img, "--tokenizer", "byte"], "own tokens"),
        (["--source", "images", "--files", str(tmp_path / "mixed")], "different sizes (HxW)"),
        (["--source", "images", "--npz", str(tmp_path / "missing.npz")], "does not exist"),
        (["--source", "images", "--npz", str(tmp_path / "notes.txt")], "is not a .npz archive"),
        (["--source", "stdlib", "--bits", "4"], "belong to --source images|audio"),
    ]
    for i, (args, fragment) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, err = prepare([*args, "--out", str(out)], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (args, err)
        assert not out.exists() and not list(tmp_path.glob(f".out{i}*"))
