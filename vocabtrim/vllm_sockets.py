"""A folder of this process's own for vLLM's IPC sockets.

vLLM names one ZMQ IPC socket file per engine channel under ``VLLM_RPC_BASE_PATH`` (the temp folder by
default, ``<temp>/<uuid4>``) and leaves the files there when its engine shuts down (seven for one engine
of vLLM 0.32's CPU build, target alone), never removed. Unless the user set ``VLLM_RPC_BASE_PATH``,
``VllmEngine`` points it at ``<temp>/vocabtrim-vllm-<uid>/<pid>`` (``claim``); an engine's own files (those
that appeared while it started) go when it closes, everything in the folder when the process's last engine
closes (``release``), and the folder at exit. A process killed before that (a Ray actor ended by
``ray.kill``) leaves its folder; the next ``claim`` on the node removes the folders of processes that are
no longer alive. A root folder that is not this user's own (a file, a link, another owner, writable by
others: anyone may create a name in the temp folder) is not used: vLLM then keeps its default, and a
warning says so.

The variable is set once a process: vLLM caches its environment after an in-process engine starts, so
every engine of a process uses the same folder.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "VLLM_RPC_BASE_PATH"

_folder: Path | None = None  # this process's folder, once claimed
_open = 0  # engines of this process using it


def root() -> Path:
    """The folder that holds one socket folder per process (per user, so users do not share it)."""
    return Path(tempfile.gettempdir()) / f"vocabtrim-vllm-{_uid()}"


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def private(folder: Path) -> bool:
    """Whether ``folder`` is a directory, not a link, owned by this user, and no one else may write in it."""
    st = os.lstat(folder)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == _uid() and not st.st_mode & 0o022


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead(under: Path) -> list[Path]:
    """Remove the socket folders under ``under`` whose process (the folder's name) is not alive; returns them."""
    gone = []
    for d in under.iterdir() if under.is_dir() else ():
        if d.is_dir() and d.name.isdigit() and int(d.name) != os.getpid() and not _alive(int(d.name)):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def user_chose() -> bool:
    """Whether ``ENV`` is the user's: set, and not a process's folder under ``root()`` (one there was set by
    vocabtrim, in this process or in a parent whose environment it inherited: Ray's workers inherit the
    environment of the process that started Ray)."""
    chosen = os.environ.get(ENV)
    return bool(chosen) and Path(chosen).parent != root()


def claim() -> Path | None:
    """Before an engine starts: this process's socket folder (made, and ``ENV`` set to it, on the first call).
    Returns None when ``user_chose()`` (changing nothing) and when ``root()`` is not ``private`` (``ENV`` then
    unset: vLLM's default); another process's folder, inherited, is replaced."""
    global _folder, _open
    if _folder is None:
        if user_chose():
            return None
        base = root()
        try:
            base.mkdir(mode=0o700)
        except FileExistsError:  # a folder, or something else in its place (checked next)
            pass
        if not private(base):
            log.warning("%s is not a folder of this user's own (a file, a link, another owner, or writable by "
                        "others): vLLM's socket files go to its default place", base)
            os.environ.pop(ENV, None)  # unset, or a parent's folder under this root
            return None
        remove_dead(base)
        folder = base / str(os.getpid())
        folder.mkdir(mode=0o700, exist_ok=True)
        os.environ[ENV] = str(folder)
        atexit.register(shutil.rmtree, folder, True)
        _folder = folder
    _open += 1
    return _folder


def entries(folder: Path | None) -> set[Path]:
    """What ``folder`` holds now (empty for None)."""
    return set(folder.iterdir()) if folder is not None and folder.is_dir() else set()


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def release(made: set[Path] = frozenset()) -> None:
    """After an engine that ``claim``ed has shut down: remove ``made`` (what appeared in the folder while it
    started), and when it was the process's last open engine, everything else its engines left (the folder
    stays: the variable may be cached)."""
    global _open
    if _folder is None or _open == 0:
        return
    _open -= 1
    for entry in made:
        _remove(entry)
    if _open == 0:
        for entry in entries(_folder):
            _remove(entry)
