"""The one error type for user-facing mistakes.

A `UserError` carries a one-line message saying what is wrong and what to do. The CLI prints it
as ``error: <message>`` and exits with status 2 (no traceback unless ``--debug``).
"""

EXIT_USAGE = 2
EXIT_PREEMPTED = 3  # stopped on SIGTERM/SIGINT after writing a checkpoint


class UserError(Exception):
    """A mistake the user can fix; the message is one line: what is wrong, what to do."""


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds."""
    if not condition:
        raise UserError(message)
