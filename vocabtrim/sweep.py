"""``vocabtrim sweep``: the VocabTrim study on one target/drafter pair: K sweep × calibration source.

Words used here (the paper's, arXiv 2506.22694):
- *cell*: one generate run on the evaluation prompts. ``target`` is the target alone (the baseline),
  ``full`` the drafter with its full LM head, ``<source>-k<K>`` the drafter with the head trimmed to the
  top-K ids of the ``<source>`` calibration histogram (source: ``corpus`` tokens, or tokens that the
  ``drafter`` / ``target`` generates from the corpus rows as prompts).
- *acceptance rate*: accepted drafts ÷ proposed drafts.
- *block efficiency* τ: tokens generated per target forward pass (``tokens_per_target_pass``).
- *c*: drafter parameters ÷ target parameters, the drafter counted with the head it drafts with
  (K × hidden rows for a trimmed head).
- *MBSU* (memory-bound speed-up): τ / (c·γ + 1), γ the draft length: the speed-up when every forward
  costs time in proportion to the parameters it reads.
- *speedup*: measured decoding tokens/s of a cell ÷ that of the target alone, from the same sweep.

Layout of the sweep folder (every stage resumes by itself; a cell is done once its output exists):
    sweep.json               the settings (a rerun must match them) and the runs so far
    calib/<source>/          ``vocabtrim calibrate`` output (manifest.json marks it done)
    heads/<source>-k<K>/     ``vocabtrim build-head`` output (manifest.json marks it done)
    gen/<cell>/              ``vocabtrim generate`` output (summary.json marks it done; sweep_cell.json
                             says in which sweep run it was measured)
    results.parquet          one row per cell (``RESULT_SCHEMA``); a failed cell has status "failed"
    report.md, *.png         the tables and plots (``write_report``)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from vocabtrim.errors import UserError

log = logging.getLogger(__name__)

SOURCES = ("corpus", "drafter", "target")
SETTINGS_FILE = "sweep.json"
RESULTS_FILE = "results.parquet"
REPORT_FILE = "report.md"
CELL_FILE = "sweep_cell.json"
PLOTS = {"acceptance": "acceptance_vs_k.png", "speedup": "speedup_vs_k.png", "coverage": "coverage.png"}
LOAD_TOLERANCE = 0.25  # a drafted cell whose target pass is this much off the median was timed under another load
KNEE_SHARE = 0.99  # the knee: the smallest K keeping this share of the full head's acceptance rate

RESULT_SCHEMA = pa.schema(
    [
        ("cell", pa.string()),
        ("kind", pa.string()),  # target | full | trimmed
        ("source", pa.string()),  # calibration source of a trimmed head; null otherwise
        ("k", pa.int64()),  # kept head rows (the vocabulary size for the full head); null for the target
        ("head_coverage", pa.float64()),  # share of the source's calibration tokens the kept ids cover
        ("eval_coverage", pa.float64()),  # share of the target-alone evaluation tokens the kept ids cover
        ("calibration_tokens", pa.int64()),
        ("acceptance_rate", pa.float64()),
        ("tokens_per_target_pass", pa.float64()),  # block efficiency τ
        ("per_position_acceptance", pa.list_(pa.float64())),  # [γ]
        ("accepted_length_histogram", pa.list_(pa.int64())),  # [γ + 1]
        ("drafter_step_ms", pa.float64()),
        ("target_pass_ms", pa.float64()),
        ("drafter_step_per_target_pass", pa.float64()),  # drafter_step_ms ÷ target_pass_ms, both of this cell
        ("tokens_per_second", pa.float64()),  # decoding throughput inside the engine
        ("speedup", pa.float64()),  # tokens_per_second ÷ the target alone's
        ("gamma", pa.int64()),
        ("drafter_params", pa.int64()),
        ("target_params", pa.int64()),
        ("param_ratio", pa.float64()),  # c
        ("mbsu", pa.float64()),
        ("rows", pa.int64()),
        ("errored_rows", pa.int64()),
        ("generated_tokens", pa.int64()),
        ("engine_seconds", pa.float64()),
        ("measured_in_run", pa.int64()),
        ("status", pa.string()),  # ok | failed
        ("error", pa.string()),
    ]
)


# ---------------------------------------------------------------------------------------------
# Metrics (pure)
# ---------------------------------------------------------------------------------------------


def mbsu(tau: float, c: float, gamma: int) -> float:
    """Memory-bound speed-up as VocabTrim defines it: ``τ / (c·γ + 1)``.

    tau: block efficiency, tokens generated per target forward pass (1 for the target alone).
    c: drafter parameters ÷ target parameters (``param_ratio``), the drafter counted with its head.
    gamma: draft tokens per step (0 for the target alone, giving MBSU = τ = 1).
    One step reads the drafter's weights γ times and the target's once: (c·γ + 1) target-forward
    equivalents for τ tokens.
    """
    if tau is None or c is None or gamma is None:
        return None
    return tau / (c * gamma + 1.0)


def drafter_params(body_params: int, head_rows: int, hidden: int, head_bias: bool = False) -> int:
    """Parameters a drafter step reads: its body (everything but the LM head) plus ``head_rows`` × hidden
    head weights (and one bias per row when the head has a bias)."""
    return int(body_params) + int(head_rows) * int(hidden) + (int(head_rows) if head_bias else 0)


def param_ratio(body_params: int, head_rows: int, hidden: int, target_params: int, head_bias: bool = False) -> float:
    """c = drafter parameters (with a ``head_rows``-row head) ÷ target parameters."""
    return drafter_params(body_params, head_rows, hidden, head_bias) / target_params


def knee_k(ks: list[int], acceptance: list[float], full_acceptance: float, share: float = KNEE_SHARE) -> int | None:
    """The smallest K whose acceptance rate is at least ``share`` × the full head's (None if none is)."""
    if full_acceptance is None:
        return None
    for k, a in sorted(zip(ks, acceptance)):
        if a is not None and a >= share * full_acceptance:
            return k
    return None


def load_outliers(rows: list[dict], tolerance: float = LOAD_TOLERANCE) -> dict[str, tuple[float, float]]:
    """Drafted cells timed under a different machine load than the others: ``{cell: (target pass ms,
    median target pass ms)}`` for those off the median by more than ``tolerance`` (relative).

    Every drafted cell runs the same target verification pass (γ + 1 tokens per row, same batches), so
    its time should not depend on the head; a cell whose pass is much slower or faster than the others'
    shared the machine with other work, and its tokens/s is not comparable with theirs.
    """
    times = {r["cell"]: r["target_pass_ms"] for r in rows
             if r["status"] == "ok" and r["kind"] != "target" and r["target_pass_ms"]}
    if len(times) < 3:
        return {}
    ordered = sorted(times.values())
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {cell: (ms, median) for cell, ms in times.items() if abs(ms / median - 1) > tolerance}


# ---------------------------------------------------------------------------------------------
# Configuration and cells
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepConfig:
    """Everything ``vocabtrim sweep`` takes (flags of the same names)."""

    target: str
    corpus: list[str]
    prompts: list[str]
    out: str
    drafter: str | None = None
    drafter_layers: int | None = None
    k: list = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384, None])  # None: the full head
    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    text_column: str = "text"
    prompt_column: str = "prompt"
    id_column: str = "id"
    calib_max_new_tokens: int = 64
    calib_temperature: float | None = None  # None: --temperature
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    gamma: int = 4
    batch_size: int = 8
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    address: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True

    @property
    def drafter_name(self) -> str:
        return self.drafter if self.drafter is not None else self.target

    @property
    def calibration_temperature(self) -> float:
        return self.temperature if self.calib_temperature is None else self.calib_temperature


@dataclass(frozen=True)
class Cell:
    """One generate run. kind: target | full | trimmed; source and k for trimmed heads."""

    name: str
    kind: str
    source: str | None = None
    k: int | None = None


def parse_k(text: str) -> list:
    """``"1024,2048,full"`` → ``[1024, 2048, None]`` (None: the full head)."""
    values = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if part.lower() == "full":
            values.append(None)
        elif part.isdigit() and int(part) > 0:
            values.append(int(part))
        else:
            raise UserError(f"--k takes positive integers and 'full', comma-separated; got {part!r}")
    if not values:
        raise UserError("--k is empty: pass e.g. 1024,4096,full")
    return values


def parse_sources(text: str) -> list[str]:
    """``"corpus,target"`` → ``["corpus", "target"]`` (checked)."""
    values = [p.strip() for p in str(text).split(",") if p.strip()]
    for s in values:
        if s not in SOURCES:
            raise UserError(f"--sources takes {', '.join(SOURCES)}, comma-separated; got {s!r}")
    return values


def plan_cells(ks: list, sources: list[str]) -> list[Cell]:
    """The target alone, the full head (when ``None`` is in ``ks``), then every (source, K) trimmed head."""
    cells = [Cell("target", "target")]
    if None in ks:
        cells.append(Cell("full", "full"))
    trimmed = sorted({k for k in ks if k is not None})
    for source in dict.fromkeys(sources):
        cells.extend(Cell(f"{source}-k{k}", "trimmed", source, k) for k in trimmed)
    return cells


def check_config(cfg: SweepConfig) -> None:
    """Refuse, in one line, flags that can never work (before any model is loaded)."""
    for name in ("max_new_tokens", "calib_max_new_tokens", "gamma", "batch_size", "workers"):
        value = getattr(cfg, name)
        if value is None or int(value) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if cfg.drafter is None and cfg.drafter_layers is None:
        raise UserError("no drafter: pass --drafter MODEL, or --drafter-layers N (drafter = first N target layers)")
    if not cfg.k:
        raise UserError("--k is empty: pass e.g. 1024,4096,full")
    if any(k is not None and (not isinstance(k, int) or k < 1) for k in cfg.k):
        raise UserError(f"--k takes positive integers and 'full', got {cfg.k}")
    if any(k is not None for k in cfg.k) and not cfg.sources:
        raise UserError("--sources is empty: trimmed heads need a calibration source (corpus, drafter, target)")
    for s in cfg.sources:
        if s not in SOURCES:
            raise UserError(f"--sources takes {', '.join(SOURCES)}; got {s!r}")
    for t in (cfg.temperature, cfg.calibration_temperature):
        if not t >= 0:
            raise UserError(f"temperatures must be >= 0, got {t}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {cfg.out} is a file: pass a folder")


# ---------------------------------------------------------------------------------------------
# Model sizes (for c and MBSU)
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelSizes:
    """Parameter counts of the pair. ``drafter_body``: the drafter without its LM head (with tied
    embeddings the shared matrix counts once, as the head); ``hidden``: the head's row width."""

    target: int
    drafter_body: int
    hidden: int
    head_bias: bool
    vocab_size: int

    def drafter(self, head_rows: int) -> int:
        return drafter_params(self.drafter_body, head_rows, self.hidden, self.head_bias)

    def ratio(self, head_rows: int) -> float:
        return param_ratio(self.drafter_body, head_rows, self.hidden, self.target, self.head_bias)


def measure_sizes(cfg: SweepConfig) -> ModelSizes:
    """Load the pair once on the CPU (checking it: one line if the tokenizers or widths differ) and count."""
    from vocabtrim.models import load_pair, logits_width, num_parameters

    pair = load_pair(
        cfg.target, cfg.drafter, cfg.drafter_layers, dtype=cfg.dtype, device="cpu", trust_remote_code=cfg.trust_remote_code
    )
    head = pair.drafter.get_output_embeddings()
    return ModelSizes(
        target=num_parameters(pair.target),
        drafter_body=num_parameters(pair.drafter, exclude_head=True),
        hidden=int(head.weight.shape[1]),
        head_bias=getattr(head, "bias", None) is not None,
        vocab_size=logits_width(pair.drafter),
    )


# ---------------------------------------------------------------------------------------------
# The sweep folder: settings, runs
# ---------------------------------------------------------------------------------------------


def _path_key(name: str | None):
    if name is None:
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def settings_of(cfg: SweepConfig) -> dict:
    """What every cell of a sweep folder must share. K values and sources may change between runs
    (new cells are added); batching is a setting because the timings depend on it."""
    return {
        "version": 1,
        "target": _path_key(cfg.target),
        "drafter": _path_key(cfg.drafter_name),
        "drafter_layers": cfg.drafter_layers,
        "corpus": [_path_key(p) for p in cfg.corpus],
        "text_column": cfg.text_column,
        "prompts": [_path_key(p) for p in cfg.prompts],
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


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def claim_out(out: Path, settings: dict) -> int:
    """Create the sweep folder (or check its settings) and record a new run; returns the run number."""
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except ValueError as exc:
            raise UserError(f"{path} is unreadable ({exc}): use a new --out") from exc
        old = recorded.get("settings", {})
        diffs = [f"{k} {old.get(k)!r} now {settings.get(k)!r}" for k in settings if old.get(k) != settings.get(k)]
        if diffs:
            raise UserError(
                f"{out} holds a sweep with other settings ({'; '.join(diffs[:2])}{'; …' if len(diffs) > 2 else ''}): "
                "rerun with the same settings to resume, or use a new --out"
            )
        runs = recorded.get("runs", [])
    else:
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"--out {out} is not empty and holds no {SETTINGS_FILE}: use a new or empty folder")
        runs = []
    run = len(runs) + 1
    _write_json(path, {"settings": settings, "runs": runs + [{"run": run, "started": _now()}]})
    return run


# ---------------------------------------------------------------------------------------------
# Stages, each skipped when its output exists
# ---------------------------------------------------------------------------------------------


def calib_dir(out: Path, source: str) -> Path:
    return out / "calib" / source


def head_dir(out: Path, cell: Cell) -> Path:
    return out / "heads" / cell.name


def gen_dir(out: Path, cell: Cell) -> Path:
    return out / "gen" / cell.name


def ensure_calibration(cfg: SweepConfig, out: Path, source: str) -> dict:
    """The calibration manifest of ``source``, calibrating first unless it is done."""
    from vocabtrim import calibrate

    folder = calib_dir(out, source)
    if (folder / "manifest.json").is_file():
        return calibrate.read_manifest(folder)
    return calibrate.run_calibrate(
        calibrate.CalibrateConfig(
            drafter=cfg.drafter_name,
            drafter_layers=cfg.drafter_layers,
            corpus=list(cfg.corpus),
            out=str(folder),
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


def ensure_head(cfg: SweepConfig, out: Path, cell: Cell) -> dict:
    """The head manifest of a trimmed cell, building the head first unless it is done."""
    from vocabtrim import head

    folder = head_dir(out, cell)
    if (folder / "manifest.json").is_file():
        return head.read_head_manifest(folder)
    return head.build_head(
        head.BuildHeadConfig(
            histogram=str(calib_dir(out, cell.source)),
            drafter=cfg.drafter_name,
            drafter_layers=cfg.drafter_layers,
            top_k=cell.k,
            out=str(folder),
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
    )


def ensure_generation(cfg: SweepConfig, out: Path, cell: Cell, run: int) -> tuple[dict, int | None]:
    """(generate summary, sweep run that measured it), generating first unless the cell is done."""
    from vocabtrim import generate

    folder = gen_dir(out, cell)
    summary_path = folder / generate.SUMMARY_FILE
    if summary_path.is_file():
        measured = json.loads((folder / CELL_FILE).read_text()).get("run") if (folder / CELL_FILE).is_file() else None
        return json.loads(summary_path.read_text()), measured
    summary = generate.run_generate(
        generate.GenerateConfig(
            target=cfg.target,
            prompts=list(cfg.prompts),
            out=str(folder),
            drafter=cfg.drafter,
            drafter_layers=cfg.drafter_layers,
            head=str(head_dir(out, cell)) if cell.kind == "trimmed" else None,
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
    _write_json(folder / CELL_FILE, {"run": run, "measured_at": _now()})
    return summary, run


# ---------------------------------------------------------------------------------------------
# One cell → one row
# ---------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, UserError) else (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def empty_row(cell: Cell) -> dict:
    row = {name: None for name in RESULT_SCHEMA.names}
    row.update(cell=cell.name, kind=cell.kind, source=cell.source, k=cell.k)
    return row


def metrics_row(cell: Cell, summary: dict, sizes: ModelSizes, gamma: int) -> dict:
    """A cell's row from its generate summary (speedup and eval coverage are filled in later)."""
    row = empty_row(cell)
    head_rows = {"target": 0, "full": sizes.vocab_size}.get(cell.kind, cell.k)
    g = 0 if cell.kind == "target" else gamma
    c = 0.0 if cell.kind == "target" else sizes.ratio(head_rows)
    tau = summary.get("tokens_per_target_pass")
    row.update(
        k=sizes.vocab_size if cell.kind == "full" else cell.k,
        acceptance_rate=summary.get("acceptance_rate"),
        tokens_per_target_pass=tau,
        per_position_acceptance=summary.get("per_position_acceptance") if g else [],
        accepted_length_histogram=summary.get("accepted_length_histogram") if g else [],
        drafter_step_ms=summary.get("drafter_step_ms"),
        target_pass_ms=summary.get("target_pass_ms"),
        drafter_step_per_target_pass=_ratio(summary.get("drafter_step_ms"), summary.get("target_pass_ms")),
        tokens_per_second=summary.get("tokens_per_engine_second"),
        gamma=g,
        drafter_params=sizes.drafter(head_rows) if cell.kind != "target" else None,
        target_params=sizes.target,
        param_ratio=c,
        mbsu=mbsu(tau, c, g),
        rows=summary.get("rows"),
        errored_rows=summary.get("errored_rows"),
        generated_tokens=summary.get("generated_tokens"),
        engine_seconds=summary.get("engine_seconds"),
        status="ok",
    )
    if cell.kind == "full":
        row["head_coverage"] = 1.0
        row["eval_coverage"] = 1.0
    return row


def _ratio(a, b):
    return a / b if a is not None and b else None


def run_cell(cfg: SweepConfig, out: Path, cell: Cell, sizes: ModelSizes, run: int, calibrations: dict) -> dict:
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
        summary, measured = ensure_generation(cfg, out, cell, run)
    except Exception as exc:
        if not isinstance(exc, UserError):
            log.warning("cell %s failed in %s", cell.name, stage, exc_info=exc)
        row = empty_row(cell)
        row.update(status="failed", error=f"{stage}: {_first_line(exc)}", gamma=0 if cell.kind == "target" else cfg.gamma)
        return row
    row = metrics_row(cell, summary, sizes, cfg.gamma)
    row["measured_in_run"] = measured
    if head is not None:
        row["head_coverage"] = head.get("coverage")
        row["k"] = head.get("k", cell.k)
    if calibration is not None:
        row["calibration_tokens"] = calibration.get("total_tokens")
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup = tokens/s ÷ the target alone's tokens/s (None when either is missing)."""
    base = next((r["tokens_per_second"] for r in rows if r["kind"] == "target" and r["status"] == "ok"), None)
    for r in rows:
        tps = r["tokens_per_second"]
        r["speedup"] = tps / base if tps and base else None


def add_eval_coverage(cfg: SweepConfig, out: Path, rows: list[dict]) -> None:
    """For trimmed cells: the share of the target alone's evaluation tokens (completions re-encoded
    with the tokenizer) that the head's kept ids cover. Needs the target cell."""
    import numpy as np
    from safetensors import safe_open

    from vocabtrim.models import load_tokenizer

    target_out = gen_dir(out, Cell("target", "target"))
    trimmed = [r for r in rows if r["kind"] == "trimmed" and r["status"] == "ok"]
    if not trimmed or not (target_out / "summary.json").is_file():
        return
    tokenizer = load_tokenizer(cfg.target, cfg.trust_remote_code)
    texts = [t for f in sorted(target_out.rglob("*.parquet")) for t in pq.read_table(f, columns=["completion"]).column(0).to_pylist() if t]
    ids = np.concatenate([np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=np.int64) for t in texts] or [np.zeros(0, np.int64)])
    if ids.size == 0:
        return
    for r in trimmed:
        with safe_open(str(head_dir(out, Cell(r["cell"], "trimmed")) / "head.safetensors"), framework="np") as f:
            kept = f.get_tensor("token_ids")
        r["eval_coverage"] = float(np.isin(ids, kept).mean())


def write_results(rows: list[dict], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


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
    """Run (or resume) the whole sweep into ``cfg.out``; returns rows, counts and the written paths."""
    with _no_weight_loading_bars():
        return _run_sweep(cfg, echo or _echo_for(cfg))


def _run_sweep(cfg: SweepConfig, echo: Callable[[str], None]) -> dict:
    wall = time.perf_counter()
    check_config(cfg)
    sizes = measure_sizes(cfg)
    too_big = [k for k in cfg.k if k is not None and k > sizes.vocab_size]
    if too_big:
        raise UserError(f"--k {too_big[0]} exceeds the drafter's vocabulary of {sizes.vocab_size}: use 'full' for the whole head")
    out = Path(cfg.out)
    run = claim_out(out, settings_of(cfg))
    rows, calibrations = run_cells(cfg, out, sizes, run, echo)
    add_eval_coverage(cfg, out, rows)
    write_results(rows, out / RESULTS_FILE)
    paths = write_report(rows, report_context(cfg, out, sizes, calibrations), out)
    return {
        "rows": rows,
        "cells": len(rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "run": run,
        "wall_seconds": time.perf_counter() - wall,
        "results": str(out / RESULTS_FILE),
        **{k: str(v) for k, v in paths.items()},
    }


def run_cells(cfg: SweepConfig, out: Path, sizes: ModelSizes, run: int, echo) -> tuple[list[dict], dict]:
    """Every cell in turn (``plan_cells``); results.parquet is rewritten after each, so a long sweep
    shows its progress. Returns the rows and the calibration manifests (or errors) by source."""
    cells = plan_cells(cfg.k, cfg.sources)
    calibrations: dict = {}
    rows: list[dict] = []
    for i, cell in enumerate(cells, 1):
        t = time.perf_counter()
        done = (gen_dir(out, cell) / "summary.json").is_file()
        echo(f"[{i}/{len(cells)}] {cell.name}: {'done already' if done else 'running'}")
        row = run_cell(cfg, out, cell, sizes, run, calibrations)
        rows.append(row)
        if row["status"] == "failed":
            echo(f"[{i}/{len(cells)}] {cell.name} FAILED: {row['error']}")
        elif not done:
            echo(f"[{i}/{len(cells)}] {cell.name}: acceptance {_fmt(row['acceptance_rate'])}, {time.perf_counter() - t:.0f} s")
        add_speedups(rows)
        write_results(rows, out / RESULTS_FILE)
    return rows, calibrations


def report_context(cfg: SweepConfig, out: Path, sizes: ModelSizes, calibrations: dict) -> "ReportContext":
    histograms = {s: calib_dir(out, s) / "histogram.parquet" for s in cfg.sources}
    return ReportContext(
        settings=settings_of(cfg),
        sizes=asdict(sizes),
        calibrations={s: m for s, m in calibrations.items() if isinstance(m, dict)},
        histograms={s: p for s, p in histograms.items() if p.is_file()},
        runs=json.loads((out / SETTINGS_FILE).read_text())["runs"],
    )


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


# ---------------------------------------------------------------------------------------------
# Report: plots (matplotlib, Agg) and Markdown
# ---------------------------------------------------------------------------------------------

TIMED_METRICS = ("speedup", "tokens_per_second", "drafter_step_ms")
SOURCE_COLORS = {"corpus": "tab:blue", "drafter": "tab:orange", "target": "tab:green"}
SOURCE_LABELS = {"corpus": "raw corpus tokens", "drafter": "drafter-generated", "target": "target-generated"}


@dataclass
class ReportContext:
    """What the report says about the setup besides the rows."""

    settings: dict
    sizes: dict  # ModelSizes as a dict
    calibrations: dict  # source -> calibration manifest
    histograms: dict  # source -> histogram.parquet path
    runs: list  # [{"run", "started"}] of the sweep folder


def _ok(rows: list[dict], kind: str | None = None) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and (kind is None or r["kind"] == kind)]


def _series(rows: list[dict], source: str, metric: str) -> tuple[list[int], list[float]]:
    """(K values, metric values) of a source's trimmed cells, K ascending, missing values left out."""
    pts = sorted((r["k"], r[metric]) for r in _ok(rows, "trimmed") if r["source"] == source and r[metric] is not None)
    return [k for k, _ in pts], [v for _, v in pts]


def _sources(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["source"] for r in rows if r["kind"] == "trimmed"))


def _k_label(k: int, vocab: int) -> str:
    """Tick label: "full" for the whole head, 1K = 1,024 (the paper's 16K, 32K), else the number."""
    if k == vocab:
        return f"full\n{k:,}"
    return f"{k // 1024}K" if k >= 1024 and k % 1024 == 0 else f"{k:,}"


def _k_axis(ax, ks: list[int], vocab: int) -> None:
    ticks = sorted(set(ks) | {vocab})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([_k_label(k, vocab) for k in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlim(min(ticks) / 1.3, max(ticks) * 1.3)
    ax.set_xlabel("K: rows kept in the drafter's LM head (log scale)")
    ax.grid(True, alpha=0.3)


def _new_figure(panels: int, width: float = 5.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, 4.2), dpi=90)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def plot_metric_vs_k(rows: list[dict], panels: list[tuple[str, str]], vocab: int, path: Path, title: str) -> Path:
    """One panel per (metric, y label): a line per calibration source over K, the full head as a black
    dashed line (and a point at K = vocabulary), the target alone as a grey dotted line where it has a value."""
    fig, axes = _new_figure(len(panels))
    ks = sorted({r["k"] for r in _ok(rows, "trimmed")})
    full = next(iter(_ok(rows, "full")), None)
    target = next(iter(_ok(rows, "target")), None)
    for ax, (metric, label) in zip(axes, panels):
        for source in _sources(rows):
            x, y = _series(rows, source, metric)
            if x:
                ax.plot(x, y, "o-", color=SOURCE_COLORS.get(source), label=SOURCE_LABELS.get(source, source))
        if full is not None and full[metric] is not None:
            ax.axhline(full[metric], color="black", ls="--", lw=1, label=f"full head (K = {vocab:,})")
            ax.plot([vocab], [full[metric]], "s", color="black")
        if target is not None and target[metric] is not None:
            ax.axhline(target[metric], color="grey", ls=":", lw=1.2, label="target alone")
        if metric in TIMED_METRICS:
            _mark_outliers(ax, rows, metric, vocab)
        _k_axis(ax, ks, vocab)
        ax.set_ylabel(label)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _mark_outliers(ax, rows: list[dict], metric: str, vocab: int) -> None:
    """Cross out the points of cells timed under another machine load (``load_outliers``)."""
    outliers = load_outliers(rows)
    points = [(vocab if r["kind"] == "full" else r["k"], r[metric]) for r in rows if r["cell"] in outliers and r[metric] is not None]
    if points:
        ax.plot(*zip(*points), "x", color="red", ms=11, mew=2, label="timed under another load (not comparable)")


def plot_coverage_curves(histograms: dict, rows: list[dict], vocab: int, path: Path) -> Path:
    """Left: coverage of each source's calibration histogram by its top-K ids (the swept Ks dotted).
    Right: the eval coverage of each trimmed head (share of the target's evaluation tokens it keeps)."""
    from vocabtrim import histogram

    ks = sorted({r["k"] for r in rows if r["kind"] == "trimmed"})
    fig, (ax, ax_eval) = _new_figure(2, width=6.0)
    for source, hist_path in histograms.items():
        counts = histogram.load(str(hist_path), vocab)
        curve = histogram.coverage_curve(counts)
        total = int(counts.sum())
        ax.plot(range(1, curve.shape[0] + 1), curve, color=SOURCE_COLORS.get(source), lw=1.6,
                label=f"{SOURCE_LABELS.get(source, source)} ({total:,} tokens, {int((counts > 0).sum()):,} distinct)")
    for k in ks:
        ax.axvline(k, color="grey", ls=":", lw=0.8)
    _k_axis(ax, ks, vocab)
    low = [t for t in (1, 4, 16, 64, 256) if not ks or t <= min(ks) / 4]
    ticks = low + sorted(set(ks) | {vocab})
    ax.set_xticks(ticks)
    ax.set_xticklabels([_k_label(k, vocab) for k in ticks], fontsize=8)
    ax.set_xlim(1, vocab * 1.3)
    ax.set_ylim(0, 1.01)
    ax.set_ylabel("share of calibration tokens in the top K")
    ax.set_title("Calibration coverage per source (dotted: swept K)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    for source in _sources(rows):
        x, y = _series(rows, source, "eval_coverage")
        if x:
            ax_eval.plot(x, y, "o-", color=SOURCE_COLORS.get(source), label=SOURCE_LABELS.get(source, source))
    _k_axis(ax_eval, ks, vocab)
    ax_eval.axhline(1.0, color="black", ls="--", lw=1, label=f"full head (K = {vocab:,})")
    ax_eval.set_ylabel("share of the target's evaluation tokens kept")
    ax_eval.set_title("Eval coverage: what the trimmed drafter can propose", fontsize=10)
    ax_eval.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def pivot_table(rows: list[dict], metric: str, spec: str, vocab: int) -> str:
    """K down, calibration source across; the full head (one cell) repeated in its row."""
    sources = _sources(rows)
    full = next(iter(_ok(rows, "full")), None)
    by = {(r["source"], r["k"]): r for r in rows if r["kind"] == "trimmed"}
    body = []
    for k in sorted({r["k"] for r in rows if r["kind"] == "trimmed"}):
        cells = []
        for s in sources:
            r = by.get((s, k))
            cells.append("failed" if r is not None and r["status"] == "failed" else _fmt(r[metric] if r else None, spec))
        body.append([f"{k:,}"] + cells)
    if full is not None:
        body.append([f"full ({vocab:,})"] + [_fmt(full[metric], spec)] * len(sources))
    return _md_table(["K"] + [SOURCE_LABELS.get(s, s) for s in sources], body)


def findings(rows: list[dict], vocab: int) -> list[str]:
    """Sentences computed from the rows: the source ranking per K, the knee, the best K by MBSU and speedup."""
    full = next(iter(_ok(rows, "full")), None)
    outliers = load_outliers(rows)
    lines = _ranking_lines(rows)
    if full is not None:
        lines.append(f"Full head: acceptance {_fmt(full['acceptance_rate'], '.4f')}, τ {_fmt(full['tokens_per_target_pass'], '.3f')}, "
                     f"MBSU {_fmt(full['mbsu'], '.3f')}, measured speedup {_fmt(full['speedup'], '.3f')}×.")
    for source in _sources(rows):
        parts = _source_findings(rows, source, full, outliers)
        if parts:
            lines.append(f"{SOURCE_LABELS.get(source, source)}: " + "; ".join(parts) + ".")
    if outliers:
        lines.append(_outlier_sentence(outliers))
    return lines


def _ranking_lines(rows: list[dict]) -> list[str]:
    """At each K, the sources by acceptance rate; then how often each was highest alone."""
    sources = _sources(rows)
    ks = sorted({r["k"] for r in _ok(rows, "trimmed")})
    by = {(r["source"], r["k"]): r["acceptance_rate"] for r in _ok(rows, "trimmed") if r["acceptance_rate"] is not None}
    lines, wins = [], {s: 0 for s in sources}
    for k in ks:
        ranked = sorted(((by[(s, k)], s) for s in sources if (s, k) in by), key=lambda pair: -pair[0])
        if len(ranked) < 2:
            continue
        if ranked[0][0] > ranked[1][0]:
            wins[ranked[0][1]] += 1
        text = f"{ranked[0][1]} {ranked[0][0]:.4f}"
        for (previous, _), (a, s) in zip(ranked, ranked[1:]):
            text += f" {'>' if previous > a else '='} {s} {a:.4f}"
        lines.append(f"K = {k:,}: acceptance {text}.")
    if len(sources) > 1 and ks:
        lines.append("Highest acceptance alone (ties not counted): " + ", ".join(f"{s} at {n} of {len(ks)} K values" for s, n in wins.items()) + ".")
    return lines


def _source_findings(rows: list[dict], source: str, full: dict | None, outliers: dict) -> list[str]:
    """The knee, and the best K by MBSU and by measured speedup (cells timed under another load left out)."""
    parts = []
    x, acc = _series(rows, source, "acceptance_rate")
    if full is not None and x:
        knee = knee_k(x, acc, full["acceptance_rate"])
        parts.append(f"knee (smallest K with ≥ {KNEE_SHARE:.0%} of the full head's acceptance) " + (f"K = {knee:,}" if knee else "not reached"))
    cells = {r["k"]: r["cell"] for r in _ok(rows, "trimmed") if r["source"] == source}
    for metric, name in (("mbsu", "MBSU"), ("speedup", "measured speedup")):
        timed = metric == "speedup"
        points = [(k, v) for k, v in zip(*_series(rows, source, metric)) if not (timed and cells[k] in outliers)]
        if not points:
            continue
        k_best, best = max(points, key=lambda p: p[1])
        comparable = full is not None and full[metric] and not (timed and full["cell"] in outliers)
        gain = f" ({best / full[metric] - 1:+.1%} on the full head)" if comparable else ""
        left_out = " (cells timed under another load left out)" if timed and any(c in outliers for c in cells.values()) else ""
        parts.append(f"best {name} {best:.3f} at K = {k_best:,}{gain}{left_out}")
    return parts


def _outlier_sentence(outliers: dict) -> str:
    median = next(iter(outliers.values()))[1]
    listed = ", ".join(f"`{c}` {ms:.0f} ms" for c, (ms, _) in outliers.items())
    return (f"Timed under another machine load (target pass more than {LOAD_TOLERANCE:.0%} off the median "
            f"{median:.0f} ms of the drafted cells): {listed}. Their tokens/s and speedup do not compare with the "
            "other cells'; rerun them (delete `gen/<cell>/`) on a quiet machine. MBSU and acceptance are unaffected.")


def _setup_lines(rows: list[dict], ctx: ReportContext) -> list[str]:
    st, sz = ctx.settings, ctx.sizes
    target = next(iter(_ok(rows, "target")), None)
    drafter = Path(st["drafter"]).name if st["drafter"] else st["drafter"]
    layers = f", first {st['drafter_layers']} layers" if st["drafter_layers"] else ""
    lines = [
        f"- Target: `{Path(st['target']).name}` ({sz['target']:,} parameters); drafter: `{drafter}`{layers} "
        f"({sz['drafter_body']:,} parameters without its LM head; head {sz['vocab_size']:,} × {sz['hidden']} = "
        f"{sz['vocab_size'] * sz['hidden']:,}).",
        f"- Evaluation: {', '.join(Path(p).name for p in st['prompts'])} (column `{st['prompt_column']}`"
        + (f", {target['rows']} rows" if target else "") + f"), {st['max_new_tokens']} new tokens per row, "
        f"temperature {st['temperature']:g}, γ = {st['gamma']} draft tokens per step, batch size {st['batch_size']}, "
        f"{st['workers']} worker(s).",
        f"- Calibration corpus: {', '.join(Path(p).name for p in st['corpus'])} (column `{st['text_column']}`); generated "
        f"sources: {st['calib_max_new_tokens']} new tokens per row at temperature {st['calib_temperature']:g}.",
    ]
    for source, m in ctx.calibrations.items():
        lines.append(f"  - {SOURCE_LABELS.get(source, source)}: {m.get('total_tokens', 0):,} tokens, "
                     f"{m.get('distinct_tokens', 0):,} distinct ids, from {m.get('rows', 0):,} rows.")
    return lines


def _timing_note(rows: list[dict], ctx: ReportContext) -> str:
    measured = sorted({r["measured_in_run"] for r in _ok(rows) if r["measured_in_run"] is not None})
    runs = {r["run"]: r["started"] for r in ctx.runs}
    note = ("Timings: tokens/s is decoding throughput inside the engine (model loading and Ray start excluded). "
            "Absolute times drift between runs and machines; the ratios (speedup against the target alone) are what compare")
    if len(measured) == 1:
        note += f", and every cell here was measured side by side in run {measured[0]} of this folder (started {runs.get(measured[0])})."
    else:
        note += (f". Cells here were measured in runs {', '.join(map(str, measured))} of this folder: "
                 "speedups compare reliably only between cells of the same run (column `measured_in_run` of results.parquet).")
    outliers = load_outliers(rows)
    return note + (" " + _outlier_sentence(outliers) if outliers else "")


def _cells_table(rows: list[dict]) -> str:
    header = ["cell", "K", "head coverage", "eval coverage", "acceptance", "τ", "per-position acceptance",
              "drafter step ms", "target pass ms", "tokens/s", "speedup", "c", "MBSU", "run"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            continue
        ppa = ", ".join(_fmt(v, ".3f") for v in (r["per_position_acceptance"] or [])) or "-"
        body.append([
            r["cell"], "-" if r["k"] is None else f"{r['k']:,}", _fmt(r["head_coverage"], ".4f"), _fmt(r["eval_coverage"], ".4f"),
            _fmt(r["acceptance_rate"], ".4f"), _fmt(r["tokens_per_target_pass"], ".3f"), ppa, _fmt(r["drafter_step_ms"], ".2f"),
            _fmt(r["target_pass_ms"], ".1f"), _fmt(r["tokens_per_second"], ".1f"), _fmt(r["speedup"], ".3f"),
            _fmt(r["param_ratio"], ".4f"), _fmt(r["mbsu"], ".3f"), _fmt(r["measured_in_run"], "d"),
        ])
    return _md_table(header, body)


def report_markdown(rows: list[dict], ctx: ReportContext, plots: dict) -> str:
    vocab = ctx.sizes["vocab_size"]
    failed = [r for r in rows if r["status"] == "failed"]
    parts = [
        "# VocabTrim study: K sweep and calibration-source ablation",
        "",
        "Written by `vocabtrim sweep`. Every number below is in `results.parquet` (one row per cell).",
        "",
        "## Setup",
        *_setup_lines(rows, ctx),
        "",
        "## Findings (computed from the table)",
        *(f"- {line}" for line in findings(rows, vocab)),
        "",
        "## Acceptance rate",
        "Accepted drafts ÷ proposed drafts.",
        "",
        pivot_table(rows, "acceptance_rate", ".4f", vocab),
        "",
        "## Block efficiency τ (tokens per target pass)",
        pivot_table(rows, "tokens_per_target_pass", ".3f", vocab),
        "",
    ]
    if "acceptance" in plots:
        parts += [f"![acceptance against K]({plots['acceptance'].name})", ""]
    parts += [
        "## MBSU (memory-bound speed-up)",
        "MBSU = τ / (c·γ + 1), c = drafter parameters (body + K × hidden head rows) ÷ target parameters "
        "(VocabTrim, arXiv 2506.22694): the speed-up if every forward pass cost time in proportion to the weights it reads.",
        "",
        pivot_table(rows, "mbsu", ".3f", vocab),
        "",
        "## Measured speedup against the target alone",
        _timing_note(rows, ctx),
        "",
        pivot_table(rows, "speedup", ".3f", vocab),
        "",
        "Drafter step (one batched drafter forward, head included), ms:",
        "",
        pivot_table(rows, "drafter_step_ms", ".2f", vocab),
        "",
        "Drafter step ÷ target pass, both timed in the same cell (interleaved, so under the same load: "
        "this ratio drifts less between cells than tokens/s does):",
        "",
        pivot_table(rows, "drafter_step_per_target_pass", ".3f", vocab),
        "",
    ]
    if "speedup" in plots:
        parts += [f"![speedup and MBSU against K]({plots['speedup'].name})", ""]
    parts += [
        "## Coverage",
        "Head coverage: share of the source's own calibration tokens on the kept ids. Eval coverage: share of the "
        "target alone's evaluation completions (re-encoded) on the kept ids — what the trimmed drafter could propose. "
        "A K above the number of distinct ids a source saw also keeps ids never seen in calibration (build-head fills "
        "those smallest id first).",
        "",
        pivot_table(rows, "eval_coverage", ".4f", vocab),
        "",
    ]
    if "coverage" in plots:
        parts += [f"![coverage curves]({plots['coverage'].name})", ""]
    parts += ["## All cells", _cells_table(rows), ""]
    if failed:
        parts += ["## Failed cells", *(f"- `{r['cell']}`: {r['error']}" for r in failed), ""]
    return "\n".join(parts)


def write_report(rows: list[dict], ctx: ReportContext, out: Path) -> dict[str, Path]:
    """Write the plots and ``report.md`` under ``out``; returns their paths by name."""
    vocab = ctx.sizes["vocab_size"]
    plots = {}
    if _ok(rows, "trimmed") or _ok(rows, "full"):
        plots["acceptance"] = plot_metric_vs_k(
            rows,
            [("acceptance_rate", "acceptance rate (accepted ÷ proposed drafts)"),
             ("tokens_per_target_pass", "block efficiency τ (tokens per target pass)")],
            vocab, out / PLOTS["acceptance"], "Acceptance against K, one line per calibration source",
        )
        plots["speedup"] = plot_metric_vs_k(
            rows,
            [("speedup", "measured speedup over the target alone (×)"), ("mbsu", "MBSU = τ / (c·γ + 1) (×)")],
            vocab, out / PLOTS["speedup"], "Speedup against K: measured tokens/s ratio and memory-bound model",
        )
    if ctx.histograms:
        plots["coverage"] = plot_coverage_curves(ctx.histograms, rows, vocab, out / PLOTS["coverage"])
    report = out / REPORT_FILE
    tmp = report.with_name(f".{report.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(report_markdown(rows, ctx, plots) + "\n")
    os.replace(tmp, report)
    return {"report": report, **plots}
