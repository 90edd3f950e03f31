"""Sweep cells and their metrics: the configuration, the plan of cells, the parameter counts, and one
result row per cell (pure apart from ``measure_sizes``, which loads the pair once).

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from vocabtrim import storage, validate
from vocabtrim.errors import UserError

SOURCES = ("corpus", "drafter", "target")
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
    k: list | None = None  # kept rows per trimmed head, None in it: the full head; None: default_k's
    sources: list[str] = field(default_factory=lambda: list(SOURCES))
    text_column: str = "text"
    prompt_column: str = "prompt"
    id_column: str = "id"
    calib_max_new_tokens: int = 64
    calib_temperature: float | None = None  # None: --temperature
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    gamma: int | str = 4  # a number; "auto" only where nothing reads the sweep's metrics (the demo preset)
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
    def eagle3(self) -> bool:
        """Whether the drafter is an EAGLE-3 checkpoint (its trimmed and full cells are EAGLE-3 folders)."""
        from vocabtrim.models import is_eagle3

        return is_eagle3(self.drafter)

    @property
    def calibration_temperature(self) -> float:
        return self.temperature if self.calib_temperature is None else self.calib_temperature


@dataclass(frozen=True)
class Cell:
    """One generate run. kind: target | full | trimmed (source and k for trimmed heads) | own (the drafter as
    given, with its own vocabulary: the demo's EAGLE-3 cell)."""

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
    from vocabtrim.models import check_runs_alone

    validate.pool(cfg.workers, cfg.gpus_per_worker, cfg.cpus_per_worker)
    for name in ("max_new_tokens", "calib_max_new_tokens", "batch_size"):
        validate.at_least(name, getattr(cfg, name), 1)
    validate.between("gamma", cfg.gamma, 1, validate.MAX_GAMMA)
    validate.drafter_layers(cfg.drafter_layers)
    check_runs_alone("target", cfg.target)
    validate.temperature(cfg.temperature)
    if cfg.calib_temperature is not None:
        validate.temperature(cfg.calib_temperature, "calib_temperature")
    if cfg.drafter is None and cfg.drafter_layers is None:
        raise UserError("no drafter: pass --drafter MODEL, or --drafter-layers N (drafter = first N target layers)")
    if cfg.eagle3 and "drafter" in cfg.sources:
        raise UserError("--sources drafter does not apply to an EAGLE-3 drafter (it drafts from the target's hidden states and "
                        "cannot generate alone): pass --sources corpus,target")
    if cfg.eagle3 and not storage.is_local(cfg.out):
        raise UserError("a sweep of an EAGLE-3 drafter writes its re-trimmed drafters as local folders: pass a local --out")
    if cfg.k is not None and not cfg.k:
        raise UserError("--k is empty: pass e.g. 1024,4096,full")
    if any(k is not None and (not isinstance(k, int) or k < 1) for k in cfg.k or ()):
        raise UserError(f"--k takes positive integers and 'full', got {cfg.k}")
    if (cfg.k is None or any(k is not None for k in cfg.k)) and not cfg.sources:
        raise UserError("--sources is empty: trimmed heads need a calibration source (corpus, drafter, target)")
    for s in cfg.sources:
        if s not in SOURCES:
            raise UserError(f"--sources takes {', '.join(SOURCES)}; got {s!r}")
    if storage.is_file(cfg.out):
        raise UserError(f"--out {storage.display(cfg.out)} is a file: pass a folder")
    for flag, inputs, what in (("--prompts", cfg.prompts, "outputs as prompts"), ("--corpus", cfg.corpus, "files as corpus")):
        folder = storage.input_folder_holding(cfg.out, inputs)
        if folder is not None:
            raise UserError(f"--out {storage.display(cfg.out)} is inside the {flag} folder {storage.display(folder)}: a rerun would read "
                            f"its {what}; use an --out outside it")
    check_inputs(cfg)
    from vocabtrim.prompts import check_room

    # Every cell's generation (and calibration, which generates without drafting) would fail on its own rows.
    check_room(cfg.target, cfg.max_new_tokens, cfg.gamma, cfg.gamma, cfg.trust_remote_code)
    for source in sorted(set(cfg.sources) - {"corpus"}):
        model = cfg.drafter if source == "drafter" and cfg.drafter else cfg.target
        check_room(model, cfg.calib_max_new_tokens, 0, 0, cfg.trust_remote_code, whose=f"{model}'s", flag="--calib-max-new-tokens")


def check_inputs(cfg: SweepConfig) -> None:
    """Refuse, in one line, prompts and a corpus that every cell would fail on: files missing or
    unreadable, columns absent (the files' footers are read, not their rows)."""
    from vocabtrim import corpus
    from vocabtrim.prompts import inspect_prompt_files

    inspect_prompt_files(cfg.prompts, cfg.prompt_column, cfg.id_column)
    if cfg.k is None or any(k is not None for k in cfg.k):  # None: default K, trimmed ones among them
        corpus.make_shards(cfg.corpus, cfg.text_column)


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
    draft_vocab_size: int | None = None  # an EAGLE-3 drafter's own draft vocabulary: trimmed cells keep ids inside it
    special_tokens: int = 0  # ids every trimmed head keeps (inside the draft vocabulary for an EAGLE-3 drafter)

    def drafter(self, head_rows: int) -> int:
        return drafter_params(self.drafter_body, head_rows, self.hidden, self.head_bias)

    def ratio(self, head_rows: int) -> float:
        return param_ratio(self.drafter_body, head_rows, self.hidden, self.target, self.head_bias)


def measure_sizes(cfg: SweepConfig) -> ModelSizes:
    """Load the pair once on the CPU (checking it: one line if the tokenizers or widths differ) and count."""
    from vocabtrim.eagle3 import Eagle3Model
    from vocabtrim.models import load_pair, logits_width, num_parameters
    from vocabtrim.special_tokens import of_model, special_token_ids

    pair = load_pair(
        cfg.target, cfg.drafter, cfg.drafter_layers, dtype=cfg.dtype, device="cpu", trust_remote_code=cfg.trust_remote_code
    )
    if isinstance(pair.drafter, Eagle3Model):  # its body: one layer and fc (the embedding lookup reads one row)
        d = pair.drafter
        body = sum(p.numel() for n, p in d.named_parameters() if not n.startswith(("lm_head.", "embed_tokens.")))
        in_draft = set(d.token_ids.tolist())
        return ModelSizes(target=num_parameters(pair.target), drafter_body=body, hidden=int(d.lm_head.weight.shape[1]),
                          head_bias=False, vocab_size=logits_width(pair.target), draft_vocab_size=int(d.config.draft_vocab_size),
                          special_tokens=sum(i in in_draft for i in special_token_ids(pair.tokenizer, of_model(pair.target))))
    head = pair.drafter.get_output_embeddings()
    return ModelSizes(
        target=num_parameters(pair.target),
        drafter_body=num_parameters(pair.drafter, exclude_head=True),
        hidden=int(head.weight.shape[1]),
        head_bias=getattr(head, "bias", None) is not None,
        vocab_size=logits_width(pair.drafter),
        special_tokens=len(special_token_ids(pair.tokenizer, of_model(pair.drafter))),
    )


DEFAULT_K = (1024, 2048, 4096, 8192, 16384)


def default_k(sizes: ModelSizes) -> list:
    """The K of a sweep not given any: those of ``DEFAULT_K`` up to the drafter's vocabulary (an EAGLE-3 drafter's
    draft vocabulary: re-trimming only removes ids), then the full head (None)."""
    limit = sizes.draft_vocab_size if sizes.draft_vocab_size is not None else sizes.vocab_size
    ks = [k for k in DEFAULT_K if k <= limit]
    if not ks:
        raise UserError(f"none of the default K ({', '.join(map(str, DEFAULT_K))}) fits the drafter's "
                        f"{'draft ' if sizes.draft_vocab_size is not None else ''}vocabulary of {limit:,}: pass --k")
    return [*ks, None]


def check_k(ks, sizes: ModelSizes, flag: str = "--k") -> None:
    """Refuse, in one line before any stage runs, a K that build-head would refuse: more ids than the drafter
    has (or than an EAGLE-3 drafter's draft vocabulary), or fewer than the special tokens every head keeps."""
    ks = [k for k in ks if k is not None]
    too_big = [k for k in ks if k > sizes.vocab_size]
    if too_big:
        raise UserError(f"{flag} {too_big[0]} exceeds the drafter's vocabulary of {sizes.vocab_size}: use 'full' for the whole head")
    too_big = [k for k in ks if sizes.draft_vocab_size is not None and k > sizes.draft_vocab_size]
    if too_big:
        raise UserError(f"{flag} {too_big[0]} exceeds the EAGLE-3 drafter's draft vocabulary of {sizes.draft_vocab_size:,} (re-trimming "
                        "only removes ids): use K up to it, and 'full' for the whole vocabulary")
    too_small = [k for k in ks if k < sizes.special_tokens]
    if too_small:
        raise UserError(f"{flag} {too_small[0]} is smaller than the {sizes.special_tokens} special tokens that every trimmed head keeps")


# ---------------------------------------------------------------------------------------------
# One cell -> one row
# ---------------------------------------------------------------------------------------------


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


def add_speedups(rows: list[dict]) -> None:
    """speedup = tokens/s ÷ the target alone's tokens/s (None when either is missing)."""
    base = next((r["tokens_per_second"] for r in rows if r["kind"] == "target" and r["status"] == "ok"), None)
    for r in rows:
        tps = r["tokens_per_second"]
        r["speedup"] = tps / base if tps and base else None
