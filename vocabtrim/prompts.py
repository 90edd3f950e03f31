"""Prompt files for ``vocabtrim generate``: finding them, checking them, and turning rows into token ids.

Words used here:
- *input file*: one Parquet file named by ``--prompts`` (a file, a folder searched for ``*.parquet``, or a glob).
- *output name*: where the file's results go under ``--out``: the file's name, or for a file found in a
  folder its path relative to that folder. Two inputs never share an output name (refused up front).
- *row key*: the string a row's seed is derived from: its ``--id-column`` value, or, when the file has no
  such column (or the value is null), the stable id ``"<output name>:<row number>"``.

A bad *file* (missing, not Parquet, no prompt column) is a ``UserError`` before any work starts.
A bad *row* (null, empty, wrong type, malformed messages, too long for the context) is not an exception:
``encode_prompt`` returns an error string for it, and that row alone is reported as an error.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vocabtrim.errors import UserError

GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class PromptFile:
    """One input Parquet file, checked.

    path:      the file.
    name:      its output name under ``--out`` (relative, POSIX separators).
    num_rows:    rows in the file (from its footer).
    prompt_type: the Arrow type of its prompt column.
    id_type:     the Arrow type of its id column, or None when it has none (stable ids are made instead).
    """

    path: Path
    name: str
    num_rows: int
    prompt_type: pa.DataType
    id_type: pa.DataType | None


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _hidden(rel: Path) -> bool:
    return any(part.startswith((".", "_")) for part in rel.parts)


def _folder_files(folder: Path) -> list[tuple[Path, str]]:
    found = []
    for path in sorted(folder.rglob("*.parquet")):
        rel = path.relative_to(folder)
        if path.is_file() and not _hidden(rel):
            found.append((path, rel.as_posix()))
    return found


def find_prompt_files(paths: list[str]) -> list[tuple[Path, str]]:
    """Expand files, folders and globs into ``(path, output name)`` pairs, in a stable order.

    Folders are searched recursively for ``*.parquet`` (hidden ``.``/``_`` entries skipped); a file named
    directly may have any extension (its content is checked later). The same file named twice counts once.
    """
    if not paths:
        raise UserError("no prompt files: pass --prompts with Parquet files, folders or globs")
    pairs: list[tuple[Path, str]] = []
    for arg in paths:
        path = Path(arg).expanduser()
        if any(c in GLOB_CHARS for c in arg):
            matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True))
            if not matches:
                raise UserError(f"--prompts {arg} matches no files")
            for m in matches:
                mp = Path(m)
                pairs.extend(_folder_files(mp) if mp.is_dir() else [(mp, mp.name)])
        elif path.is_dir():
            found = _folder_files(path)
            if not found:
                raise UserError(f"folder {arg} holds no .parquet files")
            pairs.extend(found)
        elif path.is_file():
            pairs.append((path, path.name))
        else:
            raise UserError(f"no such prompt file or folder: {arg}")
    seen: dict[Path, str] = {}
    by_name: dict[str, Path] = {}
    result = []
    for path, name in pairs:
        real = path.resolve()
        if real in seen:
            continue
        if name in by_name:
            raise UserError(
                f"input files {by_name[name]} and {path} would both write {name} under --out: "
                "pass their folder instead, or run them into separate --out folders"
            )
        seen[real] = name
        by_name[name] = path
        result.append((path, name))
    return result


def check_prompt_file(path: Path, name: str, prompt_column: str, id_column: str | None) -> PromptFile:
    """Read a file's footer and refuse it in one line if it is not Parquet or lacks the prompt column."""
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0]})") from exc
    names = schema.names
    if prompt_column not in names:
        raise UserError(
            f"{path} has no prompt column {prompt_column!r} (columns: {', '.join(names) or 'none'}): "
            "pass --prompt-column"
        )
    id_type = schema.field(id_column).type if id_column and id_column in names else None
    prompt_type = schema.field(prompt_column).type
    return PromptFile(path=path, name=name, num_rows=meta.num_rows, prompt_type=prompt_type, id_type=id_type)


def inspect_prompt_files(paths: list[str], prompt_column: str, id_column: str | None) -> list[PromptFile]:
    """All input files, each checked (see ``check_prompt_file``): the up-front validation of ``--prompts``."""
    return [check_prompt_file(p, n, prompt_column, id_column) for p, n in find_prompt_files(paths)]


def stable_id(name: str, row: int) -> str:
    """The id of row ``row`` (0-based) of the input file with output name ``name``."""
    return f"{name}:{row}"


@dataclass
class PromptChunk:
    """Consecutive rows of one input file.

    start:   the first row's number in the file.
    ids:     Arrow array [n]: the id column's values, or stable ids (strings) when the file has none.
    keys:    [n] row keys (seeds are derived from them).
    prompts: [n] the prompt column's values as Python objects (str, list of dicts, None, anything).
    """

    start: int
    ids: pa.Array
    keys: list[str]
    prompts: list


def read_chunks(file: PromptFile, prompt_column: str, id_column: str | None, rows_per_chunk: int) -> Iterator[PromptChunk]:
    """Stream a file as chunks of at most ``rows_per_chunk`` rows, in row order."""
    columns = [prompt_column] + ([id_column] if file.id_type is not None and id_column != prompt_column else [])
    start = 0
    for batch in pq.ParquetFile(file.path).iter_batches(batch_size=rows_per_chunk, columns=columns):
        n = batch.num_rows
        prompts = batch.column(prompt_column).to_pylist()
        if file.id_type is not None:
            ids = batch.column(id_column)
            keys = [stable_id(file.name, start + i) if v is None else str(v) for i, v in enumerate(ids.to_pylist())]
        else:
            keys = [stable_id(file.name, start + i) for i in range(n)]
            ids = pa.array(keys, type=pa.string())
        yield PromptChunk(start=start, ids=ids, keys=keys, prompts=prompts)
        start += n


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def _type_name(value) -> str:
    return type(value).__name__


def check_messages(messages) -> tuple[list[dict] | None, str | None]:
    """``(messages as [{role, content}], None)``, or ``(None, what is wrong)``."""
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
        clean.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in clean):
        return None, "prompt is empty: every message has empty content"
    return clean, None


def encode_prompt(value, tokenizer, max_prompt_tokens: int) -> tuple[list[int] | None, str | None]:
    """Token ids for one prompt value, or the reason the row cannot be generated.

    A string is tokenized as it is; a list of ``{role, content}`` messages goes through the tokenizer's
    chat template with the generation prompt added. ``max_prompt_tokens`` is the model's context minus
    the tokens to generate.
    """
    if value is None:
        return None, "prompt is null"
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
            first = str(exc).splitlines()[0] if str(exc) else _type_name(exc)
            return None, f"the chat template rejects these messages: {first}"
    else:
        return None, f"prompt must be a string or a list of {{role, content}} messages, got {_type_name(value)}"
    if not ids:
        return None, "prompt encodes to no tokens"
    if len(ids) > max_prompt_tokens:
        return None, f"prompt has {len(ids)} tokens, more than the {max_prompt_tokens} that fit the model's context with --max-new-tokens"
    return ids, None
