"""One run at a time in an output folder (``vocabtrim.lease``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vocabtrim import storage
from vocabtrim.cli import main
from vocabtrim.errors import UserError
from vocabtrim.lease import LOCK_FILE, lease
from vocabtrim.storage import locked

HOLD = textwrap.dedent("""
    import sys
    from vocabtrim.lease import lease
    with lease(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
""")


@pytest.fixture
def holder():
    """Start a process that holds the lease on a folder until its stdin closes (or it is killed)."""
    started = []

    def start(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_run_into_a_held_folder_is_refused_until_the_first_ends(tmp_path, holder):
    out = tmp_path / "out"
    proc = holder(out)
    with pytest.raises(UserError) as err:
        with lease(str(out)):
            pass
    assert str(err.value) == (f"--out {out} is in use by another vocabtrim run (pid {proc.pid} on {os.uname().nodename}): "
                              "wait for it to end, or use another --out")
    proc.stdin.close()
    assert proc.wait() == 0
    assert not (out / LOCK_FILE).exists()  # removed by its holder at the end
    with lease(str(out)):
        assert locked(str(out / "sub" / "x.parquet"))
    assert not locked(str(out))


def test_a_killed_holder_leaves_no_lease_behind(tmp_path, holder):
    out = tmp_path / "out"
    proc = holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_FILE).exists()  # its file stays; its lock went with the process
    with lease(str(out)):
        pass
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("command", [
    ["generate", "--target", "m", "--no-draft", "--prompts", "p.parquet"],
    ["calibrate", "--drafter", "m", "--corpus", "c.txt"],
    ["train-drafter", "--target", "m", "--corpus", "c.txt", "--histogram", "h", "--top-k", "8"],
    ["build-head", "--histogram", "h", "--drafter", "d", "--top-k", "8"],
    ["sweep", "--target", "m", "--drafter-layers", "1", "--corpus", "c.txt", "--prompts", "p.parquet"],
    ["demo", "--quick"],
])
def test_every_command_refuses_an_out_another_run_holds(capsys, tmp_path, holder, command):
    out = tmp_path / "out"
    proc = holder(out)
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"vocabtrim {command[0]}: error: --out {out} is in use by another vocabtrim run (pid {proc.pid} on "
                   f"{os.uname().nodename}): wait for it to end, or use another --out\n")


def test_a_folder_held_in_this_process_is_held_again_and_an_empty_one_it_made_goes(tmp_path):
    out = tmp_path / "out"
    with lease(str(out)):
        with lease(str(out)):  # a sweep's stage in the sweep's own folder, say
            assert (out / LOCK_FILE).exists()
        with lease(str(out / "calib")):  # and in a folder inside it
            assert (out / "calib" / LOCK_FILE).exists()
        assert (out / LOCK_FILE).exists()
    assert not out.exists()  # made by the lease, left empty (a refused run)
    with lease(str(tmp_path / "a" / "b" / "c")):
        pass
    assert not (tmp_path / "a").exists()  # with the folders made above it
    out.mkdir()
    with lease(str(out)):
        pass
    assert out.is_dir() and not any(out.iterdir())  # the user's own folder stays


def test_a_claimed_held_folder_loses_the_partial_files_of_killed_runs(tmp_path, holder):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    partial = [out / ".part.parquet.k3j2x9ab.tmp", out / ".manifest.json.0123abc_.tmp"]
    kept = [out / "sub" / ".x.npz.0123abcd.tmp",  # a folder below: the command that writes there claims it
            out / "done.parquet", out / "notes.tmp", out / ".bash_history.tmp", out / ".x.parquet.tmp-a1b2c3d4"]
    for p in partial + kept:
        p.write_bytes(b"x")
    storage.claim(str(out), "record.json", {"a": 1}, stray=lambda name: False)
    assert all(p.exists() for p in partial)  # not held: a run may be writing them
    with lease(str(out)):
        storage.claim(str(out), "record.json", {"a": 1})
    assert not any(p.exists() for p in partial)
    assert all(p.exists() for p in kept)
    # a folder below one this process holds, which another run holds: its files are that run's
    other = holder(out / "sub")
    with lease(str(out)):
        storage.remove_temporaries(str(out / "sub"))
    assert (out / "sub" / ".x.npz.0123abcd.tmp").exists()
    other.stdin.close()
    other.wait()
    with lease(str(out)):
        storage.remove_temporaries(str(out / "sub"))
    assert not (out / "sub" / ".x.npz.0123abcd.tmp").exists()


def test_a_folder_inside_one_another_run_holds_is_refused(tmp_path, holder):
    out = tmp_path / "out"
    proc = holder(out)
    with pytest.raises(UserError) as err:
        with lease(str(out / "calib" / "target")):
            pass
    assert str(err.value) == (f"--out {out / 'calib' / 'target'} is inside {out}, which another vocabtrim run is writing "
                              f"(pid {proc.pid} on {os.uname().nodename}): wait for it to end, or use another --out")
    assert not (out / "calib").exists()  # the folders the refused lease made are gone
    proc.stdin.close()
    proc.wait()
    with lease(str(out / "calib" / "target")):
        assert (out / "calib" / "target").is_dir()
    assert not (out / "calib").exists()


def test_the_lock_file_is_no_other_output_in_a_new_folder(tmp_path):
    out = tmp_path / "out"
    with lease(str(out)):
        assert storage.claim(str(out), "sweep.json", {"a": 1}) == {"a": 1}  # a sweep claims a folder holding nothing else
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]


def test_an_out_nobody_may_write_in_is_refused_in_one_line(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def denied(path, *args, **kwargs):  # a folder of another owner's (the tests may run as root, who writes anywhere)
        if str(path).endswith(LOCK_FILE):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UserError, match=rf"^cannot write in --out {out}: Permission denied$"):
        with lease(str(out)):
            pass


@pytest.fixture
def nfs_like(monkeypatch):
    """What an NFS mount does to another user's lock file: it opens read-only (not ours to write), and ``flock``
    cannot lock a file opened read-only exclusively there (EBADF; a local disk allows it)."""
    import errno
    import fcntl

    from vocabtrim import lease as lease_module

    real_flock, real_open = fcntl.flock, lease_module._open

    def flock(fd, op):
        if op & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_flock(fd, op)

    def open_lock(lock):
        return os.open(lock, os.O_RDONLY) if os.path.isfile(lock) else real_open(lock)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(lease_module, "_open", open_lock)


def test_another_user_s_lock_file_on_nfs_is_refused_while_held_and_replaced_once_free(tmp_path, holder, nfs_like):
    out = tmp_path / "out"
    proc = holder(out)
    with pytest.raises(UserError, match=rf"is in use by another vocabtrim run \(pid {proc.pid} on "):
        with lease(str(out)):
            pass
    assert (out / LOCK_FILE).exists()  # the running run's lock stays
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with lease(str(out)):  # the killed run's file is removed and this run locks its own
        assert locked(str(out))
    assert not (out / LOCK_FILE).exists()
