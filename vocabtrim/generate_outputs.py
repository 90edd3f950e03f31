"""The files ``vocabtrim generate`` writes under ``--out``: one output per input file, and the parts of a file
under way.

- ``DIR/<name>``: the output of the input file named ``<name>``, written once all its rows are generated, all at
  once (``storage.write_with``), with the file's statistics (``STATS_KEY``) and the input's footer digest
  (``INPUT_KEY``) in its Parquet footer.
- ``DIR/.parts/<name>/<start>-<stop>.<input>.parquet``: rows ``start`` to ``stop - 1`` of a file whose output is
  not written yet, with their engine statistics in the footer; ``<input>`` is the first 16 hex digits of the
  input's footer digest (``none`` where not known). The driver saves what it holds of a file every
  ``PART_ROWS`` rows or ``PART_SECONDS`` seconds and when it is stopped, so a stopped or killed run loses at most
  that much, and the driver holds at most that much of a file. The output is assembled from the parts (read
  one at a time) and the part folder then deleted.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from vocabtrim import storage
from vocabtrim.errors import UserError, first_line, user_error_unless_fault
from vocabtrim.prompts import PromptFile

log = logging.getLogger(__name__)

STATS_KEY = b"vocabtrim.generate"
INPUT_KEY = b"vocabtrim.generate.input"  # the input file an output was generated from (its footer_sha256)
RESULT_COLUMNS = ["completion", "completion_tokens", "draft_proposed", "draft_accepted", "finish_reason", "error"]
RESULT_TYPES = [pa.string(), pa.int64(), pa.int64(), pa.int64(), pa.string(), pa.string()]
PARTS = ".parts"
PART_ROWS = 8192  # rows of a file the driver holds before saving them as a part
PART_SECONDS = 300.0  # at most this long between a file's parts
_PART = re.compile(r"^(\d{12})-(\d{12})\.([0-9a-f]{16}|none)\.parquet$")


@dataclass
class ChunkStats:
    """Engine statistics summed over a chunk, a file or a run (see ``EngineStats``)."""

    accepted_hist: list[int] = field(default_factory=list)  # [gamma + 1]
    reached_hist: list[int] = field(default_factory=list)  # [gamma]: steps that reached draft i + 1 (RowOutput)
    gamma_hist: list[int] = field(default_factory=list)  # [gamma + 1]: target passes run with each gamma
    target_passes_rows: int = 0  # sum over rows of the target passes each took part in
    drafter_seconds: float = 0.0
    drafter_forwards: int = 0
    target_seconds: float = 0.0
    target_passes: int = 0  # batched target forward passes
    prefill_seconds: float = 0.0
    engine_seconds: float = 0.0
    slot_passes: int = 0  # sum over target passes of --batch-size (occupancy = target_rows_stepped / slot_passes)
    target_rows_stepped: int = 0  # sum over target passes of the rows in that pass
    # --engine vllm: vLLM's own speculative counters (vllm:spec_decode_*), summed
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)  # [gamma]

    def add(self, other: "ChunkStats") -> "ChunkStats":
        lists = ("accepted_hist", "reached_hist", "gamma_hist", "spec_accepted_per_position")
        return ChunkStats(
            **{k: add_lists(getattr(self, k), getattr(other, k)) for k in lists},
            **{k: getattr(self, k) + getattr(other, k) for k in asdict(self) if k not in lists},
        )


def add_lists(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum, the shorter list padded with zeros."""
    return [x + y for x, y in zip(_pad(a, b), _pad(b, a))]


def _pad(a: list[int], b: list[int]) -> list[int]:
    return list(a) + [0] * max(0, len(b) - len(a))


# ---------------------------------------------------------------------------------------------
# Rows as tables
# ---------------------------------------------------------------------------------------------


def output_schema(id_column: str, id_type: pa.DataType | None) -> pa.Schema:
    """The id column (its input type; strings where the input has none) and ``RESULT_COLUMNS``."""
    return pa.schema([(id_column, id_type or pa.string()), *zip(RESULT_COLUMNS, RESULT_TYPES)])


def result_table(schema: pa.Schema, ids: list[pa.Array], columns: list[dict]) -> pa.Table:
    """Consecutive chunks' rows as one table of ``schema``: ``ids[i]`` and ``columns[i]`` (``RESULT_COLUMNS``
    -> list) are chunk i's."""
    id_type = schema.field(0).type
    id_arrays = [a.cast(id_type) for a in ids]
    arrays = [pa.concat_arrays(id_arrays) if id_arrays else pa.array([], type=id_type)]
    for name, typ in zip(RESULT_COLUMNS, RESULT_TYPES):
        arrays.append(pa.array([v for c in columns for v in c[name]], type=typ))
    return pa.Table.from_arrays(arrays, schema=schema)


def _row_stats(table: pa.Table) -> dict:
    return {
        "rows": table.num_rows,
        "errored_rows": sum(r == "error" for r in table.column("finish_reason").to_pylist()),
        "generated_tokens": sum(table.column("completion_tokens").to_pylist()),
        "draft_proposed": sum(table.column("draft_proposed").to_pylist()),
        "draft_accepted": sum(table.column("draft_accepted").to_pylist()),
    }


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def output_path(out: str, file: PromptFile) -> str:
    return storage.join(out, file.name)


def finished(out: str, file: PromptFile) -> dict | None:
    """The statistics of ``file``'s output (``write_output``'s), or None while it has none. An output exists under
    its final name only once fully written; it must come from this input file as it is now: its row count, and the
    input's footer (``footer_sha256``; outputs written before it was recorded are checked by their row count
    alone). One read of the output's footer."""
    path = output_path(out, file)
    shown = storage.display(path)
    try:
        with storage.open_input_file(path) as f:
            meta = pq.read_metadata(f)
    except FileNotFoundError:
        return None
    except (pa.ArrowInvalid, OSError) as exc:
        user_error_unless_fault(exc, f"{shown} is not a readable output ({first_line(exc)}): delete it and rerun")
    if meta.num_rows != file.num_rows:
        raise UserError(
            f"{shown} has {meta.num_rows} rows but {storage.display(file.path)} has {file.num_rows}: the input changed; "
            "use a new --out"
        )
    try:
        made_from = json.loads((meta.metadata or {}).get(INPUT_KEY, b"{}")).get("footer_sha256")
    except (ValueError, AttributeError):
        made_from = None
    if made_from and file.footer_sha256 and made_from != file.footer_sha256:
        raise UserError(f"{shown} was generated from another version of {storage.display(file.path)} (its Parquet footer "
                        "changed since): use a new --out, or delete that output to generate it again")
    return _stats(path, meta.metadata)


def read_file_stats(path: str) -> dict:
    """The statistics an output holds in its footer (``write_output``'s return value)."""
    with storage.open_input_file(path) as f:
        return _stats(path, pq.read_metadata(f).metadata)


def _stats(path: str, meta: dict | None) -> dict:
    if STATS_KEY not in (meta or {}):
        raise UserError(f"{storage.display(path)} was not written by vocabtrim generate: use a new --out")
    return json.loads(meta[STATS_KEY])


def write_output(out: str, file: PromptFile, id_column: str, segments: list) -> dict:
    """Write ``file``'s output from ``segments``, in row order and tiling its rows: each a ``Part`` (its rows read
    when their turn comes) or a ``(table, ChunkStats)`` held in memory. Returns the file's statistics, also stored
    in the footer (the Arrow schema's metadata, as ``pq.write_table`` stores it) with the input's
    ``footer_sha256``. Row groups hold ``PART_ROWS`` rows or more, however small the segments."""
    schema = output_schema(id_column, file.id_type)
    made: dict = {}
    for segment in segments:  # the statistics first: the writer's schema carries them
        seg = segment.stats() if isinstance(segment, Part) else {**_row_stats(segment[0]), **asdict(segment[1])}
        made = add_stats(made, seg)
    made = {**_row_stats(schema.empty_table()), **asdict(ChunkStats()), **made}
    if made["rows"] != file.num_rows:  # segments must tile the file
        raise RuntimeError(f"{made['rows']} rows generated of the {file.num_rows} of {storage.display(file.path)}")
    meta = {STATS_KEY: json.dumps(made).encode(),
            **({INPUT_KEY: json.dumps({"footer_sha256": file.footer_sha256}).encode()} if file.footer_sha256 else {})}

    def write(tmp: str) -> None:
        pending: list[pa.Table] = []
        with pq.ParquetWriter(tmp, schema.with_metadata(meta)) as writer:
            for segment in segments:
                pending.append(segment.read(schema) if isinstance(segment, Part) else segment[0])
                if sum(t.num_rows for t in pending) >= PART_ROWS:
                    writer.write_table(pa.concat_tables(pending))
                    pending = []
            if pending or not segments:
                writer.write_table(pa.concat_tables(pending) if pending else schema.empty_table())

    storage.write_with(output_path(out, file), write)  # whole file or nothing
    return made


def add_stats(a: dict, b: dict) -> dict:
    """Two statistics dicts (``write_output``'s, or any with numbers and lists of numbers) summed key by key; lists
    element-wise."""
    return {k: add_lists(a.get(k, []), b.get(k, [])) if isinstance(a.get(k, b.get(k)), list) else a.get(k, 0) + b.get(k, 0)
            for k in {**a, **b}}


# ---------------------------------------------------------------------------------------------
# Parts of a file under way
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """Rows ``start`` to ``stop - 1`` of one input file, saved at ``path`` with their statistics (rows, errored rows,
    tokens, drafts and the engine's ``ChunkStats``) in its footer."""

    start: int
    stop: int
    path: str

    def stats(self) -> dict:
        try:
            with storage.open_input_file(self.path) as f:
                return json.loads((pq.read_metadata(f).metadata or {})[STATS_KEY])
        except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
            self._damaged(exc)

    def read(self, schema: pa.Schema) -> pa.Table:
        try:
            with storage.open_input_file(self.path) as f:
                table = pq.read_table(f)
            if table.num_rows != self.stop - self.start:
                raise ValueError(f"{table.num_rows} rows, not {self.stop - self.start}")
            return table.replace_schema_metadata(None).cast(schema)
        except (pa.ArrowException, OSError, ValueError) as exc:
            self._damaged(exc)

    def _damaged(self, exc: BaseException):
        """A part that cannot be read is refused in one line, unless the machine is at fault (``user_error_unless_fault``)."""
        user_error_unless_fault(exc, f"{storage.display(self.path)} is not a readable part ({first_line(exc)}): delete "
                                     f"{storage.display(storage.parent(self.path))} to generate that file again")


def parts_folder(out: str, name: str) -> str:
    """Where the parts of the input file with output name ``name`` are saved."""
    return storage.join(out, PARTS, *name.split("/"))


def _input_tag(file: PromptFile) -> str:
    return file.footer_sha256[:16] if file.footer_sha256 else "none"


def save_part(out: str, file: PromptFile, start: int, table: pa.Table, stats: ChunkStats) -> Part:
    """Save ``table`` (rows ``start`` on of ``file``, ``output_schema``) and their statistics as a part."""
    stop = start + table.num_rows
    path = storage.join(parts_folder(out, file.name), f"{start:012d}-{stop:012d}.{_input_tag(file)}.parquet")
    table = table.replace_schema_metadata({STATS_KEY: json.dumps({**_row_stats(table), **asdict(stats)}).encode()})
    storage.write_with(path, lambda tmp: pq.write_table(table, tmp))
    return Part(start, stop, path)


def find_parts(out: str, files: list[PromptFile]) -> dict[str, list[Part]]:
    """The saved parts of each of ``files`` that has a part folder (by output name; sorted by row; the list may
    be empty), from one listing of ``DIR/.parts``.
    Parts generated from another version of their input file (another footer), or that overlap or run past its
    rows, are refused in one line. Killed runs' partial files in part folders are removed
    (``storage.remove_temporaries``)."""
    by_name = {f.name: f for f in files}
    found: dict[str, list[Part]] = {}
    root = storage.join(out, PARTS)
    for path in storage.walk_files(root):
        rel = storage.relative(path, root)
        name, _, base = rel.rpartition("/")
        if name not in by_name:
            continue
        found.setdefault(name, [])  # a folder with no part (a killed save's partial file only): deleted with the rest
        match = _PART.match(base)
        if match:
            found[name].append(Part(int(match[1]), int(match[2]), path))
            file = by_name[name]
            if match[3] != _input_tag(file):
                raise UserError(f"{storage.display(parts_folder(out, name))} holds rows generated from another version of "
                                f"{storage.display(file.path)} (its Parquet footer changed since): use a new --out, or "
                                "delete that folder to generate the file again")
    for name, parts in found.items():
        parts.sort(key=lambda p: p.start)
        end = 0
        for p in parts:
            if p.start < end or p.stop <= p.start or p.stop > by_name[name].num_rows:
                raise UserError(f"{storage.display(p.path)} overlaps another part or runs past the rows of "
                                f"{storage.display(by_name[name].path)}: delete {storage.display(parts_folder(out, name))} "
                                "to generate that file again")
            end = p.stop
        storage.remove_temporaries(parts_folder(out, name))
    return found


def remove_parts(out: str, name: str) -> None:
    """Delete the part folder of a file whose output is written (best effort: a later run deletes what is left)."""
    try:
        storage.delete_folder(parts_folder(out, name))
    except OSError as exc:
        log.warning("could not delete %s (%s); a later run deletes it", storage.display(parts_folder(out, name)),
                    first_line(exc))
