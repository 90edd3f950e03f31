"""The cache of model folders derived from a user's files: a GGUF file's safetensors conversion
(``models.gguf_folder``) and the drafter folders vLLM loads (``vllm_backend.drafter_folder``).

Each entry is keyed by its record (``entry_record``: its sources' paths, sizes and modification times,
and its settings), so an entry whose source is deleted or changed (a reinstalled package, a removed
virtual environment or clone) can never be looked up again. Each entry keeps that record in ``RECORD``;
publishing an entry removes the entries under the same cache root whose recorded sources are gone or
changed, and those with the same record under an earlier version's key, so the cache holds one entry per
live source rather than one per install. Entries without a record are never removed; the temporary
folder of a writer that was killed is, a day later.

A cache root may be shared by several machines (a home directory on NFS): a source path recorded by one
machine may not exist, or be another file, on the next. An entry recorded by another machine is judged
stale only once it has gone unused (``lookup``) for a day.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

RECORD = ".vocabtrim-sources.json"
ABANDONED_S = 24 * 3600  # a temporary folder this old lost its writer: no conversion takes a day


def cache_root() -> Path:
    """``$VOCABTRIM_CACHE``, else ``$XDG_CACHE_HOME/vocabtrim``, else ``~/.cache/vocabtrim``."""
    root = os.environ.get("VOCABTRIM_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vocabtrim"


def stamp(path: Path) -> dict:
    """A source file's identity as the cache keys see it: resolved path, size, modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def stamps(paths: Iterable[Path]) -> list[dict]:
    """``stamp`` of each source file, in the order given."""
    return [stamp(Path(p)) for p in paths]


def entry_record(sources: list[dict], *params: str) -> dict:
    """What an entry is made from: its source files' ``stamps`` and its settings (``"layers=4"``, ...).
    Its key is made from it (``entry_key``) and it is written into the entry as ``RECORD``."""
    return {"sources": sources, "params": list(params)}


def entry_key(record: dict) -> str:
    """The key (16 hex digits) of the entry ``record`` describes: a source file changed or moved, or another
    setting, is another key."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _ours_to_judge(entry: Path, record: dict, now: float) -> bool:
    """An entry this machine recorded (or a record that names no machine), or one unused for ``ABANDONED_S``."""
    return record["host"] in (None, socket.gethostname()) or _untouched(entry, now)


def _untouched(entry: Path, now: float) -> bool:
    """Whether ``entry`` has not been modified (or marked used by ``lookup``) for ``ABANDONED_S``."""
    try:
        return now - entry.stat().st_mtime > ABANDONED_S
    except OSError:
        return False


def _same_entry(a: dict, b: dict) -> bool:
    """Two records of the same sources and settings, whichever machine wrote them."""
    return (a["sources"], a["params"]) == (b["sources"], b["params"])


def _sources_changed(record: dict) -> bool:
    """Whether a source the record stamps is gone or changed, as this machine sees it."""
    for s in record["sources"]:
        try:
            st = os.stat(s["path"])
        except (OSError, KeyError, TypeError):
            return True
        if (st.st_size, st.st_mtime_ns) != (s.get("size"), s.get("mtime_ns")):
            return True
    return False


def _read_record(entry: Path) -> dict | None:
    try:
        record = json.loads((entry / RECORD).read_text())
        return {"sources": list(record["sources"]), "params": list(record.get("params", [])),
                "host": record.get("host")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no record (or an unreadable one): not ours to judge


def _complete(entry: Path) -> bool:
    """Whether ``entry`` holds a model folder: its config and weights (a folder a removal left half-deleted, or
    whose weight links point into a removed entry, does not)."""
    return (entry / "config.json").is_file() and any(p.is_file() for p in entry.glob("*.safetensors"))


def lookup(entry: Path) -> bool:
    """Whether the cached folder ``entry`` is complete; if so it is marked used now (its modification time),
    which keeps another machine sharing the cache from judging it (``is_stale``, ``prune``)."""
    if not _complete(entry):
        return False
    try:
        os.utime(entry)
    except OSError:  # a read-only cache is still a cache
        pass
    return True


def is_stale(entry: Path, now: float | None = None) -> bool:
    """True when ``entry`` records its sources and one of them is gone or changed, as this machine sees them;
    for an entry another machine recorded, only once it has gone unused for ``ABANDONED_S``. (``prune``
    judges the same way from the one read of each record it also compares.)"""
    record = _read_record(entry)
    return (record is not None and _ours_to_judge(entry, record, time.time() if now is None else now)
            and _sources_changed(record))


def is_abandoned(entry: Path, now: float) -> bool:
    """True for a temporary folder of ``publish_folder`` untouched for ``ABANDONED_S`` (its writer was killed)."""
    return ".tmp-" in entry.name and _untouched(entry, now)


def prune(root: Path, keep: Path | None = None) -> list[Path]:
    """Remove the stale entries (``root/KIND/ENTRY``) under ``root``, abandoned temporary folders, and the
    entries ``keep`` supersedes (the same record under another name: a key from an earlier version of
    ``entry_key``); returns those removed.

    Runs until nothing more is stale: an entry derived from a removed one (a drafter folder whose
    weights link into a removed conversion) goes in the same call.
    """
    kept = _read_record(keep) if keep is not None else None

    def why(e: Path, now: float) -> str | None:
        if ".tmp-" in e.name:
            return "a writer left it unfinished a day ago" if is_abandoned(e, now) else None
        record = _read_record(e)
        if record is None or not _ours_to_judge(e, record, now):
            return None
        if _sources_changed(record):
            return "a file it was made from is gone or changed"
        if kept is not None and e.parent == keep.parent and _same_entry(record, kept):
            return f"{keep.name} is made from the same files and settings"
        return None

    removed: list[Path] = []
    while True:
        now = time.time()
        stale = [(e, w) for e in sorted(root.glob("*/*"))
                 if e.is_dir() and e != keep and e not in removed and (w := why(e, now))]
        if not stale:  # each entry is tried once: one it cannot remove stays
            return removed
        for entry, reason in stale:
            log.info("removing the cached folder %s: %s", entry, reason)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)


def kind_folder(kind: str) -> Path:
    """``cache_root() / kind``, made if need be; a cache folder that cannot be made (``VOCABTRIM_CACHE`` on a
    read-only mount or a file on its path) is refused in one line naming it, unless the machine is at fault."""
    from vocabtrim.errors import first_line, user_error_unless_fault

    folder = cache_root() / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        user_error_unless_fault(exc, f"cannot use the cache folder {folder} ({exc.strerror or first_line(exc)}): set "
                                     "VOCABTRIM_CACHE to a writable folder")
    return folder


@contextlib.contextmanager
def _writing(out: Path):
    """One writer of ``out`` at a time among the processes of this machine (an advisory lock in the cache root's
    ``.locks``; empty files, one per entry ever written): the others wait, then find it written."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks: writers race, and the first rename wins
        yield
        return
    locks = out.parent.parent / ".locks"  # beside the kind folders, not among their entries
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{out.parent.name}-{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def publish_folder(out: Path, write: Callable[[Path], None], record: dict) -> None:
    """Make the cached folder ``out`` appear whole: ``write(tmp)`` fills a temporary folder beside it,
    which gets ``RECORD`` (``record``, the ``entry_record`` its key was made from, stamped before writing,
    and this machine's name) and is then renamed. One process of a machine writes it at a time; one that
    finds it complete once its turn comes writes nothing (N actors of one node convert a GGUF file once). An
    incomplete folder in its place (left half-deleted) is replaced. Then the entries under ``out``'s cache
    root (``out.parent.parent``) that ``prune`` removes go."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _writing(out):
        if _complete(out):  # another process wrote it while this one waited
            return
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
        try:
            write(tmp)
            (tmp / RECORD).write_text(json.dumps({**record, "host": socket.gethostname()}, indent=1))
            try:
                os.rename(tmp, out)
            except OSError:
                if _complete(out):  # lost a race to another machine sharing the cache: theirs is complete
                    pass
                elif out.is_dir():  # a folder a removal left half-deleted: replaced
                    shutil.rmtree(out)
                    os.rename(tmp, out)
                else:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        prune(out.parent.parent, keep=out)
    except OSError as exc:  # removing old entries is housekeeping: never a reason to fail the caller
        log.warning("could not prune the cache under %s: %s", out.parent.parent, exc)
