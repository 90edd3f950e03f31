"""Fault injection for tests: the faults of the machine that workers must survive, raised on request.

Only tests set a ``fault_injection`` (``GenerateConfig``, ``TrainConfig``); no command-line flag reaches it.
"""

import os
import signal


def injected_fault(spec: str | None) -> None:
    """``once:<file>`` fails the first call that finds ``<file>`` (and removes it), ``always`` fails every call,
    both as a device fault would (a RuntimeError); ``sigkill-once:<file>``: the process whose call finds ``<file>``
    removes it and SIGKILLs itself, as the kernel's out-of-memory killer would. Other specs (and None) do nothing
    here."""
    if not spec:
        return
    if spec == "always":
        raise RuntimeError("injected device fault")
    if spec.startswith("sigkill-once:") and _take_marker(spec[len("sigkill-once:"):]):
        os.kill(os.getpid(), signal.SIGKILL)
    if spec.startswith("once:") and _take_marker(spec[len("once:"):]):
        raise RuntimeError("injected device fault (once)")


def _take_marker(path: str) -> bool:
    """Remove the marker file at ``path``: True for the one caller that removed it."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True
