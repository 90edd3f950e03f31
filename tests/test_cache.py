"""The cache of derived model folders: whole entries, a record of their sources, stale entries removed."""

import json
import os
import socket
import time

from vocabtrim import cache, models


def _entry_writer(text):
    def write(tmp):
        (tmp / "config.json").write_text(json.dumps({"made_from": text}))
        (tmp / "model.safetensors").write_bytes(b"weights")
    return write


def _record(sources, *params):
    return cache.entry_record(cache.stamps(sources), *params)


def _touch_later(path, seconds=10):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_an_entry_whose_source_changed_or_vanished_goes_when_another_is_published(tmp_path):
    root = tmp_path / "cache"
    a, b, gone = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "gone.gguf"
    for f in (a, b, gone):
        f.write_bytes(f.name.encode())
    cache.publish_folder(root / "models" / "a-1", _entry_writer("a"), _record([a]))
    cache.publish_folder(root / "models" / "b-1", _entry_writer("b"), _record([b]))
    cache.publish_folder(root / "models" / "gone-1", _entry_writer("gone"), _record([gone]))
    (root / "models" / "legacy").mkdir()  # no record: never ours to remove
    (root / "models" / "legacy" / "config.json").write_text("{}")
    record = json.loads((root / "models" / "a-1" / cache.RECORD).read_text())
    assert record["sources"] == [cache.stamp(a)]

    gone.unlink()
    _touch_later(a)  # a reinstall: same path, new modification time
    cache.publish_folder(root / "models" / "a-2", _entry_writer("a again"), _record([a]))
    left = sorted(p.name for p in (root / "models").iterdir())
    assert left == ["a-2", "b-1", "legacy"]
    assert json.loads((root / "models" / "a-2" / "config.json").read_text()) == {"made_from": "a again"}


def test_the_key_is_made_from_the_record_the_entry_keeps(tmp_path):
    """What the key covers and what pruning checks are one record: a change the record would call stale is
    a new key, and so is another setting."""
    a = tmp_path / "a.gguf"
    a.write_bytes(b"a")
    key = cache.entry_key(_record([a], "layers=4"))
    assert cache.entry_key(_record([a], "layers=4")) == key
    assert cache.entry_key(_record([a], "layers=2")) != key
    entry = tmp_path / "cache" / "models" / f"a-{key}"
    cache.publish_folder(entry, _entry_writer("a"), _record([a], "layers=4"))
    assert json.loads((entry / cache.RECORD).read_text()) == {**_record([a], "layers=4"), "host": socket.gethostname()}
    _touch_later(a)
    assert cache.is_stale(entry)
    assert cache.entry_key(_record([a], "layers=4")) != key


def test_an_entry_under_an_earlier_key_goes_when_the_same_record_is_published(tmp_path):
    """A new version's keys must not strand the old entries of files that still exist (517 MB a conversion):
    the same sources and settings under another name are superseded; other settings are not."""
    root = tmp_path / "cache"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")
    old = root / "models" / "m-oldkey"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / cache.RECORD).write_text(json.dumps({"sources": cache.stamps([gguf])}))  # the first version's record
    cache.publish_folder(root / "vllm-drafters" / "m-layers4", _entry_writer("d"), _record([gguf], "layers=4"))
    new = root / "models" / f"m-{cache.entry_key(_record([gguf]))}"
    cache.publish_folder(new, _entry_writer("m"), _record([gguf]))
    assert not old.exists() and new.is_dir() and (root / "vllm-drafters" / "m-layers4").is_dir()


def test_an_entry_another_machine_recorded_goes_only_once_unused_for_a_day(tmp_path):
    """A cache shared by machines (a home directory on NFS): a path recorded by another machine may not
    exist here though its file is live there, so its entry is judged only after a day without a lookup."""
    root = tmp_path / "cache"
    here, there = tmp_path / "m.gguf", "/nonexistent/other-machine/m.gguf"
    here.write_bytes(b"w")
    entry = root / "models" / "m-there"
    entry.mkdir(parents=True)
    _entry_writer("there")(entry)
    (entry / cache.RECORD).write_text(json.dumps({"sources": [{"path": there, "size": 1, "mtime_ns": 1}],
                                                  "params": [], "host": "another-machine"}))
    cache.publish_folder(root / "models" / "m-here", _entry_writer("m"), _record([here]))
    assert entry.is_dir()  # in use there, for all this machine can tell
    day_ago = time.time() - cache.ABANDONED_S - 60
    os.utime(entry, (day_ago, day_ago))
    assert cache.lookup(entry)  # a lookup there marks it used
    assert cache.prune(root) == [] and entry.is_dir()
    os.utime(entry, (day_ago, day_ago))
    assert cache.prune(root) == [entry] and not entry.exists()


def test_an_entry_made_from_a_removed_entry_goes_with_it(tmp_path):
    root = tmp_path / "cache"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")
    conversion = root / "models" / "m-1"
    cache.publish_folder(conversion, _entry_writer("m"), _record([gguf]))
    drafter = root / "vllm-drafters" / "m-1-x"
    cache.publish_folder(drafter, _entry_writer("drafter"), _record(sorted(conversion.iterdir())))
    _touch_later(gguf)
    cache.publish_folder(root / "models" / "m-2", _entry_writer("m"), _record([gguf]))
    assert not conversion.exists() and not drafter.exists()
    assert (root / "models" / "m-2" / "config.json").is_file()


def test_a_killed_writers_temporary_folder_goes_a_day_later(tmp_path):
    root = tmp_path / "cache"
    src = tmp_path / "m.gguf"
    src.write_bytes(b"w")
    old, fresh = root / "models" / "m-1.tmp-old", root / "models" / "m-1.tmp-fresh"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    day_ago = time.time() - cache.ABANDONED_S - 60
    os.utime(old, (day_ago, day_ago))
    cache.publish_folder(root / "models" / "m-1", _entry_writer("m"), _record([src]))
    assert not old.exists() and fresh.exists()  # a writer may still be filling the fresh one


def test_a_regenerated_gguf_file_converts_once_and_its_old_conversion_goes(tmp_path, monkeypatch):
    """The bundled model is reinstalled with every new virtual environment (same bytes, new path or time):
    the cache keeps one conversion per GGUF file that still exists, not one per install."""
    monkeypatch.setenv("VOCABTRIM_CACHE", str(tmp_path / "cache"))
    conversions = []

    def fake_convert(gguf, folder):  # the dequantisation itself is exercised wherever the bundled model loads
        conversions.append(gguf)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    venv1, venv2 = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for f in (venv1, venv2):
        f.parent.mkdir()
        f.write_bytes(b"gguf bytes")
    first = models.gguf_folder(venv1)
    assert models.gguf_folder(venv1) == first and len(conversions) == 1  # converted once
    second = models.gguf_folder(venv2)
    assert first.is_dir() and second.is_dir() and second != first  # both installs live
    (tmp_path / "venv1" / "m.gguf").unlink()
    _touch_later(venv2)
    third = models.gguf_folder(venv2)
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [third.name]
    assert len(conversions) == 3


def test_a_half_deleted_entry_is_written_again_and_one_writer_per_machine_converts(tmp_path, monkeypatch):
    """A folder a removal left half-deleted (its weights gone) is not a cached model: it is written again in its
    place (the rename onto it failed on every later run). Processes of one machine write an entry one at a time;
    one that finds it written once its turn comes writes nothing."""
    import threading

    root = tmp_path / "cache"
    src = tmp_path / "m.gguf"
    src.write_bytes(b"w")
    entry = root / "models" / "m-1"
    cache.publish_folder(entry, _entry_writer("m"), _record([src]))
    (entry / "model.safetensors").unlink()
    assert not cache.lookup(entry)
    cache.publish_folder(entry, _entry_writer("again"), _record([src]))
    assert cache.lookup(entry) and json.loads((entry / "config.json").read_text()) == {"made_from": "again"}

    writes, started = [], threading.Event()

    def slow(tmp):
        writes.append(tmp)
        started.set()
        time.sleep(0.5)
        _entry_writer("slow")(tmp)

    other = root / "models" / "m-2"
    first = threading.Thread(target=cache.publish_folder, args=(other, slow, _record([src], "layers=2")))
    first.start()
    started.wait()
    cache.publish_folder(other, slow, _record([src], "layers=2"))  # waits for the first writer, then finds the entry written
    first.join()
    assert len(writes) == 1 and cache.lookup(other)
    assert sorted(p.name for p in (root / "models").iterdir()) == ["m-1", "m-2"]  # no lock file among the entries


def test_a_cache_folder_that_cannot_be_made_is_named_not_blamed_on_the_model(tmp_path, monkeypatch):
    import pytest

    from vocabtrim.errors import UserError

    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("VOCABTRIM_CACHE", str(tmp_path / "afile"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf bytes")
    with pytest.raises(UserError, match=f"^cannot use the cache folder {tmp_path / 'afile' / 'models'} \\(Not a directory\\): set "
                                        "VOCABTRIM_CACHE to a writable folder$"):
        models.gguf_folder(gguf)


def test_an_entry_that_cannot_be_removed_stays_and_publishing_still_returns(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    src = tmp_path / "m.gguf"
    src.write_bytes(b"w")
    cache.publish_folder(root / "models" / "m-1", _entry_writer("m"), _record([src]))
    _touch_later(src)
    monkeypatch.setattr(cache.shutil, "rmtree", lambda *a, **k: None)  # a folder this user may not delete
    cache.publish_folder(root / "models" / "m-2", _entry_writer("m"), _record([src]))
    assert (root / "models" / "m-1").is_dir() and (root / "models" / "m-2" / "config.json").is_file()
