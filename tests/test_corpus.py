"""Corpus files → shards with stable ids; every row read exactly once; bad input refused in one line."""

import json
import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from counting import Counting

from vocabtrim import corpus, storage
from vocabtrim.errors import UserError

LINES = [f"row {i}: " + "word " * (i % 7) + ("ünïcödé" if i % 5 == 0 else "") for i in range(200)]


def read_all(shards, column="text", batch_rows=7):
    """(file name, key, text) for every row of every shard, in shard order."""
    out = []
    for s in shards:
        for batch in corpus.iter_shard(s, column, batch_rows):
            assert len(batch.texts) == len(batch.keys) <= batch_rows
            out.extend((s.name, k, t) for k, t in zip(batch.keys, batch.texts))
    return out


def write_arrow(path, table, kind: str, rows_per_batch: int) -> None:
    """``table`` as an Arrow IPC stream (what ``datasets`` writes) or IPC file of ``rows_per_batch``-row record batches."""
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_stream if kind == "stream" else pa.ipc.new_file)(sink, table.schema)
        for batch in table.to_batches(max_chunksize=rows_per_batch):
            writer.write_batch(batch)
        writer.close()


@pytest.fixture
def files(tmp_path):
    pq.write_table(pa.table({"text": LINES, "n": list(range(200))}), tmp_path / "a.parquet", row_group_size=30)
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for line in LINES:
            f.write(json.dumps({"text": line, "x": 1}) + "\n")
    with open(tmp_path / "c.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(LINES))  # no final line break
    return tmp_path


@pytest.mark.parametrize("shard_bytes", [1, 17, 100, 1000, 1 << 20])
def test_every_row_is_read_exactly_once_whatever_the_shard_size(files, shard_bytes):
    shards = corpus.make_shards([str(files)], "text", shard_bytes)
    rows = read_all(shards)
    by_file = {}
    for name, key, text in rows:
        by_file.setdefault(name, []).append((key, text))
    assert [t for _, t in by_file["a.parquet"]] == LINES
    assert [k for k, _ in by_file["a.parquet"]] == list(range(200))  # parquet keys: row numbers
    assert [t for _, t in by_file["b.jsonl"]] == LINES
    assert "".join(t for _, t in by_file["c.txt"]) == "\n".join(LINES)  # text rows keep their line breaks
    offsets = [k for k, _ in by_file["c.txt"]]
    assert offsets == sorted(offsets) and offsets[0] == 0  # text keys: byte offsets of line starts
    assert len({s.shard_id for s in shards}) == len(shards)


def test_a_line_longer_than_many_shards_is_read_once_by_the_shard_it_starts_in(tmp_path):
    """The shards inside a 3 MiB line yield nothing (they scan for its end in blocks, up to their own end, keeping
    nothing); the line is its first shard's row, whole."""
    lines = ["first", "x" * (3 << 20), "after the long one", "y" * 70_000, "last"]
    (tmp_path / "long.txt").write_text("\n".join(lines) + "\n")
    shards = corpus.make_shards([str(tmp_path / "long.txt")], "text", 64 << 10)
    assert len(shards) > 40
    assert [t for _, _, t in read_all(shards)] == [line + "\n" for line in lines]
    with open(tmp_path / "long.txt", "rb") as f:  # the scan stops at the shard's end, or just past a line break
        f.seek(10)
        assert corpus._past_line_end(f, 10, 1000, block=64) == 1000
        f.seek(10)
        assert corpus._past_line_end(f, 10, (3 << 20) + 100, block=4096) == len("first\n") + (3 << 20) + 1
        assert f.read(5) == b"after"


def test_crlf_blank_lines_and_jsonl_rows_without_text(tmp_path):
    (tmp_path / "w.txt").write_bytes(b"one\r\ntwo\r\n\r\nthree")
    rows = read_all(corpus.make_shards([str(tmp_path / "w.txt")], shard_bytes=4))
    assert [t for _, _, t in rows] == ["one\r\n", "two\r\n", "\r\n", "three"]
    (tmp_path / "r.jsonl").write_text('{"text": "a"}\n\n{"text": null}\n{"other": 1}\n{"text": 5}\n{"text": "b"}\n')
    rows = read_all(corpus.make_shards([str(tmp_path / "r.jsonl")], shard_bytes=8))
    assert [t for _, _, t in rows] == ["a", None, None, None, None, "b"]  # unusable rows come back as None


def test_large_row_groups_are_cut_into_row_slices(tmp_path):
    pq.write_table(pa.table({"text": LINES}), tmp_path / "big.parquet", row_group_size=200)
    shards = corpus.make_shards([str(tmp_path / "big.parquet")], shard_bytes=500)
    assert len(shards) > 3 and all(s.row_group == 0 for s in shards)
    assert sum(s.rows for s in shards) == 200
    assert [t for _, _, t in read_all(shards, batch_rows=13)] == LINES


def test_shard_rows_caps_the_rows_of_parquet_and_arrow_shards(tmp_path):
    pq.write_table(pa.table({"text": LINES}), tmp_path / "p.parquet", row_group_size=200)
    shards = corpus.make_shards([str(tmp_path / "p.parquet")], shard_rows=64)
    assert [s.rows for s in shards] == [50, 50, 50, 50]
    assert [t for _, _, t in read_all(shards)] == LINES


CHATS = [[{"role": "user", "content": f"question {i}: " + "word " * (i % 5)}] if i % 3 else
         [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more?"}]
         for i in range(60)]


def test_message_lists_are_read_where_rows_are_prompts_and_refused_elsewhere(tmp_path):
    """A column of {role, content} lists (Parquet, Arrow, JSONL) is read with ``messages=True``: every row exactly
    once, as its list of dicts, its shards flagged; without it the column is refused in one line."""
    import datasets  # a test dependency: its absence is a failure, not a skip
    pq.write_table(pa.table({"messages": CHATS}), tmp_path / "m.parquet", row_group_size=25)
    datasets.Dataset.from_dict({"messages": CHATS}).save_to_disk(str(tmp_path / "ds"))
    with open(tmp_path / "m.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": c}) + "\n" for c in CHATS)
    for path in (tmp_path / "m.parquet", tmp_path / "ds", tmp_path / "m.jsonl"):
        shards = corpus.make_shards([str(path)], "messages", shard_bytes=200, shard_rows=8, messages=True)
        assert len(shards) >= 8 and all(s.messages for s in shards), path  # the nested column's bytes are counted
        assert [t for _, _, t in read_all(shards, "messages")] == CHATS, path
        with pytest.raises(UserError, match="not text; message lists are read only where rows are prompts") as info:
            corpus.make_shards([str(path)], "messages")
        assert "\n" not in str(info.value)
    # A text column stays a text column with messages=True; a list of another kind is refused.
    pq.write_table(pa.table({"text": LINES[:5]}), tmp_path / "t.parquet")
    assert [s.messages for s in corpus.make_shards([str(tmp_path / "t.parquet")], messages=True)] == [False]
    pq.write_table(pa.table({"messages": [["a", "b"]]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"column 'messages' is list<element: string>: prompts must be strings or lists of "
                                        r"\{role, content\} messages \(its lists hold string, not \{role, content\} structs\)"):
        corpus.make_shards([str(tmp_path / "bad.parquet")], "messages", messages=True)


def test_dictionary_encoded_and_all_null_text_columns_are_read(tmp_path):
    """A dictionary-encoded text column (pandas' Categorical) is text; a file whose column holds only nulls (typed
    null) is read with every row null, which the counters skip, as they skip a null in a string column."""
    words = ["a b", "c", "a b", None, "d"]
    pq.write_table(pa.table({"text": pa.array(words).dictionary_encode()}), tmp_path / "dict.parquet")
    pq.write_table(pa.table({"text": pa.nulls(3)}), tmp_path / "nulls.parquet")
    shards = corpus.make_shards([str(tmp_path / "dict.parquet"), str(tmp_path / "nulls.parquet")])
    assert [t for _, _, t in read_all(shards)] == words + [None] * 3


def test_a_value_that_is_not_utf8_reads_as_null_and_its_neighbours_are_read(tmp_path):
    """Writers other than pyarrow may store any bytes in a string column: such a row is null (a skipped row), in
    Parquet and in Arrow files, and the rows around it are read; before, it failed the shard on every retry."""
    column = pa.array([b"ok", b"caf\xe9", b"fine"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": column}), tmp_path / "a.parquet")
    with pa.ipc.new_stream(tmp_path / "b.arrow", pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": column}))
    shards = corpus.make_shards([str(tmp_path / "a.parquet"), str(tmp_path / "b.arrow")])
    assert [t for _, _, t in read_all(shards)] == ["ok", None, "fine"] * 2


def test_same_corpus_same_ids_and_a_changed_file_gets_new_ones(files):
    first = corpus.make_shards([str(files / "a.parquet"), str(files / "c.txt")], shard_bytes=300)
    again = corpus.make_shards([str(files / "a.parquet"), str(files / "c.txt")], shard_bytes=300)
    assert [s.shard_id for s in first] == [s.shard_id for s in again]
    time.sleep(0.01)
    with open(files / "c.txt", "a") as f:
        f.write("\nmore")
    changed = corpus.make_shards([str(files / "a.parquet"), str(files / "c.txt")], shard_bytes=300)
    a_ids = {s.shard_id for s in first if s.kind == "parquet"}
    assert a_ids == {s.shard_id for s in changed if s.kind == "parquet"}
    assert not {s.shard_id for s in first if s.kind == "txt"} & {s.shard_id for s in changed if s.kind == "txt"}


def test_folders_globs_and_dedup(files):
    (files / "sub").mkdir()
    (files / "sub" / "d.txt").write_text("x\n")
    (files / "notes.md").write_text("ignored in folders\n")
    found = corpus.expand_paths([str(files), str(files / "*.parquet")])
    names = [os.path.basename(p) for p in found]
    assert names == ["a.parquet", "b.jsonl", "c.txt", "d.txt"]


def test_hidden_entries_of_a_folder_are_no_corpus(tmp_path):
    """Names starting with . or _ are skipped in a folder, as generate skips them: a Spark job's _SUCCESS and the
    parts a failed or running job left in _temporary/, Delta's _delta_log/ checkpoints, .crc checksums."""
    table = pa.table({"text": ["a"]})
    for rel in ["part-0.parquet", "_temporary/0/task_1/part-1.parquet", "_delta_log/00010.checkpoint.parquet",
                "sub/part-2.parquet", "sub/_part-3.parquet", ".part-0.parquet.crc"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / rel)
    (tmp_path / "_SUCCESS").write_text("")
    for where in ([str(tmp_path)], [str(tmp_path / "*")], [str(tmp_path / "**" / "*.parquet")]):  # folder and globs alike
        found = corpus.expand_paths(where)
        assert [os.path.relpath(p, tmp_path) for p in found] == ["part-0.parquet", "sub/part-2.parquet"], where


@pytest.mark.parametrize("kind", ["stream", "file"])
def test_an_arrow_shard_is_read_a_record_batch_at_a_time_up_to_its_last_row(tmp_path, monkeypatch, kind):
    """An Arrow IPC stream (as ``datasets`` writes) or file of 10 record batches of 20 rows, cut in shards of 50 rows:
    every row read once in batches across record batches; the first shard reads no further into the file than
    the record batch holding its last row (on an object store the rest is never downloaded)."""
    path = tmp_path / "t.arrow"
    write_arrow(path, pa.table({"text": LINES[:200]}), kind, 20)
    shards = corpus.make_shards([str(path)], shard_rows=50)
    assert [(s.start, s.stop) for s in shards] == [(0, 50), (50, 100), (100, 150), (150, 200)]
    assert [(k, t) for _, k, t in read_all(shards, batch_rows=7)] == list(enumerate(LINES[:200]))

    read = []
    monkeypatch.setattr(corpus, "_arrow_source", lambda p: pa.PythonFile(Counting(path, read), mode="r"))
    assert [t for b in corpus.iter_shard(shards[0], batch_rows=7) for t in b.texts] == LINES[:50]
    assert 0 < sum(read) < 0.45 * path.stat().st_size  # 3 record batches of 10 (and the footer of an IPC file)
    read.clear()
    assert [t for b in corpus.iter_shard(shards[3], batch_rows=64) for t in b.texts] == LINES[150:200]
    assert 0 < sum(read) < 0.45 * path.stat().st_size  # the schema, then record batches 7-9 (not 0-6)


@pytest.mark.parametrize("kind", ["stream", "file"])
def test_arrow_shards_read_from_their_first_record_batch_not_from_the_files_start(tmp_path, monkeypatch, kind):
    """A shard notes where the record batch holding its first row is (its byte offset in a stream, its index in a
    file) and reads from there (a stream's schema first): the 58 shards of a file of 40 record batches read under three
    times its bytes together, not 29 times (each from the first batch: on an object store, the square of the file).
    Its id is what it was before it noted that, so a ledger recorded then resumes."""
    rows = [f"row {i} " + "x" * (i % 50) for i in range(4000)]
    path = tmp_path / "t.arrow"
    write_arrow(path, pa.table({"text": rows, "n": list(range(4000))}), kind, 100)
    shards = corpus.make_shards([str(path)], shard_rows=70)  # 69-row shards: most span two record batches
    key = corpus._file_key(str(path))
    assert [s.shard_id for s in shards] == [f"t-{key}-r{s}-{min(s + 69, 4000)}" for s in range(0, 4000, 69)]
    assert [s.batch_row for s in shards] == [s.start // 100 * 100 for s in shards]
    assert all(s.batch_at > 0 for s in shards) if kind == "stream" else [s.batch_at for s in shards] == [s.start // 100 for s in shards]

    sent = []
    monkeypatch.setattr(corpus, "_arrow_source", lambda p: pa.PythonFile(Counting(path, sent), mode="r"))
    each = []
    for s in shards:
        sent.clear()
        assert [(k, t) for b in corpus.iter_shard(s, batch_rows=16) for k, t in zip(b.keys, b.texts)] == [
            (k, rows[k]) for k in range(s.start, s.stop)]
        each.append(sum(sent))
    size = path.stat().st_size
    assert max(each) < 0.07 * size and sum(each) < 3 * size  # 2 of 40 batches each at most; before: 29 files' worth


def test_an_arrow_stream_with_dictionary_columns_is_read_from_its_start(tmp_path):
    """A stream's dictionaries are messages of their own before the batches using them: a shard of a stream with a
    dictionary-encoded column reads it from its first batch, as before."""
    words = pa.array([f"w{i % 7}" for i in range(300)]).dictionary_encode()
    write_arrow(tmp_path / "d.arrow", pa.table({"text": words, "n": list(range(300))}), "stream", 40)
    write_arrow(tmp_path / "e.arrow", pa.table({"text": LINES[:100], "tag": pa.array(["a", "b"] * 50).dictionary_encode()}),
                "stream", 30)
    shards = corpus.make_shards([str(tmp_path / "d.arrow"), str(tmp_path / "e.arrow")], shard_rows=25)
    assert len(shards) == 16 and {(s.batch_at, s.batch_row) for s in shards} == {(-1, 0)}
    assert [t for _, _, t in read_all(shards)] == words.to_pylist() + LINES[:100]

    class Tag(pa.ExtensionType):  # a registered extension type whose storage is dictionary-encoded
        def __init__(self):
            super().__init__(pa.dictionary(pa.int8(), pa.string()), "vocabtrim.test.tag")

        def __arrow_ext_serialize__(self):
            return b""

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type, serialized):
            return cls()

    pa.register_extension_type(Tag())
    try:
        tags = pa.ExtensionArray.from_storage(Tag(), pa.array(["a", "b"] * 50).dictionary_encode().cast(Tag().storage_type))
        write_arrow(tmp_path / "f.arrow", pa.table({"text": LINES[:100], "tag": tags}), "stream", 30)
        shards = corpus.make_shards([str(tmp_path / "f.arrow")], shard_rows=25)
        assert {s.batch_at for s in shards} == {-1} and [t for _, _, t in read_all(shards)] == LINES[:100]
    finally:
        pa.unregister_extension_type("vocabtrim.test.tag")


def test_a_saved_datasets_folder_is_read_through_its_arrow_files(tmp_path):
    import datasets  # a test dependency: its absence is a failure, not a skip
    datasets.Dataset.from_dict({"text": LINES}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": LINES[:50]})}).save_to_disk(str(tmp_path / "dd"))
    shards = corpus.make_shards([str(tmp_path / "ds")], shard_bytes=400)
    assert len(shards) > 1 and all(s.kind == "arrow" and s.batch_at > 0 for s in shards)  # a stream: read from a shard's batch
    assert [t for _, _, t in read_all(shards)] == LINES
    assert [t for _, _, t in read_all(corpus.make_shards([str(tmp_path / "dd")]))] == LINES[:50]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "f.parquet"), "no column 'text'.*--text-column"),
        (lambda d: pq.write_table(pa.table({"text": [1, 2]}), d / "f.parquet"), "column 'text' is int64, not text"),
        (lambda d: (d / "f.parquet").write_bytes(b"PAR1 garbage"), "cannot read Parquet file"),
        (lambda d: (d / "f.jsonl").write_text('{"body": "x"}\n'), "no key 'text'.*--text-column"),
        (lambda d: (d / "f.jsonl").write_text("not json\n"), "not JSON"),
        (lambda d: (d / "f.txt").write_bytes(b"\x00\x01\x02binary"), "not a text file"),
        (lambda d: (d / "f.txt").write_bytes(b"caf\xe9 latin-1 text"), "not UTF-8"),
        (lambda d: (d / "f.csv").write_text("a,b\n"), "unsupported corpus file"),
        (lambda d: (d / "f.arrow").write_bytes(b"not arrow at all"), "cannot read Arrow file .*f.arrow: "),
        (lambda d: (d / "f.arrow").write_bytes(b"ARROW1\x00\x00 a file cut short"), "cannot read Arrow file .*f.arrow: "),
        (lambda d: pa.ipc.new_stream(str(d / "f.arrow"), pa.schema([("body", pa.string())])).close(), "no column 'text'"),
    ],
)
def test_bad_files_are_refused_in_one_line(tmp_path, make, match):
    make(tmp_path)
    (path,) = [p for p in tmp_path.iterdir()]
    with pytest.raises(UserError, match=match) as info:
        corpus.make_shards([str(path)])
    assert "\n" not in str(info.value)


def test_a_network_fault_while_reading_a_shard_is_not_a_user_error(tmp_path, monkeypatch):
    """A shard whose read breaks on the network is retried by the pool (a fault of the machine); a file
    gone missing is the user's, in one line."""
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "c.parquet")
    (shard,) = corpus.make_shards([str(tmp_path / "c.parquet")])

    def failing(error):
        def read(*args, **kwargs):
            raise error
            yield

        return read

    monkeypatch.setattr(corpus, "_iter_parquet", failing(OSError("AWS Error NETWORK_CONNECTION during GetObject: curlCode: 7")))
    with pytest.raises(OSError, match="NETWORK_CONNECTION") as e:
        list(corpus.iter_shard(shard))
    assert not isinstance(e.value, UserError)
    monkeypatch.setattr(corpus, "_iter_parquet", failing(FileNotFoundError(2, "No such file or directory")))
    with pytest.raises(UserError, match="cannot read .*No such file or directory"):
        list(corpus.iter_shard(shard))


def test_a_network_fault_while_cutting_shards_is_not_a_user_error(tmp_path, monkeypatch):
    """Reading a file's footer to cut it into shards: a file the user cannot read is refused in one line, a
    dropped connection to the object store keeps its type (the caller retries it)."""
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "c.parquet")

    def failing(error):
        def cut(*args, **kwargs):
            raise error
        return cut

    monkeypatch.setattr(corpus, "_parquet_shards", failing(OSError("Parquet magic bytes not found in footer")))
    with pytest.raises(UserError, match="cannot read .*c.parquet: Parquet magic bytes"):
        corpus.make_shards([str(tmp_path / "c.parquet")])
    monkeypatch.setattr(corpus, "_parquet_shards", failing(OSError("AWS Error SERVICE_UNAVAILABLE during GetObject")))
    with pytest.raises(OSError, match="SERVICE_UNAVAILABLE") as raised:
        corpus.make_shards([str(tmp_path / "c.parquet")])
    assert not isinstance(raised.value, UserError)


def test_files_are_cut_at_once_and_the_shards_and_the_error_are_those_of_the_files_in_order(tmp_path, monkeypatch):
    """On an object store each file's footer is round trips: ``make_shards`` cuts ``PLAN_THREADS`` files at
    once. The shards come in the files' order whichever finishes first, and of two bad files the first is named."""
    import threading
    import time

    for i in range(12):
        pq.write_table(pa.table({"text": [f"row {i} {j}" for j in range(i + 1)]}), tmp_path / f"f{i:02d}.parquet")
    serial = corpus.make_shards([str(tmp_path)])
    under_way, most = [], []
    lock = threading.Lock()
    real = corpus._parquet_shards

    def slow(path, *args):
        with lock:
            under_way.append(path)
            most.append(len(under_way))
        time.sleep(0.1 if path.endswith(("f00.parquet", "f03.parquet")) else 0.01)  # these finish after the others
        with lock:
            under_way.remove(path)
        return real(path, *args)

    monkeypatch.setattr(corpus, "_parquet_shards", slow)
    assert corpus.make_shards([str(tmp_path)]) == serial
    assert [s.path for s in serial] == sorted(str(p) for p in tmp_path.iterdir())  # one shard each, in order
    assert max(most) > 1
    (tmp_path / "f03.parquet").write_bytes(b"PAR1 garbage")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "f09.parquet")  # refused before f03 is
    with pytest.raises(UserError, match="f03.parquet"):
        corpus.make_shards([str(tmp_path)])


def test_missing_paths_and_empty_globs_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such corpus file or folder"):
        corpus.expand_paths([str(tmp_path / "nope.parquet")])
    with pytest.raises(UserError, match="no files match"):
        corpus.expand_paths([str(tmp_path / "*.jsonl")])
    with pytest.raises(UserError, match="no .parquet, .jsonl or .txt files"):
        corpus.expand_paths([str(tmp_path)])
    literal = tmp_path / "data[1].txt"  # a name with [ that exists is that file; the same spelling unmatched is a pattern
    literal.write_text("hello\n")
    assert corpus.expand_paths([str(literal)]) == [str(literal)]
    with pytest.raises(UserError, match="no files match"):
        corpus.expand_paths([str(tmp_path / "data[0-9].txt")])


def test_a_bad_json_line_mid_file_names_its_offset(tmp_path):
    (tmp_path / "f.jsonl").write_text('{"text": "ok"}\n{broken\n')
    (shard,) = corpus.make_shards([str(tmp_path / "f.jsonl")])
    with pytest.raises(UserError, match="line at byte 15 is not valid JSON"):
        read_all([shard])


def test_an_empty_file_has_no_shards_and_known_rows_are_summed(tmp_path):
    (tmp_path / "e.txt").write_text("")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    assert corpus.make_shards([str(tmp_path / "e.txt")]) == []
    shards = corpus.make_shards([str(tmp_path / "e.parquet")])
    assert corpus.file_rows(shards) == 0
    pq.write_table(pa.table({"text": ["a"] * 5}), tmp_path / "five.parquet")
    pq.write_table(pa.table({"text": ["b"] * 7}), tmp_path / "seven.parquet", row_group_size=3)
    (tmp_path / "r.jsonl").write_text('{"text": "c"}\n')
    parquet = corpus.make_shards([str(tmp_path / "five.parquet"), str(tmp_path / "seven.parquet")])
    assert corpus.file_rows(parquet) == 12
    assert corpus.file_rows(parquet + corpus.make_shards([str(tmp_path / "r.jsonl")])) is None  # rows of a byte range: unknown


def upload(local_root, remote_root: str) -> None:
    """Copy a local folder tree to an object-store prefix."""
    for dirpath, _, names in os.walk(local_root):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), local_root)
            with open(os.path.join(dirpath, n), "rb") as f:
                storage.write_bytes(storage.join(remote_root, *rel.split(os.sep)), f.read())


def test_an_s3_corpus_gives_the_shards_and_rows_of_its_local_copy(s3, files):
    import datasets  # a test dependency: its absence is a failure, not a skip
    datasets.Dataset.from_dict({"text": LINES[:40]}).save_to_disk(str(files / "sub" / "ds"))
    (files / ".hidden").mkdir()
    (files / ".hidden" / "skip.txt").write_text("never read\n")
    remote = s3.bucket() + "/corpus"
    upload(files, remote)

    def facts(shards):
        return [(s.name, s.kind, s.start, s.stop, s.row_group, s.rows, s.batch_at, s.batch_row) for s in shards]

    local = corpus.make_shards([str(files)], "text", 300)
    shards = corpus.make_shards([remote], "text", 300)
    assert {s.kind for s in shards} == {"parquet", "jsonl", "txt", "arrow"} and len(shards) > 20
    assert facts(shards) == facts(local) and read_all(shards) == read_all(local)
    assert all(s.path.startswith(remote + "/") for s in shards)
    assert [s.shard_id for s in corpus.make_shards([remote], "text", 300)] == [s.shard_id for s in shards]
    # a changed object is a new file: its shards get new ids, the others keep theirs
    storage.write_bytes(remote + "/c.txt", b"changed\n")
    again = {s.shard_id for s in corpus.make_shards([remote], "text", 300)}
    assert {s.shard_id for s in shards if s.name != "c.txt"} <= again
    assert not {s.shard_id for s in shards if s.name == "c.txt"} & again


def test_a_small_byte_shard_on_an_object_store_fetches_about_its_own_bytes(s3, monkeypatch):
    """A JSONL/text shard is read through a buffer of its size and 64 KiB more (at most 8 MiB): each 16 KiB shard (a
    generated source's) of a 600 KB object fetches at most 80 KiB, where an 8 MiB buffer fetched the whole rest of
    the object; a line running past the buffer is still its shard's, whole, and every row is read once."""
    lines = [json.dumps({"text": f"row {i} " + "w" * (i * 7 % 300)}) for i in range(3000)]
    lines[1500] = json.dumps({"text": "long " * 40_000})  # 200 KB: past its shard's buffer
    data = "".join(line + "\n" for line in lines).encode()
    remote = s3.bucket() + "/g.jsonl"
    storage.write_bytes(remote, data)
    shards = corpus.make_shards([remote], "text", 16 << 10)
    assert len(shards) > 40
    sent = []
    open_input_file = storage.open_input_file

    class Counting:  # the object store's file, counting the bytes it sends
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            sent.append(len(data))
            return data

        def seek(self, offset, whence=0):
            return self.f.seek(offset, whence)

        def tell(self):
            return self.f.tell()

        def close(self):
            self.f.close()

    monkeypatch.setattr(storage, "open_input_file", lambda where: Counting(open_input_file(where)))
    rows, each = [], {}
    for s in shards:
        sent.clear()
        rows.extend(read_all([s]))
        each[s] = sum(sent)
    assert [json.loads(line)["text"] for line in lines] == [t for _, _, t in rows]
    long_start = sum(len(line) + 1 for line in lines[:1500])
    (owner,) = [s for s in shards if s.start <= long_start < s.stop]
    assert max(n for s, n in each.items() if s is not owner) <= 80 << 10  # before: up to the whole 600 KB
    assert each[owner] < 200_000 + 3 * (80 << 10)


def test_s3_globs_files_and_missing_keys(s3, files):
    remote = s3.bucket()
    upload(files, remote + "/in")
    assert corpus.expand_paths([remote + "/in/*.txt", remote + "/in/b.jsonl", remote + "/**/b.jsonl"]) == [
        remote + "/in/c.txt", remote + "/in/b.jsonl"
    ]
    with pytest.raises(UserError, match=f"^no such corpus file or folder: {remote}/in/nope.txt$"):
        corpus.make_shards([remote + "/in/nope.txt"])
    with pytest.raises(UserError, match=f"^no files match {remote}/x/\\*.txt$"):
        corpus.make_shards([remote + "/x/*.txt"])


@pytest.mark.parametrize("file, text, what", [
    ("dataset_dict.json", "[]", "datasets file (AttributeError"),
    ("dataset_dict.json", "{not json", "datasets file (JSONDecodeError"),
    ("state.json", '{"_data_files": [{"name": "x.arrow"}]}', "datasets state file (KeyError"),
])
def test_a_datasets_folder_with_a_damaged_record_is_refused_in_one_line(tmp_path, file, text, what):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / file).write_text(text)
    (folder / "dataset_info.json").write_text("{}")
    with pytest.raises(UserError, match=rf"^{folder / file} is not a readable {re.escape(what)}.*\): pass the folder datasets' "
                                        "save_to_disk wrote, or its Arrow files$"):
        corpus.expand_paths([str(folder)])
