"""Errors and exit statuses, in one place.

A `UserError` carries a one-line message saying what is wrong and what to do. The CLI prints it
as ``error: <message>`` and exits with status 2 (no traceback unless ``--debug``).
"""

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
