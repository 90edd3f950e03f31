"""A process reading the shards of one Parquet row group in increasing order decodes the group once (the reader is
kept between shards); any other order, an error or a shard left mid-way gives the same rows as a fresh read."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from counting import Counting

from vocabtrim import corpus, storage

ROWS = [f"row {i} " + "x" * (i % 11) for i in range(300)]


def expected(shard):
    """(key, text) of a shard's rows: file row numbers and the rows written."""
    return [(k, ROWS[k]) for k in range(shard.start, shard.stop)]


def read(shard, batch_rows=5):
    out = []
    for batch in corpus.iter_shard(shard, "text", batch_rows):
        assert len(batch.texts) == len(batch.keys) <= batch_rows
        out.extend(zip(batch.keys, batch.texts))
    return out


@pytest.fixture(autouse=True)
def no_cursor():
    """Every test starts and ends with no reader held."""
    def drop():
        if corpus._parquet_cursor is not None:
            corpus._parquet_cursor.close()
        corpus._parquet_cursor = None

    drop()
    yield
    drop()


@pytest.fixture
def calls(monkeypatch):
    """The (row groups, batch size) of every ``ParquetFile.iter_batches`` call, and the files opened."""
    seen = {"iter_batches": [], "files": []}
    iter_batches, open_input_file = pq.ParquetFile.iter_batches, storage.open_input_file

    def counting_iter_batches(self, *args, **kwargs):
        seen["iter_batches"].append((tuple(kwargs.get("row_groups") or ()), kwargs.get("batch_size")))
        return iter_batches(self, *args, **kwargs)

    def recording_open(path):
        f = open_input_file(path)
        seen["files"].append(f)
        return f

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting_iter_batches)
    monkeypatch.setattr(storage, "open_input_file", recording_open)
    return seen


def open_files(seen):
    return [f for f in seen["files"] if not f.closed]


@pytest.fixture
def one_group(tmp_path):
    """300 rows in one row group, cut in 43 shards of at most 7 rows."""
    path = tmp_path / "one.parquet"
    pq.write_table(pa.table({"text": ROWS, "n": list(range(300))}), path, row_group_size=300)
    shards = corpus.make_shards([str(path)], "text", 1 << 30, shard_rows=7)
    assert len(shards) == 43 and {s.row_group for s in shards} == {0}
    return shards


def test_shards_read_in_order_decode_the_row_group_once(one_group, calls):
    """Old reader: one ``iter_batches`` call per shard (43 here), each from the group's first row."""
    calls["files"].clear()  # make_shards' own reads
    rows = [r for s in one_group for r in read(s)]
    assert rows == list(enumerate(ROWS))
    assert calls["iter_batches"] == [((0,), 5)]
    assert len(calls["files"]) == 1 and open_files(calls) == calls["files"]  # held for the next shard
    # every second shard (a process among two): still one reader, still each shard's rows
    corpus._parquet_cursor.close()
    corpus._parquet_cursor = None
    for s in one_group[1::2]:
        assert read(s) == expected(s)
    assert len(calls["iter_batches"]) == 2


def test_out_of_order_repeated_and_interleaved_shards_give_their_rows(tmp_path, calls):
    pq.write_table(pa.table({"text": ROWS}), tmp_path / "a.parquet", row_group_size=100)
    pq.write_table(pa.table({"text": ROWS}), tmp_path / "b.parquet", row_group_size=300)
    shards = corpus.make_shards([str(tmp_path)], "text", 1 << 30, shard_rows=7)
    a = [s for s in shards if s.name == "a.parquet"]
    b = [s for s in shards if s.name == "b.parquet"]
    assert {s.row_group for s in a} == {0, 1, 2} and {s.row_group for s in b} == {0}
    order = list(reversed(a)) + a[::3] + a[::3] + [s for pair in zip(a, b) for s in pair]
    order += [s for s in a for _ in range(2)] + random.Random(0).sample(shards, len(shards))
    for s in order:
        assert read(s) == expected(s), s
    for batch_rows in (1, 4, 64):  # another batch size: another reader
        for s in b[:5]:
            assert read(s, batch_rows) == expected(s)
    assert len(open_files(calls)) == 1  # one file held at a time


def test_a_shard_left_mid_way_drops_the_reader(one_group, calls):
    for s in one_group[:4]:
        assert read(s) == expected(s)
    it = corpus.iter_shard(one_group[4], "text", 5)  # goes on from the held reader (its batch of rows 25-29)...
    first = next(it)
    assert list(zip(first.keys, first.texts)) == expected(one_group[4])[:len(first.keys)]
    assert len(calls["iter_batches"]) == 1
    it.close()  # ...and is left mid-shard
    assert corpus._parquet_cursor is None and open_files(calls) == []
    for s in one_group[4:8]:
        assert read(s) == expected(s)
    it = corpus.iter_shard(one_group[9], "text", 5)
    next(it)
    del it  # abandoned without close
    assert corpus._parquet_cursor is None and open_files(calls) == []
    assert [r for s in one_group[8:] for r in read(s)] == list(enumerate(ROWS))[one_group[8].start:]


def test_an_error_while_reading_drops_the_reader(one_group, calls, monkeypatch):
    iter_batches = pq.ParquetFile.iter_batches  # the counting one
    failures = []

    def failing_once(self, *args, **kwargs):
        for i, batch in enumerate(iter_batches(self, *args, **kwargs)):
            if i == 6 and not failures:  # group rows 30-34: shard 4 (rows 28-34) on
                failures.append(i)
                raise OSError("AWS Error NETWORK_CONNECTION during GetObject: curlCode: 7")
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", failing_once)
    for s in one_group[:4]:
        assert read(s) == expected(s)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        read(one_group[4])
    assert failures and corpus._parquet_cursor is None and open_files(calls) == []
    assert [r for s in one_group[4:] for r in read(s)] == list(enumerate(ROWS))[one_group[4].start:]
    assert len(calls["iter_batches"]) == 2  # the first reader, then one more after the error


def test_a_file_written_again_at_the_same_path_is_read_afresh(tmp_path):
    """The reader is kept for the file as it was cut (its shard ids name its size and modification time): shards cut
    from the file written again at the same path read the new rows, not the held reader's."""
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"text": ROWS}), path, row_group_size=300)
    old = corpus.make_shards([str(path)], "text", 1 << 30, shard_rows=7)
    assert read(old[0]) == expected(old[0])
    new_rows = [r.upper() + "!" for r in ROWS]
    pq.write_table(pa.table({"text": new_rows}), path, row_group_size=300)
    new = corpus.make_shards([str(path)], "text", 1 << 30, shard_rows=7)
    assert new[1].shard_id != old[1].shard_id
    assert read(new[1]) == [(k, new_rows[k]) for k in range(new[1].start, new[1].stop)]


def test_a_few_rows_of_a_large_row_group_read_about_their_own_pages(tmp_path, monkeypatch):
    """A row group's column chunk is read a shard's share at a time (1 to 8 MiB) as its pages are decoded, not fetched
    and held whole up front (pyarrow's default, pre_buffer): 32 rows of a 16 MB row group read ~2 MB of the file,
    not all of it, and the reader kept for the next shards goes on from there."""
    import os

    rows = [os.urandom(200).hex() for _ in range(40_000)]  # 16 MB that does not compress
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": rows}), path, row_group_size=len(rows), compression="none")
    size = path.stat().st_size
    shards = corpus.make_shards([str(path)], "text", 16 << 10, shard_rows=32)
    assert len(shards) == 1250 and {s.row_group for s in shards} == {0}
    sent, opened = [], []

    def counting_open(where):
        opened.append(where)
        return pa.PythonFile(Counting(storage.local_path(where), sent), mode="r")

    monkeypatch.setattr(storage, "open_input_file", counting_open)
    assert read(shards[0], 16) == [(k, rows[k]) for k in range(32)]
    assert 0 < sum(sent) < 0.2 * size  # before: 16 MB, the whole column chunk
    for s in shards[1:40]:  # the next shards go on from the held reader
        assert read(s, 16) == [(k, rows[k]) for k in range(s.start, s.stop)]
    assert len(opened) == 1 and sum(sent) < 0.2 * size
    corpus._parquet_cursor.close()
    corpus._parquet_cursor = None
    sent.clear()
    (whole,) = corpus.make_shards([str(path)], "text", 1 << 30)  # the group in one shard: read 8 MiB at a time
    assert [t for b in corpus.iter_shard(whole, "text", 1024) for t in b.texts] == rows
    assert size <= sum(sent) < 1.1 * size and len(sent) <= 6  # the footer, then 2 or 3 reads; 1 MiB at a time: 17
