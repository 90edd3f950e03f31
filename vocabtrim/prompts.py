"""Prompt files for ``vocabtrim generate``: finding them, checking them, and turning rows into token ids.

Words used here:
- *input file*: one Parquet file named by ``--prompts`` (a file, a folder searched for ``*.parquet``, or a glob;
  each a local path or an object-store URI such as ``s3://bucket/prefix``, read through ``vocabtrim.storage``).
- *output name*: where the file's results go under ``--out``: the file's name, or for a file found in a
  folder its path relative to that folder. Two inputs never share an output name (refused up front).
- *row key*: the string a row's seed is derived from: its ``--id-column`` value, or, when the file has no
  such column (or the value is null), the stable id ``"<output name>:<row number>"``.

A bad *file* (missing, not Parquet, no prompt column, a prompt column of a type that holds no prompts, one id in
two rows) is a ``UserError`` before any work starts.
A bad *row* (null, empty, malformed messages, too long for the context) is not an exception:
``encode_prompt`` returns an error string for it, and that row alone is reported as an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NoReturn

import pyarrow as pa
import pyarrow.parquet as pq

from vocabtrim import storage
from vocabtrim.corpus import MESSAGE_KEYS, is_string_view, is_text_type, prompt_type_problem, to_pylist_or, unwrap_dictionary
from vocabtrim.errors import UserError, first_line, machine_fault, user_error_unless_fault

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptFile:
    """One input Parquet file, checked.

    path:      the file's location: a local path (spelled as found) or an object-store URI (``vocabtrim.storage``).
    name:      its output name under ``--out`` (relative, POSIX separators).
    num_rows:    rows in the file (from its footer).
    prompt_type: the Arrow type of its prompt column.
    id_type:     the Arrow type of its id column, or None when it has none (stable ids are made instead).
    footer_sha256: ``footer_digest`` of the file as read, or None where not known.
    """

    path: str
    name: str
    num_rows: int
    prompt_type: pa.DataType
    id_type: pa.DataType | None
    footer_sha256: str | None = None


# ---------------------------------------------------------------------------------------------
# Files (local paths or object-store URIs: see vocabtrim.storage)
# ---------------------------------------------------------------------------------------------


def _folder_files(folder: str) -> list[tuple[str, str]]:
    found = []
    for path in storage.walk_files(folder):
        rel = storage.relative(path, folder)
        if rel.endswith(".parquet") and not storage.hidden(rel):
            found.append((path, rel))
    return found


def find_prompt_files(paths: list[str]) -> list[tuple[str, str]]:
    """Expand files, folders and globs into ``(location, output name)`` pairs, in a stable order.

    Each argument is a local path or an object-store URI (``s3://bucket/key``, ``gs://…``, ``file://…``).
    Folders are searched recursively for ``*.parquet`` and globs match files (hidden ``.``/``_`` entries skipped,
    ``storage.hidden``); a file named directly may have any extension (its content is checked later). The same file named twice counts once.
    """
    if not paths:
        raise UserError("no prompt files: pass --prompts with Parquet files, folders or globs")
    pairs: list[tuple[str, str]] = []
    for arg in paths:
        arg = os.fspath(arg)
        where = arg if storage.is_uri(arg) else os.path.expanduser(arg)
        shown = storage.display(arg)
        if storage.has_glob(where) and not storage.exists(where):  # a name with [ that exists is that file, not a pattern
            matches = storage.glob_typed(where)
            if not matches:
                raise UserError(f"--prompts {shown} matches no files")
            for m, folder in matches:
                pairs.extend(_folder_files(m) if folder else [(m, storage.name(m))])
        elif storage.is_dir(where):
            found = _folder_files(where)
            if not found:
                raise UserError(f"folder {shown} holds no .parquet files")
            pairs.extend(found)
        elif storage.is_file(where):
            pairs.append((where, storage.name(where)))
        else:
            raise UserError(f"no such prompt file or folder: {shown}")
    seen: set[str] = set()
    by_name: dict[str, str] = {}
    result = []
    for path, name in pairs:
        key = storage.canonical(path)
        if key in seen:
            continue
        if name in by_name:
            raise UserError(
                f"input files {storage.display(by_name[name])} and {storage.display(path)} would both write {name} "
                "under --out: pass their folder instead, or run them into separate --out folders"
            )
        seen.add(key)
        by_name[name] = path
        result.append((path, name))
    return result


def footer_digest(f) -> str:
    """A hash (16 hex digits of sha256) of an open Parquet file's footer: its schema and row groups with their
    offsets, sizes and min/max statistics. The same file copied elsewhere gives the same one; a file written
    again gives another unless every size and statistic stayed the same (no data is read)."""
    size = f.size()
    f.seek(size - 8)
    length = int.from_bytes(f.read(4), "little")
    if not 0 < length <= size - 12:
        raise pa.ArrowInvalid(f"Parquet footer length {length} does not fit a file of {size} bytes")
    f.seek(size - 8 - length)
    return hashlib.sha256(f.read(length)).hexdigest()[:16]


def check_prompt_file(path: str, name: str, prompt_column: str, id_column: str | None, ids: bool = True) -> PromptFile:
    """Read a file's footer and refuse it in one line if it is not Parquet or lacks the prompt column; with ``ids``,
    also read its id column and refuse repeated ids (``check_ids``)."""
    path = os.fspath(path)
    shown = storage.display(path)
    try:
        with storage.open_input_file(path) as f:
            meta = pq.read_metadata(f)
            footer = footer_digest(f)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:  # column names that are not UTF-8 too
        _unreadable(path, exc)
    names = schema.names
    twice = next((c for c in (prompt_column, id_column) if c and names.count(c) > 1), None)
    if twice is not None:
        raise UserError(f"{shown} has {names.count(twice)} columns named {twice!r}: one is read, so name them apart")
    if prompt_column not in names:
        raise UserError(
            f"{shown} has no prompt column {prompt_column!r} (columns: {', '.join(names) or 'none'}): "
            "pass --prompt-column"
        )
    id_type = schema.field(id_column).type if id_column and id_column in names else None
    prompt_type = schema.field(prompt_column).type
    problem = prompt_type_problem(prompt_type)
    if problem:
        raise UserError(f"{shown}: --prompt-column {prompt_column!r} holds {prompt_type} values: {problem}")
    if id_type is not None:
        value_type = unwrap_dictionary(id_type)
        # null: a column with no id in any row (pandas writes an all-None column so), every row's id a stable one
        if not (is_text_type(value_type) or pa.types.is_integer(value_type) or pa.types.is_null(value_type)):
            raise UserError(f"{shown}: --id-column {id_column!r} holds {id_type} values: ids must be strings or integers")
        if ids:
            _check_unique_ids(path, id_column)
    return PromptFile(path=path, name=name, num_rows=meta.num_rows, prompt_type=prompt_type, id_type=id_type,
                      footer_sha256=footer)


def _check_unique_ids(path: str, id_column: str) -> None:
    """Refuse, in one line, a file in which two rows hold the same id (they would share a seed and an
    output identity), or an id that is not valid UTF-8 (it names its output row). Nulls are not ids: those rows
    get stable ids."""
    import pyarrow.compute as pc

    try:
        with storage.open_input_file(path) as f:
            ids = pq.read_table(f, columns=[id_column]).column(0)
    except (pa.ArrowException, OSError) as exc:
        _unreadable(path, exc)
    try:
        ids.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise UserError(f"{storage.display(path)}: --id-column {id_column!r} holds a value that is not valid UTF-8 "
                        f"({first_line(exc)}): ids name their output rows") from exc
    if is_string_view(ids.type):  # compute has few kernels for views
        ids = ids.cast(pa.large_string())
    counts = pc.value_counts(ids.drop_null())
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        value, n = repeated[0]["values"].as_py(), repeated[0]["counts"].as_py()
        more = f" (and {len(repeated) - 1} more repeated id(s))" if len(repeated) > 1 else ""
        raise UserError(
            f"{storage.display(path)}: --id-column {id_column!r} holds {value!r} in {n} rows{more}: ids must be unique "
            "within a file (a row's id seeds its sampling and names its output row)"
        )


def inspect_prompt_files(paths: list[str], prompt_column: str, id_column: str | None, ids: bool = True) -> list[PromptFile]:
    """All input files, each checked (see ``check_prompt_file``; several at once): the up-front validation of
    ``--prompts``. The first file in order that fails is the one refused. ``ids=False``: their id columns are
    left for ``check_ids``."""
    return storage.each(lambda pair: check_prompt_file(*pair, prompt_column, id_column, ids), find_prompt_files(paths),
                        threads=CHECK_THREADS)


def check_ids(files: list[PromptFile], id_column: str | None) -> None:
    """Refuse, in one line, the first of ``files`` whose id column repeats an id or holds one that is not UTF-8
    (``_check_unique_ids``); several files at once."""
    storage.each(lambda f: _check_unique_ids(f.path, id_column), [f for f in files if f.id_type is not None],
                 threads=CHECK_THREADS)


def stable_id(name: str, row: int) -> str:
    """The id of row ``row`` (0-based) of the input file with output name ``name``."""
    return f"{name}:{row}"


@dataclass
class PromptChunk:
    """Consecutive rows of one input file.

    start:   the first row's number in the file.
    ids:     Arrow array [n]: the id column's values, or stable ids (strings) when the file has none.
    keys:    [n] row keys (seeds are derived from them).
    prompts: [n] the prompt column's values as Python objects (str, list of dicts, None, anything; ``Undecodable``
             where a value is not valid UTF-8).
    """

    start: int
    ids: pa.Array
    keys: list[str]
    prompts: list

    def rows(self, start: int, stop: int) -> "PromptChunk":
        """Rows ``start`` to ``stop - 1`` of the file (within this chunk's) as a chunk."""
        a, b = start - self.start, stop - self.start
        return PromptChunk(start=start, ids=self.ids.slice(a, b - a), keys=self.keys[a:b], prompts=self.prompts[a:b])


@dataclass(frozen=True)
class Undecodable:
    """A prompt value that cannot be decoded (not valid UTF-8): its row is an error row with ``reason``."""

    reason: str


CHECK_THREADS = 4  # files checked at once: each check holds the file's id column (``_check_unique_ids``)
READ_ATTEMPTS = 3  # tries of one file's reading, for faults of the machine (a dropped object-store connection)


def read_chunks(file: PromptFile, prompt_column: str, id_column: str | None, rows_per_chunk: int,
                start: int = 0) -> Iterator[PromptChunk]:
    """Stream a file from row ``start`` on as chunks of at most ``rows_per_chunk`` rows, in row order. A fault of
    the machine while reading is retried (``READ_ATTEMPTS`` tries in all), reopening the file at the first row not
    yet yielded; data that cannot be read is the user's file (one line)."""
    failures = 0
    while True:
        try:
            for chunk in _chunks_from(file, prompt_column, id_column, rows_per_chunk, start):
                yield chunk
                start += len(chunk.keys)
            return
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # pages the footer did not vouch for
            failures += 1
            if not machine_fault(exc) or failures >= READ_ATTEMPTS:
                _unreadable(file.path, exc)
            log.warning("reading %s failed at row %d (%s); reading on from there", storage.display(file.path), start,
                        first_line(exc))


def _chunks_from(file: PromptFile, prompt_column: str, id_column: str | None, rows_per_chunk: int, start: int):
    """``read_chunks`` from row ``start`` on: the file opened anew, read from the row group holding that row."""
    columns = [prompt_column] + ([id_column] if file.id_type is not None and id_column != prompt_column else [])
    with storage.open_input_file(file.path) as source:
        parquet = pq.ParquetFile(source)
        first, row = 0, 0  # the row group holding row start, and its first row
        while first < parquet.num_row_groups and row + parquet.metadata.row_group(first).num_rows <= start:
            row += parquet.metadata.row_group(first).num_rows
            first += 1
        batches = parquet.iter_batches(batch_size=rows_per_chunk, columns=columns,
                                       row_groups=range(first, parquet.num_row_groups))
        for batch in batches:
            if row < start:  # rows before start in the row group: yielded before the fault
                batch, row = batch.slice(min(start - row, batch.num_rows)), row + min(start - row, batch.num_rows)
                if not batch.num_rows:
                    continue
            yield _chunk(file, batch, row, prompt_column, id_column)
            row += batch.num_rows


def _unreadable(path: str, exc: BaseException) -> NoReturn:
    """A file whose data cannot be read is the user's input (one line), unless the machine is at fault."""
    user_error_unless_fault(exc, f"{storage.display(path)} is not a readable Parquet file ({first_line(exc)})")


def _chunk(file: PromptFile, batch: pa.RecordBatch, start: int, prompt_column: str, id_column: str | None) -> PromptChunk:
    n = batch.num_rows
    prompts = to_pylist_or(batch.column(prompt_column), lambda exc: Undecodable(f"prompt is not valid UTF-8 ({exc})"))
    if file.id_type is not None:
        ids = batch.column(id_column)
        keys = [stable_id(file.name, start + i) if v is None else str(v) for i, v in enumerate(ids.to_pylist())]
    else:
        keys = [stable_id(file.name, start + i) for i in range(n)]
        ids = pa.array(keys, type=pa.string())
    return PromptChunk(start=start, ids=ids, keys=keys, prompts=prompts)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def _type_name(value) -> str:
    return type(value).__name__


def check_messages(messages) -> tuple[list[dict] | None, str | None]:
    """``(messages as [{role, content, ...}], None)``, or ``(None, what is wrong)``. A message's other fields that
    hold a value (``name``, ``tool_call_id``, ``tool_calls``: a chat template may render them) are kept; the nulls
    an Arrow struct gives a message that lacks a field, and empty values, are left out (a template tests a field's
    presence: Llama 3.1's refuses a ``tool_calls`` that is there but empty)."""
    if len(messages) == 0:
        return None, "prompt is an empty message list"
    clean = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, Mapping):
            return None, f"malformed messages: message {i} is a {_type_name(m)}, not a {{role, content}} object"
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role.strip():
            return None, f"malformed messages: message {i} has no role"
        if not isinstance(content, str):
            what = "no content" if content is None else f"a {_type_name(content)} content"
            return None, f"malformed messages: message {i} has {what}"
        clean.append({"role": role, "content": content,
                      **{k: v for k, v in m.items() if k not in MESSAGE_KEYS and v not in (None, "", [], {})}})
    if not any(m["content"].strip() for m in clean):
        return None, "prompt is empty: every message has empty content"
    return clean, None


def max_prompt_tokens(context: int, max_new_tokens: int, gamma: int | None, max_gamma: int, whose: str = "the target's",
                      flag: str = "--max-new-tokens") -> int:
    """The longest prompt (in tokens) a row may have: the target's ``context`` less ``max_new_tokens`` and
    one verify pass past the last generated token (gamma + 1 positions; ``max_gamma`` + 1 under auto gamma).
    The same with and without a drafter and for either engine, so a row is an error row in all or in none.
    ``whose``: the model named in the refusal; ``flag``: the flag that set ``max_new_tokens``."""
    past = (max_gamma if gamma is None else gamma) + 1
    if max_new_tokens + past >= context:
        raise UserError(f"{flag} {max_new_tokens} leaves no room for a prompt in {whose} context of {context} tokens (a step also "
                        f"writes {past} position{'s' if past != 1 else ''} past the last token): lower {flag}")
    return context - max_new_tokens - past


def check_room(model: str, max_new_tokens: int, gamma: int | None, max_gamma: int, trust_remote_code: bool = False,
               whose: str = "the target's", flag: str = "--max-new-tokens") -> None:
    """``max_prompt_tokens`` against ``model``'s context as its config declares it, before any model loads: a
    ``max_new_tokens`` that leaves no room for a prompt is refused in one line (the workers check again with the
    loaded engine's context). Nothing is checked when the config cannot be read here."""
    from vocabtrim.models import declared_config

    context = getattr(declared_config(model, trust_remote_code), "max_position_embeddings", None)
    if context:
        max_prompt_tokens(int(context), max_new_tokens, gamma, max_gamma, whose=whose, flag=flag)


def encode_prompt(value, tokenizer, max_prompt_tokens: int) -> tuple[list[int] | None, str | None]:
    """Token ids for one prompt value, or the reason the row cannot be generated.

    A string is tokenized as it is; a list of ``{role, content}`` messages goes through the tokenizer's
    chat template with the generation prompt added. ``max_prompt_tokens`` is the model's context minus
    the tokens to generate and the gamma + 1 positions a verify pass writes past them.
    """
    if value is None:
        return None, "prompt is null"
    if isinstance(value, Undecodable):
        return None, value.reason
    if isinstance(value, str):
        if not value.strip():
            return None, "prompt is empty"
        ids = list(tokenizer(value, add_special_tokens=True)["input_ids"])
    elif isinstance(value, (list, tuple)):
        messages, problem = check_messages(value)
        if problem:
            return None, problem
        if getattr(tokenizer, "chat_template", None) is None:
            return None, "prompt is a message list but the tokenizer has no chat template"
        try:
            ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        except Exception as exc:  # the template rejects these messages (e.g. an unsupported role)
            if machine_fault(exc):
                raise
            return None, f"the chat template rejects these messages: {first_line(exc)}"
    else:
        return None, f"prompt must be a string or a list of {{role, content}} messages, got {_type_name(value)}"
    if not ids:
        return None, "prompt encodes to no tokens"
    if len(ids) > max_prompt_tokens:
        return None, (f"prompt has {len(ids)} tokens, more than the {max_prompt_tokens} that fit the model's context beside "
                      "--max-new-tokens and one verify pass (gamma + 1 positions)")
    return ids, None
