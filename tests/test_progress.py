"""Progress when stderr is not a terminal: periodic lines with what is done, the rate and the time left."""

import io

from vocabtrim.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_every_interval_with_rate_and_eta_then_a_last_line():
    clock, out = Clock(), io.StringIO()
    p = Progress(10, "shard", "calibrate", initial=2, stream=out, interval=30, clock=clock)
    clock.now = 10
    p.update(1, tokens=500)  # 10 s in: before the interval, no line
    assert out.getvalue() == ""
    clock.now = 40
    p.update(3, tokens=1500)  # 4 shards counted in 40 s, 4 left -> eta 40 s
    assert out.getvalue().splitlines() == ["calibrate: 6/10 shards (60%), 50 tokens/s, eta 40 s"]
    clock.now = 100
    p.update(4, tokens=3000)
    p.close()
    p.close()
    assert out.getvalue().splitlines()[1:] == ["calibrate: 10/10 shards (100%), 50 tokens/s, done in 1 min 40 s"]


def test_without_tokens_the_rate_is_in_units_and_disabled_prints_nothing():
    clock, out = Clock(), io.StringIO()
    p = Progress(8, "row", "generate", stream=out, interval=0, clock=clock)
    clock.now = 4
    p.update(2)
    assert out.getvalue() == "generate: 2/8 rows (25%), 0.50 rows/s, eta 12 s\n"
    quiet = io.StringIO()
    q = Progress(8, "row", "generate", stream=quiet, interval=0, clock=clock, enabled=False)
    q.update(8)
    q.close()
    assert quiet.getvalue() == ""


def test_calibrate_logs_progress_lines_when_stderr_is_not_a_terminal(ray_local, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tiny import make_tokenizer, save_model, make_model
    from vocabtrim.calibrate import CalibrateConfig, run_calibrate

    monkeypatch.setenv("VOCABTRIM_PROGRESS_SECONDS", "0")
    tok = make_tokenizer()
    model = save_model(make_model(len(tok), layers=1), tok, tmp_path / "m")
    pq.write_table(pa.table({"text": ["the quick brown fox jumps over the lazy dog"] * 40}), tmp_path / "c.parquet", row_group_size=10)
    run_calibrate(CalibrateConfig(drafter=model, corpus=[str(tmp_path / "c.parquet")], out=str(tmp_path / "o"),
                                  cpus_per_worker=0.4, show_progress=True))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("calibrate: ")]
    assert lines[-1].startswith("calibrate: 4/4 shards (100%), ") and "tokens/s, done in" in lines[-1]
    assert len(lines) >= 4
