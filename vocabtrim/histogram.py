"""A token histogram: count, sparse form, merge, save, load, coverage curve.

A histogram is a dense ``numpy.int64`` array ``counts[V]``: ``counts[i]`` is how often token id ``i``
occurred. On disk (``histogram.parquet``) it is sparse: columns ``token_id`` (int64) and ``count``
(int64), one row per id with a non-zero count, sorted by id.

Coverage of a kept id set S is ``sum(counts[S]) / sum(counts)``; the coverage curve ``curve[k-1]``
is the coverage of the k most frequent ids.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

from vocabtrim import storage
from vocabtrim.errors import UserError, first_line, user_error_unless_fault

COLUMNS = ("token_id", "count")
MANIFEST_KIND = "vocabtrim-histogram"  # the kind of a calibration folder's manifest.json


def count_ids(id_lists: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """Count token ids.

    id_lists: sequences of ints (token ids ≥ 0), e.g. one per row.
    Returns int64 [max(vocab_size, largest id + 1)].
    """
    flat = [np.asarray(ids, dtype=np.int64) for ids in id_lists if len(ids)]
    if not flat:
        return np.zeros(vocab_size, dtype=np.int64)
    ids = np.concatenate(flat)
    if ids.min() < 0:
        raise ValueError("token ids must be non-negative")
    return np.bincount(ids, minlength=vocab_size).astype(np.int64, copy=False)


def add_into(total: np.ndarray, part: np.ndarray) -> np.ndarray:
    """``total + part`` for int64 histograms of possibly different lengths (the shorter is zero-padded)."""
    if part.shape[0] > total.shape[0]:
        total = np.concatenate([total, np.zeros(part.shape[0] - total.shape[0], dtype=np.int64)])
    total[: part.shape[0]] += part
    return total


def merge(parts: Iterable[np.ndarray], vocab_size: int = 0) -> np.ndarray:
    """The exact sum of histograms: int64 [max(vocab_size, longest part)]."""
    total = np.zeros(vocab_size, dtype=np.int64)
    for part in parts:
        total = add_into(total, np.asarray(part, dtype=np.int64))
    return total


def to_sparse(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [N], counts int64 [N]) of the non-zero entries, ids ascending."""
    ids = np.flatnonzero(counts).astype(np.int64)
    return ids, counts[ids].astype(np.int64)


def from_sparse(ids: np.ndarray, values: np.ndarray, vocab_size: int) -> np.ndarray:
    """Dense int64 [max(vocab_size, max id + 1)] from sparse (ids [N], counts [N]); repeated ids are summed."""
    ids = np.asarray(ids, dtype=np.int64)
    size = max(vocab_size, int(ids.max()) + 1 if ids.size else 0)
    out = np.zeros(size, dtype=np.int64)
    np.add.at(out, ids, np.asarray(values, dtype=np.int64))
    return out


def fingerprint(counts: np.ndarray) -> str:
    """A hash of the non-zero (id, count) pairs: equal histograms, equal fingerprints."""
    ids, values = to_sparse(counts)
    h = hashlib.sha256()
    h.update(ids.astype("<i8").tobytes())
    h.update(values.astype("<i8").tobytes())
    return "hist-" + h.hexdigest()[:24]


def coverage_curve(counts: np.ndarray) -> np.ndarray:
    """float64 [V]: ``curve[k-1]`` = share of all counted tokens covered by the k most frequent ids."""
    total = int(counts.sum())
    if total == 0:
        raise UserError("the histogram is empty (no tokens were counted)")
    ranked = np.sort(counts)[::-1]
    return np.cumsum(ranked, dtype=np.float64) / total


def ranked_ids(counts: np.ndarray) -> np.ndarray:
    """int64 [V]: ids by count, most frequent first; ties broken by the smaller id first."""
    return np.lexsort((np.arange(counts.shape[0]), -counts)).astype(np.int64)


def coverage_of(counts: np.ndarray, ids: np.ndarray) -> float:
    """Share of all counted tokens that fall on ``ids`` (unique ids < len(counts))."""
    total = int(counts.sum())
    if total == 0:
        raise UserError("the histogram is empty (no tokens were counted)")
    return float(counts[np.asarray(ids, dtype=np.int64)].sum() / total)


# ---------------------------------------------------------------------------------------------
# Files (local paths or object-store URIs: see vocabtrim.storage)
# ---------------------------------------------------------------------------------------------


def save(counts: np.ndarray, path: str) -> None:
    """Write ``histogram.parquet`` (token_id int64, count int64; non-zero rows sorted by id), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, values = to_sparse(counts)
    table = pa.table({"token_id": pa.array(ids, pa.int64()), "count": pa.array(values, pa.int64())})
    storage.atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def load(path: str, vocab_size: int = 0) -> np.ndarray:
    """Read a histogram file back into a dense int64 array (checks columns, types, ids)."""
    import pyarrow.parquet as pq

    try:
        with storage.open_input_file(path) as f:
            table = pq.read_table(f)
    except FileNotFoundError as exc:
        raise UserError(f"no histogram at {storage.display(path)}: run `vocabtrim calibrate` first") from exc
    except UserError:
        raise
    except Exception as exc:
        user_error_unless_fault(exc, f"cannot read histogram {storage.display(path)}: {first_line(exc)}")
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"{storage.display(path)} is not a histogram: no column {missing[0]!r}")
    import pyarrow as pa

    wrong = next((c for c in COLUMNS if not pa.types.is_integer(table.schema.field(c).type)), None)
    if wrong is not None:
        raise UserError(f"{storage.display(path)} is not a histogram: its {wrong!r} column holds {table.schema.field(wrong).type} values, not integers")
    ids = table.column("token_id").to_numpy().astype(np.int64)
    values = table.column("count").to_numpy().astype(np.int64)
    if ids.size and (ids.min() < 0 or values.min() < 0):
        raise UserError(f"{storage.display(path)} holds negative token ids or counts")
    if np.unique(ids).size != ids.size:
        raise UserError(f"{storage.display(path)} lists a token id twice")
    return from_sparse(ids, values, vocab_size)


def read_manifest(folder: str) -> dict:
    """The manifest of a calibration folder (``vocabtrim calibrate --out``); UserError if it is not one."""
    folder = str(folder)
    shown = storage.display(folder)
    return storage.read_manifest(
        storage.join(folder, "manifest.json"), MANIFEST_KIND, "calibration manifest",
        missing=f"no calibration in {shown} (no manifest.json): run `vocabtrim calibrate --out {shown}` first",
        writer="`vocabtrim calibrate`",
    )


def calibration_paths(where: str) -> tuple[str, str]:
    """``(calibration folder, its histogram.parquet)`` for a folder or a ``.parquet`` file location."""
    where = str(where)
    folder = storage.parent(where) if storage.name(where).endswith(".parquet") else where
    if not storage.is_dir(folder):
        shown = storage.display(where)
        raise UserError(f"no calibration folder at {shown}: run `vocabtrim calibrate --out {shown}` first")
    return folder, storage.join(folder, "histogram.parquet")


def read_calibration(where: str, tokenizer_fingerprint: str, whose: str) -> tuple[str, dict, np.ndarray]:
    """``(histogram.parquet location, manifest, counts)`` of the calibration at ``where`` (a folder or its
    ``.parquet`` file), refused in one line unless it was counted with the tokenizer of ``tokenizer_fingerprint``
    (``whose`` tokenizer it is, for the message: "drafter", "target")."""
    folder, path = calibration_paths(where)
    manifest = read_manifest(folder)
    if manifest["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise UserError(
            f"the histogram in {storage.display(folder)} was counted with another tokenizer ({manifest['tokenizer_fingerprint']}, "
            f"{whose} {tokenizer_fingerprint}): calibrate with the {whose}'s tokenizer"
        )
    counts = load(path)
    if manifest.get("histogram_fingerprint") not in (None, fingerprint(counts)):
        raise UserError(f"the histogram in {storage.display(folder)} is not the one its manifest.json describes (a calibrate run "
                        "stopped between writing them?): rerun that calibrate command (it resumes from its ledger)")
    return path, manifest, counts
