"""``vocabtrim demo``: the table from the three generate runs, the prompt split, a run on a tiny model,
and ``vocabtrim demo --quick`` on the bundled model as CI runs it."""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from vocabtrim.demo import (
    DEMO_RECORD,
    DemoConfig,
    format_rounds,
    format_table,
    gamma_lines,
    round_order,
    run_demo,
    split_prompts,
    table_rows,
)


def summary(tps, acceptance=None, per_pass=1.0, drafter_ms=None, gammas=None):
    return {"tokens_per_engine_second": tps, "acceptance_rate": acceptance, "tokens_per_target_pass": per_pass,
            "drafter_step_ms": drafter_ms, "gamma_histogram": gammas or [10]}


def test_table_compares_against_target_alone():
    rows = table_rows({"target": summary(20.0), "full": summary(10.0, 0.1, 1.3, 12.0, [30, 10]),
                       "trimmed": summary(15.0, 0.1, 1.3, 4.0, [1, 0, 3])})
    assert [r.speedup for r in rows] == [1.0, 0.5, 0.75]
    assert [r.drafted for r in rows] == [None, 0.25, 0.75]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["setting", "acceptance", "tokens/target", "pass", "drafter", "step", "ms", "drafted", "steps",
                                "tokens/s", "speedup"]
    assert lines[2].startswith("target alone") and " - " in lines[2] and lines[2].endswith("1.00x")
    assert lines[4].startswith("drafter, trimmed head") and "0.100" in lines[4] and "75%" in lines[4] and lines[4].endswith("0.75x")
    assert len({len(line) for line in lines}) == 1  # aligned columns
    # A drafter not faster than the target alone is never reported without what auto gamma did.
    said = gamma_lines(rows, "auto")
    assert any("drafter, full head: 0.50x the target alone; auto gamma drafted on 25% of the steps" in s for s in said)
    assert gamma_lines(rows, 4) == ["gamma fixed at 4 draft tokens per step."]
    with_eagle3 = table_rows({"target": summary(20.0), "full": summary(10.0), "trimmed": summary(15.0), "eagle3": summary(30.0, 0.6, 2.2, 2.0, [0, 5])})
    assert with_eagle3[3].setting == "EAGLE-3 drafter" and with_eagle3[3].speedup == 1.5 and with_eagle3[3].drafted == 1.0


def test_prompt_split_is_disjoint_and_cut_into_rounds(tmp_path):
    cal, evals = split_prompts(tmp_path, 100, 50, rounds=3)
    a = pq.read_table(cal).column("id").to_pylist()
    parts = [pq.read_table(e).column("id").to_pylist() for e in evals]
    assert [len(p) for p in parts] == [16, 17, 17] and len(a) == 100
    b = [i for p in parts for i in p]
    assert len(set(b)) == 50 and not set(a) & set(b)
    assert len(set(pq.read_table(evals[0]).column("kind").to_pylist()) | set(pq.read_table(evals[2]).column("kind").to_pylist())) == 4


def test_rounds_rotate_the_order_and_report_ranges_and_ratios_within_a_round():
    keys = ["target", "full", "trimmed"]
    assert [round_order(keys, r)[0] for r in range(4)] == ["target", "full", "trimmed", "target"]
    figures = {
        "target": {"tokens_per_second": [40.0, 36.0], "drafter_step_ms": []},
        "full": {"tokens_per_second": [10.0, 9.0], "drafter_step_ms": [60.0, 66.0]},
        "trimmed": {"tokens_per_second": [20.0, 13.5], "drafter_step_ms": [20.0, 30.0]},
    }
    first, second = format_rounds(figures)
    assert "over 2 interleaved rounds" in first and "target alone 36.0–40.0" in first and "trimmed 20.0–30.0" in first
    assert "tokens/s 1.50–2.00x" in second and "drafter step 2.20–3.00x cheaper" in second
    figures["eagle3"] = {"tokens_per_second": [60.0, 36.0], "drafter_step_ms": [3.0, 4.0]}
    third = format_rounds(figures)[2]
    assert third == "EAGLE-3 drafter: tokens/s 36.0–60.0, drafter step ms 3.0–4.0; against the target alone within each round 1.00–1.50x"


def test_demo_on_a_tiny_model(tiny_pair_dirs, tmp_path, monkeypatch):
    """The whole demo in process on the tiny target (drafter: its first layer; and a random EAGLE-3 drafter in
    SpecForge's layout as the fourth setting): greedy outputs match, each setting is measured in every round,
    and the temporary working folder is gone at the end."""
    import ray
    from transformers import AutoConfig

    from tiny import write_specforge_checkpoint

    config = AutoConfig.from_pretrained(tiny_pair_dirs[0])
    eagle3 = write_specforge_checkpoint(tmp_path / "eagle3", SimpleNamespace(config=config), range(0, config.vocab_size, 2))

    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="vt", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        lines = []
        result = run_demo(
            DemoConfig.quick(model=tiny_pair_dirs[0], drafter_layers=1, eagle3=str(eagle3), top_k=64, eval_prompts=8, batch_size=4,
                             progress=False),
            echo=lines.append,
        )
    finally:
        ray.shutdown()
    assert result["out"].startswith(str(tmp_path)) and not os.path.exists(result["out"])
    assert not any(name.startswith("vocabtrim-demo-") for name in os.listdir(tmp_path))
    assert all(len(result["rounds"][k]["tokens_per_second"]) == 2 for k in ("target", "full", "trimmed", "eagle3"))
    assert "deleted at the end" in lines[0] and not any(line.startswith("kept in") for line in lines)
    assert result["head"]["k"] == 64
    assert result["identical"] == {"full": (8, 8), "trimmed": (8, 8), "eagle3": (8, 8)}
    s = result["summaries"]
    assert s["target"]["rows"] == 8 and s["target"]["errored_rows"] == 0 and s["trimmed"]["settings"]["head_sha256"]
    table = "\n".join(lines)
    assert "drafter, trimmed head" in table and "identical to the target's own: full head 8/8, trimmed head 8/8, EAGLE-3 8/8" in table
    assert [r.setting for r in result["rows"]] == ["target alone", "drafter, full head", "drafter, trimmed head", "EAGLE-3 drafter"]
    assert s["eagle3"]["draft_proposed"] > 0 and "EAGLE-3 drafter: tokens/s" in table and "a draft vocabulary of" in table


@pytest.mark.parametrize("change, message", [
    (["--top-k", "1000000"], "--top-k must be between 1 and the drafter's vocabulary size 300, got 1000000"),
    (["--top-k", "2"], "--top-k 2 is smaller than the 3 special tokens that every trimmed head keeps"),
    (["--eval-prompts", "0"], "--eval-prompts must be >= 1, got 0"),
    (["--rounds", "9"], "--rounds must be between 1 and --eval-prompts (8), got 9"),
    (["--eagle3", "NO-SUCH"], "--eagle3 NO-SUCH: no such folder (pass an EAGLE-3 drafter's folder, smollm2-135m-eagle3, or --eagle3 none)"),
    (["--eval-prompts", "400"], "--eval-prompts 400 is too many: the demo ships 320 prompts and calibrates on 16 of them; pass at most 304"),
    (["--eagle3", "{model}"], "--eagle3 {model} is not an EAGLE-3 drafter (a folder whose config.json names LlamaForCausalLMEagle3, "
                              "or smollm2-135m-eagle3): pass one, or --eagle3 none"),
    (["--gamma", "99"], "--gamma must be 'auto' or between 0 and 64, got 99"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--drafter-layers", "9"], "--drafter-layers must be between 1 and 3, got 9"),
    (["--model", "smollm2-135m-eagle3"], "--model smollm2-135m-eagle3 is an EAGLE-3 drafter: it drafts from a target's hidden "
                                         "states and does not run alone; pass the target it drafts for"),
])
def test_what_a_stage_would_refuse_is_refused_before_the_first_stage(tiny_pair_dirs, tmp_path, capsys, change, message):
    """Before Ray starts and before calibrate runs (a bad --top-k or EAGLE-3 drafter was refused only by the stage
    that used it, after the earlier stages had run)."""
    import ray

    from vocabtrim.cli import main

    argv = ["demo", "--quick", "--model", tiny_pair_dirs[0], "--drafter-layers", "1", "--eagle3", "none", "--top-k", "64",
            "--eval-prompts", "8", "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "demo")]
    capsys.readouterr()
    assert main([*argv, *(c.format(model=tiny_pair_dirs[0]) for c in change)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"vocabtrim demo: error: {message.format(model=tiny_pair_dirs[0])}"
    assert not ray.is_initialized()
    assert not (tmp_path / "demo" / "calib").exists()


def test_an_out_folder_that_is_not_a_demos_is_refused(tiny_pair_dirs, tmp_path, capsys):
    """--out holding another command's files (here a sweep's record) is refused in one line before Ray starts,
    and nothing is written into it."""
    import ray

    from vocabtrim.cli import main

    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text("{}")
    capsys.readouterr()
    assert main(["demo", "--quick", "--model", tiny_pair_dirs[0], "--drafter-layers", "1", "--eagle3", "none", "--top-k", "64",
                 "--eval-prompts", "8", "--batch-size", "4", "--no-progress", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"vocabtrim demo: error: --out {out} already holds files (sweep.json) but no demo.json: use a new or empty --out")
    assert not ray.is_initialized() and sorted(p.name for p in out.iterdir()) == ["sweep.json"]


def test_a_demos_folder_with_other_settings_is_refused_once_a_stage_wrote_there(tiny_pair_dirs, tmp_path, capsys):
    """The demo's record binds its folder to its settings once a stage has written there: a rerun with other
    evaluation prompts or rounds would reuse outputs of the earlier prompts (the same row counts) and mix two prompt
    sets in one table. A folder no stage wrote in (a refused run) takes other settings, and so does the folder of a
    version whose record held no settings."""
    import ray

    from vocabtrim.cli import main

    argv = ["demo", "--quick", "--model", tiny_pair_dirs[0], "--drafter-layers", "1", "--eagle3", "none", "--top-k", "64",
            "--eval-prompts", "8", "--batch-size", "4", "--no-progress"]
    earlier = {k: v for k, v in dataclasses.asdict(DemoConfig.quick(model=tiny_pair_dirs[0], drafter_layers=1, eagle3=None, top_k=64,
                                                                     eval_prompts=8, batch_size=4)).items()
               if k not in ("out", "address", "progress")}
    bound, free, legacy = (tmp_path / name for name in ("bound", "free", "legacy"))
    for out, record in ((bound, {"kind": "vocabtrim-demo", **earlier, "rounds": 1}), (free, {"kind": "vocabtrim-demo", **earlier, "rounds": 1}),
                        (legacy, {"kind": "vocabtrim-demo"})):
        out.mkdir()
        (out / DEMO_RECORD).write_text(json.dumps(record))
    for out in (bound, legacy):
        (out / "gen" / "target").mkdir(parents=True)
        (out / "gen" / "target" / "eval-0.parquet").write_bytes(b"an output")
    capsys.readouterr()
    assert main([*argv, "--out", str(bound)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"vocabtrim demo: error: {bound} holds a demo made with other settings (rounds 1 now 2): rerun with the same settings to "
        "resume, or use a new --out")
    for out in (free, legacy):  # taken: the run goes on to its own checks (here a --top-k that is refused)
        assert main([*argv, "--top-k", "2", "--out", str(out)]) == 2
        assert "--top-k 2 is smaller than the 3 special tokens" in capsys.readouterr().err.splitlines()[-1]
        assert json.loads((out / DEMO_RECORD).read_text())["rounds"] == 2
    assert not ray.is_initialized()


@pytest.mark.bundled
@pytest.mark.timeout(900)  # the demo's own limit (600 s, below) ends it first
def test_demo_quick_on_the_bundled_model(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "vocabtrim.cli", "demo", "--quick", "--no-progress", "--out", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for setting in ("target alone", "drafter, full head", "drafter, trimmed head", "EAGLE-3 drafter"):
        assert setting in out
    assert "full head 16/16, trimmed head 16/16, EAGLE-3 16/16 rows" in out
    assert "The EAGLE-3 drafter smollm2-135m-eagle3 is trained for the target" in out and "a draft vocabulary of 8,192 ids" in out
    assert "kept K=8,192 of 49,152 ids" in out and "never seen in the histogram" in out and "is no test of the head" in out
    assert "over 2 interleaved rounds" in out
    table = tmp_path / "demo" / "table.txt"
    assert f"kept in {tmp_path / 'demo'}: the table {table}" in out and "drafter, trimmed head" in table.read_text()
