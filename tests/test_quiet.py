"""What a user sees on stderr from a local run: vocabtrim's own lines, not Ray's set-up chatter."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

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


def test_the_run_token_respects_a_mode_or_token_the_user_chose():
    env = {}
    local_run_token(env)
    assert env["RAY_AUTH_MODE"] == "token" and len(env["RAY_AUTH_TOKEN"]) == 32
    for chosen in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "t"}, {"RAY_AUTH_TOKEN_PATH": "/p"}):
        env = dict(chosen)
        local_run_token(env)
        assert env == chosen
