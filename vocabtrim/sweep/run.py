"""Running (or resuming) a sweep: claim the folder, then calibrate, build the head and generate for every
cell, each stage skipped when its output exists, and write the results and the report. Every file goes
through ``storage``, so the folder and the inputs may be local or on an object store.

Layout of the sweep folder:
    sweep.json               the settings (a rerun must match them) and the runs so far
    calib/<source>/          ``vocabtrim calibrate`` output (manifest.json marks it done)
    heads/<source>-k<K>/     ``vocabtrim build-head`` output (manifest.json marks it done); for an EAGLE-3
                             drafter a re-trimmed EAGLE-3 folder, and heads/full/ the drafter with a
                             full-vocabulary head (``eagle3.widen``)
    gen/<cell>/              ``vocabtrim generate`` output (summary.json marks it done; sweep_cell.json
                             says in which sweep run it was measured)
    results.parquet          one row per cell (``RESULT_SCHEMA``); a failed cell has status "failed"
    report.md, *.png         the tables and plots (``report.write_report``)
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from vocabtrim import storage
from vocabtrim.errors import UserError, first_line
from vocabtrim.generate_outputs import PARTS
from vocabtrim.sweep.cells import (
    RESULT_SCHEMA,
    Cell,
    ModelSizes,
    SweepConfig,
    add_speedups,
    check_config,
    check_k,
    default_k,
    empty_row,
    measure_sizes,
    metrics_row,
    plan_cells,
)
from vocabtrim.sweep.report import ReportContext, fmt, write_report

log = logging.getLogger(__name__)

SETTINGS_FILE = "sweep.json"
RESULTS_FILE = "results.parquet"
CELL_FILE = "sweep_cell.json"


# ---------------------------------------------------------------------------------------------
# The sweep folder: settings, runs
# ---------------------------------------------------------------------------------------------


def settings_of(cfg: SweepConfig) -> dict:
    """What every cell of a sweep folder must share. K values and sources may change between runs
    (new cells are added); batching is a setting because the timings depend on it."""
    key = storage.settings_key
    return {
        "version": 1,
        "target": key(cfg.target),
        "drafter": key(cfg.drafter_name),
        "drafter_layers": cfg.drafter_layers,
        "corpus": [key(p) for p in cfg.corpus],
        "text_column": cfg.text_column,
        "prompts": [key(p) for p in cfg.prompts],
        "prompt_column": cfg.prompt_column,
        "id_column": cfg.id_column,
        "calib_max_new_tokens": cfg.calib_max_new_tokens,
        "calib_temperature": float(cfg.calibration_temperature),
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": float(cfg.temperature),
        "seed": cfg.seed,
        "gamma": cfg.gamma,
        "batch_size": cfg.batch_size,
        "workers": cfg.workers,
        "gpus_per_worker": float(cfg.gpus_per_worker),
        "dtype": cfg.dtype,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def claim_out(out: str, settings: dict) -> int:
    """Create the sweep folder (or check its settings: ``storage.claim``) and record a new run; returns
    the run number. A folder that is not empty and holds no sweep.json is refused."""
    recorded = storage.claim(out, SETTINGS_FILE, settings, key="settings", what="a sweep")
    runs = list(recorded.get("runs", []))
    run = len(runs) + 1
    storage.write_json(storage.join(out, SETTINGS_FILE), {"settings": settings, "runs": runs + [{"run": run, "started": _now()}]})
    return run


# ---------------------------------------------------------------------------------------------
# Stages, each skipped when its output exists
# ---------------------------------------------------------------------------------------------


def calib_dir(out: str, source: str) -> str:
    return storage.join(out, "calib", source)


def head_dir(out: str, cell: Cell) -> str:
    return storage.join(out, "heads", cell.name)


def cell_drafter(cfg: SweepConfig, out: str, cell: Cell) -> tuple[str | None, str | None]:
    """(--drafter, --head) of a cell's generate run. A plain drafter: the drafter, with the cell's head when
    trimmed. An EAGLE-3 drafter: its trimmed cells and its full cell are EAGLE-3 folders in ``heads/``."""
    if cfg.eagle3 and cell.kind in ("trimmed", "full"):
        return head_dir(out, cell), None
    return cfg.drafter, (head_dir(out, cell) if cell.kind == "trimmed" else None)


def ensure_full_eagle3(cfg: SweepConfig, out: str, cell: Cell) -> None:
    """``heads/full/``: the EAGLE-3 drafter with a full-vocabulary head (its own rows at its draft ids, the
    target's LM-head rows elsewhere), written once as an EAGLE-3 folder with the target's tokenizer."""
    from vocabtrim import eagle3 as e3
    from vocabtrim.models import load_pair

    folder = head_dir(out, cell)
    if storage.is_file(storage.join(folder, "config.json")):
        return
    pair = load_pair(cfg.target, cfg.drafter, None, dtype=cfg.dtype, device="cpu", trust_remote_code=cfg.trust_remote_code)
    wide = e3.widen(pair.drafter, pair.target.get_output_embeddings().weight)
    if storage.is_local(folder):
        pair.tokenizer.save_pretrained(storage.local_path(folder))
    e3.save_eagle3(wide, folder)  # config.json last: it marks the folder done


def gen_dir(out: str, cell: Cell) -> str:
    return storage.join(out, "gen", cell.name)


def ensure_calibration(cfg: SweepConfig, out: str, source: str) -> dict:
    """The calibration manifest of ``source``, calibrating first unless it is done."""
    from vocabtrim import calibrate, histogram

    folder = calib_dir(out, source)
    if storage.is_file(storage.join(folder, "manifest.json")):
        return histogram.read_manifest(folder)
    return calibrate.run_calibrate(
        calibrate.CalibrateConfig(
            drafter=cfg.target if cfg.eagle3 else cfg.drafter_name,  # an EAGLE-3 folder may hold no tokenizer: the target's counts
            drafter_layers=cfg.drafter_layers,
            corpus=list(cfg.corpus),
            out=folder,
            text_column=cfg.text_column,
            source=source,
            target=cfg.target,
            max_new_tokens=cfg.calib_max_new_tokens,
            temperature=cfg.calibration_temperature,
            seed=cfg.seed,
            workers=cfg.workers,
            gpus_per_worker=cfg.gpus_per_worker,
            cpus_per_worker=cfg.cpus_per_worker,
            address=cfg.address,
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            show_progress=cfg.progress,
        )
    )


def ensure_head(cfg: SweepConfig, out: str, cell: Cell) -> dict:
    """The head manifest of a trimmed cell, building the head first unless it is done."""
    from vocabtrim.head.build import BuildHeadConfig, build_head
    from vocabtrim.head.io import read_head_manifest

    folder = head_dir(out, cell)
    if storage.is_file(storage.join(folder, "manifest.json")):
        return read_head_manifest(folder, eagle3=cfg.eagle3)
    return build_head(
        BuildHeadConfig(
            histogram=calib_dir(out, cell.source),
            drafter=cfg.drafter_name,
            drafter_layers=cfg.drafter_layers,
            top_k=cell.k,
            out=folder,
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            target=cfg.target if cfg.eagle3 else None,
        )
    )


def generate_cell(cfg: SweepConfig, out: str, cell: Cell, prompts: list[str] | None = None) -> dict:
    """Generate one cell's outputs into ``gen/<cell>/`` and return its summary. ``prompts``: some of
    ``cfg.prompts`` (default: all); ``generate`` resumes, so files a call already generated are skipped."""
    from vocabtrim import generate

    drafter, head = cell_drafter(cfg, out, cell)
    return generate.run_generate(
        generate.GenerateConfig(
            target=cfg.target,
            prompts=list(cfg.prompts if prompts is None else prompts),
            out=gen_dir(out, cell),
            drafter=drafter,
            drafter_layers=cfg.drafter_layers,
            head=head,
            no_draft=cell.kind == "target",
            prompt_column=cfg.prompt_column,
            id_column=cfg.id_column,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed,
            gamma=cfg.gamma,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            gpus_per_worker=cfg.gpus_per_worker,
            cpus_per_worker=cfg.cpus_per_worker,
            address=cfg.address,
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            progress=cfg.progress,
        )
    )


def ensure_generation(cfg: SweepConfig, out: str, cell: Cell, run: int) -> tuple[dict, int | None]:
    """(generate summary, sweep run that measured it), generating first unless the cell is done."""
    from vocabtrim import generate

    folder = gen_dir(out, cell)
    summary_path = storage.join(folder, generate.SUMMARY_FILE)
    if storage.is_file(summary_path):
        cell_path = storage.join(folder, CELL_FILE)
        measured = json.loads(storage.read_text(cell_path)).get("run") if storage.is_file(cell_path) else None
        return json.loads(storage.read_text(summary_path)), measured
    summary = generate_cell(cfg, out, cell)
    storage.write_json(storage.join(folder, CELL_FILE), {"run": run, "measured_at": _now()})
    return summary, run


# ---------------------------------------------------------------------------------------------
# One cell -> one row
# ---------------------------------------------------------------------------------------------


def check_measured(summary: dict, folder: str) -> None:
    """Refuse, in one line, a cell's generation that measured nothing: no evaluation rows, or error rows only
    (each row's reason is in the ``error`` column of the outputs in ``folder``)."""
    rows = summary.get("rows") or 0
    if rows == 0:
        raise UserError("the evaluation prompts hold no rows: nothing to measure")
    if summary.get("errored_rows") == rows:
        raise UserError(f"all {rows} evaluation rows are error rows (their reasons: column `error` of the outputs in "
                        f"{storage.display(folder)}): nothing to measure")


def _error_line(exc: BaseException) -> str:
    """A failed cell's error: a user mistake's line as it is, anything else with its type name."""
    return first_line(exc) if isinstance(exc, UserError) or not str(exc).strip() else f"{type(exc).__name__}: {first_line(exc)}"


def run_cell(cfg: SweepConfig, out: str, cell: Cell, sizes: ModelSizes, run: int, calibrations: dict) -> dict:
    """Calibrate (once per source), build the head and generate for one cell; never raises for a
    failure of the cell itself: the row then has status "failed" and the error's first line."""
    stage = "generate"
    try:
        calibration = head = None
        if cell.kind == "trimmed":
            stage = f"calibrate ({cell.source})"
            if cell.source not in calibrations:
                try:
                    calibrations[cell.source] = ensure_calibration(cfg, out, cell.source)
                except Exception as exc:  # every cell of this source fails with the same line
                    calibrations[cell.source] = exc
            calibration = calibrations[cell.source]
            if isinstance(calibration, Exception):
                raise calibration
            stage = "build-head"
            head = ensure_head(cfg, out, cell)
            stage = "generate"
        elif cell.kind == "full" and cfg.eagle3:
            stage = "build-head (full vocabulary)"
            ensure_full_eagle3(cfg, out, cell)
            stage = "generate"
        summary, measured = ensure_generation(cfg, out, cell, run)
        check_measured(summary, gen_dir(out, cell))
    except Exception as exc:
        if not isinstance(exc, UserError):
            log.warning("cell %s failed in %s", cell.name, stage, exc_info=exc)
        row = empty_row(cell)
        row.update(status="failed", error=f"{stage}: {_error_line(exc)}", gamma=0 if cell.kind == "target" else cfg.gamma)
        return row
    row = metrics_row(cell, summary, sizes, cfg.gamma)
    row["measured_in_run"] = measured
    if head is not None:
        row["head_coverage"] = head.get("coverage")
        row["k"] = head.get("k", cell.k)
    if calibration is not None:
        row["calibration_tokens"] = calibration.get("total_tokens")
    return row


def eval_coverage(cfg: SweepConfig, out: str, cells: list[Cell]) -> dict[str, float]:
    """For trimmed cells: ``{cell name: share}``, the share of the target alone's evaluation tokens
    (its completions re-encoded with the tokenizer) that the cell's kept ids cover. Empty without the
    target cell's outputs."""
    import numpy as np
    from safetensors.torch import load  # torch's reader: an EAGLE-3 folder's weights may be bfloat16 (numpy's refuses)

    from vocabtrim.eagle3 import WEIGHTS_FILE
    from vocabtrim.head.files import HEAD_FILE
    from vocabtrim.models import load_tokenizer

    target_out = gen_dir(out, Cell("target", "target"))
    if not cells or not storage.is_file(storage.join(target_out, "summary.json")):
        return {}
    tokenizer = load_tokenizer(cfg.target, cfg.trust_remote_code)
    counts = np.zeros(len(tokenizer), np.int64)  # [vocabulary]: occurrences of each id, summed file by file
    for f in _outputs(target_out):
        texts = [t for t in _completions(f) if t]
        if texts:
            ids = np.concatenate([np.asarray(e, dtype=np.int64) for e in tokenizer(texts, add_special_tokens=False)["input_ids"]])
            counts += np.bincount(ids, minlength=counts.size)  # ids < len(tokenizer)
    total = int(counts.sum())
    if total == 0:
        return {}
    shares = {}
    for cell in cells:
        folder = head_dir(out, cell)
        if cfg.eagle3:  # an EAGLE-3 folder: t2d marks its draft vocabulary
            kept = np.flatnonzero(load(storage.read_bytes(storage.join(folder, WEIGHTS_FILE)))["t2d"].numpy())
        else:
            kept = load(storage.read_bytes(storage.join(folder, HEAD_FILE)))["token_ids"].numpy()
        kept = np.unique(kept)
        shares[cell.name] = float(counts[kept[kept < counts.size]].sum() / total)  # ids past the tokenizer's: never in text
    return shares


def add_eval_coverage(cfg: SweepConfig, out: str, rows: list[dict]) -> None:
    """``eval_coverage`` of every trimmed cell that ran, into its row."""
    trimmed = [r for r in rows if r["kind"] == "trimmed" and r["status"] == "ok"]
    shares = eval_coverage(cfg, out, [Cell(r["cell"], "trimmed") for r in trimmed])
    for r in trimmed:
        if r["cell"] in shares:
            r["eval_coverage"] = shares[r["cell"]]


def _outputs(folder: str) -> list[str]:
    """The Parquet outputs of a generate folder (its finished files; not hidden ones, nor the parts of a file under
    way in ``.parts/``), sorted."""
    return [p for p in storage.walk_files(folder) if storage.name(p).endswith(".parquet") and not storage.name(p).startswith(".")
            and not storage.relative(p, folder).startswith(PARTS + "/")]


def _completions(where: str) -> list:
    with storage.open_input_file(where) as f:
        return pq.read_table(f, columns=["completion"]).column(0).to_pylist()


def write_results(rows: list[dict], where: str) -> None:
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    storage.write_with(where, lambda tmp: pq.write_table(table, tmp))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _echo_for(cfg: SweepConfig) -> Callable[[str], None]:
    if not cfg.progress:
        return lambda line: None
    return lambda line: print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _no_weight_loading_bars():
    """The driver loads the drafter once per head: a transformers bar per load would bury the sweep's lines."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def run_sweep(cfg: SweepConfig, echo: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) the whole sweep into ``cfg.out`` (held by ``lease``: one run at a time); returns rows,
    counts and the written paths."""
    from vocabtrim.lease import lease

    with _no_weight_loading_bars(), lease(cfg.out):
        return _run_sweep(cfg, echo or _echo_for(cfg))


def _run_sweep(cfg: SweepConfig, echo: Callable[[str], None]) -> dict:
    wall = time.perf_counter()
    check_config(cfg)
    sizes = measure_sizes(cfg)
    if cfg.k is None:
        cfg = replace(cfg, k=default_k(sizes))
    check_k(cfg.k, sizes)
    out = cfg.out
    run = claim_out(out, settings_of(cfg))
    rows, calibrations = run_cells(cfg, out, sizes, run, echo)
    add_eval_coverage(cfg, out, rows)
    write_results(rows, storage.join(out, RESULTS_FILE))
    paths = write_report(rows, report_context(cfg, out, sizes, calibrations), out)
    return {
        "rows": rows,
        "cells": len(rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "run": run,
        "wall_seconds": time.perf_counter() - wall,
        "results": str(storage.join(out, RESULTS_FILE)),
        **paths,
    }


def run_cells(cfg: SweepConfig, out: str, sizes: ModelSizes, run: int, echo) -> tuple[list[dict], dict]:
    """Every cell in turn (``plan_cells``); results.parquet is rewritten after each, so a long sweep
    shows its progress. Returns the rows and the calibration manifests (or errors) by source."""
    cells = plan_cells(cfg.k, cfg.sources)
    calibrations: dict = {}
    rows: list[dict] = []
    for i, cell in enumerate(cells, 1):
        t = time.perf_counter()
        done = storage.is_file(storage.join(gen_dir(out, cell), "summary.json"))
        echo(f"[{i}/{len(cells)}] {cell.name}: {'done already' if done else 'running'}")
        row = run_cell(cfg, out, cell, sizes, run, calibrations)
        rows.append(row)
        if row["status"] == "failed":
            echo(f"[{i}/{len(cells)}] {cell.name} FAILED: {row['error']}")
        elif not done:
            echo(f"[{i}/{len(cells)}] {cell.name}: acceptance {fmt(row['acceptance_rate'])}, {time.perf_counter() - t:.0f} s")
        add_speedups(rows)
        write_results(rows, storage.join(out, RESULTS_FILE))
    return rows, calibrations


def report_context(cfg: SweepConfig, out: str, sizes: ModelSizes, calibrations: dict) -> ReportContext:
    histograms = {s: storage.join(calib_dir(out, s), "histogram.parquet") for s in cfg.sources}
    return ReportContext(
        settings=settings_of(cfg),
        sizes=asdict(sizes),
        calibrations={s: m for s, m in calibrations.items() if isinstance(m, dict)},
        histograms={s: p for s, p in histograms.items() if storage.is_file(p)},
        runs=json.loads(storage.read_text(storage.join(out, SETTINGS_FILE)))["runs"],
    )
