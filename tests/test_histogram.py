"""Histograms: counting, sparse form, exact merge, the parquet file, coverage."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vocabtrim import histogram
from vocabtrim.errors import UserError


def test_count_ids_matches_a_plain_counter():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50, size=rng.integers(0, 30)).tolist() for _ in range(40)]
    counts = histogram.count_ids(rows, 64)
    assert counts.dtype == np.int64 and counts.shape == (64,)
    expected = Counter(i for row in rows for i in row)
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(expected)


def test_count_ids_grows_past_vocab_and_handles_no_rows():
    assert histogram.count_ids([[1, 9]], 4).tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert histogram.count_ids([[], []], 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        histogram.count_ids([[-1]], 3)


def test_merge_is_the_exact_sum_of_parts_of_any_length():
    a = np.array([1, 2, 3], dtype=np.int64)
    b = np.array([0, 0, 0, 0, 5], dtype=np.int64)
    assert histogram.merge([a, b], vocab_size=6).tolist() == [1, 2, 3, 0, 5, 0]
    big = np.array([2**40], dtype=np.int64)
    assert histogram.merge([big, big])[0] == 2**41  # int64, no float rounding


def test_sparse_roundtrip_sums_repeated_ids():
    counts = np.array([0, 3, 0, 7, 0], dtype=np.int64)
    ids, values = histogram.to_sparse(counts)
    assert ids.tolist() == [1, 3] and values.tolist() == [3, 7]
    assert np.array_equal(histogram.from_sparse(ids, values, 5), counts)
    assert histogram.from_sparse(np.array([2, 2]), np.array([1, 4]), 3).tolist() == [0, 0, 5]


def test_save_writes_the_spec_schema_and_load_reads_it_back(tmp_path):
    counts = np.zeros(100, dtype=np.int64)
    counts[[5, 2, 99]] = [4, 1, 10]
    path = tmp_path / "histogram.parquet"
    histogram.save(counts, str(path))
    table = pq.read_table(path)
    assert table.schema.field("token_id").type == pa.int64()
    assert table.schema.field("count").type == pa.int64()
    assert table.column("token_id").to_pylist() == [2, 5, 99]  # non-zero only, sorted by id
    assert table.column("count").to_pylist() == [1, 4, 10]
    assert np.array_equal(histogram.load(str(path), 100), counts)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_load_refuses_what_is_not_a_histogram(tmp_path):
    with pytest.raises(UserError, match="run `vocabtrim calibrate` first"):
        histogram.load(str(tmp_path / "missing.parquet"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1]}), bad)
    with pytest.raises(UserError, match="no column 'token_id'"):
        histogram.load(str(bad))
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"token_id": [1, 1], "count": [2, 3]}), dup)
    with pytest.raises(UserError, match="twice"):
        histogram.load(str(dup))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="cannot read histogram"):
        histogram.load(str(junk))
    for table, column in ((pa.table({"token_id": ["1", "2"], "count": [2, 3]}), "'token_id' column holds string"),
                          (pa.table({"token_id": [1.7, 2.2], "count": [2, 3]}), "'token_id' column holds double"),  # not truncated
                          (pa.table({"token_id": [1, 2], "count": [2.5, 3.0]}), "'count' column holds double")):
        typed = tmp_path / "typed.parquet"
        pq.write_table(table, typed)
        with pytest.raises(UserError, match=f"is not a histogram: its {column} values, not integers"):
            histogram.load(str(typed))


def test_coverage_curve_and_ranking_on_a_known_histogram():
    counts = np.array([10, 0, 50, 30, 10], dtype=np.int64)  # total 100
    assert np.allclose(histogram.coverage_curve(counts), [0.5, 0.8, 0.9, 1.0, 1.0])
    assert histogram.ranked_ids(counts).tolist() == [2, 3, 0, 4, 1]  # ties: smaller id first
    assert histogram.coverage_of(counts, np.array([2, 4])) == pytest.approx(0.6)
    with pytest.raises(UserError, match="empty"):
        histogram.coverage_curve(np.zeros(3, dtype=np.int64))


def test_fingerprint_depends_on_counts_not_on_trailing_zeros():
    a = np.array([1, 2, 0], dtype=np.int64)
    assert histogram.fingerprint(a) == histogram.fingerprint(np.array([1, 2], dtype=np.int64))
    assert histogram.fingerprint(a) != histogram.fingerprint(np.array([1, 3], dtype=np.int64))
