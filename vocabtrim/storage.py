"""Where inputs and outputs live: local paths and object-store URIs behind one small API.

A *location* is a string: a local path (``data/corpus``, ``~/out``, ``/mnt/shared/x``) or a URI that
``pyarrow.fs.FileSystem.from_uri`` understands: ``s3://bucket/key``, ``gs://bucket/key``,
``hdfs://host/path``, ``abfs://container@account.dfs.core.windows.net/path``, ``file:///path``. Query
parameters of the URI configure the filesystem (``s3://b/k?region=eu-west-1`` or
``?endpoint_override=host:port&scheme=http`` for MinIO and other S3-compatible stores); credentials come
from the environment as pyarrow reads them (``AWS_*`` variables, the instance's role, ``~/.aws``,
``GOOGLE_APPLICATION_CREDENTIALS``), on every node that touches the data.

Every function takes and returns location strings, so shard descriptions, configs and Ray task
arguments stay plain strings; the filesystem behind a URI is made once per process and reused.

Writes are whole-object: ``write_bytes`` and ``write_with`` make a file appear complete or not at all
(locally a temporary file in the same folder, flushed and renamed; on an object store a single upload
of a finished local file, which the store publishes only when it completes).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

from vocabtrim.errors import UserError, first_line, user_error_unless_fault

LOCK_FILE = ".vocabtrim.lock"  # ``vocabtrim.lease``'s, in each output folder a run holds
LOCKED: set[str] = set()  # the local folders (real paths) this process holds locked (``vocabtrim.lease`` keeps it)
PARTIAL_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # ``_atomic_local``'s (mkstemp's) ``.<name>.<8 random>.tmp``
STAGED_OBJECT = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # ``write_with``'s staged upload: ``.<name>.<uuid4 hex>.tmp``
STAGED_STALE_S = 3600.0  # a staged upload this old is a killed run's: a live one is copied into place right after it
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
GLOB_CHARS = frozenset("*?[")


def is_uri(where: str) -> bool:
    """True for ``scheme://…`` (object stores, HDFS, ``file://``); False for a local path."""
    return bool(_URI.match(str(where)))


def is_local(where: str) -> bool:
    return not is_uri(where) or str(where).startswith("file://")


def has_glob(where: str) -> bool:
    """Wildcards in a location: ``* ? [`` in a local path, ``* [`` in a URI (whose ``?`` starts the query)."""
    return any(c in GLOB_CHARS for c in _split(where)[0])


def _split(where: str) -> tuple[str, str]:
    """``(location without query, "?query" or "")``."""
    where = str(where)
    if not is_uri(where):
        return where, ""
    parts = urlsplit(where)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), (f"?{parts.query}" if parts.query else "")


def local_path(where: str) -> str:
    """The local filesystem path of a local location (``~`` expanded, ``file://`` stripped)."""
    where = str(where)
    if where.startswith("file://"):
        return urlsplit(where).path
    return os.path.expanduser(where)


def join(where: str, *parts: str) -> str:
    """``where/part/...``, keeping a URI's query at the end."""
    base, query = _split(where)
    if not is_uri(where):
        return os.path.join(base, *parts)
    tail = "/".join(p.strip("/") for p in parts if p)
    return (base.rstrip("/") + "/" + tail if tail else base) + query


def name(where: str) -> str:
    """The last component (``s3://b/x/y.parquet?region=r`` → ``y.parquet``)."""
    return _split(where)[0].rstrip("/").rsplit("/", 1)[-1] if is_uri(where) else os.path.basename(str(where).rstrip(os.sep))


def parent(where: str) -> str:
    base, query = _split(where)
    if not is_uri(where):
        return os.path.dirname(os.path.abspath(local_path(base)))
    head, _, _ = base.rstrip("/").rpartition("/")
    return head + query


def display(where: str) -> str:
    """A location for messages: the query (which may carry endpoints or keys) left out."""
    return _split(where)[0]


def canonical(where: str) -> str:
    """One spelling per file, for deduplication and identity: local paths resolved, URIs without query."""
    if is_local(where):
        return os.path.realpath(local_path(where))
    return _split(where)[0].rstrip("/")


def input_folder_holding(out: str, inputs) -> str | None:
    """The first of ``inputs`` (as given) that is a folder holding ``out`` or equal to it, else None: an output
    folder there would be read as input by a rerun. Globs are not followed."""
    target = canonical(out)
    for where in inputs:
        where = os.fspath(where)
        if not has_glob(where) and is_dir(where):
            folder = canonical(where)
            sep = os.sep if is_local(where) else "/"
            if target == folder or target.startswith(folder.rstrip(sep) + sep):
                return where
    return None


@functools.lru_cache(maxsize=32)
def _root(root_uri: str):
    """``(filesystem, path of the root)`` for ``scheme://netloc/?query``: one filesystem per store and options."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(root_uri)


def resolve(where: str):
    """``(pyarrow FileSystem, path inside it)`` for a location. UserError for a URI pyarrow cannot open."""
    import pyarrow.fs as pafs

    if is_local(where):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(where))
    parts = urlsplit(str(where))
    try:
        fs, root = _root(urlunsplit((parts.scheme, parts.netloc, "/", parts.query, "")))
    except Exception as exc:  # unknown scheme, bad query option, filesystem not built into this pyarrow (a network
        # error looking up the bucket's region is a fault)
        user_error_unless_fault(exc, f"cannot open {display(where)}: {first_line(exc)}")
    key = parts.path.strip("/")
    return fs, (root.rstrip("/") + "/" + key if key else root.rstrip("/") or "/")


def _info(where: str):
    fs, path = resolve(where)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        user_error_unless_fault(exc, f"cannot reach {display(where)}: {first_line(exc)}")


def is_file(where: str) -> bool:
    import pyarrow.fs as pafs

    return _info(where).type == pafs.FileType.File


def is_dir(where: str) -> bool:
    import pyarrow.fs as pafs

    return _info(where).type == pafs.FileType.Directory


def exists(where: str) -> bool:
    import pyarrow.fs as pafs

    return _info(where).type != pafs.FileType.NotFound


def stat(where: str) -> tuple[int, int]:
    """``(size in bytes, modification time in ns)`` of a file (mtime 0 where the store keeps none)."""
    info = _info(where)
    return int(info.size or 0), int(info.mtime_ns or 0)


def _listing(where: str) -> dict:
    """One recursive listing under ``where``: ``{relative path (POSIX): pyarrow FileType}``, empty if absent."""
    import pyarrow.fs as pafs

    fs, root = resolve(where)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        user_error_unless_fault(exc, f"cannot list {display(where)}: {first_line(exc)}")
    return {i.path[len(root):].lstrip("/"): i.type for i in infos if i.type != pafs.FileType.NotFound}


def walk_files(where: str) -> list[str]:
    """Every file under a folder, recursively, as locations, sorted (hidden ``.`` entries included)."""
    import pyarrow.fs as pafs

    return [join(where, *rel.split("/")) for rel, kind in sorted(_listing(where).items()) if kind == pafs.FileType.File]


def relative(where: str, root: str) -> str:
    """``where`` relative to ``root`` with POSIX separators (``where`` must lie under ``root``)."""
    a, b = _split(where)[0], _split(root)[0]
    if not is_uri(where):
        return os.path.relpath(local_path(a), local_path(b)).replace(os.sep, "/")
    return a[len(b.rstrip("/")):].lstrip("/")


def hidden(rel: str, named: tuple[str, ...] | list[str] = ()) -> bool:
    """Whether a path relative to a folder that is read as input passes through a hidden entry (a name starting
    with ``.`` or ``_``): Spark's ``_SUCCESS`` and ``_temporary/``, Delta's ``_delta_log/``, ``.crc`` checksums,
    ``.ipynb_checkpoints``. Those are never data, unless ``named``: a glob's parts below its wildcard-free start
    (``rel`` is a match below it), one starting with the entry's first character matching it."""
    return any(p[:1] in (".", "_") and p != "." and not any(c[:1] == p[:1] and fnmatch.fnmatchcase(p, c) for c in named)
               for p in rel.split("/"))  # ".": a glob's start itself (``tbl/**`` matches ``tbl/``)


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as ``glob.glob(recursive=True)`` reads it: ``*``/``[...]`` within one component, ``**`` as a
    whole component matching zero or more components, and names starting with ``.`` matched only by a
    pattern component that starts with ``.``."""
    visible = r"(?!\.)[^/]+"
    out = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(f"(?:{visible}(?:/{visible})*)?" if last else f"(?:{visible}/)*")
            continue
        rx = fnmatch.translate(part)  # '(?s:...)\\Z'
        rx = rx[rx.index(":") + 1: rx.rindex(")")].replace(".*", "[^/]*")
        if not part.startswith("."):
            rx = r"(?!\.)" + rx
        out.append(rx + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z", re.S)


def glob_typed(pattern: str) -> list[tuple[str, bool]]:
    """``(location, is a folder)`` for every file and folder matching a glob, sorted by location; as inputs are
    read, a match through a ``hidden`` entry the pattern does not name is left out (``tbl/*`` takes no
    ``tbl/_SUCCESS`` nor ``tbl/_delta_log``, ``tbl/**/*.parquet`` nothing under ``tbl/_temporary/``;
    ``tbl/_delta_log/*`` and ``tbl/_d*/*`` name that folder).

    Local patterns go through ``glob.glob(recursive=True)``; a URI's matches come from one listing of
    the longest prefix without wildcards (so no request per match). In a URI ``?`` starts the query,
    so the wildcards there are ``*``, ``**`` and ``[...]``, and the bucket (host) cannot hold them.
    """
    import glob as globlib

    if is_local(pattern):
        path = local_path(pattern)
        parts = path.split(os.sep)
        wild = next(i for i, c in enumerate(parts) if any(ch in GLOB_CHARS for ch in c))
        start = os.sep.join(parts[:wild]) or (os.sep if wild else os.curdir)  # [""]: the pattern starts at the root
        return [(m, os.path.isdir(m)) for m in sorted(globlib.glob(path, recursive=True))
                if not hidden(os.path.relpath(m, start).replace(os.sep, "/"), parts[wild:])]
    import pyarrow.fs as pafs

    base, query = _split(pattern)
    scheme_host, _, path = base.partition("://")
    host, _, key = path.partition("/")
    if any(ch in GLOB_CHARS for ch in host):
        raise UserError(f"{display(pattern)}: wildcards in the bucket or host name are not supported")
    comps = key.split("/")
    fixed = next(i for i, c in enumerate(comps) if any(ch in GLOB_CHARS for ch in c))
    prefix = f"{scheme_host}://{host}/" + "/".join(comps[:fixed]) + query
    rx = _glob_regex("/".join(comps[fixed:]))
    return [(join(prefix, *rel.split("/")), kind == pafs.FileType.Directory)
            for rel, kind in sorted(_listing(prefix).items()) if rx.match(rel) and not hidden(rel, comps[fixed:])]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


IO_THREADS = 16  # reads of many small objects at once (each a store round trip, mostly waiting)


def each(fn: Callable, items, threads: int = IO_THREADS) -> list:
    """``[fn(x) for x in items]`` with up to ``threads`` calls at once (``each_in_order``)."""
    return list(each_in_order(fn, items, threads))


def each_in_order(fn: Callable, items, threads: int = IO_THREADS):
    """``fn(x)`` for each of ``items`` (a generator), up to ``threads`` calls at once, for reads whose time is round
    trips. Results come in the items' order, and so does the exception raised: the first item's that failed. At most
    ``2 * threads`` calls are begun ahead of the result taken, so at most that many results are held."""
    items = iter(items)
    if threads < 2:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pending: deque = deque()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vocabtrim-io")
    try:
        while True:
            while len(pending) < 2 * threads and (x := next(items, _END)) is not _END:
                pending.append(pool.submit(fn, x))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # an error or a reader that stops: the calls not begun are dropped


_END = object()


def open_input_file(where: str):
    """A random-access pyarrow file (for ``pq.ParquetFile``, Arrow IPC readers, ranged reads)."""
    fs, path = resolve(where)
    return fs.open_input_file(path)


class _RawNative(io.RawIOBase):
    """A pyarrow random-access file as a raw Python stream, so ``io.BufferedReader`` can add ``readline``."""

    def __init__(self, native):
        self._f = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        super().close()


def open_binary(where: str, buffer_size: int = 1 << 20):
    """A seekable binary reader with ``readline`` (a plain ``open`` for local files). On an object store
    each refill of the buffer is one ranged GET of ``buffer_size`` bytes: small to peek, large to stream."""
    if is_local(where):
        return open(local_path(where), "rb")
    return io.BufferedReader(_RawNative(open_input_file(where)), buffer_size=buffer_size)


def read_bytes(where: str) -> bytes:
    if is_local(where):
        with open(local_path(where), "rb") as f:
            return f.read()
    with open_input_file(where) as f:
        return f.read()


def read_text(where: str) -> str:
    return read_bytes(where).decode("utf-8")


def read_manifest(where: str, kind: str, what: str, missing: str, writer: str = "") -> dict:
    """The JSON manifest at ``where`` whose ``"kind"`` is ``kind``.

    UserError, one line: ``missing`` when there is no such file, else "not valid JSON" or "not a ``what``" (and,
    given the command that writes such a manifest, ``writer``, to pass a folder it wrote).
    """
    try:
        manifest = json.loads(read_text(where))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UserError(missing) from exc
    except ValueError as exc:
        raise UserError(f"{display(where)} is not valid JSON: {exc}") from exc
    except OSError as exc:  # a folder of that name, no permission (an I/O error: the machine's)
        user_error_unless_fault(exc, f"{display(where)} is unreadable ({exc.strerror or first_line(exc)}): pass a folder that holds a {what}")
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        raise UserError(f"{display(where)} is not a {what}" + (f": pass a folder written by {writer}" if writer else ""))
    return manifest


# ---------------------------------------------------------------------------------------------
# Writing (whole files only)
# ---------------------------------------------------------------------------------------------


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _local_folder(path: str) -> None:
    """``os.makedirs``; a folder the user named that cannot be made (no permission, a file on its path) is
    the user's mistake, a full disk or an I/O error a fault of the machine."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        user_error_unless_fault(exc, f"cannot create folder {path}: {exc.strerror or first_line(exc)}")


def _atomic_local(path: str, write: Callable[[str], None]) -> None:
    path = os.path.abspath(path)
    _local_folder(os.path.dirname(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    except OSError as exc:
        user_error_unless_fault(exc, f"cannot write in {os.path.dirname(path)}: {exc.strerror or first_line(exc)}")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_SERVER_COPY_BYTES = 5 << 30  # S3's CopyObject copies objects up to 5 GiB


def _upload(where: str, fill: Callable) -> None:
    """One object at ``where`` (not local), written by ``fill(output stream)``. pyarrow's object streams complete
    the upload when closed, even while an exception propagates: an upload that fails part-way is deleted, so no
    partial object stays at ``where``."""
    fs, path = resolve(where)
    try:
        try:
            with fs.open_output_stream(path) as dst:
                fill(dst)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_file(path)
            raise
    except OSError as exc:
        user_error_unless_fault(exc, f"cannot write {display(where)}: {first_line(exc)}")


def write_with(where: str, write: Callable[[str], None]) -> None:
    """Let ``write(local_path)`` produce a file, then publish it at ``where`` all at once: on an object store it
    is uploaded beside ``where`` and copied into place on the server (readers see the old object or the whole new
    one); a file over 5 GiB, more than one server-side copy takes, is uploaded in place (an upload that fails is
    deleted, the old object with it)."""
    if is_local(where):
        _atomic_local(local_path(where), write)
        return
    fd, tmp = tempfile.mkstemp(prefix=".vocabtrim-upload-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        staged = where if os.path.getsize(tmp) > _SERVER_COPY_BYTES else join(parent(where), f".{name(where)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "rb") as src:
            _upload(staged, lambda dst: shutil.copyfileobj(src, dst, 8 << 20))
        if staged != where:
            fs, path = resolve(where)
            try:
                fs.move(resolve(staged)[1], path)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    fs.delete_file(resolve(staged)[1])
                if isinstance(exc, OSError):
                    user_error_unless_fault(exc, f"cannot write {display(where)}: {first_line(exc)}")
                raise
    finally:
        os.unlink(tmp)


def write_bytes(where: str, data: bytes) -> None:
    """Publish ``data`` at ``where`` all at once (readers see the old object or the whole new one; on an object
    store through ``write_with``'s staged upload, so an upload that fails leaves the old object)."""

    def dump(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    if is_local(where):
        _atomic_local(local_path(where), dump)
    else:
        write_with(where, dump)


def atomic_write(where, data) -> None:
    """``write_bytes`` for bytes, ``write_with`` for a callable that writes a given local path."""
    where = os.fspath(where)
    if callable(data):
        write_with(where, data)
    else:
        write_bytes(where, bytes(data))


def makedirs(where: str) -> None:
    """Create a local folder (object stores have no folders: nothing to do there)."""
    if is_local(where):
        _local_folder(local_path(where))


def delete(where: str) -> None:
    """Remove a file if it is there."""
    fs, path = resolve(where)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_folder(where: str) -> None:
    """Remove a folder and everything under it, if it is there (on an object store: every object under it)."""
    fs, path = resolve(where)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Output folders bound to settings
# ---------------------------------------------------------------------------------------------


def settings_key(name: str | None) -> str | None:
    """A model, corpus or prompt name as recorded in settings: a local path that exists made absolute, a URI
    without its query (which may carry keys, and rotates with them), anything else (a hub id, a bundled model's
    name) as given."""
    if name is None:
        return None
    name = str(name)
    if is_uri(name):
        return display(name)
    path = os.path.expanduser(name)
    return os.path.realpath(path) if os.path.exists(path) else name


def check_out_kind(folder: str, kind: str, overwrites: tuple[str, ...] = ()) -> dict | None:
    """Refuse, in one line, an ``--out`` whose ``manifest.json`` is of another kind than ``kind`` (another
    command's output, or a file vocabtrim did not write), or that has no manifest but holds one of the files
    ``overwrites`` (a model's folder, say): the run would overwrite it. Returns the manifest an earlier run of
    this kind left there, else None."""
    path = join(folder, "manifest.json")
    if not is_file(path):  # no manifest to overwrite (also when --out is a file)
        found = next((name for name in overwrites if is_file(join(folder, name))), None)
        if found is not None:
            raise UserError(f"--out {display(folder)} holds {found} but no manifest.json: it is not a {kind!r} folder, and the run "
                            "would overwrite it; use a new --out")
        return None
    try:
        manifest = json.loads(read_text(path))
        found = manifest.get("kind")
    except OSError as exc:  # an I/O error reading it says nothing of whose folder it is
        user_error_unless_fault(exc, f"--out {display(folder)} holds a manifest.json that cannot be read "
                                     f"({exc.strerror or first_line(exc)}): use a new --out")
    except (ValueError, AttributeError):
        found = None
    if found != kind:
        what = f"a {found!r} manifest.json" if isinstance(found, str) else "a manifest.json vocabtrim did not write"
        raise UserError(f"--out {display(folder)} holds {what}, not {kind!r}: it is another command's output; use a new --out")
    return manifest


def claim(folder: str, record: str, settings: dict, *, key: str | None = None, what: str = "outputs",
          binds: Callable[[], bool] | None = None, stray: Callable[[str], bool] = lambda name: True,
          later: tuple[str, ...] = ()) -> dict:
    """Claim the output folder ``folder`` for a run with ``settings``, so that a rerun resumes only with the
    same settings. The settings are recorded in the JSON file ``folder/record``: the whole file, or its
    ``key`` entry.

    - ``folder`` is a file: refused.
    - No record yet: refused when the folder holds a file whose name ``stray(name)`` accepts (the output of
      something else); otherwise the record ``settings`` (or ``{key: settings}``) is written.
    - A record with the same settings (keys of both compared): the run resumes. Keys in ``later`` are settings
      that records written by an earlier vocabtrim lack: compared only where the record has them, and written
      into a record that lacks them (the run's own work is made under them).
    - A record with other settings: refused, naming the first differences, unless ``binds()`` says the
      folder holds nothing made under the recorded settings; then the record is rewritten with these.

    Refusals are UserError, one line. Returns the record as it is in the file afterwards. Once claimed, the
    folder's partial files of killed runs are removed where this process holds its lease (``lease``).
    """
    recorded = _claim(folder, record, settings, key=key, what=what, binds=binds, stray=stray, later=later)
    remove_temporaries(folder)
    return recorded


def _claim(folder: str, record: str, settings: dict, *, key: str | None, what: str, binds: Callable[[], bool] | None,
           stray: Callable[[str], bool], later: tuple[str, ...]) -> dict:
    shown = display(folder)
    path = join(folder, record)
    fresh = {key: settings} if key else dict(settings)
    if is_file(folder):
        raise UserError(f"--out {shown} is a file, not a folder")
    if not is_file(path):
        names = [name(p) for p in walk_files(folder)]
        # A temporary file of ours (``.<name>.<random>.tmp``: a run killed while it wrote) is no one's output, nor
        # is the lease's lock file (``vocabtrim.lease``).
        found = next((n for n in names if stray(n) and not (n.startswith(".") and n.endswith(".tmp")) and n != LOCK_FILE), None)
        if found is not None:
            raise UserError(f"--out {shown} already holds files ({found}) but no {record}: use a new or empty --out")
        makedirs(folder)
        write_json(path, fresh)
        return fresh
    if binds is not None and not binds():
        write_json(path, fresh)
        return fresh
    try:
        recorded = json.loads(read_text(path))
        old = recorded.get(key, {}) if key else recorded
        if not isinstance(old, dict):
            raise ValueError(f"not a JSON object: {old!r}"[:80])
    except (OSError, ValueError, AttributeError) as exc:
        user_error_unless_fault(exc, f"{display(path)} is unreadable ({first_line(exc)}): use a new --out")
    diffs = [f"{k} {_without_queries(old.get(k))!r} now {settings.get(k)!r}"
             for k in [*settings, *(k for k in old if k not in settings)]
             if _without_queries(old.get(k)) != settings.get(k) and (k in old or k not in later)]
    if diffs:
        raise UserError(
            f"{shown} holds {what} made with other settings ({'; '.join(diffs[:3])}{'; …' if len(diffs) > 3 else ''}): "
            "rerun with the same settings to resume, or use a new --out"
        )
    added = {k: settings[k] for k in later if k in settings and k not in old}
    if added:  # what this run adds is made under these values: from here on they are checked too
        old.update(added)
        write_json(path, recorded)
    return recorded


def locked(where: str) -> bool:
    """Whether this process holds the lock (``vocabtrim.lease``) on the local folder ``where`` or a folder above it."""
    if not is_local(where):
        return False
    path = os.path.realpath(local_path(where))
    return any(path == p or path.startswith(p.rstrip(os.sep) + os.sep) for p in LOCKED)


def remove_temporaries(where: str) -> None:
    """The partial files that killed runs left in the local folder ``where`` (not in folders below it):
    ``_atomic_local``'s ``.<name>.<8 random characters>.tmp``, never a complete output (those have their final
    names). Nothing unless this process holds the lock on ``where`` or a folder above it (``locked``), and no other
    run's lock file is there: no run is writing them. In a folder on an object store, which has no lock:
    ``write_with``'s staged uploads (``.<name>.<32 hex>.tmp``) older than ``STAGED_STALE_S``."""
    if not is_local(where):
        _remove_stale_staged(where)
        return
    if not locked(where):
        return
    folder = os.path.realpath(local_path(where))
    if folder not in LOCKED and os.path.exists(os.path.join(folder, LOCK_FILE)):  # another run's folder, or a killed one's
        return
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    for n in names:
        if PARTIAL_FILE.match(n):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(os.path.join(folder, n))


def remove_temporaries_below(where: str, folders: set[str]) -> None:
    """``remove_temporaries`` in each of ``folders``, folders below ``where``: on an object store one recursive
    listing of ``where`` (one listing per folder would be a round trip each), removing stale staged uploads
    anywhere below it."""
    if is_local(where):
        for folder in folders:
            remove_temporaries(folder)
    elif folders:
        _remove_stale_staged(where, recursive=True)


def _remove_stale_staged(folder: str, recursive: bool = False) -> None:
    """``remove_temporaries`` on an object store: one listing of ``folder`` (below it too where ``recursive``);
    best effort, and nothing whose age the store does not tell."""
    import pyarrow.fs as pafs

    fs, root = resolve(folder)
    with contextlib.suppress(OSError):
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
        oldest = time.time_ns() - int(STAGED_STALE_S * 1e9)
        for info in infos:
            if info.type == pafs.FileType.File and STAGED_OBJECT.match(info.base_name) and 0 < (info.mtime_ns or 0) <= oldest:
                fs.delete_file(info.path)


def _without_queries(value):
    """A recorded setting with each URI's query left out, as ``settings_key`` records it now (records written
    before kept the query): a string, or a list of them; anything else as it is."""
    if isinstance(value, str) and is_uri(value):
        return display(value)
    if isinstance(value, list):
        return [_without_queries(v) for v in value]
    return value


def write_json(where: str, data) -> None:
    """Publish ``data`` as indented JSON at ``where`` all at once."""
    write_bytes(where, (json.dumps(data, indent=2, default=str) + "\n").encode())
