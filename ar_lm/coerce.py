"""Converting a config value from JSON or a command-line string to its field's type (`--set`, config.json)."""

from __future__ import annotations

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
