"""The one exception type for user mistakes.

Anything raised as ``UserError`` is printed by the CLI as a single line and exits with code 2;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (flags, files, models): one line, exit code 2."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RunFailed(Exception):
    """A run stopped by a fault of the machine (a dead worker, a device error) that outlived its retries:
    one line and exit code 1. What was written before it stays complete, so a rerun resumes."""

    exit_code = 1
