"""Local paths and object-store URIs behind one API (vocabtrim.storage), checked on a local S3 server."""

import glob as globlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vocabtrim import storage
from vocabtrim.errors import UserError

TREE = ["a.parquet", "b.jsonl", "sub/c.txt", "sub/deep/d.parquet", "sub/deep/e.txt", ".hidden/f.txt", "x_y.txt"]
PATTERNS = ["*.parquet", "*", "**", "**/*.txt", "sub/*", "sub/**/*.parquet", "s[u]b/*.txt", "[ab].*", ".h*/*", "sub/*/e.txt", "nothing*"]


def make_tree(root: str) -> None:
    for rel in TREE:
        storage.write_bytes(storage.join(root, *rel.split("/")), f"{rel}\n".encode())


def test_local_and_s3_locations_answer_the_same(s3, tmp_path):
    remote = s3.bucket() + "/data"
    make_tree(str(tmp_path))
    make_tree(remote)
    for root in (str(tmp_path), remote):
        assert [storage.relative(f, root) for f in storage.walk_files(root)] == sorted(TREE)
        assert storage.is_dir(root) and storage.is_dir(storage.join(root, "sub"))
        assert storage.is_file(storage.join(root, "sub", "c.txt")) and not storage.is_dir(storage.join(root, "a.parquet"))
        assert not storage.exists(storage.join(root, "nope.txt"))
        assert storage.read_text(storage.join(root, "sub", "deep", "e.txt")) == "sub/deep/e.txt\n"
        assert storage.stat(storage.join(root, "b.jsonl"))[0] == len("b.jsonl\n")
        assert storage.name(storage.join(root, "sub", "c.txt")) == "c.txt"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_s3_globs_match_what_glob_glob_matches_locally(s3, tmp_path, pattern):
    remote = s3.bucket()
    make_tree(str(tmp_path))
    make_tree(remote)
    local = sorted(os.path.relpath(m, tmp_path) for m in globlib.glob(str(tmp_path / pattern), recursive=True))
    got = sorted(storage.relative(m, remote) for m, _ in storage.glob_typed(storage.join(remote, pattern)))
    assert got == [m for m in local if m != "."]


def test_globs_leave_out_hidden_entries_the_pattern_does_not_name(s3, tmp_path):
    """As inputs are read, locally and on a store alike: a match through an entry starting with . or _ (Spark's
    _SUCCESS and _temporary/, Delta's _delta_log/) is left out unless a pattern part starting so names it."""
    tree = ["part-0.parquet", "_SUCCESS", "_temporary/0/part-1.parquet", "sub/part-2.parquet", "sub/_part-3.parquet"]
    remote = s3.bucket()
    for root in (str(tmp_path), remote):
        for rel in tree:
            storage.write_bytes(storage.join(root, *rel.split("/")), b"x")
        for pattern, want in (("*", ["part-0.parquet", "sub"]), ("**/*.parquet", ["part-0.parquet", "sub/part-2.parquet"]),
                              ("_temporary/*/*", ["_temporary/0/part-1.parquet"]), ("_t*/**/*.parquet", ["_temporary/0/part-1.parquet"]),
                              ("sub/_*", ["sub/_part-3.parquet"])):
            got = [storage.relative(m, root) for m, _ in storage.glob_typed(storage.join(root, *pattern.split("/")))]
            assert got == want, (root, pattern)


def test_a_query_string_rides_along_and_is_never_shown(s3):
    bucket = s3.bucket()
    host = s3.endpoint.removeprefix("http://")
    where = f"{bucket}/dir?endpoint_override={host}&scheme=http"
    storage.write_bytes(storage.join(where, "f.bin"), b"\x00\x01")
    assert storage.join(where, "f.bin") == f"{bucket}/dir/f.bin?endpoint_override={host}&scheme=http"
    assert storage.read_bytes(storage.join(where, "f.bin")) == b"\x00\x01"
    assert storage.walk_files(where) == [storage.join(where, "f.bin")]
    assert storage.display(storage.join(where, "f.bin")) == f"{bucket}/dir/f.bin"
    assert storage.parent(storage.join(where, "f.bin")) == where


def test_readline_and_seek_on_an_object(s3):
    where = s3.bucket() + "/t.txt"
    storage.write_bytes(where, b"one\ntwo\nthree")
    with storage.open_binary(where, buffer_size=4) as f:
        f.seek(4)
        assert f.readline() == b"two\n" and f.tell() == 8 and f.readline() == b"three" and f.readline() == b""


def test_parquet_round_trip_through_write_with(s3):
    where = s3.bucket() + "/p/t.parquet"
    table = pa.table({"x": list(range(1000))})
    storage.write_with(where, lambda tmp: pq.write_table(table, tmp))
    with storage.open_input_file(where) as f:
        assert pq.read_table(f).equals(table)


@pytest.mark.parametrize("remote", [True, False])
def test_a_failed_write_leaves_no_file_and_an_old_file_untouched(s3, tmp_path, remote):
    root = s3.bucket() if remote else str(tmp_path)
    where = storage.join(root, "out.bin")

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        storage.write_with(where, half_then_fail)
    assert not storage.exists(where) and storage.walk_files(root) == []
    storage.write_bytes(where, b"old")
    with pytest.raises(RuntimeError):
        storage.write_with(where, half_then_fail)
    assert storage.read_bytes(where) == b"old" and storage.walk_files(root) == [where]


def test_a_rewrite_whose_upload_fails_keeps_the_old_object(s3, monkeypatch):
    """A settings record, a manifest or a training state rewritten in place on an object store: an upload that
    fails (the network, say) leaves the old object, so the folder still resumes from it."""
    root = s3.bucket()
    where = storage.join(root, "state.json")
    storage.write_bytes(where, b"epoch 1")
    real = storage._upload

    def failing(target, fill):
        def partial_then_reset(dst):
            dst.write(b"ep")
            raise ConnectionResetError(104, "Connection reset by peer")

        real(target, partial_then_reset)

    monkeypatch.setattr(storage, "_upload", failing)
    with pytest.raises(ConnectionResetError):  # a fault of the machine: raised as it is, for a retry
        storage.write_bytes(where, b"epoch 2")
    monkeypatch.undo()
    assert storage.read_bytes(where) == b"epoch 1" and storage.walk_files(root) == [where]


@pytest.mark.parametrize("staged", [True, False])
def test_an_upload_interrupted_part_way_leaves_no_partial_object(s3, monkeypatch, staged):
    """pyarrow completes an object upload when its stream closes, even on the way out of an exception: a copy
    interrupted after 3 bytes must publish nothing. Staged (the default up to 5 GiB): the old object stays; in
    place (over 5 GiB): the partial object is deleted."""
    import shutil

    root = s3.bucket()
    where = storage.join(root, "out.bin")
    storage.write_bytes(where, b"old")
    if not staged:
        monkeypatch.setattr(storage, "_SERVER_COPY_BYTES", 0)

    def interrupted(src, dst, length=0):
        dst.write(src.read(3))
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shutil, "copyfileobj", interrupted)
        with pytest.raises(KeyboardInterrupt):
            storage.write_with(where, lambda tmp: Path(tmp).write_bytes(b"new content"))
    if staged:
        assert storage.read_bytes(where) == b"old" and storage.walk_files(root) == [where]
    else:
        assert not storage.exists(where) and storage.walk_files(root) == []
    storage.write_with(where, lambda tmp: Path(tmp).write_bytes(b"new content"))
    assert storage.read_bytes(where) == b"new content" and storage.walk_files(root) == [where]


def test_a_killed_runs_staged_upload_is_removed_from_a_store_once_it_is_stale(s3, monkeypatch):
    """A run killed between a staged upload and its copy into place leaves ``.<name>.<32 hex>.tmp``; the next run that
    claims the folder removes it once it is STAGED_STALE_S old (a live upload is copied right after it is made),
    and nothing else: not a fresh one, not another dot file, not a folder below."""
    import uuid

    root = s3.bucket()
    staged = storage.join(root, f".out.parquet.{uuid.uuid4().hex}.tmp")
    kept = [storage.join(root, "out.parquet"), storage.join(root, ".notes.tmp"), storage.join(root, "sub", f".x.{uuid.uuid4().hex}.tmp")]
    for where in [staged, *kept]:
        storage.write_bytes(where, b"x")
    claim = dict(record="settings.json", settings={"seed": 0}, stray=lambda name: False)  # the files are this run's
    storage.claim(root, **claim)
    assert storage.exists(staged)  # fresh: perhaps a live upload
    monkeypatch.setattr(storage, "STAGED_STALE_S", 0.0)
    storage.claim(root, **claim)
    assert not storage.exists(staged) and all(storage.exists(w) for w in kept)
    below = kept.pop()  # a folder below: removed where its folder is named (generate's outputs in subfolders)
    storage.remove_temporaries_below(root, set())
    assert storage.exists(below)
    storage.remove_temporaries_below(root, {storage.join(root, "sub")})
    assert not storage.exists(below) and all(storage.exists(w) for w in kept)


def test_local_spellings(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    storage.write_bytes("~/x/y.txt", b"hi")
    assert (tmp_path / "x" / "y.txt").read_bytes() == b"hi"
    assert storage.read_bytes(f"file://{tmp_path}/x/y.txt") == b"hi"
    assert storage.canonical("~/x/y.txt") == storage.canonical(f"file://{tmp_path}/x/y.txt")
    assert not storage.is_uri("~/x") and storage.is_uri("s3://b/k") and storage.is_uri("gs://b")


def test_unknown_schemes_and_missing_objects_are_one_line_errors(s3):
    with pytest.raises(UserError, match=r"^cannot open nosuch://b/k: .*Unrecognized") as e:
        storage.is_file("nosuch://b/k")
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(s3.bucket() + "/missing.txt")


def test_wildcards_in_a_bucket_name_are_refused_in_one_line(s3):
    with pytest.raises(UserError, match=r"^s3://vt-\*/x.parquet: wildcards in the bucket or host name are not supported$"):
        storage.glob_typed("s3://vt-*/x.parquet")


def test_glob_typed_tells_folders_from_files_without_asking_again(s3, tmp_path):
    remote = s3.bucket()
    make_tree(remote)
    make_tree(str(tmp_path))
    for root in (remote, str(tmp_path)):
        typed = {storage.relative(m, root): d for m, d in storage.glob_typed(storage.join(root, "sub", "*"))}
        assert typed == {"sub/c.txt": False, "sub/deep": True}


@pytest.mark.parametrize("remote", [False, True])
def test_claim_binds_a_folder_to_its_settings(s3, tmp_path, remote):
    """``storage.claim``, the check behind every resumable --out: the same settings resume, other settings are
    refused naming the difference (unless nothing was made under the old ones), a folder holding someone
    else's files or a file in place of the folder is refused, and a record may keep other entries."""
    root = s3.bucket() if remote else str(tmp_path)
    out = storage.join(root, "out")
    assert storage.claim(out, "settings.json", {"seed": 1, "model": "m"}) == {"seed": 1, "model": "m"}
    assert storage.claim(out, "settings.json", {"seed": 1, "model": "m"}) == {"seed": 1, "model": "m"}
    with pytest.raises(UserError, match=r"out holds outputs made with other settings \(seed 1 now 2\): rerun with the same"):
        storage.claim(out, "settings.json", {"seed": 2, "model": "m"})
    assert storage.claim(out, "settings.json", {"seed": 2, "model": "m"}, binds=lambda: False) == {"seed": 2, "model": "m"}

    sweep = storage.join(root, "sweep")
    storage.write_json(storage.join(sweep, "sweep.json"), {"settings": {"k": 4}, "runs": [{"run": 1}]})
    assert storage.claim(sweep, "sweep.json", {"k": 4}, key="settings")["runs"] == [{"run": 1}]
    with pytest.raises(UserError, match=r"holds a sweep made with other settings \(k 4 now 8; gamma None now 3\)"):
        storage.claim(sweep, "sweep.json", {"k": 8, "gamma": 3}, key="settings", what="a sweep")

    stray = storage.join(root, "stray")
    storage.write_bytes(storage.join(stray, "part.parquet"), b"x")
    with pytest.raises(UserError, match=r"already holds files \(part.parquet\) but no settings.json"):
        storage.claim(stray, "settings.json", {"seed": 1}, stray=lambda name: name.endswith(".parquet"))
    assert storage.claim(stray, "settings.json", {"seed": 1}, stray=lambda name: name.endswith(".json")) == {"seed": 1}
    with pytest.raises(UserError, match="is a file, not a folder"):
        storage.claim(storage.join(stray, "part.parquet"), "settings.json", {"seed": 1})
    storage.write_bytes(storage.join(root, "bad", "settings.json"), b"{not json")
    with pytest.raises(UserError, match="settings.json is unreadable"):
        storage.claim(storage.join(root, "bad"), "settings.json", {"seed": 1})
    earlier = storage.join(root, "earlier")  # a record written when settings kept a URI's query resumes without it
    storage.write_json(storage.join(earlier, "sweep.json"), {"settings": {"prompts": ["s3://b/p?endpoint_override=h:1"]}})
    assert storage.claim(earlier, "sweep.json", {"prompts": [storage.settings_key("s3://b/p?endpoint_override=h:1")]},
                         key="settings", what="a sweep")
    with pytest.raises(UserError, match=r"prompts \['s3://b/p'\] now \['s3://b/q'\]"):  # and no query shown
        storage.claim(earlier, "sweep.json", {"prompts": ["s3://b/q"]}, key="settings", what="a sweep")
    killed = storage.join(root, "killed")  # a run killed while it wrote its first record left a temporary file
    storage.write_bytes(storage.join(killed, ".sweep.json.k3j2x9.tmp"), b"{")
    assert storage.claim(killed, "sweep.json", {"k": 4}, key="settings") == {"settings": {"k": 4}}


def test_a_fault_reading_a_record_or_opening_a_store_is_no_user_error(tmp_path, monkeypatch):
    """An I/O error reading a settings record or a manifest, or a network error opening a store (pyarrow looks up a
    bucket's region), is a fault of the machine, raised as it is for a retry: not a one-line "use a new --out"."""
    import errno

    from vocabtrim import corpus

    root = str(tmp_path)
    storage.claim(root, "settings.json", {"seed": 1})
    storage.write_json(storage.join(root, "manifest.json"), {"kind": "vocabtrim-head"})
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "c.parquet")

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage, "read_text", eio)
    with pytest.raises(OSError, match="Input/output error"):
        storage.claim(root, "settings.json", {"seed": 1})
    with pytest.raises(OSError, match="Input/output error"):
        storage.check_out_kind(root, "vocabtrim-head")
    monkeypatch.setattr(storage, "open_input_file", eio)
    with pytest.raises(OSError, match="Input/output error"):
        corpus.make_shards([str(tmp_path / "c.parquet")], "text")

    def unreachable(uri):
        raise OSError("When resolving region for bucket 'b': AWS Error NETWORK_CONNECTION during HeadBucket operation")

    monkeypatch.setattr(storage, "_root", unreachable)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        storage.resolve("s3://b/key")


def test_settings_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    assert storage.settings_key("model") == str(tmp_path.resolve() / "model")  # a local folder: its absolute path
    assert storage.settings_key("org/name") == "org/name"  # a hub id (no such folder here)
    assert storage.settings_key("s3://b/k?region=x&secret_key=s") == "s3://b/k"  # no keys written down
    assert storage.settings_key(None) is None


def test_a_local_folder_that_cannot_be_made_is_a_one_line_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="cannot create folder .*Not a directory") as e:
        storage.makedirs(str(tmp_path / "f" / "sub"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="cannot create folder"):
        storage.write_json(str(tmp_path / "f" / "sub" / "x.json"), {})


def test_machine_faults_are_told_from_user_mistakes():
    import errno

    from vocabtrim.errors import machine_fault

    faults = [MemoryError(), OSError(errno.ENOSPC, "No space left on device"), ConnectionResetError(),
              OSError(errno.EDQUOT, "Disk quota exceeded"), OSError(errno.ESTALE, "Stale file handle"),
              OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7"),
              RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              # Object stores' transient answers, as pyarrow's S3 and GCS clients word them.
              OSError("AWS Error SERVICE_UNAVAILABLE during PutObject operation: Please reduce your request rate."),
              OSError("AWS Error THROTTLING during ListObjectsV2 operation: Rate exceeded"),
              OSError("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."),
              OSError("AWS Error REQUEST_TIMEOUT during GetObject operation: Your socket connection to the server was not read"),
              OSError("google::cloud::Status(UNAVAILABLE: Retry policy exhausted in GetObjectMetadata)"),
              OSError("google::cloud::Status(DEADLINE_EXCEEDED: Retry policy exhausted in ReadObject)")]
    mistakes = [FileNotFoundError(errno.ENOENT, "No such file or directory"), PermissionError(errno.EACCES, "Permission denied"),
                NotADirectoryError(errno.ENOTDIR, "Not a directory"), ValueError("bad"), OSError("Path does not exist 'x'"),
                OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"),
                OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation: The specified bucket does not exist"),
                OSError("google::cloud::Status(NOT_FOUND: Permanent error in GetObjectMetadata)")]
    assert all(machine_fault(e) for e in faults)
    assert not any(machine_fault(e) for e in mistakes)


def test_a_manifest_that_cannot_be_read_is_refused_in_one_line(tmp_path):
    """A folder named manifest.json (or one without permission) was a traceback; an I/O error stays the machine's."""
    from vocabtrim import histogram

    (tmp_path / "calib" / "manifest.json").mkdir(parents=True)
    with pytest.raises(UserError, match=r"^.*/calib/manifest.json is unreadable \(Is a directory\): pass a folder that holds a "
                                        r"calibration manifest$"):
        histogram.read_manifest(str(tmp_path / "calib"))


def test_an_io_error_reading_a_manifest_is_the_machine_s(tmp_path, monkeypatch):
    import errno

    (tmp_path / "manifest.json").write_text("{}")

    def fails(where):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage, "read_text", fails)
    with pytest.raises(OSError, match="Input/output error"):
        storage.read_manifest(str(tmp_path / "manifest.json"), "k", "thing", missing="none")


def test_a_manifest_in_out_that_cannot_be_read_is_said_so(tmp_path, monkeypatch):
    """Not "a manifest.json vocabtrim did not write": a manifest without permission to read it."""
    (tmp_path / "manifest.json").write_text('{"kind": "vocabtrim-head"}')

    def denied(where):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(storage, "read_text", denied)
    with pytest.raises(UserError, match=rf"^--out {tmp_path} holds a manifest.json that cannot be read \(Permission denied\): use a new --out$"):
        storage.check_out_kind(str(tmp_path), "vocabtrim-head")


def test_a_manifest_of_another_kind_names_the_command_that_writes_the_right_one(tmp_path):
    from vocabtrim import histogram

    (tmp_path / "manifest.json").write_text('{"kind": "vocabtrim-head"}')
    with pytest.raises(UserError, match=rf"^{tmp_path}/manifest.json is not a calibration manifest: pass a folder written by "
                                        r"`vocabtrim calibrate`$"):
        histogram.read_manifest(str(tmp_path))


def test_each_runs_reads_at_once_and_keeps_the_items_order():
    """storage.each: calls overlap (four calls meet at a barrier that one at a time would never pass), results come
    in the items' order, and the exception raised is the first failing item's, not the first to fail."""
    import threading
    import time as _time

    meet = threading.Barrier(4, timeout=10)

    def read(i):
        meet.wait()
        return i * i

    assert storage.each(read, range(4), threads=4) == [0, 1, 4, 9]

    def failing(i):
        if i == 1:
            _time.sleep(0.3)
            raise ValueError("item 1")
        if i == 3:
            raise KeyError("item 3")  # fails first
        return i

    with pytest.raises(ValueError, match="item 1"):
        storage.each(failing, range(4), threads=4)
    assert storage.each(lambda i: -i, [5], threads=4) == [-5] and storage.each(str, [], threads=4) == []
