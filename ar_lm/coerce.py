"""Converting a config value from JSON or a command-line string to its field's type (`--set`, config.json)."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from ar_lm.errors import UserError, require


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert `value` (from JSON or a command-line string) to type `hint`, or raise UserError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or value == "None":
            return None
        return coerce(value, args[0], key)
    if origin is tuple:
        (elem, *_) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        require(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        return tuple(coerce(v, elem, key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{key} expects true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise UserError(f"{key} expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise UserError(f"{key} expects an integer, got {value!r}")
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{key} expects a number, got {value!r}") from None
    if hint is str:
        require(isinstance(value, str), f"{key} expects a string, got {value!r}")
        return value
    raise UserError(f"{key} has unsupported type {hint}")  # pragma: no cover - config definition bug


# other frameworks' names (Hugging Face, nanoGPT, optax) -> ours, for the "did you mean" of an unknown key
_ALIASES = {"learning_rate": "lr", "num_layers": "n_layers", "n_layer": "n_layers", "num_hidden_layers": "n_layers",
            "hidden_size": "d_model", "n_embd": "d_model", "dim": "d_model", "num_heads": "n_heads",
            "n_head": "n_heads", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
            "intermediate_size": "d_ff", "ffn_dim": "d_ff", "max_position_embeddings": "max_seq_len",
            "n_positions": "max_seq_len", "block_size": "seq_len", "context_length": "seq_len", "max_steps": "steps",
            "num_steps": "steps", "max_grad_norm": "clip_norm", "grad_clip": "clip_norm", "beta1": "b1", "beta2": "b2",
            "batch": "batch_size", "gradient_accumulation_steps": "grad_accum", "warmup": "warmup_steps",
            "dtype": "compute_dtype"}


def unknown_key_message(key: str, valid: list[str]) -> str:
    """Suggest keys with the same last part (after `_ALIASES`; own section first), else close spellings."""
    section, _, leaf = key.rpartition(".")
    leaf, leaves = _ALIASES.get(leaf, leaf), {k: k.rpartition(".")[2] for k in valid}
    close = sorted((k for k in valid if leaves[k] == leaf), key=lambda k: k.rpartition(".")[0] != section)
    close = close or difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    near = difflib.get_close_matches(leaf, sorted(set(leaves.values())), n=3, cutoff=0.6)
    close = close or [k for k in valid if leaves[k] in near]
    hint = f"did you mean {', '.join(close[:3])}?" if close else "see docs/reference/config.md"
    return f"unknown config key {key!r}: {hint}"
