"""One run at a time in an output folder.

``lease(out)`` holds a local ``--out`` for the length of one command: a second vocabtrim run into the same
folder, or into a folder inside it, on this machine or on another that mounts it, is refused in one line
while the first one runs. The holder's claim is an exclusive ``flock`` on ``out/.vocabtrim.lock``. The kernel
drops it when the holder's process ends, killed or not: there is no stale lease to break. On NFS, Linux turns
``flock`` into a lock the server keeps (NFSv4, or v3 with lockd), which holds across machines and which a
crashed client's machine keeps until the server's lease on it runs out; a mount with ``nolock`` or
``local_lock`` locks for its own machine only. Once a run holding the lease has claimed a folder as its own
(``storage.claim``), the partial files of killed runs in that folder (``.<name>.<random>.tmp``, written by
``storage`` before each rename) are removed: no run is writing them.

A folder on an object store has no lease (stores offer no lock that pyarrow reaches); two runs into one such
folder are the user's to avoid. Within one process a folder already held is held again (a sweep's stages,
say), not refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time

from vocabtrim import storage
from vocabtrim.errors import UserError, first_line, user_error_unless_fault

log = logging.getLogger(__name__)

LOCK_FILE = storage.LOCK_FILE

_held: dict[str, int] = {}  # folders this process holds (real paths) and how many leases on each


@contextlib.contextmanager
def lease(out: str):
    """Hold the output folder ``out`` while the ``with`` block runs (see the module's doc). A local folder that
    does not exist is made, and removed again at the end (with the folders made above it) when the run left
    nothing in it."""
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
    shown = storage.display(out)
    made = _missing_folders(path)
    storage.makedirs(path)
    try:
        _check_outer(path, shown)
        fd = _acquire(path, shown)
    except BaseException:
        _remove_empty(made)
        raise
    _held[path] = 1
    if fd is not None:  # under a lock (not where the file system had none to take)
        storage.LOCKED.add(path)
    try:
        yield
    finally:
        del _held[path]
        storage.LOCKED.discard(path)
        _release(path, fd)
        _remove_empty(made)


def _missing_folders(path: str) -> list[str]:
    """``path`` and the folders above it that do not exist, innermost first."""
    made = []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        made.append(path)
        path = os.path.dirname(path)
    return made


def _remove_empty(folders: list[str]) -> None:
    for folder in folders:  # innermost first; one that is not empty stops the rest
        try:
            os.rmdir(folder)
        except OSError:
            return


def _check_outer(path: str, shown: str) -> None:
    """Refuse a folder inside one another run holds (its run may write where this one would)."""
    outer = os.path.dirname(path)
    while True:
        if outer not in _held and os.path.exists(os.path.join(outer, LOCK_FILE)):
            holder = _held_by_another(os.path.join(outer, LOCK_FILE))
            if holder is not None:
                raise _in_use(f"--out {shown} is inside {outer}, which another vocabtrim run is writing", holder)
        if os.path.dirname(outer) == outer:
            return
        outer = os.path.dirname(outer)


def _held_by_another(lock: str) -> str | None:
    """The holder's line ("" when unreadable) when another process holds ``lock``, else None."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the shared lock
    return None


def _acquire(path: str, shown: str) -> int | None:
    """The lock file's descriptor, locked; None where the file system has no locks to take (the run goes on
    without a lease)."""
    lock = os.path.join(path, LOCK_FILE)
    while True:
        try:
            fd = _open(lock)
        except FileNotFoundError:  # a holder that made the folder removed it as it ended
            storage.makedirs(path)
            continue
        except OSError as exc:  # every command writes in its --out
            user_error_unless_fault(exc, f"cannot write in --out {shown}: {exc.strerror or first_line(exc)}")
        try:
            _lock_exclusive(fd)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise _in_use(f"--out {shown} is in use by another vocabtrim run", holder) from None
        except OSError as exc:
            read_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            os.close(fd)
            if exc.errno == errno.ESTALE:  # NFS: the file went as we locked it
                continue
            if read_only:  # NFS locks a file exclusively only when opened for writing: another user's lock file
                holder = _held_by_another(lock)
                if holder is not None:
                    raise _in_use(f"--out {shown} is in use by another vocabtrim run", holder) from None
                try:  # a killed run's: this run makes its own
                    os.unlink(lock)
                except FileNotFoundError:
                    pass
                except OSError as gone:
                    return _no_lease(shown, gone)
                continue
            with contextlib.suppress(OSError):  # no lock manager: the file would only stay behind
                os.unlink(lock)
            return _no_lease(shown, exc)
        try:  # the holder before us removed the file after we opened it: lock the one at the path now
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):  # a lock file of another user's, opened read-only, keeps its line
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)


def _in_use(what: str, holder: str) -> UserError:
    """The refusal: ``what``, the holder's line when there is one, and what to do."""
    return UserError(f"{what}{f' ({holder})' if holder else ''}: wait for it to end, or use another --out")


def _no_lease(shown: str, exc: OSError) -> None:
    """Warn that the run goes on without a lease (the file system has no lock to take); None, as ``_acquire`` returns."""
    log.warning("no lease on %s (%s): nothing stops another run from writing there", shown, exc.strerror or exc)


def _lock_exclusive(fd: int, tries: int = 5) -> None:
    """``flock(LOCK_EX | LOCK_NB)``, tried again for a few milliseconds while busy: a run checking the folders above
    its own holds this one's file shared for as long as a look takes (``_held_by_another``)."""
    for left in range(tries - 1, -1, -1):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not left:
                raise
            time.sleep(0.01)


def _open(lock: str) -> int:
    """The lock file, made if missing (writable by whoever may write in the folder, as the umask allows); one
    another user made is opened read-only, which ``flock`` takes as well."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        if not os.path.isfile(lock):
            raise
        return os.open(lock, os.O_RDONLY)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _release(path: str, fd: int | None) -> None:
    """Remove the lock file while still holding it (a run waiting to open it opens the next one), then unlock."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(path, LOCK_FILE))
        os.close(fd)
