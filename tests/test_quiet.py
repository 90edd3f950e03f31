"""What a user sees on stderr from a local run: vocabtrim's own lines, not Ray's set-up chatter; and the token
auth that run's Ray keeps."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiny import make_model, make_tokenizer, save_model
from vocabtrim.ray_utils import local_run_token


def test_a_local_run_keeps_token_auth_without_a_warning_or_a_token_file(tmp_path):
    """As a user runs it: no RAY_AUTH_MODE set, a home folder without ~/.ray."""
    tok = make_tokenizer()
    model = save_model(make_model(len(tok), layers=1), tok, tmp_path / "m")
    pq.write_table(pa.table({"text": ["the quick brown fox jumps over the lazy dog"] * 20}), tmp_path / "c.parquet")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), VOCABTRIM_PROGRESS_SECONDS="0", TMPDIR="/tmp")
    proc = subprocess.run(
        [sys.executable, "-m", "vocabtrim.cli", "calibrate", "--drafter", str(model), "--corpus", str(tmp_path / "c.parquet"),
         "--cpus-per-worker", "0.4", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (home / ".ray").exists()
    lines = proc.stderr.splitlines()  # only the progress line: no Ray set-up or auth messages
    assert len(lines) == 1 and lines[0].startswith("calibrate: 1/1 shards (100%), "), proc.stderr
    assert " from 20 rows in 1 shards " in proc.stdout


# Starts a local Ray as a run does, then asks its GCS for its keys from a client that sends no token.
AUTH_PROBE = """
import os, subprocess, sys
import ray
from vocabtrim.ray_utils import init_ray
init_ray(None)
env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
env["RAY_AUTH_MODE"] = "disabled"
code = "import sys; from ray._raylet import GcsClient; GcsClient(address=sys.argv[1]).internal_kv_keys(b'', None, timeout=60)"
p = subprocess.run([sys.executable, "-c", code, ray.get_runtime_context().gcs_address], env=env, capture_output=True,
                   text=True, timeout=180)
ray.shutdown()
print("refused" if "InvalidAuthToken" in p.stderr else f"answered rc={p.returncode}")
"""


@pytest.mark.parametrize("chosen, answer", [({}, "refused"), ({"RAY_AUTH_MODE": "disabled"}, "answered rc=0")])
def test_a_local_run_s_ray_refuses_a_client_without_its_token(tmp_path, chosen, answer):
    """The Ray a run starts for itself has token auth on: a client without the run's token is refused. With
    RAY_AUTH_MODE=disabled chosen by the user, the same client is answered (the probe tells the two apart)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(tmp_path), TMPDIR="/tmp", **chosen)
    proc = subprocess.run([sys.executable, "-c", AUTH_PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == answer


def test_the_run_token_respects_a_mode_or_token_the_user_chose():
    env = {}
    local_run_token(env)
    assert env["RAY_AUTH_MODE"] == "token" and len(env["RAY_AUTH_TOKEN"]) == 32
    for chosen in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "t"}, {"RAY_AUTH_TOKEN_PATH": "/p"}):
        env = dict(chosen)
        local_run_token(env)
        assert env == chosen
