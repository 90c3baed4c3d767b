"""Experiment configuration: small frozen dataclasses composed into one `ExperimentConfig`.

An experiment file (``experiments/*.py``) defines ``config() -> ExperimentConfig``. Command-line
overrides (``--set model.n_layers=8``) are parsed against the field types; unknown keys name the
closest valid ones. The resolved config is written as JSON into every run directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

from ar_lm.coerce import coerce
from ar_lm.coerce import unknown_key_message as _unknown_key_message
from ar_lm.errors import UserError, require, run_experiment_code

EVAL_TOKENS_CAP = 1_048_576  # what train.eval_tokens=0 reads at most (a random subset spread over larger splits)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer. `family` picks the block recipe:

    - ``gpt2``: LayerNorm, learned absolute positions, GELU MLP, biases.
    - ``llama``: RMSNorm, rotary positions (RoPE), SwiGLU MLP, no biases.
    """

    family: str = "gpt2"  # gpt2 | llama
    vocab_size: int = 0  # 0 -> the dataset's tokenizer vocabulary
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 -> n_heads (multi-head); 1 -> multi-query; else grouped-query
    d_ff: int = 0  # 0 -> 4*d_model (gpt2) or 256-aligned 8/3*d_model (llama)
    max_seq_len: int = 256
    tie_embeddings: bool = True
    qk_norm: bool = False  # RMSNorm on queries and keys per head (no HF equivalent for gpt2)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "auto"  # auto -> float32 on CPU, bfloat16 on GPU/TPU
    scan_layers: bool = True
    remat: str = "auto"  # auto | none | full | dots | dots_no_batch | offload (ar_lm.model.backend.resolve_remat)
    logits_chunk: int = 512  # cross-entropy over this many positions at a time (ar_lm.model.head; 0: all at once)
    attention: str = "auto"  # auto | xla (masked softmax) | dot_product (jax.nn) | pallas (splash, GPU mha) | cudnn
    parametrization: str = "sp"  # sp | mup (Yang et al. 2022; see ar_lm.model.mup)
    mup_base_width: int = 0  # mup: d_model of the base shape (where mup equals sp)
    mup_base_head_dim: int = 0  # mup: head dim of the base shape (0: this model's; attention keeps 1/sqrt(dh))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.family == "llama":
            return 256 * ((8 * self.d_model // 3 + 255) // 256)
        return 4 * self.d_model


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # dataset directory written by `ar-lm prepare`
    seq_len: int = 128
    batch_size: int = 16  # global batch, in sequences
    shuffle_seed: int = 0
    eval_seed: int = 0  # which val windows a budget of train.eval_tokens reads (the same for every run on a dataset)
    prefetch: int = 2  # batches prepared ahead on a background thread (0: none)
    document_mask: bool = False  # attention stops at end-of-document tokens; positions restart per document
    eval_sets: tuple[str, ...] = ()  # more validation sets, "name=DATA_DIR[:split]", evaluated at every eval


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW; the learning rate: linear warmup, then `schedule` (formulas in `ar_lm.training.optimizer`)
    to `final_lr_frac * lr` at the last step (`constant` stays at lr)."""

    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | wsd | constant | linear
    warmup_steps: int = 0  # 0 -> warmup_tokens, else warmup_frac of the run
    warmup_tokens: int = 0  # warmup = warmup_tokens / (batch_size * seq_len) steps (e.g. N tokens, Porian et al.)
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.1
    cooldown_steps: int = 0  # wsd: the cooldown's length; 0 -> cooldown_frac of the run
    cooldown_frac: float = 0.2
    cooldown_shape: str = "linear"  # wsd: linear | 1-sqrt | cosine
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # norms and biases are never decayed
    clip_norm: float = 1.0  # 0 -> no clipping
    grad_accum: int = 1  # micro-batches per step
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2) (PaLM)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # used when `tokens` is 0
    tokens: int = 0  # token budget; steps = tokens // (batch_size * seq_len)
    seed: int = 0
    eval_every: int = 50  # 0 -> only at the end
    eval_tokens: int = 0  # val target tokens per evaluation (0: the whole split, up to EVAL_TOKENS_CAP)
    log_every: int = 10
    checkpoint_every: int = 50  # 0 -> only at the end
    keep_checkpoints: int = 2
    checkpoint_at_tokens: tuple[int, ...] = ()  # also checkpoint at these token counts, and keep them (branch points)
    branch_of: str = ""  # lineage of a cooldown branch (`ar-lm cooldown`): the parent run directory
    branch_step: int = 0  # and the parent's step it started from
    init_from: str = ""  # a run directory: start from the params of its latest checkpoint (fresh optimizer, step 0)
    async_checkpoint: bool = True
    nonfinite_policy: str = "stop"  # stop | skip
    max_skips: int = 3  # consecutive non-finite steps tolerated under `skip`
    debug_nan_steps: tuple[int, ...] = ()  # fault injection: make the loss NaN at these steps
    # scheduled sampling (Bengio et al. 2015; formulas in ar_lm.training.scheduled_sampling): probability of
    # feeding the model's own token, from ss_start at step 0 towards ss_end; ss_k: the schedule's length/decay
    ss_schedule: str = "none"  # none | linear | exponential | inverse_sigmoid
    ss_start: float = 0.0
    ss_end: float = 0.25
    ss_k: float = 1000.0  # linear: steps to reach ss_end; exponential: decay k in (0, 1); inverse_sigmoid: k >= 1
    ss_token: str = "argmax"  # argmax | sample (the model's token)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh with axes (data, fsdp, tensor); one size may be -1 (the remaining devices).

    `rules` names a logical-axis rule preset (see `ar_lm.parallel.mesh.RULE_PRESETS`); `rule_overrides`
    adds entries such as ``"mlp=tensor"`` or ``"embed=fsdp+tensor"`` or ``"vocab="`` (replicated).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1  # across-slice (DCN) sizes for multi-slice TPU runs
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    devices: int = 0  # use the first N devices (0: all)
    cpu_devices: int = 0  # host-platform devices for `ar-lm train` on CPU (0: auto, see parallel/runtime.py)
    rules: str = "fsdp_tp"
    rule_overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = True
    project: str = "ar_lm"
    group: str = ""
    tags: tuple[str, ...] = ()
    coords: tuple[str, ...] = ()  # "key=value" sweep coordinates (N, D, C, ...) for wandb's config
    peak_flops: float = 0.0  # per device, FLOP/s; 0 -> known accelerator table or a CPU measurement
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len

    @property
    def total_steps(self) -> int:
        if self.train.tokens:
            return max(1, self.train.tokens // self.tokens_per_step)
        return self.train.steps


# ---------------------------------------------------------------------------------------------
# Validation


def _range(lo: float, hi: float, hi_open: bool) -> tuple[str, Callable[[Any], bool]]:
    return (f"in [{lo}, {hi}{')' if hi_open else ']'}", lambda x: lo <= x < hi if hi_open else lo <= x <= hi)


_POSITIVE = ("positive", lambda x: x > 0)
_NON_NEGATIVE = (">= 0", lambda x: x >= 0)
_AT_LEAST_ONE = (">= 1", lambda x: x >= 1)


def _zero_means(meaning: str) -> tuple[str, Callable[[Any], bool]]:
    return (f">= 0 (0: {meaning})", lambda x: x >= 0)


# every numeric field: (what it must be, check); enumerated fields are in CHOICES, free text is unchecked
FIELD_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{k: _POSITIVE for k in ("model.d_model", "model.n_layers", "model.n_heads", "model.max_seq_len",
                              "model.rope_theta", "model.norm_eps", "model.init_std", "data.seq_len",
                              "data.batch_size", "optim.lr", "optim.eps")},
    **{k: _NON_NEGATIVE for k in ("data.shuffle_seed", "data.eval_seed", "data.prefetch", "optim.warmup_steps",
                                  "optim.warmup_tokens", "train.branch_step",
                                  "optim.cooldown_steps", "optim.weight_decay",
                                  "optim.z_loss", "train.steps", "train.tokens", "train.seed", "train.max_skips")},
    **{k: _AT_LEAST_ONE for k in ("optim.grad_accum", "train.log_every", "mesh.dcn_data", "mesh.dcn_fsdp",
                                  "mesh.dcn_tensor")},
    **{k: ("positive or -1 (the remaining devices)", lambda x: x >= 1 or x == -1)
       for k in ("mesh.data", "mesh.fsdp", "mesh.tensor")},
    "model.vocab_size": _zero_means("the dataset's"), "model.n_kv_heads": _zero_means("n_heads"),
    "model.d_ff": _zero_means("the family's"), "model.mup_base_width": _zero_means("no base shape"),
    "model.mup_base_head_dim": _zero_means("this model's head dim"),
    "model.logits_chunk": _zero_means("all positions at once"), "optim.clip_norm": _zero_means("off"),
    **{k: _zero_means("at the end only") for k in ("train.eval_every", "train.checkpoint_every")},
    "train.eval_tokens": _zero_means(f"the whole split, up to EVAL_TOKENS_CAP={EVAL_TOKENS_CAP:,}"),
    **{k: _zero_means("all") for k in ("train.keep_checkpoints", "mesh.devices")},
    "mesh.cpu_devices": _zero_means("auto"), "logging.peak_flops": _zero_means("known or measured"),
    "optim.warmup_frac": _range(0, 1, True), "optim.final_lr_frac": _range(0, 1, False),
    "optim.cooldown_frac": ("in (0, 1]", lambda x: 0 < x <= 1),
    "optim.b1": _range(0, 1, True), "optim.b2": _range(0, 1, True),
    "train.debug_nan_steps": ("a list of steps >= 1", lambda steps: all(s >= 1 for s in steps)),
    "train.checkpoint_at_tokens": ("a list of token counts >= 1", lambda tokens: all(t >= 1 for t in tokens)),
    "train.ss_start": _range(0, 1, False), "train.ss_end": _range(0, 1, False), "train.ss_k": _POSITIVE,
    "train.init_from": ("a run directory or empty", lambda x: not x.startswith("-")),  # not an option's name
}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.family": ("gpt2", "llama"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.remat": ("auto", "none", "full", "dots", "dots_no_batch", "offload"),
    "model.attention": ("auto", "xla", "dot_product", "pallas", "cudnn"),
    "model.parametrization": ("sp", "mup"),
    "train.nonfinite_policy": ("stop", "skip"),
    "optim.schedule": ("cosine", "wsd", "constant", "linear"),
    "optim.cooldown_shape": ("linear", "1-sqrt", "cosine"),
    "train.ss_schedule": ("none", "linear", "exponential", "inverse_sigmoid"), "train.ss_token": ("argmax", "sample"),
}  # mesh.rules and mesh.rule_overrides are checked against the rule table (`ar_lm.parallel.mesh.logical_rules`)


def field_value(cfg: ExperimentConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name) if name else getattr(cfg, section)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every numeric and enumerated field (`FIELD_RULES`, `CHOICES`) and the constraints between
    fields; raise `UserError` naming the first one broken."""
    for key, (what, ok) in FIELD_RULES.items():
        value = field_value(cfg, key)
        require(ok(value), f"{key} must be {what}, got {value!r}")
    for key, allowed in CHOICES.items():
        value = field_value(cfg, key)
        require(value in allowed, f"{key}={value!r} is unknown: use one of {', '.join(allowed)}")
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    require(m.d_model % m.n_heads == 0,
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: pick sizes that divide")
    require(m.n_heads % m.kv_heads == 0,
            f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.kv_heads}: use a divisor of n_heads")
    require(m.parametrization != "mup" or m.mup_base_width > 0,
            "model.parametrization=mup needs a base shape: set model.mup_base_width to the d_model the "
            "hyperparameters were tuned at")
    require(m.family == "gpt2" or m.head_dim % 2 == 0, f"llama needs an even head_dim (RoPE), got {m.head_dim}")
    require(d.seq_len <= m.max_seq_len,
            f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}: lower seq_len or raise max_seq_len")
    require(d.batch_size % o.grad_accum == 0,
            f"data.batch_size={d.batch_size} is not divisible by optim.grad_accum={o.grad_accum}")
    require(t.steps > 0 or t.tokens > 0, "train.steps or train.tokens must be positive")
    require({"exponential": t.ss_k < 1, "inverse_sigmoid": t.ss_k >= 1}.get(t.ss_schedule, True),
            f"train.ss_k={t.ss_k} does not fit train.ss_schedule={t.ss_schedule}: exponential needs k in (0, 1), "
            "inverse_sigmoid k >= 1")
    require([cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) <= 1,
            "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (the remaining devices)")
    return cfg


# ---------------------------------------------------------------------------------------------
# Dict conversion and overrides


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise UserError(_unknown_key_message(prefix + key, [prefix + n for n in names]))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            require(isinstance(value, dict), f"{prefix}{key} must be a section (mapping), got {value!r}")
            kwargs[key] = from_dict(hint, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, hint, prefix + key)
    return cls(**kwargs)


def all_keys(cfg: ExperimentConfig) -> list[str]:
    keys = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(value)]
        else:
            keys.append(section.name)
    return keys


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply ``section.field=value`` strings to `cfg` (type-checked) and validate the result."""
    for item in overrides:
        require("=" in item, f"override {item!r} is not of the form section.field=value (e.g. model.n_layers=8)")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        valid = all_keys(cfg)
        if key not in valid:
            raise UserError(_unknown_key_message(key, valid))
        if len(parts) == 1:
            cfg = dataclasses.replace(cfg, **{key: coerce(raw, typing.get_type_hints(type(cfg))[key], key)})
            continue
        section_name, field = parts
        section = getattr(cfg, section_name)
        hint = typing.get_type_hints(type(section))[field]
        section = dataclasses.replace(section, **{field: coerce(raw, hint, key)})
        cfg = dataclasses.replace(cfg, **{section_name: section})
    return cfg


def load_json(path: Path) -> ExperimentConfig:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise UserError(f"config file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return from_dict(ExperimentConfig, data)


def save_json(cfg: ExperimentConfig, path: Path) -> None:
    from ar_lm.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(to_dict(cfg), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Experiment files


def load_experiment_module(path: str | Path) -> types.ModuleType:
    """Import an experiment file (a Python file defining ``config()``)."""
    path = Path(path)
    require(path.is_file(), f"experiment file {path} does not exist: pass a path like experiments/tiny.py")
    require(path.suffix == ".py", f"experiment file {path} is not a .py file")
    name = f"ar_lm_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    run_experiment_code(path, spec.loader.exec_module, module)
    require(hasattr(module, "config"), f"experiment file {path} defines no config() function")
    return module


def load_experiment(path: str | Path, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """An experiment file (``.py`` with ``config()``) or a resolved config (``.json``), with overrides."""
    if Path(path).suffix == ".json":
        require(Path(path).is_file(), f"config file {path} does not exist")
        return validate(apply_overrides(load_json(Path(path)), overrides or []))
    cfg = run_experiment_code(path, load_experiment_module(path).config)
    require(isinstance(cfg, ExperimentConfig), f"config() in {path} must return an ExperimentConfig")
    return validate(apply_overrides(cfg, overrides or []))


def with_data_path(cfg: ExperimentConfig, data_dir: str | Path | None) -> ExperimentConfig:
    """`cfg` with data.path set to `data_dir` (absolute), if one is given."""
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(Path(data_dir).absolute())))
    return cfg
