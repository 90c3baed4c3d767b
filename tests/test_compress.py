"""`ar-lm compress` / `ar-lm decompress`: exact round trips through a trained tiny byte-level run, the coded
size against the model's log-loss, refusals (another run, a tampered header, an existing output)."""

import inspect
import io
import json
import random
import string
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from test_decode import make_run

from ar_lm.cli import main
from ar_lm.config import ModelConfig
from ar_lm.data.tokenizers import CharTokenizer
from ar_lm.decoding.compress import PRECISION, CodingModel, Header, decode_tokens, encode_tokens
from ar_lm.decoding.compress_command import _load_model
from ar_lm.training.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, byte_data):
    root = tmp_path_factory.mktemp("compress_runs")
    train(tiny_config(byte_data, train={"steps": 30}), root / "run")
    train(tiny_config(byte_data, train={"steps": 2, "seed": 1}), root / "other")
    return root / "run", root / "other"


def _png() -> bytes:
    """A small generated RGB image (a gradient with seeded noise), as PNG bytes."""
    y, x = np.mgrid[0:20, 0:20]
    noise = np.random.default_rng(0).integers(0, 24, (20, 20, 3))
    rgb = (np.stack([x * 11, y * 11, (x * y) % 200], axis=-1) + noise).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


FILES = {
    "text": lambda: "".join(random.Random(0).choices(string.printable, k=1200)).encode(),
    "code": lambda: inspect.getsource(textwrap)[:1500].encode(),
    "png": _png,
    "empty": lambda: b"",
}


@pytest.mark.parametrize("kind", list(FILES))
def test_round_trip_is_exact_and_near_the_log_loss(runs, tmp_path, capsys, kind):
    data = FILES[kind]()
    src, packed, back = tmp_path / "in", tmp_path / "in.arlz", tmp_path / "out"
    src.write_bytes(data)
    assert main(["compress", str(runs[0]), str(src), str(packed)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes_in"] == len(data) and report["bytes_out"] == packed.stat().st_size
    if kind == "code":  # decompressed by another process (one device, its own compilation): the same integers
        subprocess.run([sys.executable, "-m", "ar_lm", "decompress", str(runs[0]), str(packed), str(back)], check=True)
    else:
        assert main(["decompress", str(runs[0]), str(packed), str(back)]) == 0
    assert back.read_bytes() == data
    assert report["header_bytes"] < 64 and all(report[k] > 0 for k in ("gzip", "bz2", "lzma"))
    if not data:
        assert report["bytes_out"] == report["header_bytes"] and report["bits_per_byte"] is None
        return
    assert report["tokens"] == len(data) > report["chunk_tokens"]  # several chunks
    predicted_bits = report["predicted_bits_per_byte"] * len(data)
    assert abs(8 * report["bytes_out"] - predicted_bits) <= 0.01 * predicted_bits + 8 * 64
    assert report["bits_per_byte"] == pytest.approx(8 * report["bytes_out"] / len(data), abs=1e-6)
    if kind == "code":  # a trained model beats log2(257) bits per byte on text like its training data
        assert report["bits_per_byte"] < 7.0


def test_several_batches_of_chunks_and_the_quantised_cost(runs):
    """Coding in groups of 2 rows of 5-token chunks: exact, and the coded bits are the quantised log-loss
    plus the coder's termination."""
    mesh, rules, run, model, _ = _load_model(runs[0])
    tokens = np.frombuffer(b"the cat sat on the mat and then the dog ran.", np.uint8).astype(np.int64)
    payload, float_bits = encode_tokens(model, tokens, chunk_len=5, rows=2)
    assert np.array_equal(decode_tokens(model, payload, len(tokens), 5, 2, "x"), tokens)
    assert 8 * len(payload) == pytest.approx(float_bits, rel=0.01, abs=64)
    other = CodingModel(run.cfg, run.params, run.tokenizer.eos_id)  # same inputs -> same integers
    u1, _, _, _ = model.step(np.full(2, 256), 0, *model.group(2, 5))
    u2, _, _, _ = other.step(np.full(2, 256), 0, *other.group(2, 5))
    assert np.array_equal(np.asarray(u1), np.asarray(u2))
    assert np.all(np.asarray(u1).sum(-1) == (1 << PRECISION) - 257) and np.all(np.asarray(u1) >= 0)


def test_other_run_tampered_header_and_existing_output_are_refused(runs, tmp_path, capsys):
    src, packed, back = tmp_path / "in", tmp_path / "in.arlz", tmp_path / "out"
    src.write_bytes(b"the cat sat on the mat.\n" * 4)
    assert main(["compress", str(runs[0]), str(src), str(packed)]) == 0
    capsys.readouterr()
    assert main(["decompress", str(runs[1]), str(packed), str(back)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "checkpoint sha256 differs" in err and "\n" not in err
    assert not back.exists()

    data = bytearray(packed.read_bytes())
    header, _ = Header.unpack(bytes(data), "x")
    data[21] ^= 0xFF  # the first byte of the tokenizer hash
    tampered = tmp_path / "tampered.arlz"
    tampered.write_bytes(bytes(data))
    assert main(["decompress", str(runs[0]), str(tampered), str(back)]) == 2
    assert "tokenizer sha256 differs" in capsys.readouterr().err and not back.exists()
    assert header.n_tokens == 4 * 24

    src.write_bytes(b"not compressed")
    assert main(["decompress", str(runs[0]), str(src), str(back)]) == 2
    assert "not an ar-lm compressed file" in capsys.readouterr().err and not back.exists()
    assert main(["compress", str(runs[0]), str(src), str(packed)]) == 2  # packed exists
    assert "already exists" in capsys.readouterr().err


def test_char_run_codes_utf8_text_and_refuses_other_bytes(tmp_path, capsys):
    tok = CharTokenizer(list(" abcdeéilt"))
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)
    run = str(make_run(tmp_path / "char", cfg, tok))
    src, packed, back = tmp_path / "in", tmp_path / "in.arlz", tmp_path / "out"
    text = "café au lait, 日本\n" * 3  # known characters and byte fallbacks
    src.write_text(text, encoding="utf-8")
    assert main(["compress", run, str(src), str(packed)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == len(tok.encode(text)) and report["bytes_in"] == len(text.encode())
    assert main(["decompress", run, str(packed), str(back)]) == 0
    assert back.read_text(encoding="utf-8") == text

    src.write_bytes(b"\xff\xfe not text")
    assert main(["compress", run, str(src), str(tmp_path / "x.arlz")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err and not (tmp_path / "x.arlz").exists()
