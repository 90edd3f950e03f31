"""generate's driver saves a file's rows as parts while the file is under way (``generate_outputs``): what it
holds stays bounded, a stopped run keeps the rows that are back, a rerun generates only the rest, and the output
assembled from parts equals one written whole. The pool here is a stand-in that runs chunks on the driver (rows
come back out of order, as from several actors); the engine's side is test_generate's."""

import json
from dataclasses import asdict, replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vocabtrim import generate, storage
from vocabtrim.errors import UserError
from vocabtrim.generate import GenerateConfig, run_pool
from vocabtrim.generate_outputs import STATS_KEY, ChunkStats, find_parts, finished, output_path, parts_folder, read_file_stats
from vocabtrim.prompts import inspect_prompt_files, read_chunks

ROWS = 100


class Pool:
    """Takes ``window`` chunks at a time and hands their results back last first; raises KeyboardInterrupt (Ctrl-C)
    instead of taking chunk number ``stop_at`` (0-based). ``keys``: every row key it was given."""

    def __init__(self, window: int = 3, stop_at: int | None = None):
        self.window, self.stop_at, self.keys, self.taken, self.shut = window, stop_at, [], 0, False

    def shutdown(self):
        self.shut = True

    def run(self, items, on_result, describe):
        items = iter(items)
        while True:
            batch = []
            for item in items:
                if self.taken == self.stop_at:
                    raise KeyboardInterrupt
                self.taken += 1
                batch.append(item)
                if len(batch) == self.window:
                    break
            if not batch:
                return
            for item in reversed(batch):
                on_result(item, result(item[1].keys))
                self.keys.extend(item[1].keys)


def result(keys: list[str]) -> dict:
    """A chunk's result whose every value follows from its row keys."""
    n = len(keys)
    columns = {"completion": [f"completion of {k}" for k in keys], "completion_tokens": [len(k) for k in keys],
               "draft_proposed": [3] * n, "draft_accepted": [k.count("1") for k in keys], "finish_reason": ["length"] * n,
               "error": [None] * n}
    return {"columns": columns, "stats": asdict(ChunkStats(accepted_hist=[n, 1], target_passes=n, engine_seconds=0.5))}


@pytest.fixture
def files(tmp_path):
    """A file with int64 ids and one without ids (stable ids), in a subfolder."""
    root = tmp_path / "prompts"
    (root / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"id": pa.array(range(1000, 1000 + ROWS), pa.int64()), "prompt": [f"p{i}" for i in range(ROWS)]}),
                   root / "a.parquet", row_group_size=30)
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(37)]}), root / "sub" / "b.parquet")
    return inspect_prompt_files([str(root)], "prompt", "id")


def config(out, **kw) -> GenerateConfig:
    return GenerateConfig(target="unused", prompts=["unused"], out=str(out), rows_per_task=7, progress=False, **kw)


def run(pool, files, cfg, saved=None):
    """run_pool; the statistics each written output was reported with must be those in its footer."""
    reported = {}
    try:
        run_pool(pool, files, cfg, cfg.out, lambda rows, tokens: None, lambda f, stats: reported.update({f.name: stats}),
                 saved=saved)
    finally:
        for name, stats in reported.items():
            assert stats == read_file_stats(output_path(cfg.out, next(f for f in files if f.name == name)))
    return reported


def outputs(out, files):
    return {f.name: pq.read_table(output_path(str(out), f)) for f in files}


@pytest.fixture
def whole(files, tmp_path):
    """The outputs written whole: no part saved (rows held until their file is done)."""
    out = tmp_path / "whole"
    run(Pool(), files, config(out, part_rows=10**9, part_seconds=1e9))
    assert not (out / ".parts").exists()
    return outputs(out, files)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_parts_bound_what_the_driver_holds_and_the_output_equals_one_written_whole(files, whole, tmp_path, monkeypatch,
                                                                                   s3, where):
    out = str(tmp_path / "out") if where == "local" else f"{s3.bucket()}/out"
    saved, save = [], generate.save_part
    monkeypatch.setattr(generate, "save_part", lambda *a: saved.append(save(*a)) or saved[-1])
    run(Pool(), files, config(out, part_rows=20))
    # a part is saved once 20 rows are held: at most 26 then (chunks of 7); a part holds consecutive rows only
    a = [p for p in saved if "/a.parquet/" in p.path]
    assert len(a) >= 4 and all(0 < p.stop - p.start <= 26 for p in a)
    for f in files:
        got = pq.read_table(storage.open_input_file(output_path(out, f)))
        assert got.equals(whole[f.name])  # rows in order, ids as they came, same values and types
        stats = read_file_stats(output_path(out, f))
        assert stats["rows"] == f.num_rows and stats["target_passes"] == f.num_rows  # parts' statistics summed
        assert json.loads(got.schema.metadata[STATS_KEY]) == stats  # in the Arrow schema, as pq.write_table puts them
        assert pq.ParquetFile(storage.open_input_file(output_path(out, f))).metadata.num_row_groups == 1  # parts coalesced
        assert stats["accepted_hist"][0] == f.num_rows
        assert stats["generated_tokens"] == sum(whole[f.name].column("completion_tokens").to_pylist())
        assert finished(out, f)
    assert storage.walk_files(storage.join(out, ".parts")) == []  # deleted once the output is written


def test_parts_are_also_saved_by_the_clock(files, whole, tmp_path, monkeypatch):
    """part_seconds after a file's first chunk went out or its last save, its rows are saved as the next chunk comes
    back, whatever their number (here every chunk's, at once); a file not begun starts its clock with its first chunk."""
    out = tmp_path / "out"
    saved, save = [], generate.save_part
    monkeypatch.setattr(generate, "save_part", lambda *a: saved.append(save(*a)) or saved[-1])
    clock = [0.0]
    monkeypatch.setattr(generate.time, "monotonic", lambda: clock[0])

    class Slow(Pool):  # each chunk takes 10 s of the clock
        def run(self, items, on_result, describe):
            super().run(items, lambda item, r: (clock.__setitem__(0, clock[0] + 10), on_result(item, r)), describe)

    run(Slow(window=1), files, config(out, part_seconds=25.0))
    a = [p for p in saved if "/a.parquet/" in p.path]
    chunks = len(list(read_chunks(files[0], "prompt", "id", 7)))
    assert len(a) == chunks // 3 and all(p.stop - p.start <= 3 * 7 for p in a)  # every third chunk: 30 s >= 25
    b = [(p.start, p.stop) for p in saved if "/b.parquet/" in p.path]
    assert b == [(0, 21), (21, 37)]  # its clock began with its first chunk (from the run's start: a part of 1 chunk)
    assert outputs(out, files) == whole


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_stopped_run_keeps_its_rows_and_the_rerun_generates_only_the_rest(files, whole, tmp_path, s3, where):
    out = str(tmp_path / "out") if where == "local" else f"{s3.bucket()}/out"
    cfg = config(out, part_rows=20)
    generate.prepare_out(out, {"seed": 1}, files)
    first = Pool(stop_at=11)  # Ctrl-C with a.parquet's chunks 9 and 10 out, and rows back but not saved yet
    with pytest.raises(KeyboardInterrupt):
        run(first, files, cfg)
    assert not any(finished(out, f) for f in files)
    parts = find_parts(out, files)
    kept = sorted(r for p in parts["a.parquet"] for r in range(p.start, p.stop))
    assert kept == list(range(len(first.keys)))  # every row that was back, held ones included, and no other
    with pytest.raises(UserError, match="holds outputs made with other settings"):  # saved rows bind the settings
        generate.prepare_out(out, {"seed": 2}, files)

    second = Pool()
    run(second, files, replace(cfg, part_rows=15, rows_per_task=5), saved=parts)  # other chunk sizes: rows still once
    assert sorted(first.keys + second.keys) == sorted([str(i) for i in range(1000, 1000 + ROWS)] +
                                                      [f"sub/b.parquet:{i}" for i in range(37)])
    for f in files:
        assert pq.read_table(storage.open_input_file(output_path(out, f))).equals(whole[f.name])
        assert read_file_stats(output_path(out, f))["target_passes"] == f.num_rows
    assert storage.walk_files(storage.join(out, ".parts")) == []


def test_a_write_that_fails_leaves_the_file_saved_for_the_rerun(files, whole, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = config(out, part_rows=20)

    def stopped(out_, file, *args):
        if file.name == "a.parquet":
            raise KeyboardInterrupt
        return write(out_, file, *args)

    write = generate.write_output
    with monkeypatch.context() as m:
        m.setattr(generate, "write_output", stopped)  # a.parquet's write ends in an interrupt
        with pytest.raises(KeyboardInterrupt):
            run(Pool(), files, cfg)
    parts = find_parts(str(out), files)
    assert sum(p.stop - p.start for p in parts["a.parquet"]) == ROWS
    second = Pool()
    run(second, [f for f in files if finished(str(out), f) is None], cfg, saved=parts)
    assert all(k.startswith("sub/b.parquet:") for k in second.keys)  # a.parquet written from its parts alone
    assert outputs(out, files) == whole


def test_ctrl_c_while_an_output_is_written_saves_the_rest_kills_the_workers_then_lets_the_write_end(files, whole, tmp_path,
                                                                                                     monkeypatch):
    """Ctrl-C on the driver while a.parquet's output is being written: b.parquet's rows that are back are saved and
    the workers killed before the write is let end; the write ends whole; the rerun generates b.parquet's other rows."""
    import threading

    out = tmp_path / "out"
    cfg = config(out, part_rows=10**9)
    write, writing, go = generate.write_output, threading.Event(), threading.Event()
    order = []

    def slow(out_, file, *args):
        if file.name == "a.parquet":
            writing.set()
            go.wait(20)
            order.append("written")
        return write(out_, file, *args)

    class Stopping(Pool):
        def shutdown(self):
            order.append("workers killed")
            threading.Timer(0.2, go.set).start()

    chunks = len(list(read_chunks(files[0], "prompt", "id", 7)))
    first = Stopping(window=1, stop_at=chunks + 2)  # Ctrl-C as b.parquet's third chunk would go out
    with monkeypatch.context() as m:
        m.setattr(generate, "write_output", slow)
        with pytest.raises(KeyboardInterrupt):
            run(first, files, cfg)
    assert writing.is_set() and order == ["workers killed", "written"]
    assert finished(str(out), files[0]) is not None and finished(str(out), files[1]) is None
    parts = find_parts(str(out), files)
    assert "a.parquet" not in parts and [(p.start, p.stop) for p in parts["sub/b.parquet"]] == [(0, 14)]
    second = Pool()
    run(second, files[1:], cfg, saved=parts)  # the files with no output, as _generate gives them
    assert sorted(second.keys) == sorted(f"sub/b.parquet:{i}" for i in range(14, 37))
    assert outputs(out, files) == whole


def test_parts_of_another_version_of_the_input_or_that_overlap_are_refused(files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(Pool(stop_at=5), files, config(out, part_rows=10))
    changed = [replace(files[0], footer_sha256="0" * 64)]
    with pytest.raises(UserError, match=r"\.parts/a\.parquet holds rows generated from another version of .*a\.parquet "
                                        r"\(its Parquet footer changed since\): use a new --out, or delete that folder"):
        find_parts(str(out), changed)
    folder = parts_folder(str(out), "a.parquet")
    first = sorted(p.name for p in (tmp_path / "out" / ".parts" / "a.parquet").iterdir())[0]
    start, rest = first.split("-", 1)
    (tmp_path / "out" / ".parts" / "a.parquet" / f"{int(start) + 1:012d}-{rest}").write_bytes(
        (tmp_path / "out" / ".parts" / "a.parquet" / first).read_bytes())
    with pytest.raises(UserError, match=f"overlaps another part or runs past the rows of .*: delete {folder}"):
        find_parts(str(out), files)
    (tmp_path / "out" / ".parts" / "a.parquet" / f"{int(start) + 1:012d}-{rest}").unlink()
    (tmp_path / "out" / ".parts" / "a.parquet" / first).write_bytes(b"PAR1 not a part")  # damaged: refused in one line
    with pytest.raises(UserError, match=f"{first} is not a readable part .*: delete {folder} to generate that file again"):
        run(Pool(), files, config(out), saved=find_parts(str(out), files))


def test_a_part_folder_left_with_only_a_killed_saves_partial_file_is_deleted_with_the_file(files, whole, tmp_path):
    out = tmp_path / "out"
    folder = out / ".parts" / "sub" / "b.parquet"
    folder.mkdir(parents=True)
    (folder / ".000000000000-000000000021.none.parquet.Ab3dE6gH.tmp").write_bytes(b"half a part")
    saved = find_parts(str(out), files)
    assert saved == {"sub/b.parquet": []}
    run(Pool(), files, config(out, part_rows=10**9, part_seconds=1e9), saved=saved)
    assert not folder.exists() and outputs(out, files) == whole


def test_outputs_are_written_beside_the_pool_and_a_failed_write_keeps_its_rows(files, whole, tmp_path, monkeypatch):
    """Two files' writes run at once (each waits for the other at a barrier: written one after the other on the
    driver, the first would wait forever). A write that fails stops the run with its error, and the file's rows are
    saved as parts: the rerun writes it without generating a row of it."""
    import threading

    write = generate.write_output
    meet = threading.Barrier(2, timeout=20)
    with monkeypatch.context() as m:
        m.setattr(generate, "write_output", lambda *a: (meet.wait(), write(*a))[1])
        run(Pool(), files, config(tmp_path / "both"))
    assert outputs(tmp_path / "both", files) == whole

    out = tmp_path / "out"

    def failing(out_, file, *a):
        if file.name == "a.parquet":
            raise OSError("injected: the store dropped the upload")
        return write(out_, file, *a)

    with monkeypatch.context() as m:
        m.setattr(generate, "write_output", failing)
        with pytest.raises(OSError, match="injected"):
            run(Pool(), files, config(out, part_rows=30))
    parts = find_parts(str(out), files)
    assert [(p.start, p.stop) for p in parts["a.parquet"]][-1][1] == ROWS and sum(p.stop - p.start for p in parts["a.parquet"]) == ROWS
    second = Pool()
    run(second, files, config(out), saved=parts)
    assert not any(k.isdigit() for k in second.keys)  # none of a.parquet's rows generated again
    assert outputs(out, files) == whole
