"""Media out of a run: whole images (or the rest of a given image's top rows) as a PNG grid, audio as a WAV.

The token format is `ar_lm.data.media`'s: an image is H·W·C level ids (2^bits levels) in raster order with the
channels of a pixel interleaved, after the begin-of-document eos (Image GPT, Chen et al. 2020); audio is
8-bit mu-law codes after eos (WaveNet, van den Oord et al. 2016). Sampling is restricted to the level ids
(`Sampling.vocab_limit` = levels: never eos); a request past the model's context continues with
`generate_sliding`. Files are written only after generation, atomically (temp file + rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ar_lm.config import ModelConfig
from ar_lm.data import media
from ar_lm.decoding.decoder import generate_sliding
from ar_lm.decoding.sampling import Sampling
from ar_lm.errors import require
from ar_lm.training import rundir


@dataclasses.dataclass(frozen=True)
class MediaSpec:
    """What a run's dataset holds: modality "text", "image" (height, width, channels, bits) or "audio"
    (sample_rate); levels = the level ids 0..levels-1, eos_id = levels."""

    modality: str
    levels: int = 0
    height: int = 0
    width: int = 0
    channels: int = 0
    bits: int = 0
    sample_rate: int = 0

    @property
    def image_tokens(self) -> int:
        return self.height * self.width * self.channels


def _media_metadata(run_dir: Path) -> dict:
    """The run's copied tokenizer metadata when it names a modality, else its dataset's metadata.json."""
    tok_meta = rundir.TOKENIZER + "/metadata.json"
    own = json.loads((run_dir / tok_meta).read_text()) if (run_dir / tok_meta).is_file() else {}
    if "modality" in own:
        return own
    data_meta = Path(rundir.load_run_config(run_dir).data.path or "") / "metadata.json"
    if data_meta.is_file():
        return json.loads(data_meta.read_text())
    kind = own.get("tokenizer", {}).get("kind")
    require(kind != "levels", f"run {run_dir} was trained on media but its dataset's {data_meta} is gone: "
                              "restore the dataset directory to read the image or audio shape")
    return own


def media_spec(run_dir: str | Path) -> MediaSpec:
    meta = _media_metadata(Path(run_dir).absolute())
    modality = meta.get("modality", "text")
    if modality == "image":
        im = meta["image"]
        return MediaSpec("image", 2 ** int(im["bits"]), int(im["height"]), int(im["width"]), int(im["channels"]),
                         int(im["bits"]))
    if modality == "audio":
        return MediaSpec("audio", int(meta["audio"]["mu_law"]), sample_rate=int(meta["audio"]["sample_rate"]))
    return MediaSpec(modality)


def check_media_args(args, spec: MediaSpec, run_dir) -> None:
    """The media flags against each other and against the run (before any parameters are restored)."""
    out_flag = "--image-out" if args.image_out is not None else "--audio-out"
    require(args.image_out is None or args.audio_out is None, "give --image-out or --audio-out, not both")
    want = "image" if args.image_out is not None else "audio"
    out = Path(args.image_out if args.image_out is not None else args.audio_out)
    require(not out.is_dir(), f"{out_flag} {out} is a directory: give a file name")
    require(spec.modality == want, f"run {run_dir} was trained on {spec.modality}, not {want}: {out_flag} needs "
                                   f"a run on a `prepare --source {want}s` dataset")
    given = [flag for flag, value in (("--prompt", args.prompt), ("--prompt-ids", args.prompt_ids),
                                      ("--max-new-tokens", args.max_new_tokens), ("--eos-id", args.eos_id),
                                      ("--draft", args.draft)) if value is not None]
    given += ["--beams"] if args.beams > 1 else []
    given += ["--json"] if args.json else []
    require(not given, f"{out_flag} fixes the prompt and the length and prints one JSON line: drop {', '.join(given)}")
    if want == "image":
        require(args.seconds is None, "--seconds is the length of --audio-out: drop it for an image")
        require((args.prompt_image is None) == (args.prompt_rows is None),
                "--prompt-image and --prompt-rows go together: give both or neither")
        if args.prompt_rows is not None:
            require(1 <= args.prompt_rows < spec.height,
                    f"--prompt-rows must lie in [1, {spec.height - 1}] (the images have {spec.height} rows), "
                    f"got {args.prompt_rows}")
        return
    require(args.prompt_image is None and args.prompt_rows is None,
            "--prompt-image and --prompt-rows complete an image: drop them for --audio-out")
    require(args.seconds is not None and args.seconds > 0, f"--audio-out needs --seconds S > 0, got {args.seconds}")
    require(args.num_samples == 1, "--audio-out writes one WAV: drop --num-samples")


def image_prompt(spec: MediaSpec, path: str | Path, rows: int) -> list[int]:
    """The first `rows` rows of the image at `path` as level ids, resized and quantised as the dataset's were
    (`ar_lm.data.media.read_image`); an image of another channel count is an error, not converted."""
    path = Path(path)
    require(path.is_file(), f"--prompt-image {path} does not exist: give an image file (PNG, JPEG)")
    channels = media.image_shape([path], media.MediaOptions(), spec.bits).channels  # from its header
    require(channels == spec.channels, f"--prompt-image {path} has {channels} channel(s) but the run's images have "
                                       f"{spec.channels}: convert it ({'grayscale' if spec.channels == 1 else 'RGB'})")
    shape = media.ImageShape(spec.height, spec.width, spec.channels, spec.bits)
    levels = media.image_to_levels(media.read_image(path, shape), spec.bits)
    return [int(t) for t in levels[: rows * spec.width * spec.channels]]


def generate_images(cfg: ModelConfig, params, spec: MediaSpec, prompt_levels: list[int], k: int,
                    sampling: Sampling, seed: int) -> tuple[np.ndarray, int]:
    """K images (level ids [K, H·W·C], the prompt's levels first) from [eos] + prompt_levels; and the number
    of tokens generated."""
    n = spec.image_tokens - len(prompt_levels)
    res = generate_sliding(cfg, params, [[spec.levels] + prompt_levels] * k, n, sampling, seed=seed)
    prefix_KxP = np.tile(np.asarray(prompt_levels, np.int64), (k, 1))
    return np.concatenate([prefix_KxP, res.tokens], axis=1), k * n


def generate_audio(cfg: ModelConfig, params, spec: MediaSpec, seconds: float, sampling: Sampling,
                   seed: int) -> np.ndarray:
    """round(seconds · sample_rate) mu-law codes after [eos]."""
    n = max(1, round(seconds * spec.sample_rate))
    return generate_sliding(cfg, params, [[spec.levels]], n, sampling, seed=seed).tokens[0]


def _atomic(path: Path, write) -> None:
    """`write(tmp)` to a temporary file next to `path` with the same suffix (the writers go by it), then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_images(path: str | Path, spec: MediaSpec, ids_KxT: np.ndarray) -> None:
    images = [media.levels_to_image(row, spec.height, spec.width, spec.channels, spec.bits) for row in ids_KxT]
    _atomic(Path(path), lambda tmp: media.write_png_grid(tmp, images))


def write_audio(path: str | Path, spec: MediaSpec, codes: np.ndarray) -> None:
    samples = media.mu_law_decode(np.asarray(codes), spec.levels)
    _atomic(Path(path), lambda tmp: media.write_wav(tmp, samples, spec.sample_rate))
