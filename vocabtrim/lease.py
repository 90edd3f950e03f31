"""One run at a time in an output folder.

``lease(out)`` holds a local ``--out`` for the length of one command: a second vocabtrim run into the same
folder, on this machine or on another that mounts it, is refused in one line while the first one runs. The
holder's claim is an exclusive ``flock`` on ``out/.vocabtrim.lock``, which the kernel (or the NFS server,
which Linux hands ``flock`` to as a whole-file lock) drops when the holder's process ends, killed or not:
there is no stale lease to break. Once a run holding the lease has claimed the folder as its own
(``storage.claim``), the partial files of killed runs there (``.<name>.<random>.tmp``, written by ``storage``
before each rename) are removed: no run is writing them.

A folder on an object store has no lease (stores offer no lock that pyarrow reaches); two runs into one such
folder are the user's to avoid. Within one process a folder already held is held again (a sweep's stages,
say), not refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket

from vocabtrim import storage
from vocabtrim.errors import UserError, first_line, user_error_unless_fault

log = logging.getLogger(__name__)

LOCK_FILE = storage.LOCK_FILE

_held: dict[str, int] = {}  # folders this process holds (real paths) and how many leases on each


@contextlib.contextmanager
def lease(out: str):
    """Hold the output folder ``out`` while the ``with`` block runs (see the module's doc). A local folder that
    does not exist is made, and removed again at the end when the run left nothing in it."""
    if not storage.is_local(out) or os.path.isfile(storage.local_path(out)):  # a file: the command refuses it
        yield
        return
    path = os.path.realpath(storage.local_path(out))
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    made = not os.path.exists(path)
    storage.makedirs(path)
    fd = _acquire(path, storage.display(out))
    _held[path] = 1
    if fd is not None:  # under a lock (not where the file system had none to take)
        storage.LOCKED.add(path)
    try:
        yield
    finally:
        del _held[path]
        storage.LOCKED.discard(path)
        _release(path, fd, made)


def _acquire(path: str, shown: str) -> int | None:
    """The lock file's descriptor, locked; None where the file system has no locks to take (the run goes on
    without a lease)."""
    lock = os.path.join(path, LOCK_FILE)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # every command writes in its --out
            user_error_unless_fault(exc, f"cannot write in --out {shown}: {exc.strerror or first_line(exc)}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"--out {shown} is in use by another vocabtrim run{f' ({holder})' if holder else ''}: "
                            "wait for it to end, or use another --out") from None
        except OSError as exc:  # no lock manager (an NFS mount with nolock, say)
            os.close(fd)
            log.warning("no lease on %s (%s): nothing stops another run from writing there", shown, exc.strerror or exc)
            return None
        try:  # the holder before us removed the file after we opened it: lock the one at the path now
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _release(path: str, fd: int | None, made: bool) -> None:
    """Remove the lock file while still holding it (a run waiting to open it opens the next one), then unlock;
    a folder the lease made and the run left empty goes too."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(path, LOCK_FILE))
        os.close(fd)
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only when empty
