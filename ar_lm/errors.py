"""Errors and exit statuses, in one place.

A `UserError` carries a one-line message saying what is wrong and what to do. The CLI prints it
as ``error: <message>`` and exits with status 2 (no traceback unless ``--debug``).
"""

import traceback
from pathlib import Path
from typing import Any, Callable

EXIT_FAILURE = 1  # an unexpected error (one line without --debug)
EXIT_USAGE = 2  # a UserError: nothing was changed
EXIT_PREEMPTED = 3  # stopped on SIGTERM/SIGINT after writing a checkpoint
EXIT_NONFINITE = 4  # a NonFiniteError under train.nonfinite_policy=stop (or too many skips)


class UserError(Exception):
    """A mistake the user can fix; the message is one line: what is wrong, what to do."""


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds."""
    if not condition:
        raise UserError(message)


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/Inf (policy `stop`, or too many skips)."""


def run_experiment_code(path: str | Path, fn: Callable, *args) -> Any:
    """`fn(*args)`, code of the experiment file `path`; an error in it -> `UserError` "FILE:LINE: Type: message"
    (the innermost line of that file; a SyntaxError's own line)."""
    try:
        return fn(*args)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:  # the user's file is broken: say where
        here = Path(path).resolve()
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == here]
        line = e.lineno if isinstance(e, SyntaxError) and e.lineno else (lines[-1] if lines else None)
        where = f"{path}:{line}" if line else f"experiment file {path}"
        text = (e.msg if isinstance(e, SyntaxError) else str(e)).strip().split("\n")[0]
        raise UserError(f"{where}: {type(e).__name__}: {text}: fix the experiment file") from e
