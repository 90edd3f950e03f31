"""``vocabtrim demo``: the three stages on the bundled model and the shipped prompts, ending in one table.

The demo is a preset of the sweep (``preset``): three of its cells (and, as a fourth, the shipped EAGLE-3
drafter as it is), each run by the sweep's own stages
(``vocabtrim.sweep.run``: calibrate, build the head, generate), in the sweep's folder layout
(``calib/target/``, ``heads/<cell>/``, ``gen/<cell>/``).

1. Split the shipped prompts (``vocabtrim/data/prompts.parquet``) into a calibration part and a
   disjoint evaluation part.
2. calibrate: count the tokens the *target* generates from the calibration prompts.
3. build-head: keep the top-K ids of that histogram; the trimmed head is the drafter's LM-head rows for them.
4. generate on the evaluation prompts with the same batching in three cells: target alone, drafter
   with its full head, drafter with the trimmed head; and a fourth with the shipped EAGLE-3 drafter
   (``eagle3``, its own trimmed draft vocabulary). The evaluation prompts are cut into ``rounds``
   files; each round generates one file in every cell, in an order that rotates from round to
   round, so that drift in the machine's speed hits every cell alike. Each cell's folder gains one
   output per round (``generate`` resumes: earlier files are skipped), and its summary covers them all.
   Per-round figures come from each output file's own statistics.

The drafter is the first ``drafter_layers`` layers of the 135M target (a self-speculative, untrained
drafter), so it rarely agrees with the target. With ``--gamma auto`` (the default) the engine then drafts
on few steps and runs the target alone on the rest; the table's "drafted steps" column says how many,
and a line under it says so for every drafter setting not faster than the target alone. What the table
shows besides is the trimmed head's gain over the full head: on a drafter this small the LM head is most
of each drafter step, and trimming it makes every step cheaper at (almost) the same acceptance. The
EAGLE-3 row is the trained drafter against the target alone.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from vocabtrim import storage
from vocabtrim.errors import UserError
from vocabtrim.lease import lease
from vocabtrim.models import BUNDLED_EAGLE3
from vocabtrim.sweep.cells import Cell, SweepConfig, plan_cells

PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.parquet"


@dataclass
class DemoConfig:
    """Sizes of the demo. ``quick()`` gives the CI sizes."""

    out: str | None = None  # None: a new temporary folder, deleted at the end
    model: str = "smollm2-135m"
    drafter_layers: int = 4
    eagle3: str | None = BUNDLED_EAGLE3  # an EAGLE-3 drafter of the target, shown beside the others (None: not shown)
    calibration_prompts: int = 96
    calibration_new_tokens: int = 48
    eval_prompts: int = 32
    max_new_tokens: int = 48
    top_k: int = 8192
    gamma: int | str = "auto"
    batch_size: int = 8
    temperature: float = 0.0
    rounds: int = 4  # the evaluation prompts in this many interleaved rounds (see the module docstring)
    seed: int = 0
    address: str | None = None
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        sizes = dict(calibration_prompts=16, calibration_new_tokens=16, eval_prompts=16, max_new_tokens=16, rounds=2)
        return cls(**{**sizes, **overrides})


@dataclass
class Row:
    """One line of the table (None where a measure does not apply)."""

    setting: str
    acceptance: float | None
    tokens_per_target_pass: float | None
    drafter_step_ms: float | None
    drafted: float | None  # share of target passes that verified drafts (gamma > 0)
    tokens_per_second: float | None
    speedup: float | None


DEMO_RECORD = "demo.json"  # marks a demo's working folder


def split_prompts(out: Path, calibration: int, evaluation: int, rounds: int = 1) -> tuple[Path, list[Path]]:
    """The first ``calibration`` shipped prompts as one Parquet file, and the last ``evaluation`` ones cut into
    ``rounds`` consecutive files ``eval-<r>.parquet`` (sizes differ by at most one row)."""
    table = pq.read_table(PROMPTS)
    if calibration + evaluation > table.num_rows:
        raise UserError(f"--eval-prompts {evaluation} is too many: the demo ships {table.num_rows} prompts and calibrates on "
                        f"{calibration} of them; pass at most {table.num_rows - calibration}")
    if evaluation < 1:
        raise UserError(f"--eval-prompts must be >= 1, got {evaluation}")
    if not 1 <= rounds <= evaluation:
        raise UserError(f"--rounds must be between 1 and --eval-prompts ({evaluation}), got {rounds}")
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    cal = folder / "calibration.parquet"
    pq.write_table(table.slice(0, calibration), cal)
    first = table.num_rows - evaluation
    bounds = [first + evaluation * r // rounds for r in range(rounds + 1)]
    evals = []
    for r in range(rounds):
        path = folder / f"eval-{r}.parquet"
        pq.write_table(table.slice(bounds[r], bounds[r + 1] - bounds[r]), path)
        evals.append(path)
    return cal, evals


def table_rows(summaries: dict[str, dict]) -> list[Row]:
    """Rows for the table from the ``generate`` summaries (keys: target, full, trimmed and, when shown, eagle3)."""
    base = summaries["target"]["tokens_per_engine_second"]
    labels = {"target": "target alone", "full": "drafter, full head", "trimmed": "drafter, trimmed head", "eagle3": "EAGLE-3 drafter"}
    rows = []
    for key, label in labels.items():
        if key not in summaries:
            continue
        s = summaries[key]
        tps = s["tokens_per_engine_second"]
        gammas = s.get("gamma_histogram") or []
        rows.append(
            Row(
                setting=label,
                acceptance=s["acceptance_rate"],
                tokens_per_target_pass=s["tokens_per_target_pass"],
                drafter_step_ms=s["drafter_step_ms"],
                drafted=sum(gammas[1:]) / sum(gammas) if key != "target" and sum(gammas) else None,
                tokens_per_second=tps,
                speedup=tps / base if tps and base else None,
            )
        )
    return rows


def gamma_lines(rows: list[Row], gamma) -> list[str]:
    """What gamma did: with --gamma auto, a drafter row at or below the target alone's speed says how
    little auto gamma let it draft (drafted steps = target passes that verified drafts)."""
    if str(gamma) != "auto":
        return [f"gamma fixed at {gamma} draft tokens per step."]
    lines = ["gamma auto: each step drafts 0..6 tokens, whichever the measured costs and acceptance say is fastest "
             "(0 = the target alone)."]
    for r in rows[1:]:
        if r.speedup is not None and r.speedup <= 1.0 and r.drafted is not None:
            lines.append(f"  {r.setting}: {r.speedup:.2f}x the target alone; auto gamma drafted on {r.drafted:.0%} of the "
                         f"steps (acceptance {'-' if r.acceptance is None else format(r.acceptance, '.3f')}), the target "
                         "stepping alone on the rest.")
    return lines


def format_table(rows: list[Row]) -> str:
    header = ["setting", "acceptance", "tokens/target pass", "drafter step ms", "drafted steps", "tokens/s", "speedup"]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    body = [
        [r.setting, fmt(r.acceptance, ".3f"), fmt(r.tokens_per_target_pass, ".2f"), fmt(r.drafter_step_ms, ".2f"),
         "-" if r.drafted is None else f"{r.drafted:.0%}", fmt(r.tokens_per_second, ".1f"), fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else "")]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def identical_rows(a: Path, b: Path, names: list[str]) -> tuple[int, int]:
    """(rows whose completion is the same in both output folders, rows), over the output files ``names``."""
    ta, tb = ([row for n in names for row in pq.read_table(p / n, columns=["id", "completion"]).to_pylist()] for p in (a, b))
    return sum(x == y for x, y in zip(ta, tb, strict=True)), len(ta)


def round_order(keys: list[str], r: int) -> list[str]:
    """The settings' order in round ``r``: rotated by one each round, so none always runs first."""
    shift = r % len(keys)
    return keys[shift:] + keys[:shift]


def per_round(folders: dict[str, Path], names: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per setting, per round (one output file each): engine tokens/s and drafter step ms (when it drafts)."""
    from vocabtrim.generate_outputs import read_file_stats

    figures = {}
    for key, folder in folders.items():
        stats = [read_file_stats(str(folder / n)) for n in names]
        figures[key] = {
            "tokens_per_second": [s["generated_tokens"] / s["engine_seconds"] for s in stats if s["engine_seconds"]],
            "drafter_step_ms": [1000 * s["drafter_seconds"] / s["drafter_forwards"] for s in stats if s["drafter_forwards"]],
        }
    return figures


def _span(values: list[float], spec: str) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return format(low, spec) if format(low, spec) == format(high, spec) else f"{format(low, spec)}–{format(high, spec)}"


def format_rounds(figures: dict[str, dict[str, list[float]]]) -> list[str]:
    """Lines giving each figure's range over the rounds, the trimmed/full ratio measured within each round and,
    when the EAGLE-3 drafter is shown, its ratio to the target alone within each round."""
    rounds = len(figures["target"]["tokens_per_second"])
    full, trimmed = figures["full"], figures["trimmed"]
    ratio = [t / f for t, f in zip(trimmed["tokens_per_second"], full["tokens_per_second"]) if f]
    step = [f / t for f, t in zip(full["drafter_step_ms"], trimmed["drafter_step_ms"]) if t]
    lines = [
        f"over {rounds} interleaved rounds (lowest–highest round): tokens/s target alone {_span(figures['target']['tokens_per_second'], '.1f')}, "
        f"full head {_span(full['tokens_per_second'], '.1f')}, trimmed head {_span(trimmed['tokens_per_second'], '.1f')}; "
        f"drafter step ms full {_span(full['drafter_step_ms'], '.1f')}, trimmed {_span(trimmed['drafter_step_ms'], '.1f')}",
        f"trimmed vs full head within each round: tokens/s {_span(ratio, '.2f')}x, drafter step {_span(step, '.2f')}x cheaper",
    ]
    if "eagle3" in figures:
        e, base = figures["eagle3"], figures["target"]["tokens_per_second"]
        vs = [x / b for x, b in zip(e["tokens_per_second"], base) if b]
        lines.append(f"EAGLE-3 drafter: tokens/s {_span(e['tokens_per_second'], '.1f')}, drafter step ms {_span(e['drafter_step_ms'], '.1f')}; "
                     f"against the target alone within each round {_span(vs, '.2f')}x")
    return lines


def _draft_vocab_size(eagle3: str) -> int | None:
    import json

    from vocabtrim.models import eagle3_folder

    return json.loads((Path(eagle3_folder(eagle3)) / "config.json").read_text()).get("draft_vocab_size")


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    """Run the demo; ``echo`` gets progress lines and the final table. Returns the table and the stage results.

    Without ``cfg.out`` the working folder is a new temporary folder, deleted at the end (also on failure).
    """
    out = Path(cfg.out).expanduser() if cfg.out else Path(tempfile.mkdtemp(prefix="vocabtrim-demo-"))
    try:
        with lease(str(out)):  # one run at a time in --out
            result = _run(cfg, out, echo)
    finally:
        if not cfg.out:
            shutil.rmtree(out, ignore_errors=True)
    if cfg.out:
        echo(
            f"kept in {out}: the table {out / TABLE_FILE}, the coverage plot {result['plot']}, each setting's "
            f"outputs and summary.json in {out}/gen/*/"
        )
    return result


TABLE_FILE = "table.txt"


def preset(cfg: DemoConfig, out: Path, calibration: Path, evaluation: list[Path]) -> SweepConfig:
    """The demo as a sweep: the target alone, the full head and one trimmed head (top-K of the target's own
    outputs), each cell run by the sweep's stages (``vocabtrim.sweep.run``) in ``out``."""
    return SweepConfig(
        target=cfg.model, drafter_layers=cfg.drafter_layers, corpus=[str(calibration)], text_column="prompt",
        prompts=[str(p) for p in evaluation], prompt_column="messages", id_column="id", k=[cfg.top_k, None],
        sources=["target"], calib_max_new_tokens=cfg.calibration_new_tokens, calib_temperature=1.0,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, gamma=cfg.gamma,
        batch_size=cfg.batch_size, workers=1, address=cfg.address, progress=cfg.progress, out=str(out),
    )


def check(cfg: DemoConfig, sweep: SweepConfig, eagle3: SweepConfig | None) -> None:
    """Refuse in one line, before any stage runs, what a stage would refuse later: the settings, the pair (the
    truncated drafter and the EAGLE-3 drafter, each against the target) and --top-k against the vocabulary."""
    from vocabtrim import validate
    from vocabtrim.models import check_runs_alone
    from vocabtrim.sweep.cells import check_config, check_k, measure_sizes

    check_runs_alone("model", cfg.model)  # named as the demo's flag, before the sweep's checks name --target
    validate.trim(cfg.top_k, None)
    validate.gamma(cfg.gamma)  # generate's rule: auto or a number; the sweep's own check wants a number
    check_config(dataclasses.replace(sweep, gamma=1))
    sizes = measure_sizes(sweep)
    validate.trim(cfg.top_k, None, sizes.vocab_size)
    check_k([cfg.top_k], sizes, "--top-k")
    if eagle3 is not None:
        from vocabtrim.models import is_eagle3

        if not is_eagle3(eagle3.drafter):
            if not Path(eagle3.drafter).expanduser().exists():
                raise UserError(f"--eagle3 {eagle3.drafter}: no such folder (pass an EAGLE-3 drafter's folder, {BUNDLED_EAGLE3}, "
                                "or --eagle3 none)")
            raise UserError(f"--eagle3 {eagle3.drafter} is not an EAGLE-3 drafter (a folder whose config.json names "
                            "LlamaForCausalLMEagle3, or smollm2-135m-eagle3): pass one, or --eagle3 none")
        measure_sizes(eagle3)  # the pair: another tokenizer or width


def _run(cfg: DemoConfig, out: Path, echo) -> dict:
    from vocabtrim.head.select import describe_kept, unseen_warning
    from vocabtrim.ray_utils import init_ray
    from vocabtrim.sweep.run import ensure_calibration, ensure_head, eval_coverage, gen_dir, generate_cell, head_dir

    start = time.perf_counter()
    # A folder the demo made before with the same settings is reused (finished stages are skipped: the prompts it
    # split, the calibration, the heads and the outputs depend on every setting but these three); a demo's folder
    # with other settings, and any other non-empty folder, is refused.
    # The record binds the folder once a stage has written there (a refused run leaves it free); a record of an earlier
    # version, which held no settings, is replaced, as that version replaced it.
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "address", "progress")}
    record = out / DEMO_RECORD
    try:
        legacy = json.loads(record.read_text()) == {"kind": "vocabtrim-demo"}
    except (OSError, ValueError):  # no record yet, or not one to trust: claim says so
        legacy = False
    storage.claim(str(out), DEMO_RECORD, {"kind": "vocabtrim-demo", **settings}, what="a demo",
                  binds=lambda: not legacy and any((out / stage).exists() for stage in ("calib", "heads", "gen")))
    where = f"working folder {out}" if cfg.out else "working in a temporary folder, deleted at the end (--out DIR keeps it)"
    also = f" and the EAGLE-3 drafter {cfg.eagle3}" if cfg.eagle3 else ""
    echo(f"vocabtrim demo: {cfg.model}, drafter = its first {cfg.drafter_layers} layers{also}; {where}")
    cal_prompts, eval_files = split_prompts(out, cfg.calibration_prompts, cfg.eval_prompts, cfg.rounds)
    names = [p.name for p in eval_files]
    sweep = preset(cfg, out, cal_prompts, eval_files)
    cells = {cell.kind: cell for cell in plan_cells(sweep.k, sweep.sources)}  # target, full, trimmed
    sweeps = {key: sweep for key in cells}
    if cfg.eagle3:  # the EAGLE-3 drafter as it ships: its own draft vocabulary, no --head
        cells["eagle3"] = Cell(name="eagle3", kind="own")
        sweeps["eagle3"] = dataclasses.replace(sweep, drafter=cfg.eagle3, drafter_layers=None)
    check(cfg, sweep, sweeps.get("eagle3"))
    init_ray(cfg.address)
    timings = {}

    t = time.perf_counter()
    echo(f"[1/3] calibrate: tokens the target generates from {cfg.calibration_prompts} prompts ({cfg.calibration_new_tokens} each)")
    calibration = ensure_calibration(sweep, str(out), "target")
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    echo(f"[2/3] build-head: top {cfg.top_k} of {calibration['distinct_tokens']} distinct ids seen ({calibration['total_tokens']} tokens)")
    head = ensure_head(sweep, str(out), cells["trimmed"])
    timings["build-head"] = time.perf_counter() - t

    what = {"target": "target alone", "full": "drafter with its full head", "trimmed": f"drafter with the K={head['k']} head",
            "eagle3": "the EAGLE-3 drafter"}
    summaries = {}
    t = time.perf_counter()
    for r in range(cfg.rounds):
        order = round_order(list(cells), r)
        echo(f"[3/3] generate, round {r + 1}/{cfg.rounds} ({names[r]}, batch {cfg.batch_size}, {cfg.max_new_tokens} tokens each): "
             + ", then ".join(what[k] for k in order))
        for key in order:
            summaries[key] = generate_cell(sweeps[key], str(out), cells[key], prompts=sweep.prompts[: r + 1])
    timings["generate"] = time.perf_counter() - t

    folders = {k: Path(gen_dir(str(out), cell)) for k, cell in cells.items()}
    rows = table_rows(summaries)
    figures = per_round(folders, names)
    lines = [format_table(rows), *format_rounds(figures)]
    same = {k: identical_rows(folders["target"], folders[k], names) for k in cells if k != "target"}
    if cfg.temperature == 0:
        shown = {"full": "full head", "trimmed": "trimmed head", "eagle3": "EAGLE-3"}
        lines.append("greedy: completions identical to the target's own: "
                     + ", ".join(f"{shown[k]} {a}/{n}" for k, (a, n) in same.items()) + " rows")
    covered = eval_coverage(sweep, str(out), [cells["trimmed"]]).get(cells["trimmed"].name)
    lines.append(f"head: {describe_kept(head)}.")
    if unseen_warning(head):
        lines.append(
            f"  K is larger than the {head['distinct_ids']:,} distinct ids the calibration counted, so covering all of its tokens "
            "is no test of the head."
        )
    if covered is not None:
        lines.append(f"  The kept ids hold {covered:.2%} of the tokens the target itself wrote in the evaluation (re-encoded).")
    lines += [
        "tokens/s is decoding throughput inside the engine (model loading and Ray start excluded).",
        *gamma_lines(rows, cfg.gamma),
        f"The drafter is an untrained {cfg.drafter_layers}-layer truncation of the target: it rarely agrees with the "
        "target; compare the trimmed head with the full head.",
    ]
    if cfg.eagle3:
        K = _draft_vocab_size(cfg.eagle3)
        lines.append(f"The EAGLE-3 drafter {cfg.eagle3} is trained for the target (one layer reading its hidden states"
                     + (f", a draft vocabulary of {K:,} ids" if K else "") + "; docs/eagle3.md).")
    echo("")
    for line in lines:
        echo(line)
    (out / TABLE_FILE).write_text("\n".join(lines) + "\n")
    timings["total"] = time.perf_counter() - start
    echo("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return {"rows": rows, "summaries": summaries, "calibration": calibration, "head": head, "timings": timings,
            "identical": same, "rounds": figures, "eval_coverage": covered, "out": str(out),
            "plot": str(Path(head_dir(str(out), cells["trimmed"])) / "coverage.png")}
