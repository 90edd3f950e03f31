"""``vocabtrim sweep`` on tiny models: every output file with its columns, MBSU as defined, a failed
cell recorded without stopping the sweep, and a rerun that reuses finished cells and retries the failed one."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import TRAINING_TEXT

from vocabtrim import calibrate, cli, generate
from vocabtrim.errors import UserError
from vocabtrim.sweep import (
    PLOTS,
    SweepConfig,
    knee_k,
    load_outliers,
    mbsu,
    param_ratio,
    parse_k,
    parse_sources,
    plan_cells,
    run_sweep,
)
from vocabtrim.sweep.cells import ModelSizes, default_k

REQUIRED_COLUMNS = [
    "cell", "kind", "source", "k", "acceptance_rate", "tokens_per_target_pass", "per_position_acceptance",
    "drafter_step_ms", "tokens_per_second", "speedup", "param_ratio", "mbsu", "status", "error",
]
FAILING_CELL = "corpus-k32"


@pytest.fixture(scope="module")
def config(tiny_pair_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-inputs")
    pq.write_table(pa.table({"text": sorted(set(TRAINING_TEXT))}), root / "corpus.parquet")
    prompts = ["the quick brown fox", "a small drafter proposes", "What is the capital of France?",
               "def add(a, b):", "ray actors count tokens", "Write a haiku about the sea."]
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(len(prompts))], "prompt": prompts}), root / "eval.parquet")
    target, drafter = tiny_pair_dirs
    return SweepConfig(
        target=target, drafter=drafter, corpus=[str(root / "corpus.parquet")], prompts=[str(root / "eval.parquet")],
        out=str(tmp_path_factory.mktemp("sweep") / "out"), k=[32, 128, None], sources=["corpus", "target"],
        calib_max_new_tokens=8, max_new_tokens=8, temperature=1.0, gamma=3, batch_size=8, progress=False,
    )


class Calls:
    """Wraps a stage function: counts calls per output folder, and fails for chosen folders."""

    def __init__(self, fn, fail_for=()):
        self.fn, self.fail_for, self.outs = fn, tuple(fail_for), []

    def __call__(self, cfg):
        self.outs.append(Path(cfg.out).name)
        if Path(cfg.out).name in self.fail_for:
            raise RuntimeError("injected failure")
        return self.fn(cfg)


@pytest.fixture(scope="module")
def first(ray_local, config):
    """The sweep with generation failing for one cell."""
    with pytest.MonkeyPatch.context() as mp:
        gen = Calls(generate.run_generate, fail_for=[FAILING_CELL])
        mp.setattr(generate, "run_generate", gen)
        result = run_sweep(config)
    return result, gen


@pytest.fixture(scope="module")
def second(first, config):
    """The same sweep again, nothing failing."""
    with pytest.MonkeyPatch.context() as mp:
        gen, cal = Calls(generate.run_generate), Calls(calibrate.run_calibrate)
        mp.setattr(generate, "run_generate", gen)
        mp.setattr(calibrate, "run_calibrate", cal)
        result = run_sweep(config)
    return result, gen, cal


def test_mbsu_on_a_known_case():
    # τ = 2.4 tokens per target pass, a drafter 1/10 of the target, γ = 4: 2.4 / (0.4 + 1).
    assert mbsu(2.4, 0.1, 4) == pytest.approx(2.4 / 1.4)
    assert mbsu(1.0, 0.0, 0) == 1.0  # the target alone
    # c counts the drafter body plus K rows of the head: (1000 + 10 × 8) / 10000.
    assert param_ratio(1000, 10, 8, 10_000) == pytest.approx(0.108)
    assert param_ratio(1000, 10, 8, 10_000, head_bias=True) == pytest.approx(0.109)


def test_every_file_and_column(first, config):
    result, _ = first
    out = Path(config.out)
    for name in ["results.parquet", "report.md", *PLOTS.values()]:
        assert (out / name).is_file(), name
    for png in PLOTS.values():
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 300_000
    table = pq.read_table(out / "results.parquet")
    assert set(REQUIRED_COLUMNS) <= set(table.column_names)
    cells = table.column("cell").to_pylist()
    assert cells == ["target", "full", "corpus-k32", "corpus-k128", "target-k32", "target-k128"]
    report = (out / "report.md").read_text()
    for heading in ("## Acceptance rate", "## MBSU", "## Measured speedup", "## Coverage", "## All cells"):
        assert heading in report
    for png in PLOTS.values():
        assert f"]({png})" in report


def test_metrics_of_the_rows(first, config, tiny_pair_dirs):
    from vocabtrim.models import load_model

    rows = {r["cell"]: r for r in first[0]["rows"]}
    target, drafter = (load_model(p, device="cpu") for p in tiny_pair_dirs)
    target_params = sum(p.numel() for p in target.parameters())
    head = drafter.get_output_embeddings().weight
    body = sum(p.numel() for n, p in drafter.named_parameters() if not n.startswith("lm_head"))
    vocab, hidden = head.shape
    assert rows["target"]["speedup"] == 1.0 and rows["target"]["mbsu"] == 1.0
    assert rows["full"]["k"] == vocab
    for name in ("full", "target-k32", "target-k128", "corpus-k128"):
        r = rows[name]
        assert r["status"] == "ok" and r["error"] is None
        assert r["param_ratio"] == pytest.approx((body + r["k"] * hidden) / target_params)
        assert r["mbsu"] == pytest.approx(r["tokens_per_target_pass"] / (r["param_ratio"] * 3 + 1))
        assert r["speedup"] == pytest.approx(r["tokens_per_second"] / rows["target"]["tokens_per_second"])
        assert len(r["per_position_acceptance"]) == 3 and sum(r["accepted_length_histogram"]) > 0
        assert 0 <= r["acceptance_rate"] <= 1 and r["drafter_step_ms"] > 0
        assert r["drafter_step_per_target_pass"] == pytest.approx(r["drafter_step_ms"] / r["target_pass_ms"])
    assert rows["target-k32"]["k"] == 32 and 0 < rows["target-k32"]["head_coverage"] <= 1
    assert rows["target-k32"]["param_ratio"] < rows["target-k128"]["param_ratio"] < rows["full"]["param_ratio"]


def test_a_failed_cell_is_recorded_and_the_sweep_goes_on(first, config):
    result, gen = first
    rows = {r["cell"]: r for r in result["rows"]}
    assert result["failed"] == 1
    assert rows[FAILING_CELL]["status"] == "failed"
    assert rows[FAILING_CELL]["error"] == "generate: RuntimeError: injected failure"
    assert gen.outs[-1] == "target-k128"  # the cells after it ran
    assert all(r["status"] == "ok" for name, r in rows.items() if name != FAILING_CELL)
    assert f"`{FAILING_CELL}`: generate: RuntimeError: injected failure" in (Path(config.out) / "report.md").read_text()


def test_a_rerun_reuses_finished_cells_and_retries_the_failed_one(second, config):
    result, gen, cal = second
    assert gen.outs == [FAILING_CELL] and cal.outs == []
    assert result["failed"] == 0
    runs = {r["cell"]: r["measured_in_run"] for r in result["rows"]}
    assert runs == {"target": 1, "full": 1, "corpus-k32": 2, "corpus-k128": 1, "target-k32": 1, "target-k128": 1}
    table = pq.read_table(Path(config.out) / "results.parquet")
    assert table.column("status").to_pylist() == ["ok"] * 6
    assert "measured in runs 1, 2" in (Path(config.out) / "report.md").read_text()


def test_other_settings_into_the_same_folder_are_refused(second, config):
    from dataclasses import replace

    with pytest.raises(UserError, match="other settings.*max_new_tokens 8 now 9"):
        run_sweep(replace(config, max_new_tokens=9))


def test_missing_prompts_are_refused_before_the_out_folder_is_claimed(config, tmp_path):
    """Every cell would fail on them: refused in one line before any model loads, and --out stays free for
    the corrected command."""
    from dataclasses import replace

    out = tmp_path / "s"
    with pytest.raises(UserError, match="typo.parquet"):
        run_sweep(replace(config, prompts=[str(tmp_path / "typo.parquet")], out=str(out)))
    with pytest.raises(UserError, match="no column 'body'"):
        run_sweep(replace(config, text_column="body", out=str(out)))
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"prompt": [1, 2]}), numbers)
    with pytest.raises(UserError, match="--prompt-column 'prompt' holds int64 values: prompts must be strings"):
        run_sweep(replace(config, prompts=[str(numbers)], out=str(out)))
    # Lengths that leave no room for a prompt: every cell would fail (exit 1, "rerun to retry them"), as each stage said.
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(config.target).max_position_embeddings
    with pytest.raises(UserError, match=rf"^--max-new-tokens {context - 4} leaves no room for a prompt in the target's context of "
                                        rf"{context} tokens \(a step also writes 4 positions past the last token\): lower --max-new-tokens$"):
        run_sweep(replace(config, max_new_tokens=context - 4, out=str(out)))
    with pytest.raises(UserError, match=rf"^--calib-max-new-tokens {context} leaves no room for a prompt in .*'s context of {context} "
                                        rf"tokens \(a step also writes 1 position past the last token\): lower --calib-max-new-tokens$"):
        run_sweep(replace(config, calib_max_new_tokens=context, out=str(out)))
    assert not out.exists()
    # An --out inside the prompts or corpus folder: its outputs would be read as inputs by a rerun.
    inputs = Path(config.prompts[0]).parent
    for flag, given in (("--prompts", dict(prompts=[str(inputs)])), ("--corpus", dict(corpus=[str(inputs)]))):
        with pytest.raises(UserError, match=f"--out {inputs / 'sweep'} is inside the {flag} folder {inputs}: a rerun would read"):
            run_sweep(replace(config, **given, out=str(inputs / "sweep")))
    assert not (inputs / "sweep").exists()


def test_error_rows_are_counted_and_a_cell_of_error_rows_only_fails(ray_local, config, tmp_path):
    """Error rows are left out of every figure and the report's setup says how many there were; a cell whose rows
    are all error rows measured nothing: it fails with one line instead of a row of blanks counted as done."""
    from dataclasses import replace

    some = tmp_path / "some.parquet"
    pq.write_table(pa.table({"prompt": ["the quick brown fox", "", "def add(a, b):"]}), some)
    result = run_sweep(replace(config, prompts=[str(some)], k=[None], sources=[], out=str(tmp_path / "some")))
    assert result["failed"] == 0 and [r["errored_rows"] for r in result["rows"]] == [1, 1]
    assert "(column `prompt`, 3 rows, 1 of them error rows, left out of every figure)" in (tmp_path / "some" / "report.md").read_text()

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": ["", "  "]}), empty)
    result = run_sweep(replace(config, prompts=[str(empty)], k=[None], sources=[], out=str(tmp_path / "empty")))
    assert result["failed"] == 2
    for r in result["rows"]:
        assert r["status"] == "failed" and r["error"].startswith("generate: all 2 evaluation rows are error rows (their reasons: ")
    assert "all 2 evaluation rows are error rows" in (tmp_path / "empty" / "report.md").read_text()


def test_cli_errors_are_one_line(config, capsys):
    args = ["sweep", "--target", config.target, "--drafter", config.drafter, "--corpus", *config.corpus,
            "--prompts", *config.prompts, "--out", config.out + "-cli"]
    assert cli.main(args) == 2  # the default K: each is more than the tiny drafter's 300 ids
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("fits the drafter's vocabulary of 300: pass --k"), err
    assert cli.main(args + ["--k", "64,lots"]) == 2
    assert capsys.readouterr().err.strip().endswith("--k takes positive integers and 'full', comma-separated; got 'lots'")
    assert cli.main(args + ["--k", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exceeds the drafter's vocabulary" in err
    assert cli.main(args + ["--k", "2,full"]) == 2  # build-head would refuse it in each cell, after calibrating
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--k 2 is smaller than the 3 special tokens that every trimmed head keeps" in err
    assert cli.main(args + ["--k", "64", "--sources", ""]) == 2  # not the default sources
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("--sources is empty: trimmed heads need a calibration source (corpus, drafter, target)"), err


def test_the_default_k_stop_at_the_drafters_vocabulary():
    """Without --k: 1024 to 16384 in doublings as far as the drafter's vocabulary goes (an EAGLE-3 drafter's draft
    vocabulary), and the full head."""
    sizes = ModelSizes(target=1, drafter_body=1, hidden=8, head_bias=False, vocab_size=49152)
    assert default_k(sizes) == [1024, 2048, 4096, 8192, 16384, None]
    assert default_k(replace(sizes, draft_vocab_size=8192)) == [1024, 2048, 4096, 8192, None]
    assert default_k(replace(sizes, vocab_size=3000)) == [1024, 2048, None]
    with pytest.raises(UserError, match=r"fits the drafter's draft vocabulary of 300: pass --k$"):
        default_k(replace(sizes, draft_vocab_size=300))


def test_parsing_and_plan():
    assert parse_k("1024, 2048,full") == [1024, 2048, None]
    assert parse_sources("target,corpus") == ["target", "corpus"]
    with pytest.raises(UserError):
        parse_sources("corpus,web")
    names = [c.name for c in plan_cells([8, None, 4], ["drafter"])]
    assert names == ["target", "full", "drafter-k4", "drafter-k8"]


def test_knee_and_cells_timed_under_another_load():
    assert knee_k([1024, 2048, 4096], [0.140, 0.1496, 0.151], 0.151) == 2048  # 0.1496 ≥ 0.99 × 0.151
    assert knee_k([1024], [0.10], 0.151) is None

    def row(cell, kind, ms):
        return {"cell": cell, "kind": kind, "status": "ok", "target_pass_ms": ms}

    rows = [row("target", "target", 50.0), row("full", "full", 290.0), row("a", "trimmed", 200.0),
            row("b", "trimmed", 190.0), row("c", "trimmed", 210.0)]
    assert load_outliers(rows) == {"full": (290.0, 205.0)}  # the target alone's 1-token pass is not compared
    assert load_outliers(rows[:3]) == {}  # too few drafted cells to tell


def test_every_input_and_output_on_s3(ray_local, s3, config, monkeypatch, capsys):
    """``vocabtrim sweep`` with the corpus, the prompts and ``--out`` on an S3 server: every file of the sweep
    folder is written there, and a rerun of the same command resumes from them (nothing generated again)."""
    from vocabtrim import storage

    bucket = s3.bucket()
    for local, name in ((config.corpus[0], "corpus/corpus.parquet"), (config.prompts[0], "prompts/eval.parquet")):
        storage.write_bytes(f"{bucket}/{name}", Path(local).read_bytes())
    out = f"{bucket}/sweeps/one"
    argv = ["sweep", "--target", config.target, "--drafter", config.drafter, "--corpus", f"{bucket}/corpus",
            "--prompts", f"{bucket}/prompts", "--k", "32,full", "--sources", "corpus", "--max-new-tokens", "6",
            "--gamma", "3", "--no-progress", "--out", out]
    assert cli.main(argv) == 0
    assert f"results: {out}/results.parquet" in capsys.readouterr().out
    names = {storage.relative(p, out) for p in storage.walk_files(out)}
    assert {"sweep.json", "results.parquet", "report.md", *PLOTS.values(), "calib/corpus/manifest.json",
            "heads/corpus-k32/manifest.json", "gen/target/summary.json", "gen/corpus-k32/sweep_cell.json"} <= names
    with storage.open_input_file(f"{out}/results.parquet") as f:
        table = pq.read_table(f)
    assert table.column("cell").to_pylist() == ["target", "full", "corpus-k32"]
    assert table.column("status").to_pylist() == ["ok"] * 3
    assert "](coverage.png)" in storage.read_text(f"{out}/report.md")

    gen = Calls(generate.run_generate)
    monkeypatch.setattr(generate, "run_generate", gen)
    assert cli.main(argv) == 0
    assert gen.outs == []


def test_a_sweep_of_an_eagle3_drafter(ray_local, config, tmp_path, capsys):
    """An EAGLE-3 drafter sweeps like any other: its trimmed cells are re-trimmed EAGLE-3 folders (ids inside its
    draft vocabulary), its full cell the same drafter with a full-vocabulary head; greedy outputs of every cell are
    the target's; 'drafter' as a source and a K above its draft vocabulary are refused in one line. The drafter is
    bfloat16, as the shipped one is."""
    import dataclasses

    import torch
    from transformers import AutoConfig

    from tiny import write_specforge_checkpoint
    from vocabtrim import eagle3 as e3

    tcfg = AutoConfig.from_pretrained(config.target)
    V = tcfg.vocab_size
    folder = write_specforge_checkpoint(tmp_path / "eagle3", type("T", (), {"config": tcfg})(), range(0, V, 2), dtype=torch.bfloat16)
    cfg = dataclasses.replace(config, drafter=str(folder), k=[16, 64, None], sources=["target"], temperature=0.0,
                              out=str(tmp_path / "sweep"))
    result = run_sweep(cfg)
    rows = {r["cell"]: r for r in result["rows"]}
    assert set(rows) == {"target", "full", "target-k16", "target-k64"}
    assert [r["error"] for r in rows.values() if r["status"] != "ok"] == []
    assert rows["full"]["k"] == V and rows["target-k16"]["k"] == 16
    heads = tmp_path / "sweep" / "heads"
    k16 = e3.load_eagle3(heads / "target-k16")
    assert k16.config.draft_vocab_size == 16 and bool((k16.token_ids % 2 == 0).all())  # inside the drafter's ids
    full = e3.load_eagle3(heads / "full")
    assert full.config.draft_vocab_size == V and torch.equal(full.token_ids, torch.arange(V))
    alone = [r for p in sorted((tmp_path / "sweep" / "gen" / "target").glob("*.parquet")) for r in pq.read_table(p).column("completion").to_pylist()]
    for cell in ("full", "target-k16", "target-k64"):
        got = [r for p in sorted((tmp_path / "sweep" / "gen" / cell).glob("*.parquet")) for r in pq.read_table(p).column("completion").to_pylist()]
        assert got == alone, cell
    assert rows["target-k16"]["param_ratio"] < rows["full"]["param_ratio"]
    assert 0 < rows["target-k16"]["eval_coverage"] <= rows["target-k64"]["eval_coverage"] <= 1
    from vocabtrim.models import load_tokenizer  # eval_coverage: the share of the target's completion tokens kept

    tok = load_tokenizer(cfg.target)
    ids = np.concatenate([tok(t, add_special_tokens=False)["input_ids"] for t in alone if t])
    for cell in ("target-k16", "target-k64"):
        kept = e3.load_eagle3(heads / cell).token_ids.numpy()
        assert rows[cell]["eval_coverage"] == pytest.approx(np.isin(ids, kept).mean(), abs=1e-12), cell
    # A rerun reuses every finished cell and its re-trimmed folder.
    again = {r["cell"]: r for r in run_sweep(cfg)["rows"]}
    assert all(r["status"] == "ok" for r in again.values()) and again["target-k16"]["tokens_per_second"] == rows["target-k16"]["tokens_per_second"]

    args = ["sweep", "--target", cfg.target, "--drafter", str(folder), "--corpus", *cfg.corpus, "--prompts", *cfg.prompts,
            "--out", str(tmp_path / "cli")]
    assert cli.main(args + ["--sources", "corpus,drafter"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--sources drafter does not apply to an EAGLE-3 drafter" in err
    assert cli.main(args + ["--k", f"{V // 2 + 1}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"exceeds the EAGLE-3 drafter's draft vocabulary of {V // 2:,}" in err
