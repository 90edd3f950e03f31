"""``vocabtrim generate`` end to end on a local Ray with tiny models: rows one to one, ids, column types,
bad rows and bad files, greedy identity with the target alone, determinism, resume after a kill, and
prompts, outputs and head on an object store (a local S3 server)."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import make_model, make_tokenizer, save_model

from vocabtrim import cli
from vocabtrim.errors import UserError
from vocabtrim.generate import GenerateConfig, generate_chunk, run_generate

RESULT_SCHEMA = [
    ("completion", pa.string()),
    ("completion_tokens", pa.int64()),
    ("draft_proposed", pa.int64()),
    ("draft_accepted", pa.int64()),
    ("finish_reason", pa.string()),
    ("error", pa.string()),
]
LONG = "the quick brown fox jumps over the lazy dog " * 40  # > 256 positions of the tiny models

# The local S3 server (session fixture `s3`) starts before this module's Ray, whatever test runs first, so the
# Ray workers inherit its AWS_* variables, as workers on a cluster node would (they read --head from it).
pytestmark = pytest.mark.usefixtures("s3")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """a.parquet: int64 ids, string prompts with bad rows; sub/b.parquet: no id column, message lists;
    c.parquet: a prompt column of nulls only (Arrow type null)."""
    root = tmp_path_factory.mktemp("prompts")
    a = [
        "the quick brown fox",
        None,
        "What is the capital of France?",
        "",
        "def add(a, b):",
        LONG,
        "speculative decoding drafts tokens",
        "1 2 3 4 5",
        "ray actors count tokens",
    ]
    pq.write_table(pa.table({"id": pa.array(range(100, 100 + len(a)), pa.int64()), "prompt": a}), root / "a.parquet")
    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    b = [
        [{"role": "user", "content": "Write a haiku about the sea."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is a drafter"}],
        [{"role": "user", "content": None}],
        [],
        None,
        [{"role": "user", "content": "the lazy dog"}],
    ]
    (root / "sub").mkdir()
    pq.write_table(pa.table({"prompt": pa.array(b, msgs), "other": list(range(len(b)))}), root / "sub" / "b.parquet")
    pq.write_table(pa.table({"id": ["c0", "c1"], "prompt": pa.array([None, None], pa.null())}), root / "c.parquet")
    return root


@pytest.fixture(scope="module")
def base(tiny_pair_dirs, inputs, tmp_path_factory):
    target, drafter = tiny_pair_dirs
    return GenerateConfig(
        target=target,
        drafter=drafter,
        prompts=[str(inputs)],
        out=str(tmp_path_factory.mktemp("out") / "first"),
        max_new_tokens=12,
        temperature=1.0,
        seed=3,
        gamma=3,
        batch_size=4,
        workers=1,
        progress=False,
        rows_per_task=4,
    )


@pytest.fixture(scope="module")
def first_run(ray_local, base):
    """One run through the CLI (flags → config → run); other tests compare against it."""
    argv = ["generate", "--target", base.target, "--drafter", base.drafter, "--prompts", *base.prompts,
            "--max-new-tokens", "12", "--seed", "3", "--gamma", "3", "--batch-size", "4", "--no-progress", "--out", base.out]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    return json.loads((Path(base.out) / "summary.json").read_text()), printed.getvalue()


def read(out, name) -> pa.Table:
    return pq.read_table(Path(out) / name)


def results(out) -> dict:
    return {name: read(out, name).to_pylist() for name in ("a.parquet", "sub/b.parquet", "c.parquet")}


def test_rows_one_to_one_ids_and_types(first_run, base, inputs):
    out = Path(base.out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet")) == ["a.parquet", "c.parquet", "sub/b.parquet"]

    a = read(out, "a.parquet")
    assert a.schema.remove_metadata() == pa.schema([("id", pa.int64()), *RESULT_SCHEMA])
    assert a.column("id").to_pylist() == pq.read_table(inputs / "a.parquet").column("id").to_pylist()
    b = read(out, "sub/b.parquet")
    assert b.schema.remove_metadata() == pa.schema([("id", pa.string()), *RESULT_SCHEMA])
    assert b.column("id").to_pylist() == [f"sub/b.parquet:{i}" for i in range(6)]

    rows = a.to_pylist() + b.to_pylist()
    errors = {r["id"]: r["error"] for r in rows if r["finish_reason"] == "error"}
    assert set(errors) == {101, 103, 105, "sub/b.parquet:2", "sub/b.parquet:3", "sub/b.parquet:4"}
    assert "null" in errors[101] and "empty" in errors[103] and "context" in errors[105]
    assert "no content" in errors["sub/b.parquet:2"] and "empty message list" in errors["sub/b.parquet:3"]
    for r in rows:
        if r["finish_reason"] == "error":
            assert r["completion"] is None and r["completion_tokens"] == 0 and r["error"]
        else:
            assert r["finish_reason"] in ("stop", "length") and r["error"] is None
            assert isinstance(r["completion"], str)
            assert 1 <= r["completion_tokens"] <= 12
            assert (r["completion_tokens"] == 12) == (r["finish_reason"] == "length") or r["finish_reason"] == "stop"
            # gamma 3, and at least one token a pass; fewer drafts where the room left keeps fewer
            assert 0 <= r["draft_accepted"] <= r["draft_proposed"] <= 3 * r["completion_tokens"]
    c = read(out, "c.parquet").to_pylist()
    assert [r["finish_reason"] for r in c] == ["error", "error"] and c[0]["error"] == "prompt is null"

    s, printed = first_run
    assert s["rows"] == 9 + 6 + 2 and s["errored_rows"] == 6 + 2
    assert s["generated_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert s["draft_proposed"] == sum(r["draft_proposed"] for r in rows) > 0
    assert s["acceptance_rate"] == pytest.approx(s["draft_accepted"] / s["draft_proposed"])
    hist = s["accepted_length_histogram"]
    assert len(hist) == 4 and sum(j * n for j, n in enumerate(hist)) == s["draft_accepted"]
    assert sum(hist) == s["target_passes"] and s["tokens_per_target_pass"] >= 1
    assert len(s["per_position_acceptance"]) == 3
    assert s["settings"]["temperature"] == 1.0 and s["settings"]["gamma"] == 3
    assert s["files"] == 3 and s["files_generated"] == 3 and s["wall_seconds"] > 0
    assert "acceptance rate" in printed and "17 (8 errors)" in printed


def test_rerun_with_the_same_settings_does_nothing_again(first_run, base, monkeypatch):
    from vocabtrim import prompts

    before = {p: p.stat().st_mtime_ns for p in Path(base.out).rglob("*.parquet")}
    monkeypatch.setattr(prompts, "_check_unique_ids", lambda *a: pytest.fail("a finished file's id column was read again"))
    summary = run_generate(replace(base, batch_size=2, workers=2))  # not settings: rows do not depend on them
    assert summary["files_resumed"] == 3 and summary["files_generated"] == 0
    assert summary["rows"] == first_run[0]["rows"] and summary["generated_tokens"] == first_run[0]["generated_tokens"]
    assert {p: p.stat().st_mtime_ns for p in Path(base.out).rglob("*.parquet")} == before


@pytest.mark.parametrize("flag, value, what", [("--temperature", "0.5", "temperature"), ("--seed", "4", "seed")])
def test_other_settings_into_the_same_out_are_refused(first_run, base, capsys, flag, value, what):
    argv = ["generate", "--target", base.target, "--drafter", base.drafter, "--prompts", *base.prompts,
            "--max-new-tokens", "12", "--seed", "3", "--gamma", "3", "--no-progress", "--out", base.out]
    i = argv.index(flag) + 1 if flag in argv else None
    argv = argv[:i] + [value] + argv[i + 1 :] if i else argv + [flag, value]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "other settings" in err and what in err


def test_outputs_resume_only_from_the_inputs_they_were_generated_from(first_run, base, inputs, tmp_path, capsys):
    """The prompts folder copied elsewhere: the outputs resume from the copy. One file written again with the same
    name and row count but another first prompt (which changes its footer's statistics): its output is refused in
    one line, not resumed as that file's."""
    import shutil

    out, copy = tmp_path / "out", tmp_path / "copy"
    shutil.copytree(base.out, out)
    shutil.copytree(inputs, copy)
    argv = ["generate", "--target", base.target, "--drafter", base.drafter, "--prompts", str(copy), "--max-new-tokens", "12",
            "--seed", "3", "--gamma", "3", "--batch-size", "4", "--no-progress", "--out", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["files_resumed"] == 3
    table = pq.read_table(copy / "a.parquet")
    prompts = table.column("prompt").to_pylist()
    prompts[0] = "an edited prompt"
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts, table.schema.field("prompt").type)),
                   copy / "a.parquet")
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "a.parquet was generated from another version of" in err, err


def test_same_row_same_completion_for_any_batch_size_and_workers(first_run, base, tmp_path):
    expected = results(base.out)
    for batch_size, workers in [(1, 1), (4, 2)]:
        out = tmp_path / f"b{batch_size}w{workers}"
        run_generate(replace(base, out=str(out), batch_size=batch_size, workers=workers, rows_per_task=3))
        assert results(out) == expected, (batch_size, workers)


def test_a_run_stopped_mid_file_resumes_from_its_saved_rows(first_run, base, tmp_path, monkeypatch):
    """Ctrl-C after 8 of 17 rows (T = 1): the rows back are saved as parts; the rerun (another batch size)
    generates only the others, and every output equals the one of a run never stopped."""
    from vocabtrim import generate
    from vocabtrim.progress import Progress

    out = tmp_path / "out"
    cfg = replace(base, out=str(out), part_rows=1)  # every chunk back saved at once

    class Stopping(Progress):
        def update(self, n=1, tokens=None):
            super().update(n, tokens)
            if self.done >= 8:
                raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(generate, "_progress", lambda total, enabled: Stopping(total, "row", "generate", enabled=False))
        with pytest.raises(KeyboardInterrupt):
            run_generate(cfg)
    saved = sorted(p.relative_to(out / ".parts").as_posix() for p in (out / ".parts").rglob("*.parquet"))
    assert saved and not any((out / n).exists() for n in ("a.parquet", "sub/b.parquet", "c.parquet"))
    summary = run_generate(replace(cfg, batch_size=2, rows_per_task=3))
    assert 8 <= summary["run"]["rows_resumed_in_files_under_way"] < 17, saved
    assert results(out) == results(base.out)
    assert summary["rows"] == 17 and summary["generated_tokens"] == first_run[0]["generated_tokens"]
    assert summary["tokens_per_second"] * summary["wall_seconds"] < summary["generated_tokens"]  # this run's tokens only
    assert not (out / ".parts").exists() or not any((out / ".parts").rglob("*.parquet"))


def test_greedy_equals_target_alone(ray_local, base, tmp_path):
    # The target's first 2 of 3 layers draft: accepted often, not always.
    greedy = replace(base, temperature=0.0, drafter=base.target, drafter_layers=2, out=str(tmp_path / "spec"))
    s_spec = run_generate(greedy)
    s_alone = run_generate(replace(greedy, no_draft=True, out=str(tmp_path / "alone")))
    spec, alone = results(tmp_path / "spec"), results(tmp_path / "alone")
    for name in spec:
        for r_spec, r_alone in zip(spec[name], alone[name], strict=True):
            for col in ("id", "completion", "completion_tokens", "finish_reason", "error"):
                assert r_spec[col] == r_alone[col], (name, col)
            assert r_alone["draft_proposed"] == 0
    assert s_alone["acceptance_rate"] is None and s_alone["tokens_per_target_pass"] == 1.0
    assert 0 < s_spec["draft_accepted"] < s_spec["draft_proposed"], (s_spec["draft_accepted"], s_spec["draft_proposed"])
    assert s_alone["settings"]["drafter"] is None


def test_resume_after_the_driver_is_killed(ray_local, tiny_pair_dirs, tmp_path):
    """Kill the driver once the first output exists; the rerun writes the rest; every row exactly once."""
    target, drafter = tiny_pair_dirs
    names = [f"part-{i}.parquet" for i in range(8)]  # files enough that some are still to do at the kill
    for i, name in enumerate(names):
        prompts = [f"the quick brown fox {i} {j}" for j in range(4)]
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(4)], "prompt": prompts}), tmp_path / name)
    out = tmp_path / "out"
    argv = ["generate", "--target", target, "--drafter", drafter, "--prompts", str(tmp_path / "part-*.parquet"),
            "--max-new-tokens", "24", "--batch-size", "1", "--no-progress", "--out", str(out),
            "--address", ray_local.get_runtime_context().gcs_address]
    driver = subprocess.Popen([sys.executable, "-m", "vocabtrim.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not any(out.glob("part-*.parquet")):
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    driver.stderr.close()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 1 <= len(done_before) < len(names)

    summary = run_generate(GenerateConfig(target=target, drafter=drafter, prompts=[str(tmp_path / "part-*.parquet")],
                                          max_new_tokens=24, batch_size=4, progress=False, out=str(out)))
    assert summary["files_resumed"] == len(done_before) and summary["files_generated"] == len(names) - len(done_before)
    assert {n: (out / n).stat().st_mtime_ns for n in done_before} == done_before  # never written twice
    ids = [i for n in names for i in read(out, n).column("id").to_pylist()]
    assert sorted(ids) == sorted(f"{i}-{j}" for i in range(len(names)) for j in range(4))  # every row exactly once
    assert summary["rows"] == 4 * len(names) and summary["errored_rows"] == 0
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_repeated_ids_are_refused_up_front_in_files_still_to_do(tiny_pair_dirs, tmp_path, capsys):
    target, drafter = tiny_pair_dirs
    pq.write_table(pa.table({"id": ["x", "y", "x"], "prompt": ["a", "b", "c"]}), tmp_path / "twice.parquet")
    out = tmp_path / "out"
    argv = ["generate", "--target", target, "--drafter", drafter, "--prompts", str(tmp_path / "twice.parquet"), "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--id-column 'id' holds 'x' in 2 rows" in err and not out.exists()


def test_bad_files_are_refused_up_front(tiny_pair_dirs, tmp_path, capsys):
    target, drafter = tiny_pair_dirs
    (tmp_path / "notes.parquet").write_text("not parquet")
    pq.write_table(pa.table({"text": ["hi"]}), tmp_path / "text.parquet")
    other_tok = make_tokenizer(280)
    other = save_model(make_model(len(other_tok), layers=1), other_tok, tmp_path / "other")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), good)
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    tok = make_tokenizer()
    wide = save_model(make_model(len(tok) + 20, layers=1), tok, tmp_path / "wide")  # same tokenizer, 20 more logits
    # A file whose footer reads but whose data pages are damaged.
    rows = [f"sentence {i}: the quick brown fox" for i in range(200)]
    pq.write_table(pa.table({"id": [str(i) for i in range(200)], "prompt": rows}), tmp_path / "ok.parquet",
                   compression="snappy", use_dictionary=False)
    damaged = bytearray((tmp_path / "ok.parquet").read_bytes())
    damaged[60 : len(damaged) // 2] = b"\xab" * (len(damaged) // 2 - 60)
    (tmp_path / "damaged.parquet").write_bytes(bytes(damaged))
    capsys.readouterr()
    cases = [
        (["--drafter", drafter, "--prompts", str(tmp_path / "notes.parquet")], "not a readable Parquet file"),
        (["--drafter", drafter, "--prompts", str(tmp_path / "text.parquet")], "no prompt column 'prompt'"),
        (["--drafter", drafter, "--prompts", str(tmp_path / "missing.parquet")], "no such prompt file"),
        (["--drafter", other, "--prompts", str(good)], "tokenizers differ"),
        (["--drafter", wide, "--prompts", str(good)], f"target and drafter logits widths differ: {len(tok)} vs {len(tok) + 20}"),
        (["--drafter", drafter, "--prompts", str(tmp_path / "damaged.parquet")], "damaged.parquet is not a readable Parquet file"),
        (["--drafter", drafter, "--prompts", str(tmp_path / "empty.parquet")], "the prompts are empty: no rows in"),
        (["--prompts", str(good)], "no drafter"),
        (["--no-draft", "--head", str(tmp_path), "--prompts", str(good)], "--head needs a drafter"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert cli.main(["generate", "--target", target, *extra, "--out", str(out)]) == 2, message
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (message, err)
        assert not out.exists()  # refused before anything was written


def test_an_engine_failure_is_raised_not_written_as_error_rows(tiny_pair_dirs):
    """Error rows are for what is wrong with a row; an engine failure on a chunk is the machine's fault and
    goes up to the pool (which retries the chunk on a fresh worker)."""
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.models import load_pair

    pair = load_pair(*tiny_pair_dirs, dtype="float32", device="cpu")
    engine = make_engine(pair.target, pair.drafter, gamma=2, sampling=SamplingParams(temperature=0.0),
                         eos_token_ids=(2,), max_new_tokens=5)

    class Failing:
        config, gamma = engine.config, engine.gamma

        def generate(self, *args, **kwargs):
            raise RuntimeError("device fault")

    prompts = ["the quick brown fox", "1 2 3", None]
    with pytest.raises(RuntimeError, match="device fault"):
        generate_chunk(Failing(), pair.tokenizer, prompts, ["a", "b", "c"], seed=0, max_prompt_tokens=100)
    got = generate_chunk(engine, pair.tokenizer, prompts, ["a", "b", "c"], seed=0, max_prompt_tokens=100)["columns"]
    assert got["finish_reason"][2] == "error" and "null" in got["error"][2]  # the bad row is still its own error
    assert got["finish_reason"][:2] in (["stop", "stop"], ["stop", "length"], ["length", "stop"], ["length", "length"])


def test_out_of_memory_retries_with_fewer_rows_in_flight_and_identical_completions(tiny_pair_dirs):
    from vocabtrim.engine import make_engine
    from vocabtrim.engine.sampling import SamplingParams
    from vocabtrim.generate import _OutOfMemoryAbove
    from vocabtrim.models import load_pair

    pair = load_pair(*tiny_pair_dirs, dtype="float32", device="cpu")
    engine = make_engine(pair.target, pair.drafter, gamma=None, sampling=SamplingParams(temperature=0.8),
                         eos_token_ids=(2,), max_new_tokens=10, batch_size=8)
    prompts = [f"the quick brown fox {i}" for i in range(8)]
    keys = [f"k{i}" for i in range(8)]
    plain = generate_chunk(engine, pair.tokenizer, prompts, keys, seed=5, max_prompt_tokens=100)
    tight = generate_chunk(_OutOfMemoryAbove(engine, 2), pair.tokenizer, prompts, keys, seed=5, max_prompt_tokens=100)
    assert tight["columns"]["completion"] == plain["columns"]["completion"]
    st = tight["stats"]
    assert st["target_rows_stepped"] <= 2 * st["target_passes"]  # it ran at most 2 rows in flight
    assert st["slot_passes"] == 8 * st["target_passes"]  # occupancy counts against the configured 8
    with pytest.raises(Exception, match="out of memory"):
        generate_chunk(_OutOfMemoryAbove(engine, 0), pair.tokenizer, prompts, keys, seed=5, max_prompt_tokens=100)


def test_settings_refuse_before_ray(base, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "stray.parquet")
    with pytest.raises(UserError, match="no settings.json"):
        run_generate(replace(base, out=str(out)))
    head = tmp_path / "head"  # another command's output (build-head's): generate would mix its files in
    head.mkdir()
    (head / "manifest.json").write_text(json.dumps({"kind": "trimmed-head"}))
    with pytest.raises(UserError, match=r"already holds files \(manifest.json\) but no settings.json"):
        run_generate(replace(base, out=str(head)))
    assert sorted(p.name for p in head.iterdir()) == ["manifest.json"]


def test_an_out_inside_the_prompts_folder_is_refused_before_ray(base, tmp_path):
    """A rerun would read the outputs as prompts (and an --out equal to the folder would overwrite them)."""
    for out in (Path(base.prompts[0]) / "gen", Path(base.prompts[0])):
        with pytest.raises(UserError, match=f"--out {out} is inside the prompts folder {base.prompts[0]}: a rerun would read") as e:
            run_generate(replace(base, out=str(out)))
        assert "\n" not in str(e.value)
    assert not (Path(base.prompts[0]) / "gen").exists()


def test_no_draft_runs_record_the_gamma_that_sets_a_prompts_room(base, tmp_path):
    """--no-draft keeps the room of the speculative runs it is compared with (gamma + 1 positions past the last
    token), so its gamma decides which rows are error rows: a resume with another gamma is another setting."""
    from vocabtrim.generate import settings_of
    from vocabtrim.prompts import max_prompt_tokens

    alone = replace(base, drafter=None, no_draft=True)
    assert max_prompt_tokens(100, 10, 2, 6) != max_prompt_tokens(100, 10, 5, 6)
    rooms = [settings_of(replace(alone, gamma=g, max_gamma=m), "fp").get("prompt_room_gamma") for g, m in
             (("2", 6), ("5", 6), ("auto", 4), ("auto", 6), ("6", 9))]
    assert rooms == [2, 5, 4, None, None]  # the defaults' room (max_gamma 6) unrecorded, as settings written before it were
    assert settings_of(alone, "fp")["gamma"] is None and "prompt_room_gamma" not in settings_of(base, "fp")
    # A run on GPUs is another setting (other floats; --dtype auto another dtype); the CPU adds no key, as before.
    assert settings_of(replace(base, gpus_per_worker=1), "fp")["device"] == "cuda" and "device" not in settings_of(base, "fp")
    # The rejection sampler's uniforms changed (version 2): its outputs at temperature > 0 from before do not resume.
    assert settings_of(replace(base, sampler="rejection"), "fp")["uniforms"] == 2
    assert all("uniforms" not in settings_of(replace(base, **kw), "fp")
               for kw in ({}, {"sampler": "rejection", "temperature": 0.0}))


def test_max_new_tokens_that_leave_no_room_for_a_prompt_are_refused_before_ray(base, tmp_path, monkeypatch):
    from transformers import AutoConfig

    from vocabtrim import ray_utils

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_utils, "init_ray", no_ray)
    context = AutoConfig.from_pretrained(base.target).max_position_embeddings
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"--max-new-tokens {context - 4} leaves no room for a prompt in the target's context of "
                                        f"{context} tokens"):
        run_generate(replace(base, max_new_tokens=context - 4, gamma="3", out=str(out)))  # 4 positions past the last token
    assert not out.exists()


def test_an_output_of_any_extension_binds_the_settings(tmp_path):
    """A prompt file named directly keeps its name (any extension) in --out: once that output exists, a rerun with
    other settings is refused, as for .parquet names; before it exists the folder takes the new settings."""
    from vocabtrim.generate import prepare_out
    from vocabtrim.prompts import inspect_prompt_files

    pq.write_table(pa.table({"prompt": ["hi"]}), tmp_path / "data.pq")
    files = inspect_prompt_files([str(tmp_path / "data.pq")], "prompt", None)
    out = tmp_path / "out"
    prepare_out(str(out), {"seed": 0}, files)
    prepare_out(str(out), {"seed": 1}, files)  # no output yet: the record is rewritten
    pq.write_table(pa.table({"prompt": ["hi"], "completion": ["x"]}), out / "data.pq")
    with pytest.raises(UserError, match="holds outputs made with other settings .*seed 1 now 2"):
        prepare_out(str(out), {"seed": 2}, files)
    assert json.loads((out / "settings.json").read_text()) == {"seed": 1}


def test_an_output_that_cannot_be_read_is_the_users_unless_the_network_dropped(tmp_path, monkeypatch):
    """finished on an existing output: garbage is refused in one line (delete it and rerun); an object store's
    dropped connection keeps its type, so a good output is never called unreadable."""
    from vocabtrim import storage
    from vocabtrim.generate_outputs import finished
    from vocabtrim.prompts import inspect_prompt_files

    pq.write_table(pa.table({"prompt": ["hi"]}), tmp_path / "p.parquet")
    (file,) = inspect_prompt_files([str(tmp_path / "p.parquet")], "prompt", None)
    out = tmp_path / "out"
    out.mkdir()
    assert finished(str(out), file) is None
    (out / "p.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(UserError, match=r"p\.parquet is not a readable output \(.*\): delete it and rerun"):
        finished(str(out), file)

    def dropped(where):
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset by peer")

    monkeypatch.setattr(storage, "open_input_file", dropped)
    with pytest.raises(OSError, match="connection reset") as raised:
        finished(str(out), file)
    assert not isinstance(raised.value, UserError)


def test_string_prompts_follow_the_chat_template_rule(ray_local, base, tmp_path, capsys):
    """auto: a string prompt is fed as one user message (the tokenizer has a chat template), exactly as the same
    prompt given as a message list; never: the string is fed raw; message lists with never are refused."""
    texts = ["What is the capital of France?", "Write a haiku about the sea.", "the quick brown fox"]
    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    pq.write_table(pa.table({"id": [0, 1, 2], "prompt": texts}), tmp_path / "strings.parquet")
    pq.write_table(pa.table({"id": [0, 1, 2], "prompt": pa.array([[{"role": "user", "content": t}] for t in texts], msgs)}),
                   tmp_path / "messages.parquet")
    greedy = replace(base, drafter=None, no_draft=True, temperature=0.0)

    def completions(name, mode):
        out = tmp_path / f"{name}-{mode}"
        summary = run_generate(replace(greedy, prompts=[str(tmp_path / f"{name}.parquet")], chat_template=mode, out=str(out)))
        assert summary["settings"]["chat_template"] == mode
        return pq.read_table(out / f"{name}.parquet").column("completion").to_pylist(), summary

    auto, summary = completions("strings", "auto")
    assert summary["run"]["string_prompts_wrapped"] is True
    assert auto == completions("messages", "auto")[0]
    never, summary = completions("strings", "never")
    assert summary["run"]["string_prompts_wrapped"] is False and never != auto
    argv = ["generate", "--target", base.target, "--no-draft", "--prompts", str(tmp_path / "messages.parquet"),
            "--chat-template", "never", "--out", str(tmp_path / "refused")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds message lists in 'prompt', which need the chat template" in err[0]
    assert not (tmp_path / "refused").exists()


def test_string_view_and_all_null_ids_are_written_back_as_they_came(ray_local, base, tmp_path):
    """Id columns of string_view (as Polars writes strings) and of Arrow's null type (an all-None pandas column)
    come back in the output with their type and values."""
    views = pa.array(["a", None, "c"]).cast(pa.string_view())
    pq.write_table(pa.table({"id": views, "prompt": ["x y", "the dog", "a cat"]}), tmp_path / "views.parquet")
    pq.write_table(pa.table({"id": pa.array([None, None], pa.null()), "prompt": ["x y", "a cat"]}), tmp_path / "nulls.parquet")
    run_generate(replace(base, drafter=None, no_draft=True, temperature=0.0, max_new_tokens=2, prompts=[str(tmp_path / "views.parquet"),
                 str(tmp_path / "nulls.parquet")], out=str(tmp_path / "out")))
    for name, ids in (("views", views), ("nulls", pa.array([None, None], pa.null()))):
        table = pq.read_table(tmp_path / "out" / f"{name}.parquet")
        assert table.column("id").combine_chunks().equals(ids) and table.column("error").null_count == table.num_rows


def test_a_rerun_given_more_files_and_stopped_leaves_no_summary_of_fewer(ray_local, base, tmp_path):
    """summary.json is written last and sums every file its run was given (a sweep takes it as a cell's end): a rerun
    into the same --out with another file, stopped by a fault, removes the earlier run's summary first."""
    from vocabtrim.errors import RunFailed

    for name in ("p", "q"):
        pq.write_table(pa.table({"id": [0, 1], "prompt": ["x y", "a cat"]}), tmp_path / f"{name}.parquet")
    first = replace(base, drafter=None, no_draft=True, temperature=0.0, max_new_tokens=2, prompts=[str(tmp_path / "p.parquet")],
                    out=str(tmp_path / "out"))
    run_generate(first)
    assert (tmp_path / "out" / "summary.json").exists()
    more = replace(first, prompts=[*first.prompts, str(tmp_path / "q.parquet")])
    with pytest.raises(RunFailed, match="injected device fault"):
        run_generate(replace(more, fault_injection="always"))
    assert (tmp_path / "out" / "p.parquet").exists() and not (tmp_path / "out" / "summary.json").exists()
    assert run_generate(more)["rows"] == 4 and (tmp_path / "out" / "summary.json").exists()


def test_message_fields_beside_role_and_content_are_a_setting(ray_local, base, tmp_path):
    """Prompt files whose messages have other fields (a speaker's name) record them: those fields go to the chat
    template, so outputs written by a vocabtrim that left them out (no such key) are refused, not mixed in."""
    msgs = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())]))
    pq.write_table(pa.table({"id": [0], "prompt": pa.array([[{"role": "user", "content": "hi", "name": "ada"}]], msgs)}),
                   tmp_path / "m.parquet")
    run = replace(base, drafter=None, no_draft=True, temperature=0.0, max_new_tokens=2, prompts=[str(tmp_path / "m.parquet")],
                  out=str(tmp_path / "out"))
    assert run_generate(run)["settings"]["message_fields"] == ["name"]
    recorded = json.loads((tmp_path / "out" / "settings.json").read_text())
    del recorded["message_fields"]
    (tmp_path / "out" / "settings.json").write_text(json.dumps(recorded))
    with pytest.raises(UserError, match=r"other settings \(message_fields None now \['name'\]\)"):
        run_generate(run)
    assert "message_fields" not in run_generate(replace(run, prompts=[str(base.prompts[0])], out=str(tmp_path / "plain")))["settings"]


def test_outputs_resume_only_under_the_chat_template_they_were_made_with(ray_local, base, tmp_path):
    """The chat template prompts are rendered with is a setting (its hash; the tokenizer's fingerprint leaves it
    out): after the model folder's template changes, a rerun into the same --out is refused, not mixed in. Settings
    recorded by an earlier vocabtrim, without the key, still resume; --chat-template never records none."""
    import shutil

    from transformers import AutoTokenizer

    target = tmp_path / "target"
    shutil.copytree(base.target, target)
    pq.write_table(pa.table({"id": [0, 1], "prompt": ["What is a drafter?", "the quick brown fox"]}), tmp_path / "p.parquet")
    out = tmp_path / "out"
    run = replace(base, target=str(target), drafter=None, no_draft=True, temperature=0.0, prompts=[str(tmp_path / "p.parquet")],
                  out=str(out))
    first = run_generate(run)["settings"]["chat_template_sha256"]
    written = (out / "p.parquet").read_bytes()
    tok = AutoTokenizer.from_pretrained(target)
    tok.chat_template = "System: be brief.\n" + tok.chat_template
    tok.save_pretrained(target)
    with pytest.raises(UserError, match=f"other settings \\(chat_template_sha256 '{first}' now '[0-9a-f]{{24}}'\\)"):
        run_generate(run)
    recorded = json.loads((out / "settings.json").read_text())
    del recorded["chat_template_sha256"]
    (out / "settings.json").write_text(json.dumps(recorded))
    assert run_generate(run)["run"]["files_resumed"] == 1 and (out / "p.parquet").read_bytes() == written
    now = json.loads((out / "settings.json").read_text())["chat_template_sha256"]  # recorded from here on
    assert now != first and len(now) == 24
    assert "chat_template_sha256" not in run_generate(replace(run, chat_template="never", out=str(tmp_path / "never")))["settings"]


@pytest.fixture(scope="module")
def heads(ray_local, base, tmp_path_factory):
    """Heads from one calibration: ``independent`` for the independent drafter, ``layers2`` for the
    target's first 2 layers (``--drafter-layers 2``)."""
    from vocabtrim.calibrate import CalibrateConfig, run_calibrate
    from vocabtrim.head.build import BuildHeadConfig, build_head

    root = tmp_path_factory.mktemp("heads")
    corpus = root / "corpus.parquet"
    pq.write_table(pa.table({"text": ["the quick brown fox jumps over the lazy dog"] * 8}), corpus)
    run_calibrate(CalibrateConfig(drafter=base.drafter, corpus=[str(corpus)], out=str(root / "cal"), show_progress=False))
    build_head(BuildHeadConfig(histogram=str(root / "cal"), drafter=base.drafter, top_k=32, out=str(root / "independent")))
    build_head(BuildHeadConfig(histogram=str(root / "cal"), drafter=base.target, drafter_layers=2, top_k=32, out=str(root / "layers2")))
    return {"independent": str(root / "independent"), "layers2": str(root / "layers2")}


def test_a_head_for_other_drafter_layers_is_refused_before_the_out_folder_is_claimed(base, heads, tmp_path, capsys):
    """A head's architecture is checked on the driver against the drafter's config: nothing is written to --out."""
    out = tmp_path / "out"
    argv = ["generate", "--target", base.target, "--drafter-layers", "1", "--head", heads["layers2"],
            "--prompts", *base.prompts, "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_hidden_layers (--drafter-layers) 2, this drafter 1" in err[0]
    assert not out.exists()
    assert cli.main([*argv[:4], "99", *argv[5:]]) == 2
    assert "--drafter-layers must be between 1 and 3" in capsys.readouterr().err and not out.exists()


def _damage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100:400] = b"\xab" * 300
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged, message", [
    ("target", "cannot load model {target} (weights are read from safetensors or GGUF only): model.safetensors: Error while deserializing header"),
    ("drafter", "cannot load model {drafter} (weights are read from safetensors or GGUF only): model.safetensors: Error while deserializing header"),
    ("drafter-truncated", "cannot load model {drafter} (weights are read from safetensors or GGUF only): model.safetensors: "
                          "Error while deserializing header: incomplete metadata, file not fully covered"),
    ("head", "cannot read {head}/head.safetensors: "),
])
def test_damaged_weights_and_heads_are_refused_before_ray_starts(base, heads, tmp_path, capsys, monkeypatch, damaged, message):
    """The driver reads the safetensors headers of the target and drafter and the whole head file: one line, exit 2,
    Ray never started and --out never claimed (the workers would find them only after loading for seconds)."""
    import shutil

    from vocabtrim import ray_utils

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_utils, "init_ray", no_ray)
    target, drafter, head = tmp_path / "target", tmp_path / "drafter", tmp_path / "head"
    shutil.copytree(base.target, target)
    shutil.copytree(base.drafter, drafter)
    shutil.copytree(heads["independent"], head)
    if damaged == "drafter-truncated":
        weights = (drafter / "model.safetensors").read_bytes()
        (drafter / "model.safetensors").write_bytes(weights[:-1000])
    else:
        _damage_header({"target": target, "drafter": drafter, "head": head}[damaged] /
                       ("head.safetensors" if damaged == "head" else "model.safetensors"))
    out = tmp_path / "out"
    code = cli.main(["generate", "--target", str(target), "--drafter", str(drafter), "--head", str(head),
                     "--prompts", *base.prompts, "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert message.format(target=target, drafter=drafter, head=head) in err, err
    assert not out.exists()


def test_a_refused_run_leaves_its_out_folder_reusable_with_other_settings(ray_local, base, heads, tmp_path):
    """The workers refuse a head whose rows are another drafter's (one line, no rows written); the same --out
    then takes a run with other settings, since it holds no outputs."""
    out = tmp_path / "out"
    with pytest.raises(UserError, match="built for another drafter") as e:
        run_generate(replace(base, drafter=None, drafter_layers=1, head=heads["independent"], out=str(out)))
    assert "\n" not in str(e.value)
    assert not list(out.rglob("*.parquet"))
    summary = run_generate(replace(base, drafter=None, drafter_layers=1, prompts=[str(Path(base.prompts[0]) / "a.parquet")], out=str(out)))
    assert summary["rows"] == 9 and summary["settings"]["head_sha256"] is None
    assert json.loads((out / "settings.json").read_text())["head_sha256"] is None


# ---------------------------------------------------------------------------------------------
# Object storage: --prompts, --out and --head as s3:// URIs
# ---------------------------------------------------------------------------------------------


def read_s3(where: str) -> pa.Table:
    from vocabtrim import storage

    with storage.open_input_file(where) as f:
        return pq.read_table(f)


def test_prompts_out_and_head_on_s3_and_resume(ray_local, s3, tiny_pair_dirs, tmp_path, capsys):
    import numpy as np

    from vocabtrim import histogram, storage
    from vocabtrim.head.build import BuildHeadConfig, build_head
    from vocabtrim.models import load_tokenizer, tokenizer_fingerprint

    target, drafter = tiny_pair_dirs
    bucket = s3.bucket()
    inputs = {
        "part-0.parquet": pa.table({"id": pa.array([10, 11, 12], pa.int64()), "prompt": ["the quick brown fox", "", "def add(a, b):"]}),
        "sub/part-1.parquet": pa.table({"prompt": ["What is the capital of France?", "1 2 3 4 5"]}),
        ".hidden/x.parquet": pa.table({"prompt": ["never read"]}),
    }
    for name, table in inputs.items():
        storage.write_with(f"{bucket}/prompts/{name}", lambda tmp, t=table: pq.write_table(t, tmp))
    # a head on S3 too: the Ray workers read it from there
    cal = tmp_path / "cal"
    cal.mkdir()
    tok = load_tokenizer(drafter)
    histogram.save(np.arange(len(tok), dtype=np.int64) % 7, str(cal / "histogram.parquet"))
    (cal / "manifest.json").write_text(json.dumps({"kind": "vocabtrim-histogram", "tokenizer_fingerprint": tokenizer_fingerprint(tok)}))
    head = f"{bucket}/head"
    build_head(BuildHeadConfig(histogram=str(cal), drafter=drafter, top_k=64, out=head))

    host = s3.endpoint.split("://", 1)[1]
    out = f"{bucket}/runs/out?endpoint_override={host}&scheme=http"  # a query configures the filesystem
    argv = ["generate", "--target", target, "--drafter", drafter, "--head", head, "--prompts", f"{bucket}/prompts",
            "--max-new-tokens", "6", "--gamma", "2", "--batch-size", "2", "--no-progress", "--out", out]
    capsys.readouterr()
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"in {bucket}/runs/out" in printed and "endpoint_override" not in printed

    names = [storage.relative(p, out) for p in storage.walk_files(out)]
    assert names == ["part-0.parquet", "settings.json", "sub/part-1.parquet", "summary.json"]
    a, b = read_s3(storage.join(out, "part-0.parquet")), read_s3(storage.join(out, "sub/part-1.parquet"))
    assert a.column("id").to_pylist() == [10, 11, 12]  # one row per input row, in order
    assert b.column("id").to_pylist() == ["sub/part-1.parquet:0", "sub/part-1.parquet:1"]
    assert a.column("finish_reason").to_pylist()[1] == "error" and "empty" in a.column("error").to_pylist()[1]
    assert [r in ("stop", "length") for r in a.column("finish_reason").to_pylist() + b.column("finish_reason").to_pylist()] == [
        True, False, True, True, True]
    settings = json.loads(storage.read_text(storage.join(out, "settings.json")))
    summary = json.loads(storage.read_text(storage.join(out, "summary.json")))
    assert settings["head_sha256"] and summary["settings"] == settings
    assert summary["rows"] == 5 and summary["errored_rows"] == 1 and summary["files_generated"] == 2
    assert summary["run"]["head"] == head and sorted(summary["run"]["prompts"]) == [
        f"{bucket}/prompts/part-0.parquet", f"{bucket}/prompts/sub/part-1.parquet"]
    assert summary["draft_proposed"] > 0

    # a rerun resumes: nothing is generated again; with one output gone, only that file is, and no row twice
    cfg = GenerateConfig(target=target, drafter=drafter, head=head, prompts=[f"{bucket}/prompts"], max_new_tokens=6,
                         gamma=2, batch_size=2, progress=False, out=out)
    again = run_generate(cfg)
    assert (again["files_resumed"], again["files_generated"], again["rows"]) == (2, 0, 5)
    storage.delete(storage.join(out, "sub/part-1.parquet"))
    again = run_generate(replace(cfg, batch_size=1))
    assert (again["files_resumed"], again["files_generated"], again["rows"]) == (1, 1, 5)
    assert read_s3(storage.join(out, "sub/part-1.parquet")).equals(b)
    assert read_s3(storage.join(out, "part-0.parquet")).equals(a)
    # other settings into the same S3 --out are refused, as locally
    with pytest.raises(UserError, match=f"{bucket}/runs/out holds outputs made with other settings") as e:
        run_generate(replace(cfg, seed=1))
    assert "endpoint_override" not in str(e.value)


def test_bad_locations_are_refused_in_one_line(s3, tiny_pair_dirs, tmp_path, capsys):
    target, drafter = tiny_pair_dirs
    bucket = s3.bucket()
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["hi"]}), good)
    capsys.readouterr()
    cases = [
        (["--prompts", "nosuchscheme://bucket/p.parquet", "--out", str(tmp_path / "out")], "cannot open nosuchscheme://bucket/p.parquet"),
        (["--prompts", f"{bucket}/missing.parquet", "--out", str(tmp_path / "out")], f"no such prompt file or folder: {bucket}/missing.parquet"),
        (["--prompts", f"{bucket}/prompts/*.parquet", "--out", str(tmp_path / "out")], "matches no files"),
        (["--prompts", str(good), "--head", f"{bucket}/nohead", "--out", str(tmp_path / "out")], f"--head {bucket}/nohead holds no head.safetensors"),
        (["--prompts", str(good), "--out", "nosuchscheme://bucket/out"], "cannot open nosuchscheme://bucket/out"),
        (["--prompts", str(good), "--out", "s3://vt-no-such-bucket/out"], "s3://vt-no-such-bucket/out"),
    ]
    for extra, message in cases:
        assert cli.main(["generate", "--target", target, "--drafter", drafter, "--no-progress", *extra]) == 2, message
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (message, err)
        assert not (tmp_path / "out").exists()


def test_a_prompt_at_the_context_limit_generates_and_one_token_past_it_is_an_error_row(ray_local, base, tmp_path):
    """The tiny target has 256 positions. Generate reserves --max-new-tokens + gamma + 1 of them (a verify pass
    writes gamma + 1 positions past the last accepted token), so with 8 new tokens and --gamma 4 a prompt may
    hold 243 tokens: that one generates all its tokens, one more token makes an error row saying why."""
    from vocabtrim.models import load_tokenizer

    tok = load_tokenizer(base.target)
    limit = 256 - (8 + 4 + 1)
    by_length = {len(tok("the" + " the" * m)["input_ids"]): "the" + " the" * m for m in range(limit - 10, limit + 2)}
    prompts = tmp_path / "edge.parquet"
    pq.write_table(pa.table({"id": ["at", "past"], "prompt": [by_length[limit], by_length[limit + 1]]}), prompts)
    out = tmp_path / "out"
    run_generate(replace(base, prompts=[str(prompts)], out=str(out), max_new_tokens=8, gamma=4, temperature=0.0,
                         chat_template="never"))  # strings tokenized as they are, as counted above
    at, past = pq.read_table(out / "edge.parquet").to_pylist()
    assert at["error"] is None and (at["completion_tokens"] == 8 or at["finish_reason"] == "stop"), at
    assert past["finish_reason"] == "error" and past["completion"] is None
    assert past["error"] == (f"prompt has {limit + 1} tokens, more than the {limit} that fit the model's context beside "
                             "--max-new-tokens and one verify pass (gamma + 1 positions)")


def test_a_setting_a_worker_refuses_keeps_its_flag(tmp_path, monkeypatch):
    """A worker that meets a bad setting while it loads (a --drafter-layers its node's model cannot give, say) hands
    the driver the SettingError itself, which the CLI prints with the flag's name (its text alone named the field)."""
    import pickle

    from vocabtrim.generate import GenerateWorker
    from vocabtrim.validate import SettingError

    def refuses(self):
        raise SettingError("drafter_layers", "must be between 1 and 29, got 30")

    monkeypatch.setattr(GenerateWorker, "_load", refuses)
    worker = GenerateWorker(GenerateConfig(target="t", drafter_layers=30, prompts=[], out=str(tmp_path / "o")).__dict__, threads=1)
    error = pickle.loads(pickle.dumps(worker.info()["error"]))  # as Ray hands it to the driver
    assert isinstance(error, SettingError) and (error.setting, error.rule) == ("drafter_layers", "must be between 1 and 29, got 30")
    with pytest.raises(SettingError):
        worker.pid()
