"""Corpus files, folders and globs → shards with stable ids, and the readers that stream a shard's rows.

Supported inputs (``--corpus``):
- ``.parquet`` files: the text column is read through pyarrow, one row group at a time (a large row
  group is cut into row slices); never a whole file into one list.
- ``.jsonl`` files: one JSON object per line; the text column is a key of each object.
- ``.txt`` files: one row per line, the line break kept (so newline tokens are counted; a prompt of the
  generated sources drops it: ``calibrate.prompt_value``).
- folders (searched recursively for the three kinds above), glob patterns, and folders written by
  Hugging Face ``datasets`` ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``; its Arrow files are
  memory-mapped when local and streamed from an object store, a record batch at a time either way).

A shard is a stable piece of one file: a Parquet row group (or a row slice of one), a byte range of a
JSONL/text file (it owns the lines that *start* inside the range), or a row range of an Arrow file.
Its id is built from the file's identity (resolved path or URI, size, modification time) and the
range, so the same corpus always gives the same shard ids, and a changed file gives new ones.

A shard reads about its own bytes, which on an object store are ranged GETs: a Parquet slice streams its
column chunk a share at a time (1 to 8 MiB) rather than fetching the whole chunk up front; a byte range
reads through a buffer of its size plus 64 KiB (at most 8 MiB); an Arrow shard starts at the record batch
holding its first row (noted when the file is cut), not at the file's first batch.

Every input may be a local path or an object-store URI (``s3://bucket/prefix``, ``gs://…``): files,
folders and globs are found and read through ``vocabtrim.storage``, so actors on any node read their
shards straight from the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Iterator

from vocabtrim import storage
from vocabtrim.errors import UserError, first_line, user_error_unless_fault

SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".txt": "txt", ".arrow": "arrow"}
FOLDER_SUFFIXES = (".parquet", ".jsonl", ".txt")  # what a plain folder is searched for
DEFAULT_SHARD_BYTES = 16 << 20
PLAN_THREADS = 16  # files ``make_shards`` checks and cuts at once
PARQUET_READ_BUFFER = 1 << 20, 8 << 20  # the least and most of a Parquet column chunk read at a time (``_parquet_buffer``)


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One unit of work: a range of one file.

    kind:  "parquet" | "jsonl" | "txt" | "arrow".
    start, stop: rows [start, stop) of the file for parquet and arrow (absolute row numbers),
                 bytes [start, stop) for jsonl and txt.
    row_group: the Parquet row group holding the rows (-1 for the other kinds).
    rows:  the number of rows, where known before reading (parquet, arrow), else None.
    messages: the rows are lists of {role, content} messages rather than strings (``make_shards(messages=True)``).
    batch_at, batch_row: arrow: where the record batch holding row ``start`` is (its byte offset in an IPC stream,
                 its index in an IPC file; -1: unknown, read from the first batch) and the file row of its first
                 row, so a shard reads from that batch on, not the batches before it. Not part of the shard's
                 id: the same file cut the same way gives the same ids as before they were recorded.
    """

    shard_id: str
    path: str
    kind: str
    start: int
    stop: int
    row_group: int = -1
    rows: int | None = None
    messages: bool = False
    batch_at: int = -1
    batch_row: int = 0

    @property
    def name(self) -> str:
        return storage.name(self.path)


@dataclass(frozen=True)
class RowBatch:
    """Rows read from a shard: ``texts[i]`` is the row's value: a string (a list of {role, content} messages in
    a shard of messages; a JSONL row's list as it is), or None where the row has no value.

    keys[i] is the row's stable position in its file: the row number (parquet, arrow) or the byte
    offset where its line starts (jsonl, txt).
    """

    texts: list
    keys: list


def _suffix(path: str) -> str:
    return os.path.splitext(storage.name(path))[1]


def _file_key(path: str) -> str:
    size, mtime_ns = storage.stat(path)
    ident = f"{storage.canonical(path)}:{size}:{mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:10]


def _safe_stem(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(storage.name(path))[0])[:40].strip("._") or "file"
    return stem


def _shard_prefix(path: str) -> str:
    """``<stem>-<file key>``: every shard id of a file starts with it."""
    return f"{_safe_stem(path)}-{_file_key(path)}"


# ---------------------------------------------------------------------------------------------
# Finding files
# ---------------------------------------------------------------------------------------------


def _datasets_arrow_files(folder: str) -> list[str] | None:
    """The Arrow files of a ``datasets`` ``save_to_disk`` folder, or None if ``folder`` is not one."""
    dict_file = storage.join(folder, "dataset_dict.json")
    if storage.is_file(dict_file):
        splits = _datasets_json(dict_file, "datasets file", lambda d: [str(s) for s in d.get("splits", [])])
        files: list[str] = []
        for split in splits:
            files.extend(_datasets_arrow_files(storage.join(folder, split)) or [])
        return files
    state = storage.join(folder, "state.json")
    if storage.is_file(state) and storage.is_file(storage.join(folder, "dataset_info.json")):
        names = _datasets_json(state, "datasets state file", lambda d: [str(f["filename"]) for f in d["_data_files"]])
        return [storage.join(folder, n) for n in names]
    return None


def _datasets_json(path: str, what: str, read):
    """``read(the JSON object in path)``; one line when the file is not what ``datasets`` writes (an I/O error stays
    the machine's)."""
    try:
        return read(json.loads(storage.read_text(path)))
    except OSError as exc:
        user_error_unless_fault(exc, f"{storage.display(path)} is unreadable ({exc.strerror or first_line(exc)})")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{storage.display(path)} is not a readable {what} ({type(exc).__name__}: {first_line(exc)}): "
                        "pass the folder datasets' save_to_disk wrote, or its Arrow files") from exc


def _walk_key(rel: str) -> tuple:
    """``os.walk`` order: in each folder its files (sorted) before its subfolders (sorted)."""
    parts = rel.split("/")
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


def _folder_files(folder: str) -> list[str]:
    """Corpus files under a folder, recursively, hidden entries skipped (``storage.hidden``); a ``datasets`` folder (the
    folder itself or one inside it) gives its Arrow files instead of its contents."""
    arrow = _datasets_arrow_files(folder)
    if arrow is not None:
        return arrow
    rels = [storage.relative(f, folder) for f in storage.walk_files(folder)]
    rels = [r for r in rels if not storage.hidden(r)]
    present = set(rels)
    dataset_roots: list[str] = []  # relative folders that hold a datasets save
    for rel in sorted(rels, key=lambda r: r.count("/")):
        head, _, leaf = rel.rpartition("/")
        if not head or any(head == d or head.startswith(d + "/") for d in dataset_roots):
            continue
        if leaf == "dataset_dict.json" or (leaf == "state.json" and f"{head}/dataset_info.json" in present):
            dataset_roots.append(head)
    found: list[str] = []
    emitted: set[str] = set()
    for rel in sorted(rels, key=_walk_key):
        root = next((d for d in dataset_roots if rel.startswith(d + "/")), None)
        if root is not None:
            if root not in emitted:
                emitted.add(root)
                found.extend(_datasets_arrow_files(storage.join(folder, *root.split("/"))) or [])
            continue
        if rel.endswith(FOLDER_SUFFIXES):
            found.append(storage.join(folder, *rel.split("/")))
    return found


def expand_paths(paths: list[str]) -> list[str]:
    """Files named by ``paths`` (files, folders, globs; local or object-store URIs), deduplicated, in a
    stable order.

    Raises UserError for a path that does not exist, a glob that matches nothing, a file of an
    unsupported kind, or no files at all.
    """
    if not paths:
        raise UserError("no corpus given: pass --corpus PATH (files, folders or globs of .parquet, .jsonl, .txt)")
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str, named: bool) -> None:
        if _suffix(p) not in SUFFIXES:
            if named:
                raise UserError(f"{storage.display(p)}: unsupported corpus file (use .parquet, .jsonl, .txt or .arrow)")
            return
        key = storage.canonical(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    for raw in paths:
        p = raw if storage.is_uri(raw) else os.path.expanduser(raw)
        if storage.has_glob(raw) and not storage.exists(p):  # a name with [ that exists is that file, not a pattern
            matches = storage.glob_typed(p)
            if not matches:
                raise UserError(f"no files match {storage.display(raw)}")
            for m, folder in matches:
                for f in (_folder_files(m) if folder else [m]):
                    add(f, named=False)
        elif storage.is_dir(p):
            for f in _folder_files(p):
                add(f, named=False)
        elif storage.is_file(p):
            add(p, named=True)
        else:
            raise UserError(f"no such corpus file or folder: {storage.display(raw)}")
    if not out:
        raise UserError(f"no .parquet, .jsonl or .txt files found in {' '.join(storage.display(p) for p in paths)}")
    return out


# ---------------------------------------------------------------------------------------------
# Checking files and cutting them into shards
# ---------------------------------------------------------------------------------------------


def is_text_type(t) -> bool:
    """Whether Arrow type ``t`` holds strings (string, large_string, string_view)."""
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_string_view(t)


def is_string_view(t) -> bool:
    """Whether Arrow type ``t`` is string_view (pyarrow versions without that type have none)."""
    import pyarrow as pa

    return getattr(pa.types, "is_string_view", lambda _: False)(t)


def to_pylist_or(array, bad) -> list:
    """``array.to_pylist()``, with ``bad(exc)`` in place of each value that cannot be decoded: a string (or a
    message's content) that is not valid UTF-8, which writers other than pyarrow may store in a string column."""
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        values = []
        for i in range(len(array)):
            try:
                values.append(array[i].as_py())
            except UnicodeDecodeError as exc:
                values.append(bad(exc))
        return values


def _skipped(exc: UnicodeDecodeError) -> None:
    """A corpus value that is not valid UTF-8 reads as null: a skipped row, as a null is."""
    return None


def unwrap_dictionary(t):
    """A dictionary type's value type; any other type as it is."""
    import pyarrow as pa

    return t.value_type if pa.types.is_dictionary(t) else t


def holds_text(t) -> bool:
    """Whether a column of Arrow type ``t`` holds text rows: strings (dictionary-encoded too), or nulls only."""
    import pyarrow as pa

    return pa.types.is_null(t) or is_text_type(unwrap_dictionary(t))


def is_messages_type(t) -> bool:
    """Whether a column of Arrow type ``t`` holds message lists (their fields checked by ``prompt_type_problem``)."""
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t)


MESSAGE_KEYS = ("role", "content")  # a message's own fields; others go to the chat template beside them


def message_extra_fields(t) -> list[str]:
    """The fields beside role and content of the messages a column of Arrow type ``t`` holds (they go to the chat
    template: ``prompts.check_messages``); none for any other type."""
    import pyarrow as pa

    if not is_messages_type(t) or not pa.types.is_struct(t.value_type):
        return []
    return [f.name for f in t.value_type if f.name not in MESSAGE_KEYS]


def prompt_type_problem(t) -> str | None:
    """What makes a prompt column of Arrow type ``t`` unable to hold a prompt in any row, or None.

    A prompt column holds strings, or lists of ``{role, content}`` messages (a list of structs whose
    ``role`` and ``content`` fields hold strings; other fields go to the chat template as they are). A column of nulls only is
    allowed: each row is then an error row, as a null in any column is.
    """
    import pyarrow as pa

    if holds_text(t):
        return None
    wanted = "prompts must be strings or lists of {role, content} messages"
    if not is_messages_type(t):
        return wanted
    message = t.value_type
    if not pa.types.is_struct(message):
        return f"{wanted} (its lists hold {message}, not {{role, content}} structs)"
    for name in MESSAGE_KEYS:
        index = message.get_field_index(name)
        if index < 0:
            return f"{wanted} (its messages have no {name!r} field)"
        if not (pa.types.is_null(message.field(index).type) or is_text_type(unwrap_dictionary(message.field(index).type))):
            return f"{wanted} (its messages' {name!r} field holds {message.field(index).type}, not strings)"
    return None


def _check_text_field(schema, path: str, text_column: str, messages: bool = False) -> bool:
    """Check that ``text_column`` holds text (dictionary-encoded too, or nulls only: every row skipped) or, with
    ``messages``, lists of {role, content} messages; returns whether it holds messages."""
    if text_column not in schema.names:
        raise UserError(
            f"{storage.display(path)}: no column {text_column!r} (columns: {', '.join(schema.names[:10])}); pass --text-column"
        )
    t = schema.field(text_column).type
    if holds_text(t):
        return False
    where = f"{storage.display(path)}: column {text_column!r} is {t}"
    if is_messages_type(t) and messages:
        problem = prompt_type_problem(t)
        if problem:
            raise UserError(f"{where}: {problem}; pass --text-column")
        return True
    if is_messages_type(t):
        raise UserError(f"{where}, not text; message lists are read only where rows are prompts (a generated --source); pass --text-column")
    raise UserError(f"{where}, not text; pass --text-column")


def _pieces(rows: int, nbytes: int, shard_bytes: int, shard_rows: int | None) -> int:
    """How many row slices a block of ``rows`` rows and ``nbytes`` bytes of text is cut into."""
    if rows == 0:
        return 0
    pieces = math.ceil(nbytes / shard_bytes)
    if shard_rows:
        pieces = max(pieces, math.ceil(rows / shard_rows))
    return max(1, min(rows, pieces))


def _parquet_shards(path: str, text_column: str, shard_bytes: int, shard_rows: int | None, messages: bool) -> list[Shard]:
    import pyarrow.parquet as pq

    try:
        source = storage.open_input_file(path)
        pf = pq.ParquetFile(source)
    except UserError:
        raise
    except Exception as exc:
        user_error_unless_fault(exc, f"cannot read Parquet file {storage.display(path)}: {first_line(exc)}")
    with source, pf:
        holds_messages = _check_text_field(pf.schema_arrow, path, text_column, messages)
        md = pf.metadata
        prefix = _shard_prefix(path)
        # A string column is one leaf; a message list's fields are leaves under its name.
        leaves = [i for i in range(md.num_columns) if md.schema.column(i).path == text_column
                  or (holds_messages and md.schema.column(i).path.startswith(text_column + "."))]
        shards: list[Shard] = []
        first = 0
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            n = rg.num_rows
            pieces = _pieces(n, sum(rg.column(i).total_uncompressed_size for i in leaves), shard_bytes, shard_rows)
            step = math.ceil(n / pieces) if pieces else 0
            for s in range(first, first + n, step or 1):
                e = min(s + step, first + n)
                tag = f"rg{g:05d}" if pieces == 1 else f"rg{g:05d}-r{s}-{e}"
                shards.append(Shard(f"{prefix}-{tag}", path, "parquet", s, e, g, e - s, holds_messages))
            first += n
    return shards


def _check_jsonl(path: str, text_column: str, messages: bool) -> bool:
    """Check the first row (a JSON object with ``text_column``); returns whether its value is a message list."""
    with storage.open_binary(path, buffer_size=1 << 16) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{storage.display(path)}: the first line is not JSON ({first_line(exc)}); expected one JSON object per line") from exc
            if not isinstance(row, dict):
                raise UserError(f"{storage.display(path)}: the first line is not a JSON object; expected one object per line")
            if text_column not in row:
                keys = ", ".join(list(row)[:10])
                raise UserError(f"{storage.display(path)}: no key {text_column!r} in the first row (keys: {keys}); pass --text-column")
            if isinstance(row[text_column], list) and not messages:
                raise UserError(f"{storage.display(path)}: key {text_column!r} of the first row is a list, not text; message lists are read "
                                "only where rows are prompts (a generated --source); pass --text-column")
            return isinstance(row[text_column], list)
    return False


def _check_text(path: str) -> None:
    with storage.open_binary(path, buffer_size=1 << 16) as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        raise UserError(f"{storage.display(path)}: not a text file (it holds NUL bytes)")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a multi-byte character cut at the end of the sample is fine
            raise UserError(f"{storage.display(path)}: not UTF-8 text (bad byte at offset {exc.start})") from exc


def _byte_shards(path: str, kind: str, shard_bytes: int, messages: bool = False) -> list[Shard]:
    size, _ = storage.stat(path)
    prefix = _shard_prefix(path)
    return [
        Shard(f"{prefix}-b{s}-{min(s + shard_bytes, size)}", path, kind, s, min(s + shard_bytes, size), messages=messages)
        for s in range(0, size, shard_bytes)
    ]


def _arrow_source(path: str):
    """The bytes of an Arrow file: memory-mapped when local, an input stream from an object store."""
    import pyarrow as pa

    return pa.memory_map(storage.local_path(path), "r") if storage.is_local(path) else storage.open_input_file(path)


def _holds_dictionary(t) -> bool:
    """Whether Arrow type ``t`` is or holds a dictionary-encoded type (an extension type: in its storage)."""
    import pyarrow as pa

    if isinstance(t, pa.BaseExtensionType):
        return _holds_dictionary(t.storage_type)
    return pa.types.is_dictionary(t) or any(_holds_dictionary(t.field(i).type) for i in range(t.num_fields))


def _stream_batches(source, schema) -> Iterator[tuple[int, object]]:
    """``(byte offset, record batch)`` of each record batch message of an IPC stream from ``source``'s position on
    (a stream with no dictionaries: every message after the schema is a record batch)."""
    import pyarrow as pa

    messages = pa.ipc.MessageReader.open_stream(source)
    while True:
        at = source.tell()  # the message reader reads exactly one message at a time: no read-ahead
        try:
            message = messages.read_next_message()
        except StopIteration:  # the end-of-stream marker, or the file's end
            return
        yield at, pa.ipc.read_record_batch(message, schema)


@contextlib.contextmanager
def _arrow_batches(path: str, at: int = -1):
    """``(schema, (where, record batch) in row order)`` of an Arrow IPC stream (what ``datasets`` writes) or IPC
    file. ``where`` is the batch's byte offset in a stream, its index in a file, or -1 in a stream with
    dictionary-encoded columns (whose dictionaries are messages of their own before the batches: such a stream is
    read from its start). ``at``, a ``where`` given before: begin with that batch (a stream's schema, at its
    start, is read first), not the first. Batches are read as they are iterated: memory holds one batch, and a
    reader that stops early reads no further (an object store sends no more of the file)."""
    import pyarrow as pa

    with _arrow_source(path) as source:
        if source.read(6) == b"ARROW1":  # an IPC file's magic: read its footer, then the batches it lists
            reader = pa.ipc.open_file(source)
            yield reader.schema, ((i, reader.get_batch(i)) for i in range(max(at, 0), reader.num_record_batches))
            return
        source.seek(0)
        schema = pa.ipc.read_schema(source)  # the stream's first message
        if any(_holds_dictionary(t) for t in schema.types):
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            yield reader.schema, ((-1, batch) for batch in reader)
            return
        if at >= 0:
            source.seek(at)
        yield schema, _stream_batches(source, schema)


def _arrow_shards(path: str, text_column: str, shard_bytes: int, shard_rows: int | None, messages: bool) -> list[Shard]:
    """The file's row ranges, cut from its row count and the text column's bytes (one pass over the file); each
    shard notes where the record batch holding its first row is, to read from there."""
    import bisect

    try:
        with _arrow_batches(path) as (schema, batches):
            holds_messages = _check_text_field(schema, path, text_column, messages)
            n = nbytes = 0
            firsts: list[int] = []  # the file row of each non-empty record batch's first row
            wheres: list[int] = []  # and where that batch is
            for where, batch in batches:
                if batch.num_rows:
                    firsts.append(n)
                    wheres.append(where)
                n += batch.num_rows
                nbytes += batch.column(text_column).nbytes
    except UserError:
        raise
    except Exception as exc:
        user_error_unless_fault(exc, f"cannot read Arrow file {storage.display(path)}: {first_line(exc)}")
    if n == 0:
        return []
    pieces = _pieces(n, nbytes, shard_bytes, shard_rows)
    step = math.ceil(n / pieces)
    prefix = _shard_prefix(path)
    shards = []
    for s in range(0, n, step):
        b = bisect.bisect_right(firsts, s) - 1  # the batch holding row s
        shards.append(Shard(f"{prefix}-r{s}-{min(s + step, n)}", path, "arrow", s, min(s + step, n), -1, min(s + step, n) - s,
                            holds_messages, wheres[b], firsts[b] if wheres[b] >= 0 else 0))
    return shards


def make_shards(
    paths: list[str], text_column: str = "text", shard_bytes: int = DEFAULT_SHARD_BYTES, shard_rows: int | None = None,
    messages: bool = False,
) -> list[Shard]:
    """Check every file (readable, has the text column) and cut the corpus into shards.

    A shard holds about ``shard_bytes`` of text and, for Parquet and Arrow files, at most
    ``shard_rows`` rows when given (generated sources: a row costs a whole generation, not its bytes).
    The result depends only on the files and these sizes: same corpus, same shard ids, same order.
    With ``messages`` (rows used as prompts), the column may instead hold lists of {role, content} messages;
    such a file's shards say so (``Shard.messages``).
    Raises UserError (one line) for a missing or unreadable file or a missing text column.
    """
    if shard_bytes < 1:
        raise ValueError("shard_bytes must be positive")

    def cut(path: str) -> list[Shard]:
        kind = SUFFIXES[_suffix(path)]
        if storage.is_local(path) and not os.access(storage.local_path(path), os.R_OK):
            raise UserError(f"cannot read {storage.display(path)}: permission denied")
        try:
            if kind == "parquet":
                return _parquet_shards(path, text_column, shard_bytes, shard_rows, messages)
            if kind == "arrow":
                return _arrow_shards(path, text_column, shard_bytes, shard_rows, messages)
            if kind == "jsonl":
                return _byte_shards(path, kind, shard_bytes, _check_jsonl(path, text_column, messages))
            _check_text(path)
            return _byte_shards(path, kind, shard_bytes)
        except OSError as exc:
            user_error_unless_fault(exc, f"cannot read {storage.display(path)}: {exc.strerror or first_line(exc)}")

    # Files are checked PLAN_THREADS at a time (on an object store a footer read is round trips); the shards and
    # the error raised, if any, are those of the files in order.
    return [shard for shards in storage.each_in_order(cut, expand_paths(paths), PLAN_THREADS) for shard in shards]


# ---------------------------------------------------------------------------------------------
# Reading one shard
# ---------------------------------------------------------------------------------------------


class _ParquetCursor:
    """An open reader of one row group's column: the file, its ``iter_batches`` iterator, and the record batch
    it gave last (``batch``, None before the first; ``end`` is the group row just past it)."""

    def __init__(self, path: str, row_group: int, column: str, batch_rows: int, file_id: str = "", rows: int = 0):
        import pyarrow.parquet as pq

        self.key = (path, row_group, column, batch_rows, file_id)
        self.batch = None
        self.end = 0
        self._open = contextlib.ExitStack()
        try:
            source = self._open.enter_context(storage.open_input_file(path))
            md = pq.read_metadata(source)
            # Not pyarrow's default (pre_buffer: the row group's whole column chunk fetched and held up front): the
            # chunk is read a shard's share at a time as its pages are decoded (``_parquet_buffer``), so a shard of a
            # few rows of a large row group reads about its own pages, and a reader kept for the next shard goes on.
            buffer = _parquet_buffer(md.row_group(row_group), column, rows)
            pf = self._open.enter_context(pq.ParquetFile(source, metadata=md, pre_buffer=False, buffer_size=buffer))
            self.group_first = sum(md.row_group(g).num_rows for g in range(row_group))  # file row of group row 0
            self._batches = pf.iter_batches(batch_size=batch_rows, row_groups=[row_group], columns=[column])
            self._open.callback(self._batches.close)  # the iterator stops before its file closes
        except BaseException:
            self._open.close()
            raise

    @property
    def first(self) -> int:
        """The group row of the held batch's first row: a read from here on can go on from this reader."""
        return self.end - (self.batch.num_rows if self.batch is not None else 0)

    def advance(self):
        """The next record batch (held as ``batch``), or None at the row group's end."""
        batch = next(self._batches, None)
        if batch is not None:
            self.batch, self.end = batch, self.end + batch.num_rows
        return batch

    def close(self) -> None:
        self._open.close()


def _parquet_buffer(group, column: str, rows: int) -> int:
    """How much of a column chunk a reader of ``rows`` rows of row group ``group`` (its metadata) reads at a time (on an
    object store, one ranged GET): those rows' share of the column's largest leaf chunk (compressed), at least 1 MiB
    and at most 8 MiB (``PARQUET_READ_BUFFER``)."""
    chunk = max((group.column(i).total_compressed_size for i in range(group.num_columns)
                 if group.column(i).path_in_schema == column or group.column(i).path_in_schema.startswith(column + ".")),
                default=0)
    least, most = PARQUET_READ_BUFFER
    return min(most, max(least, chunk * rows // max(group.num_rows, 1)))


_parquet_cursor: _ParquetCursor | None = None  # this process's last row-group reader: at most one open file
_parquet_slot = threading.Lock()  # taking the reader out of the slot and putting it back: one thread at a time


def _iter_parquet(shard: Shard, text_column: str, batch_rows: int) -> Iterator[RowBatch]:
    """Rows [start, stop) of the shard's row group, a slice of one record batch (at most ``batch_rows`` rows) at a time.

    A row group cut into many shards is read by one process in increasing shards (k, k + W, ...). Reading each
    from the group's first row would decode (and download) the group once per shard, so the reader is kept in
    ``_parquet_cursor`` when a shard ends, and the next shard of the same file (as cut), row group, column and batch size
    that starts at or after its held batch goes on from it; any other shard closes it and opens afresh. While a
    shard is read the reader is out of the slot, and an error or a generator closed mid-shard closes it, so the
    next read opens afresh rather than going on from a half-read state.
    """
    global _parquet_cursor
    with _parquet_slot:
        cur, _parquet_cursor = _parquet_cursor, None
    try:
        # The shard id's prefix names the file as it was when cut (its size and modification time): a file
        # written again since is read afresh.
        key = (shard.path, shard.row_group, text_column, batch_rows, shard.shard_id[: shard.shard_id.rindex("-rg")])
        if cur is not None and (cur.key != key or shard.start - cur.group_first < cur.first):
            cur.close()
            cur = None
        if cur is None:
            cur = _ParquetCursor(*key, rows=shard.stop - shard.start)
        lo, hi = shard.start - cur.group_first, shard.stop - cur.group_first  # rows within the row group
        batch = cur.batch if cur.batch is not None and cur.end > lo else cur.advance()
        while batch is not None:
            pos = cur.end - batch.num_rows
            a, b = max(lo, pos), min(hi, cur.end)
            if a < b:
                texts = to_pylist_or(batch.column(0).slice(a - pos, b - a), _skipped)
                yield RowBatch(texts, list(range(cur.group_first + a, cur.group_first + b)))
            if cur.end >= hi:
                break
            batch = cur.advance()
    except BaseException:  # GeneratorExit included: a shard left mid-way drops its reader
        if cur is not None:
            cur.close()
        raise
    with _parquet_slot:
        old, _parquet_cursor = _parquet_cursor, cur
    if old is not None:
        old.close()


def _iter_arrow(shard: Shard, text_column: str, batch_rows: int) -> Iterator[RowBatch]:
    """Rows [start, stop) in batches of ``batch_rows`` (the last one shorter); the file is read from the record
    batch holding row start (``Shard.batch_at``; from the first where that is unknown) up to the one holding row
    stop - 1."""
    texts: list = []
    row = shard.start  # the key of texts[0]
    with _arrow_batches(shard.path, shard.batch_at) as (_, batches):
        first = shard.batch_row if shard.batch_at >= 0 else 0  # the file row of this record batch's first row
        for _, batch in batches:
            lo, hi = max(first, shard.start), min(first + batch.num_rows, shard.stop)
            if lo < hi:
                texts.extend(to_pylist_or(batch.column(text_column).slice(lo - first, hi - lo), _skipped))
                while len(texts) >= batch_rows:
                    yield RowBatch(texts[:batch_rows], list(range(row, row + batch_rows)))
                    texts, row = texts[batch_rows:], row + batch_rows
            first += batch.num_rows
            if first >= shard.stop:
                break
    if texts:
        yield RowBatch(texts, list(range(row, row + len(texts))))


def _iter_lines(shard: Shard) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for every line that starts in [start, stop) (line break included).

    On an object store each refill of the read buffer is one ranged GET: the buffer is the shard's size and a
    little more (up to 8 MiB), so a 16 KiB shard fetches about 80 KiB, not 8 MiB; a last line running further
    takes more refills."""
    buffer = min(8 << 20, shard.stop - shard.start + (64 << 10))
    with storage.open_binary(shard.path, buffer_size=buffer) as f:
        pos = shard.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the previous shard
                pos = _past_line_end(f, pos, shard.stop)
        else:
            f.seek(0)
        while pos < shard.stop:
            line = f.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)


def _past_line_end(f, pos: int, stop: int, block: int = 1 << 20) -> int:
    """The offset just past the line break at or after ``pos`` (``f`` positioned there, ``f`` at ``pos`` on
    entry), or ``stop`` when none comes before it (no line starts in [pos, stop)): read in blocks, nothing kept,
    so a shard inside a long line costs at most its own bytes."""
    while pos < stop:
        chunk = f.read(min(block, stop - pos))
        if not chunk:
            return pos
        end = chunk.find(b"\n")
        if end >= 0:
            f.seek(pos + end + 1)
            return pos + end + 1
        pos += len(chunk)
    return stop


def _jsonl_text(shard: Shard, offset: int, line: bytes, text_column: str):
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise UserError(f"{storage.display(shard.path)}: the line at byte {offset} is not valid JSON ({first_line(exc)})") from exc
    value = row.get(text_column) if isinstance(row, dict) else None
    return value if isinstance(value, (str, list)) else None


def _iter_bytes(shard: Shard, text_column: str, batch_rows: int) -> Iterator[RowBatch]:
    texts: list = []
    keys: list = []
    for offset, line in _iter_lines(shard):
        if shard.kind == "jsonl":
            texts.append(_jsonl_text(shard, offset, line, text_column))
        else:
            texts.append(line.decode("utf-8", errors="replace"))
        keys.append(offset)
        if len(texts) >= batch_rows:
            yield RowBatch(texts, keys)
            texts, keys = [], []
    if texts:
        yield RowBatch(texts, keys)


def iter_shard(shard: Shard, text_column: str = "text", batch_rows: int = 1024) -> Iterator[RowBatch]:
    """Stream a shard's rows in batches of at most ``batch_rows``; memory stays O(batch_rows)."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be positive")
    try:
        if shard.kind == "parquet":
            yield from _iter_parquet(shard, text_column, batch_rows)
        elif shard.kind == "arrow":
            yield from _iter_arrow(shard, text_column, batch_rows)
        else:
            yield from _iter_bytes(shard, text_column, batch_rows)
    except UserError:
        raise
    except Exception as exc:  # a network or memory fault is re-raised: the shard is retried on a fresh actor
        if isinstance(exc, OSError):
            user_error_unless_fault(exc, f"cannot read {storage.display(shard.path)}: {exc.strerror or first_line(exc)}")
        if type(exc).__module__.startswith("pyarrow"):
            user_error_unless_fault(exc, f"cannot read {storage.display(shard.path)} (shard {shard.shard_id}): {first_line(exc)}")
        raise


def file_rows(shards: list[Shard]) -> int | None:
    """Rows known before reading (parquet, arrow), or None when some shard is a byte range."""
    if any(s.rows is None for s in shards):
        return None
    return sum(s.rows for s in shards)
