"""Language models as compressors: range coding of a token sequence with a run's next-token distributions
(Deletang et al. 2024, "Language Modeling Is Compression"; arithmetic coding: Witten, Neal & Cleary 1987).

A token costs -log2 q(token) bits, q the model's distribution quantised to integers: u_i = floor(p_i · F),
F = 2^24 - V, the remainder added to the argmax, and q_i = (u_i + 1) / 2^24, so every symbol has q_i > 0.
`constriction`'s range coder (24-bit precision, `Categorical(perfect=False)`) turns the free weights u_i
(summing to exactly F) back into exactly these q_i: its scale F / sum(u) is 1.0, every partial sum an
exact float64 integer. The coded size is so the quantised log-loss plus a few bytes of termination.

Exactness: encoder and decoder compute q through one jitted step (one token per row with a KV cache,
float32, the quantisation inside the jit) over the same shapes in the same order, on one device: the
tokens are cut into chunks of `chunk_len` (<= max_seq_len - 1) that each start from the begin-of-document
token (eos), and `rows` chunks at a time run as the rows of one batch; rows that are done (or padding)
are fed eos. So step t sees the same inputs in both directions, and gives the same integers.

Header (little endian): magic b"ARLZ", format version (1 byte), the first 16 bytes of the sha256 of the
parameters, the first 8 of the tokenizer file's sha256, the first 4 of the sha256 of the device kind,
the crc32 of the original file, then varints: tokens, chunk_len, rows. The coded 32-bit words follow.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import struct
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ar_lm.config import ModelConfig
from ar_lm.decoding.decoder import for_decoding
from ar_lm.errors import UserError, require
from ar_lm.model.transformer import apply, init_cache, relayout_layers

MAGIC = b"ARLZ"
VERSION = 1
PRECISION = 24  # constriction's Categorical: probabilities in units of 2^-24
MAX_ROWS = 128  # chunks coded side by side as the rows of one batch
_FIXED = struct.Struct("<4sB16s8s4sI")


@dataclasses.dataclass(frozen=True)
class Header:
    params_hash: bytes  # 16 bytes
    tokenizer_hash: bytes  # 8 bytes
    device_hash: bytes  # 4 bytes
    crc32: int
    n_tokens: int
    chunk_len: int
    rows: int

    def pack(self) -> bytes:
        fixed = _FIXED.pack(MAGIC, VERSION, self.params_hash, self.tokenizer_hash, self.device_hash, self.crc32)
        return fixed + b"".join(_varint(v) for v in (self.n_tokens, self.chunk_len, self.rows))

    @classmethod
    def unpack(cls, data: bytes, name: str) -> tuple["Header", bytes]:
        """(header, the coded payload) of a compressed file's bytes."""
        require(len(data) >= _FIXED.size and data[:4] == MAGIC,
                f"{name} is not an ar-lm compressed file (no ARLZ header): give a file that `ar-lm compress` wrote")
        magic, version, params, tok, device, crc = _FIXED.unpack_from(data)
        require(version == VERSION, f"{name} has format version {version}, this ar_lm reads version {VERSION}: "
                                    "decompress it with the ar_lm that wrote it")
        pos, values = _FIXED.size, []
        for _ in range(3):
            value, pos = _read_varint(data, pos, name)
            values.append(value)
        return cls(params, tok, device, crc, *values), data[pos:]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int, name: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        require(pos < len(data), f"{name} is truncated (its header ends early): give the whole compressed file")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def params_sha256(cfg: ModelConfig, params) -> bytes:
    """sha256 over the parameters in the unstacked layer layout: each leaf's path, dtype, shape and bytes, in
    sorted-path order (so a run resumed with another `scan_layers` keeps its hash)."""
    host = jax.device_get(relayout_layers(params, cfg.n_layers, scanned=False) if cfg.scan_layers else params)
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(host)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
        leaf = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype.str}:{leaf.shape};".encode())
        h.update(leaf.tobytes())
    return h.digest()


def device_sha256() -> bytes:
    """The kind of device the probabilities are computed on (another kind may round differently)."""
    device = jax.devices()[0]
    return hashlib.sha256(f"{device.platform}:{device.device_kind}".encode()).digest()


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _coding_step(cfg: ModelConfig, params, token_B, slot, cache, kv_pos_BxS):
    """Feed token_B at position = cache slot `slot`; return (u_BxV free integer weights summing to
    2^24 - V, -log2 p_BxV of the float model, cache, kv_pos_BxS)."""
    pos_B = jnp.full(token_B.shape, slot, jnp.int32)
    kv_pos_BxS = jax.lax.dynamic_update_slice(kv_pos_BxS, pos_B[:, None], (jnp.int32(0), slot))
    logits_Bx1xV, cache = apply(cfg, params, token_B[:, None], positions_BxL=pos_B[:, None], cache=cache,
                                cache_index=slot, kv_positions_BxS=kv_pos_BxS)
    logits_BxV = logits_Bx1xV[:, 0].astype(jnp.float32)
    free = (1 << PRECISION) - cfg.vocab_size
    u_BxV = jnp.floor(jax.nn.softmax(logits_BxV, axis=-1) * free).astype(jnp.int32)
    top_B = jnp.argmax(logits_BxV, axis=-1)
    u_BxV = u_BxV.at[jnp.arange(u_BxV.shape[0]), top_B].add(free - u_BxV.sum(-1))
    bits_BxV = -jax.nn.log_softmax(logits_BxV, axis=-1) / jnp.log(2.0)
    return u_BxV, bits_BxV, cache, kv_pos_BxS


class CodingModel:
    """A run's model as the coder runs it: float32 compute, float32 weights, the decoder's layer layout."""

    def __init__(self, cfg: ModelConfig, params, eos_id: int):
        cfg = dataclasses.replace(cfg, compute_dtype="float32", param_dtype="float32")
        self.cfg, params = for_decoding(cfg, params)
        self.params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        self.eos_id = eos_id

    def group(self, rows: int, chunk_len: int):
        """A fresh (cache, kv_pos) for `rows` chunks of up to `chunk_len` tokens."""
        return init_cache(self.cfg, rows, chunk_len, jnp.float32), jnp.full((rows, chunk_len), -1, jnp.int32)

    def step(self, token_R: np.ndarray, t: int, cache, kv_pos):
        with jax.default_matmul_precision("float32"):
            return _coding_step(self.cfg, self.params, jnp.asarray(token_R, jnp.int32), jnp.int32(t), cache, kv_pos)


def chunk_layout(n_tokens: int, max_seq_len: int) -> tuple[int, int]:
    """(chunk_len, rows): chunks of max_seq_len - 1 tokens (one slot for the leading eos), and as many rows
    as there are chunks, rounded up to a power of two, at most MAX_ROWS."""
    require(max_seq_len >= 2, f"the model's context is {max_seq_len} tokens: compressing needs at least 2")
    chunk_len = max_seq_len - 1
    n_chunks = -(-n_tokens // chunk_len)
    return chunk_len, min(MAX_ROWS, 1 << max(0, n_chunks - 1).bit_length())


def run_coder(model: CodingModel, n_tokens: int, chunk_len: int, rows: int,
              code: Callable[[np.ndarray, Optional[np.ndarray]], np.ndarray],
              tokens: Optional[np.ndarray] = None) -> tuple[np.ndarray, float]:
    """Walk the chunks in groups of `rows`, step by step: `code(u_AxV, targets_A or None)` codes the
    active rows' tokens (the encoder gets `tokens`, the decoder None) and returns them.
    Returns (the tokens, the float model's summed -log2 p over them)."""
    require(chunk_len >= 1 and rows >= 1, f"corrupt chunk layout (chunk {chunk_len}, rows {rows})")
    out, float_bits = np.zeros(n_tokens, np.int64), 0.0
    for start in range(0, n_tokens, chunk_len * rows):
        span = min(n_tokens - start, chunk_len * rows)
        lens_R = np.clip(span - chunk_len * np.arange(rows), 0, chunk_len)
        grid_RxL = np.full((rows, chunk_len), model.eos_id, np.int64)
        if tokens is not None:
            grid_RxL.reshape(-1)[:span] = tokens[start:start + span]
        cache, kv_pos = model.group(rows, chunk_len)
        feed_R = np.full(rows, model.eos_id, np.int32)
        for t in range(int(lens_R[0])):
            u, bits, cache, kv_pos = model.step(feed_R, t, cache, kv_pos)
            u_RxV, bits_RxV = jax.device_get((u, bits))
            active = np.nonzero(lens_R > t)[0]
            sym_A = np.asarray(code(u_RxV[active], None if tokens is None else grid_RxL[active, t]), np.int64)
            grid_RxL[active, t] = sym_A
            float_bits += float(bits_RxV[active, sym_A].sum(dtype=np.float64))
            feed_R = np.where(lens_R > t + 1, grid_RxL[:, t], model.eos_id).astype(np.int32)
        out[start:start + span] = grid_RxL.reshape(-1)[:span]
    return out, float_bits


def _constriction():
    try:
        import constriction
    except ImportError:
        raise UserError("compression needs the constriction package: pip install -e '.[compress]'") from None
    return constriction


def encode_tokens(model: CodingModel, tokens: np.ndarray, chunk_len: int, rows: int) -> tuple[bytes, float]:
    """(coded bytes, the float model's summed -log2 p of the tokens)."""
    constriction = _constriction()
    encoder, family = constriction.stream.queue.RangeEncoder(), constriction.stream.model.Categorical(perfect=False)

    def code(u_AxV, targets_A):
        encoder.encode(targets_A.astype(np.int32), family, u_AxV.astype(np.float64))
        return targets_A

    _, float_bits = run_coder(model, len(tokens), chunk_len, rows, code, np.asarray(tokens, np.int64))
    return encoder.get_compressed().astype("<u4").tobytes(), float_bits


def decode_tokens(model: CodingModel, payload: bytes, n_tokens: int, chunk_len: int, rows: int,
                  name: str) -> np.ndarray:
    """The n_tokens tokens that `encode_tokens` coded into `payload`."""
    constriction = _constriction()
    require(len(payload) % 4 == 0, f"{name} is truncated (coded data of {len(payload)} bytes, not whole 32-bit "
                                   "words): give the whole compressed file")
    words = np.frombuffer(payload, "<u4").astype(np.uint32)
    decoder = constriction.stream.queue.RangeDecoder(words)
    family = constriction.stream.model.Categorical(perfect=False)

    def code(u_AxV, _):
        return decoder.decode(family, u_AxV.astype(np.float64))

    tokens, _ = run_coder(model, n_tokens, chunk_len, rows, code)
    return tokens
