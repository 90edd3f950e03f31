"""The one exception type for user mistakes.

Anything raised as ``UserError`` is printed by the CLI as a single line and exits with code 2;
everything else is a bug and keeps its traceback.
"""

import signal
from typing import NoReturn


class UserError(Exception):
    """A mistake in the user's input (flags, files, models): one line, exit code 2."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_stopped_by: list[int] = []  # the signal that stopped this run, once one has


def stop_on_signal(signum: int, frame=None) -> NoReturn:
    """The SIGTERM handler of a vocabtrim command (``cli.main``; ``ray_utils.init_ray`` puts it back after Ray's
    start replaces it): the run stops as Ctrl-C stops it, through a KeyboardInterrupt (Ray re-raises that one from
    a blocking ``ray.get``), so its ``finally`` blocks stop its workers and release its ``--out``. ``stopped_by()``
    then names the signal."""
    _stopped_by.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stopped_by(forget: bool = False) -> int | None:
    """The signal ``stop_on_signal`` took, or None (a Ctrl-C, or nothing); ``forget``: and none since."""
    signum = _stopped_by[-1] if _stopped_by else None
    if forget:
        _stopped_by.clear()
    return signum


class RunFailed(Exception):
    """A run stopped by a fault of the machine (a dead worker, a device error) that outlived its retries:
    one line and exit code 1. What was written before it stays complete, so a rerun resumes."""

    exit_code = 1


_FAULT_ERRNOS = {"ENOMEM", "ENOSPC", "EDQUOT", "EIO", "EREMOTEIO", "ESTALE", "ENOBUFS", "EAGAIN", "ETIMEDOUT",
                 "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "EPIPE"}


def machine_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault of the machine, never the user's input: memory (host or device)
    exhausted, a full disk, an I/O or network error. Such a fault is retried, never reported as a user
    error or written as a user's error row."""
    import errno

    if isinstance(exc, (MemoryError, ConnectionError, TimeoutError)):  # pyarrow's ArrowMemoryError too
        return True
    if isinstance(exc, OSError) and exc.errno is not None and errno.errorcode.get(exc.errno) in _FAULT_ERRNOS:
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA, XPU, ...)
        return True
    text = str(exc).lower()
    return any(m in text for m in _FAULT_MESSAGES)


def user_error_unless_fault(exc: BaseException, message: str) -> NoReturn:
    """Raise ``exc`` itself when it is a fault of the machine (``machine_fault``), else UserError(message)
    from it: for the places where a failure is the user's input unless the machine is at fault."""
    if machine_fault(exc):
        raise exc
    raise UserError(message) from exc


# Memory exhausted (torch's CPU allocator), and object stores' transient errors as pyarrow's and fsspec's
# clients word them (they raise plain OSErrors without an errno).
_FAULT_MESSAGES = ("out of memory", "can't allocate memory", "network_connection", "curlcode", "timed out",
                   "connection reset", "connection aborted", "slow_down", "slowdown", "service unavailable",
                   "serviceunavailable", "service_unavailable", "internalerror", "internal_failure", "throttl",
                   "request_timeout", "requesttimeout", "too many requests", "http status 429", "http status 500",
                   "http status 502", "http status 503", "http status 504", "deadline_exceeded", "deadline exceeded", "status(unavailable")
