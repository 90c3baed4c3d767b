"""Images and audio as token sequences (Image GPT, Chen et al. 2020; WaveNet's mu-law, van den Oord et al. 2016).

An image document is its H*W*C intensity levels in raster order (row by row, left to right, the channels of a
pixel interleaved: R, G, B, R, G, B, ...). An 8-bit value v becomes level l = v >> (8 - bits) of 2^bits and
comes back as the level's centre, (l << (8 - bits)) + 2^(8 - bits) // 2 (v itself at 8 bits). Images are
converted to grayscale ("L") or RGB and resized with Pillow's box filter (aspect ratio not kept).

An audio document is one WAV file (PCM, 8/16/24/32-bit), mono (the channels' mean), resampled to the target
rate (polyphase, scipy.signal.resample_poly), mu-law companded, F(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu)
with mu = Q - 1, and F(x) in [-1, 1] rounded to one of Q codes, c = round((F(x) + 1) / 2 * mu).

Corpora are re-iterable and decode one file at a time; their documents carry the ids (`Document.ids`).
"""

from __future__ import annotations

import math
import os
import re
import wave
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ar_lm.data.sources import Document, expand_paths
from ar_lm.data.tokenizers import LevelTokenizer
from ar_lm.errors import UserError, require
from ar_lm.io import sha256_file

MODALITY_METRICS = {"image": "bits_per_dim", "audio": "bits_per_sample"}  # bits per byte of a media dataset
METRIC_LABELS = {"bits_per_dim": "bits/dim", "bits_per_sample": "bits/sample"}  # their short names in tables
GRAY_MODES, COLOUR_MODES = ("1", "L", "LA"), ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def modality_metric_name(meta: dict) -> Optional[str]:
    """What bits per byte is called for a dataset with this metadata: bits_per_dim (images), bits_per_sample
    (audio), None (text)."""
    return MODALITY_METRICS.get(meta.get("modality"))


@dataclass(frozen=True)
class MediaOptions:
    """`ar-lm prepare --source images|audio` options; None: not given (the defaults are in brackets)."""

    size: Optional[tuple[int, int]] = None  # (H, W) to resize to [the images' own]
    channels: Optional[int] = None  # [the images' own]
    bits: Optional[int] = None  # [8]
    npz: str = ""
    npz_key: str = ""  # [the archive's first array]
    sample_rate: Optional[int] = None  # [16000]
    mu_law: Optional[int] = None  # codes [256]

    def image_fields(self) -> bool:
        return self.size is not None or self.channels is not None or self.bits is not None or bool(self.npz or self.npz_key)

    def audio_fields(self) -> bool:
        return self.sample_rate is not None or self.mu_law is not None


def parse_size(text: str) -> tuple[int, int]:
    """"HxW" -> (H, W)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    require(m and int(m[1]) > 0 and int(m[2]) > 0, f"--size must be HxW with positive integers (e.g. 32x32), got {text!r}")
    return int(m[1]), int(m[2])


# ---------------------------------------------------------------------------------------------- images

def image_to_levels(image_HxWxC: np.ndarray, bits: int) -> np.ndarray:
    """8-bit intensities [H, W, C] -> H*W*C levels in raster order, channels interleaved: v >> (8 - bits)."""
    return (np.asarray(image_HxWxC, np.uint8) >> (8 - bits)).reshape(-1)


def levels_to_image(ids, height: int, width: int, channels: int, bits: int) -> np.ndarray:
    """Raster-order levels -> uint8 image [H, W, C], each level at its centre; missing ids (a short sample)
    are black and ids past the levels (an end-of-image) are clipped to the top level."""
    flat = np.zeros(height * width * channels, np.int64)
    ids = np.asarray(ids, np.int64)[: flat.size]
    flat[: ids.size] = np.clip(ids, 0, (1 << bits) - 1)
    shift = 8 - bits
    return ((flat << shift) + ((1 << shift) >> 1)).astype(np.uint8).reshape(height, width, channels)


def write_png_grid(path: str | Path, images_NxHxWxC: np.ndarray, columns: int = 0, pad: int = 1) -> None:
    """Images [N, H, W, C] (uint8) as one PNG: a grid of `columns` (0: ceil(sqrt N)) with `pad` black pixels
    between them."""
    from PIL import Image

    images = np.asarray(images_NxHxWxC, np.uint8)
    n, h, w, c = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * (h + pad): r * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = image
    Image.fromarray(grid[..., 0] if c == 1 else grid, "L" if c == 1 else "RGB").save(path, format="PNG")


@dataclass(frozen=True)
class ImageShape:
    """Every image document's shape; `asdict` is metadata.json's "image"."""

    height: int
    width: int
    channels: int
    bits: int


def _header(path: Path) -> tuple[int, int, int]:
    """(H, W, channels) of an image file from its header, or a UserError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"input file {path} is not an image Pillow can read ({type(e).__name__}): pass PNG or JPEG "
                        "files") from None
    require(mode in GRAY_MODES + COLOUR_MODES, f"image {path} has {mode!r} pixels (16-bit or float): convert it to "
                                               "8-bit grayscale or RGB")
    return h, w, 1 if mode in GRAY_MODES else 3


def read_image(path: Path, shape: ImageShape) -> np.ndarray:
    """The image file as uint8 [H, W, C] of `shape` (converted, resized with the box filter if needed)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if shape.channels == 1 else "RGB")
            if im.size != (shape.width, shape.height):
                im = im.resize((shape.width, shape.height), Image.Resampling.BOX)
            array = np.asarray(im, np.uint8)
    except OSError as e:
        raise UserError(f"image {path} cannot be decoded ({e}): replace or drop it") from None
    return array.reshape(shape.height, shape.width, shape.channels)


def image_shape(paths: Sequence[Path], opts: MediaOptions, bits: int) -> ImageShape:
    """The shape all images get: --size and --channels where given, else the images' own, which must agree."""
    headers = {p: _header(p) for p in paths}
    if opts.size is None:
        _require_one({(h, w): p for p, (h, w, _) in headers.items()}, "sizes (HxW)", "--size HxW")
    if opts.channels is None:
        _require_one({c: p for p, (_, _, c) in headers.items()}, "channel counts", "--channels 1|3")
    h, w, c = headers[paths[0]]
    (h, w), c = opts.size or (h, w), opts.channels or c
    return ImageShape(h, w, c, bits)


def _require_one(seen: dict, what: str, flag: str) -> None:
    examples = ", ".join(f"{p.name}: {value}" for value, p in list(seen.items())[:3])
    require(len(seen) == 1, f"the images have different {what} ({examples}): pass {flag} to convert them all")


class ImageCorpus:
    """Image files, one document each in sorted path order, named by the path relative to their common
    directory (so a corpus splits the same wherever it lies)."""

    def __init__(self, paths: Sequence[Path], shape: ImageShape):
        self.paths, self.shape = list(paths), shape
        self.root = Path(os.path.commonpath([str(p.absolute().parent) for p in self.paths]))

    def files(self) -> list[dict]:
        return [{"path": str(p.absolute()), "sha256": sha256_file(p)} for p in self.paths]

    def __iter__(self) -> Iterator[Document]:
        for path in self.paths:
            yield Document(path.absolute().relative_to(self.root).as_posix(), "",
                           ids=image_to_levels(read_image(path, self.shape), self.shape.bits))


class NpzCorpus:
    """Images from an array [N, H, W] or [N, H, W, C] (uint8) in a .npz file; document i is named "i"."""

    def __init__(self, path: str, key: str, opts: MediaOptions, bits: int):
        require(Path(path).is_file(), f"--npz file {path} does not exist")
        require(zipfile.is_zipfile(path), f"--npz file {path} is not a .npz archive: save the array with numpy.savez")
        require(opts.size is None, "--size resizes image files, not --npz arrays: resize the array, or drop --size")
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            require(keys, f"--npz file {path} holds no array")
            require(not key or key in keys, f"--npz file {path} has no array {key!r} (it has {', '.join(keys)})")
            self.key = key or keys[0]
            try:
                array = npz[self.key]
            except ValueError:  # an object array: its loading would unpickle
                raise UserError(f"--npz array {self.key!r} holds Python objects: store uint8 images") from None
        require(array.dtype == np.uint8 and array.ndim in (3, 4) and (array.ndim == 3 or array.shape[3] in (1, 3)),
                f"--npz array {self.key!r} is {array.dtype} {list(array.shape)}: give uint8 [N, H, W] or [N, H, W, C] "
                "with C 1 or 3")
        channels = 1 if array.ndim == 3 else array.shape[3]
        require(opts.channels in (None, channels), f"--channels {opts.channels} differs from the array's {channels}: "
                                                   "drop --channels")
        self.path, self.count = Path(path), array.shape[0]
        self.shape = ImageShape(array.shape[1], array.shape[2], channels, bits)

    def files(self) -> list[dict]:
        return [{"path": str(self.path.absolute()), "sha256": sha256_file(self.path), "key": self.key}]

    def __iter__(self) -> Iterator[Document]:
        with np.load(self.path, allow_pickle=False) as npz:
            array = npz[self.key]
        for i in range(self.count):
            yield Document(str(i), "", ids=image_to_levels(array[i], self.shape.bits))


# ---------------------------------------------------------------------------------------------- audio

def mu_law_encode(x: np.ndarray, codes: int = 256) -> np.ndarray:
    """Samples in [-1, 1] -> mu-law codes 0..codes-1 (mu = codes - 1)."""
    mu = codes - 1
    x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.floor((y + 1) / 2 * mu + 0.5).astype(np.uint16)


def mu_law_decode(c: np.ndarray, codes: int = 256) -> np.ndarray:
    """Mu-law codes -> samples in [-1, 1]: x = sign(y) ((1 + mu)^|y| - 1) / mu, y = 2 c / mu - 1."""
    mu = codes - 1
    y = 2 * np.clip(np.asarray(c, np.float64), 0, mu) / mu - 1
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu


def _open_wav(path: Path) -> wave.Wave_read:
    try:
        return wave.open(str(path), "rb")
    except (wave.Error, EOFError) as e:
        raise UserError(f"input file {path} is not a PCM WAV file ({e}): convert it to 8/16/24/32-bit integer PCM "
                        "WAV") from None


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """(mono samples in [-1, 1) as float64, sample rate) of an integer PCM WAV file (channels averaged)."""
    with _open_wav(Path(path)) as f:
        width, n_channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
        raw = f.readframes(f.getnframes())
    require(1 <= width <= 4, f"WAV file {path} has {8 * width}-bit samples: use 8/16/24/32-bit PCM")
    data = np.frombuffer(raw, np.uint8)
    data = data[: len(data) // (width * n_channels) * width * n_channels].reshape(-1, width)
    if width == 1:  # 8-bit WAV is unsigned
        samples = (data[:, 0].astype(np.float64) - 128) / 128
    else:  # little-endian signed: the bytes at the top of an int32
        padded = np.zeros((len(data), 4), np.uint8)
        padded[:, 4 - width:] = data
        samples = padded.view("<i4")[:, 0].astype(np.float64) / 2**31
    return samples.reshape(-1, n_channels).mean(axis=1), rate


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Mono samples in [-1, 1] as a 16-bit PCM WAV file (x * 2^15, rounded, 1.0 clipped to 32767)."""
    pcm = np.clip(np.round(np.asarray(samples, np.float64) * 32768), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling from `rate` to `target` Hz (scipy.signal.resample_poly, its default Kaiser window)."""
    if rate == target:
        return samples
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(samples, target // g, rate // g)


class AudioCorpus:
    """WAV files, one document each (sorted path order, named by relative path): mono, resampled, mu-law codes."""

    def __init__(self, paths: Sequence[Path], sample_rate: int, codes: int):
        self.paths, self.sample_rate, self.codes = list(paths), sample_rate, codes
        self.root = Path(os.path.commonpath([str(p.absolute().parent) for p in self.paths]))
        for path in self.paths:
            with _open_wav(path) as f:
                require(1 <= f.getsampwidth() <= 4, f"WAV file {path} has {8 * f.getsampwidth()}-bit samples: use "
                                                   "8/16/24/32-bit PCM")

    def files(self) -> list[dict]:
        return [{"path": str(p.absolute()), "sha256": sha256_file(p)} for p in self.paths]

    def __iter__(self) -> Iterator[Document]:
        for path in self.paths:
            samples, rate = read_wav(path)
            codes = mu_law_encode(resample(samples, rate, self.sample_rate), self.codes)
            yield Document(path.absolute().relative_to(self.root).as_posix(), "", ids=codes)


# ---------------------------------------------------------------------------------------------- sources

def media_corpora(source: str, opts: MediaOptions, files: dict[str, Sequence[str]]):
    """(corpus per split, the LevelTokenizer, metadata.json's media entries) of `--source images|audio`;
    `files`: split -> patterns ("train": --files, "val", "test"). Every file's header is checked here."""
    given = {split: patterns for split, patterns in files.items() if patterns}
    if source == "audio":
        require(not opts.image_fields(), "--size, --channels, --bits, --npz and --npz-key belong to --source images: "
                                         "drop them")
        rate, codes = opts.sample_rate or 16_000, opts.mu_law or 256
        require(rate > 0, f"--sample-rate must be positive, got {rate}")
        require(2 <= codes <= 65536, f"--mu-law must be in 2..65536 codes (WaveNet: 256), got {codes}")
        require(given, "--source audio needs --files PATH [PATH ...] (WAV files)")
        corpora = {split: AudioCorpus(ps, rate, codes) for split, ps in _split_paths(given).items()}
        return corpora, LevelTokenizer(codes), {"modality": "audio", "audio": {"sample_rate": rate, "mu_law": codes}}
    require(source == "images", f"source {source!r} is not a media source: use images or audio")
    require(not opts.audio_fields(), "--sample-rate and --mu-law belong to --source audio: drop them")
    bits = 8 if opts.bits is None else opts.bits
    require(1 <= bits <= 8, f"--bits must be in 1..8 (2^bits levels of 8-bit intensities), got {bits}")
    require(opts.channels in (None, 1, 3), f"--channels must be 1 (grayscale) or 3 (RGB), got {opts.channels}")
    require(not opts.npz_key or opts.npz, "--npz-key names an array of --npz FILE: give --npz")
    if opts.npz:
        require(not given, "--npz replaces --files/--val-files/--test-files: give one or the other")
        corpus = NpzCorpus(opts.npz, opts.npz_key, opts, bits)
        return {"train": corpus}, LevelTokenizer(1 << bits), _image_meta(corpus.shape)
    require(given, "--source images needs --files PATH [PATH ...] or --npz FILE")
    paths = _split_paths(given)
    shape = image_shape([p for ps in paths.values() for p in ps], opts, bits)
    return {split: ImageCorpus(ps, shape) for split, ps in paths.items()}, LevelTokenizer(1 << bits), _image_meta(shape)


def _split_paths(given: dict[str, Sequence[str]]) -> dict[str, list[Path]]:
    return {split: expand_paths(patterns, "--files" if split == "train" else f"--{split}-files")
            for split, patterns in given.items()}


def _image_meta(shape: ImageShape) -> dict:
    return {"modality": "image", "image": asdict(shape)}
