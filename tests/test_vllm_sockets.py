"""vLLM's IPC socket files go to a folder of the process's own and are removed (``vocabtrim.vllm_sockets``).

vLLM itself is not needed: an engine's sockets are stood in for by Unix sockets bound in the folder. The
vLLM tests check the same with real engines (``bundled_vllm`` in ``test_vllm.py``).
"""

import os
import socket
import subprocess
import sys
import tempfile

import pytest

from vocabtrim import vllm_sockets


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A new process's state: no folder claimed, the temp folder under tmp_path, the variable unset."""
    monkeypatch.setattr(vllm_sockets, "_folder", None)
    monkeypatch.setattr(vllm_sockets, "_open", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(vllm_sockets.ENV, raising=False)
    held = []
    yield held
    for s in held:
        s.close()


def bind(path, held):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    held.append(s)
    return path


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_sockets_go_to_the_processs_folder_and_go_away_when_their_engine_closes(fresh, tmp_path):
    first = vllm_sockets.claim()
    assert first == tmp_path / f"vocabtrim-vllm-{os.getuid()}" / str(os.getpid())
    assert os.environ[vllm_sockets.ENV] == str(first) and first.is_dir()
    a = {bind(first / "a1", fresh), bind(first / "a2", fresh)}  # engine A's start
    before = vllm_sockets.entries(first)
    assert vllm_sockets.claim() == first  # a second engine in the process: the same folder
    b = {bind(first / "b1", fresh)}  # engine B's start
    assert vllm_sockets.entries(first) - before == b

    vllm_sockets.release(a)  # A closes: its files go, B's stay
    assert vllm_sockets.entries(first) == b
    late = bind(first / "late", fresh)  # made by an engine after its start: not in its own set
    vllm_sockets.release(b)  # the last engine closes: everything goes, the folder stays
    assert vllm_sockets.entries(first) == set() and first.is_dir() and not late.exists()
    vllm_sockets.release(b)  # a second close changes nothing
    assert first.is_dir()


def test_folders_of_processes_no_longer_alive_are_removed(fresh, tmp_path):
    base = vllm_sockets.root()
    dead, alive, other = base / str(dead_pid()), base / str(os.getppid()), base / "notes"
    for d in (dead, alive, other):
        d.mkdir(parents=True)
        (d / "x").write_text("")
    mine = vllm_sockets.claim()
    assert not dead.exists()
    assert alive.is_dir() and other.is_dir() and mine.is_dir()


def test_a_folder_the_user_chose_is_left_alone(fresh, tmp_path, monkeypatch):
    chosen = tmp_path / "mine"
    monkeypatch.setenv(vllm_sockets.ENV, str(chosen))
    assert vllm_sockets.claim() is None
    assert os.environ[vllm_sockets.ENV] == str(chosen)
    assert not vllm_sockets.root().exists() and not chosen.exists()
    vllm_sockets.release({tmp_path / "anything"})  # nothing claimed: nothing removed
    assert vllm_sockets.claim() is None


def test_a_folder_inherited_from_the_process_that_started_ray_is_replaced(fresh, monkeypatch):
    parent = vllm_sockets.root() / str(os.getppid())
    parent.mkdir(parents=True)
    keep = parent / "parent-socket"
    keep.write_text("")
    monkeypatch.setenv(vllm_sockets.ENV, str(parent))
    mine = vllm_sockets.claim()
    assert mine == vllm_sockets.root() / str(os.getpid()) and os.environ[vllm_sockets.ENV] == str(mine)
    vllm_sockets.release()
    assert keep.exists()  # the parent's files are the parent's to remove


@pytest.mark.parametrize("make", ["writable by others", "a link", "a dangling link", "a file"])
def test_a_root_folder_that_is_not_the_users_own_is_not_used(fresh, tmp_path, monkeypatch, make, caplog):
    base = vllm_sockets.root()
    elsewhere = tmp_path / "elsewhere"
    if make == "writable by others":  # anyone may make a name in the temp folder, so it may be another's
        base.mkdir(mode=0o700)
        base.chmod(0o777)
    elif make == "a link":
        elsewhere.mkdir(mode=0o700)
        base.symlink_to(elsewhere)
    elif make == "a dangling link":
        base.symlink_to(elsewhere)
    else:
        base.write_text("")
    dead = base / str(dead_pid())
    if base.is_dir():
        dead.mkdir()
    inherited = base / str(os.getppid())
    monkeypatch.setenv(vllm_sockets.ENV, str(inherited))  # a parent's folder under that root
    assert vllm_sockets.claim() is None
    assert vllm_sockets.ENV not in os.environ  # vLLM keeps its default
    assert dead.is_dir() == base.is_dir() and not (base / str(os.getpid())).exists()  # nothing made or removed there
    if make == "a dangling link":
        assert not elsewhere.exists()  # not followed
    assert "not a folder of this user's own" in caplog.text
    vllm_sockets.release()  # nothing claimed: nothing to do
