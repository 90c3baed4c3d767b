"""`ar-lm compress RUN IN OUT` and `ar-lm decompress RUN IN OUT`: a file through a run's model and a range
coder (`ar_lm.decoding.compress`), with gzip / bz2 / lzma at their best settings for comparison."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import time
import zlib
from pathlib import Path

import numpy as np

from ar_lm.decoding.command import LoadedRun, load_run
from ar_lm.decoding.compress import (
    CodingModel,
    Header,
    chunk_layout,
    decode_tokens,
    device_sha256,
    encode_tokens,
    params_sha256,
)
from ar_lm.errors import UserError, require
from ar_lm.io import atomic_write_bytes, sha256_file
from ar_lm.parallel.mesh import inference_mesh, logical_rules, make_mesh, mesh_context
from ar_lm.training import rundir


def _check_paths(args) -> bytes:
    """The input's bytes, once IN exists and OUT does not."""
    src, dst = Path(args.input), Path(args.output)
    require(src.is_file(), f"input file {src} does not exist: give an existing file")
    require(not dst.exists(), f"output {dst} already exists: remove it or give another path")
    require(dst.absolute().parent.is_dir(), f"the directory of output {dst} does not exist: create it first")
    return src.read_bytes()


def _text_run(run: LoadedRun, run_dir) -> bool:
    """True for a text tokenizer (sentencepiece, char), False for bytes; other runs are refused."""
    require(run.tokenizer is not None, f"run {run_dir} has no ar_lm tokenizer (an imported model): "
                                       "compress with a run trained by ar-lm")
    kind = run.tokenizer_meta.get("kind")
    require(kind in ("byte", "char", "sentencepiece"),
            f"run {run_dir} has a {kind!r} tokenizer (images or audio): compress files with a byte-tokenizer run")
    return kind != "byte"


def _tokenize(run: LoadedRun, run_dir, data: bytes, name: str) -> np.ndarray:
    """File bytes -> tokens, losslessly: bytes as they are, or UTF-8 text through the run's tokenizer."""
    if not _text_run(run, run_dir):
        return np.frombuffer(data, np.uint8).astype(np.int64)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{name} is not UTF-8 text, which run {run_dir}'s {run.tokenizer_meta['kind']} tokenizer "
                        "needs: compress it with a byte-tokenizer run") from None
    tokens = list(run.tokenizer.encode(text))
    require(run.tokenizer.decode(tokens) == text, f"run {run_dir}'s tokenizer does not round-trip {name} exactly: "
                                                  "compress it with a byte-tokenizer run")
    return np.asarray(tokens, np.int64)


def _detokenize(run: LoadedRun, run_dir, tokens: np.ndarray, name: str) -> bytes:
    if _text_run(run, run_dir):
        return run.tokenizer.decode(tokens.tolist()).encode("utf-8")
    require(bool(np.all(tokens < 256)), f"{name} decodes to a non-byte token: it was not compressed with this run")
    return tokens.astype(np.uint8).tobytes()


def _tokenizer_hash(run_dir, run: LoadedRun) -> bytes:
    return bytes.fromhex(sha256_file(Path(run_dir) / rundir.TOKENIZER / run.tokenizer_meta["file"]))[:8]


def _load_model(run_dir):
    """(mesh, rules, run with params, its CodingModel, params hash) on one device."""
    mesh_cfg = inference_mesh(rundir.load_run_config(Path(run_dir)).mesh, batch=1, n_devices=1)
    mesh, rules = make_mesh(mesh_cfg), logical_rules(mesh_cfg)
    run = load_run(run_dir, mesh, rules)
    model = CodingModel(run.cfg, run.params, run.tokenizer.eos_id)
    return mesh, rules, run, model, params_sha256(run.cfg, run.params)[:16]


def baselines(data: bytes) -> dict:
    """Sizes of the same bytes through the standard library's compressors at their best settings."""
    return {"gzip": len(gzip.compress(data, compresslevel=9, mtime=0)), "bz2": len(bz2.compress(data, 9)),
            "lzma": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))}


def compress_command(args) -> int:
    """`ar-lm compress RUN IN OUT`: prints one JSON object (sizes, bits per byte, stdlib baselines)."""
    data = _check_paths(args)
    run = load_run(args.run_dir)
    tokens = _tokenize(run, args.run_dir, data, args.input)
    tok_hash = _tokenizer_hash(args.run_dir, run)
    mesh, rules, run, model, p_hash = _load_model(args.run_dir)
    chunk_len, rows = chunk_layout(len(tokens), run.cfg.max_seq_len)
    t0 = time.perf_counter()
    with mesh_context(mesh, rules):
        payload, float_bits = encode_tokens(model, tokens, chunk_len, rows)
    seconds = time.perf_counter() - t0
    header = Header(p_hash, tok_hash, device_sha256()[:4], zlib.crc32(data), len(tokens), chunk_len, rows)
    out = header.pack() + payload
    atomic_write_bytes(Path(args.output), out)
    per_byte = (lambda bits: round(bits / len(data), 6)) if data else (lambda bits: None)
    print(json.dumps({
        "bytes_in": len(data), "bytes_out": len(out), "bits_per_byte": per_byte(8 * len(out)),
        "predicted_bits_per_byte": per_byte(float_bits), "header_bytes": len(out) - len(payload),
        "tokens": int(len(tokens)), "chunk_tokens": chunk_len, "rows": rows,
        "tokens_per_s": round(len(tokens) / seconds, 1) if len(tokens) else None, **baselines(data),
    }))
    return 0


def decompress_command(args) -> int:
    """`ar-lm decompress RUN IN OUT`: the original file, checked against the header's hashes and crc32."""
    data = _check_paths(args)
    header, payload = Header.unpack(data, args.input)
    run = load_run(args.run_dir)
    _text_run(run, args.run_dir)
    require(header.tokenizer_hash == _tokenizer_hash(args.run_dir, run),
            f"{args.input} was compressed with another tokenizer (its tokenizer sha256 differs from run "
            f"{args.run_dir}'s): decompress it with the run that compressed it")
    require(header.device_hash == device_sha256()[:4],
            f"{args.input} was compressed on another kind of device than this one: "
            "decompress it where it was compressed")
    mesh, rules, run, model, p_hash = _load_model(args.run_dir)
    require(header.params_hash == p_hash, f"{args.input} was compressed with other parameters (its checkpoint "
                                          f"sha256 differs from run {args.run_dir}'s latest checkpoint): "
                                          "decompress it with the run and checkpoint that compressed it")
    with mesh_context(mesh, rules):
        tokens = decode_tokens(model, payload, header.n_tokens, header.chunk_len, header.rows, args.input)
    original = _detokenize(run, args.run_dir, tokens, args.input)
    require(zlib.crc32(original) == header.crc32,
            f"{args.input} decoded to data whose crc32 differs from the original's: the file is corrupt "
            "or the model computed otherwise here")
    atomic_write_bytes(Path(args.output), original)
    return 0
