"""``vocabtrim demo``: the three stages on the bundled model and the shipped prompts, ending in one table.

1. Split the shipped prompts (``vocabtrim/data/prompts.parquet``) into a calibration part and a
   disjoint evaluation part.
2. calibrate: count the tokens the *target* generates from the calibration prompts.
3. build-head: keep the top-K ids of that histogram; the trimmed head is the drafter's LM-head rows for them.
4. generate on the evaluation prompts three times with the same batching: target alone, drafter with its
   full head, drafter with the trimmed head.

The drafter is the first ``drafter_layers`` layers of the 135M target (a self-speculative, untrained
drafter), so it rarely agrees with the target and speculative decoding is slower than the target alone.
What the table shows is the trimmed head's gain over the full head: on a drafter this small the LM head
is most of each drafter step, and trimming it makes every step cheaper at (almost) the same acceptance.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq

from vocabtrim.errors import UserError

PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.parquet"


@dataclass
class DemoConfig:
    """Sizes of the demo. ``quick()`` gives the CI sizes."""

    out: str | None = None  # None: a new temporary folder
    model: str = "smollm2-135m"
    drafter_layers: int = 4
    calibration_prompts: int = 96
    calibration_new_tokens: int = 48
    eval_prompts: int = 32
    max_new_tokens: int = 48
    top_k: int = 8192
    gamma: int = 4
    batch_size: int = 8
    temperature: float = 0.0
    seed: int = 0
    address: str | None = None
    progress: bool = True

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        sizes = dict(calibration_prompts=16, calibration_new_tokens=16, eval_prompts=16, max_new_tokens=16)
        return cls(**{**sizes, **overrides})


@dataclass
class Row:
    """One line of the table (None where a measure does not apply)."""

    setting: str
    acceptance: float | None
    tokens_per_target_pass: float | None
    drafter_step_ms: float | None
    tokens_per_second: float | None
    speedup: float | None


def split_prompts(out: Path, calibration: int, evaluation: int) -> tuple[Path, Path]:
    """The first ``calibration`` shipped prompts and the last ``evaluation`` ones, as two Parquet files."""
    table = pq.read_table(PROMPTS)
    if calibration + evaluation > table.num_rows:
        raise UserError(f"the demo ships {table.num_rows} prompts: calibration + evaluation must not exceed that")
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    cal, ev = folder / "calibration.parquet", folder / "eval.parquet"
    pq.write_table(table.slice(0, calibration), cal)
    pq.write_table(table.slice(table.num_rows - evaluation, evaluation), ev)
    return cal, ev


def table_rows(summaries: dict[str, dict]) -> list[Row]:
    """Rows for the table from the three ``generate`` summaries (keys: target, full, trimmed)."""
    base = summaries["target"]["tokens_per_engine_second"]
    labels = {"target": "target alone", "full": "drafter, full head", "trimmed": "drafter, trimmed head"}
    rows = []
    for key, label in labels.items():
        s = summaries[key]
        tps = s["tokens_per_engine_second"]
        rows.append(
            Row(
                setting=label,
                acceptance=s["acceptance_rate"],
                tokens_per_target_pass=s["tokens_per_target_pass"],
                drafter_step_ms=s["drafter_step_ms"],
                tokens_per_second=tps,
                speedup=tps / base if tps and base else None,
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    header = ["setting", "acceptance", "tokens/target pass", "drafter step ms", "tokens/s", "speedup"]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    body = [
        [r.setting, fmt(r.acceptance, ".3f"), fmt(r.tokens_per_target_pass, ".2f"), fmt(r.drafter_step_ms, ".2f"),
         fmt(r.tokens_per_second, ".1f"), fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else "")]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def identical_rows(a: Path, b: Path) -> tuple[int, int]:
    """(rows whose completion is the same in both output folders, rows)."""
    ta, tb = (pq.read_table(p / "eval.parquet", columns=["id", "completion"]).to_pylist() for p in (a, b))
    return sum(x == y for x, y in zip(ta, tb, strict=True)), len(ta)


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    """Run the demo; ``echo`` gets progress lines and the final table. Returns the table and the stage results."""
    from vocabtrim.calibrate import CalibrateConfig, run_calibrate
    from vocabtrim.generate import GenerateConfig, run_generate
    from vocabtrim.head import BuildHeadConfig, build_head
    from vocabtrim.ray_utils import init_ray

    start = time.perf_counter()
    out = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="vocabtrim-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    echo(f"vocabtrim demo: {cfg.model}, drafter = its first {cfg.drafter_layers} layers; working folder {out}")
    cal_prompts, eval_prompts = split_prompts(out, cfg.calibration_prompts, cfg.eval_prompts)
    init_ray(cfg.address)
    timings = {}

    t = time.perf_counter()
    echo(f"[1/3] calibrate: tokens the target generates from {cfg.calibration_prompts} prompts ({cfg.calibration_new_tokens} each)")
    calibration = run_calibrate(
        CalibrateConfig(
            drafter=cfg.model, drafter_layers=cfg.drafter_layers, corpus=[str(cal_prompts)], text_column="prompt",
            source="target", target=cfg.model, max_new_tokens=cfg.calibration_new_tokens, seed=cfg.seed,
            out=str(out / "calibration"), show_progress=cfg.progress,
        )
    )
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    echo(f"[2/3] build-head: top {cfg.top_k} of {calibration['distinct_tokens']} distinct ids seen ({calibration['total_tokens']} tokens)")
    head = build_head(
        BuildHeadConfig(
            histogram=str(out / "calibration"), drafter=cfg.model, drafter_layers=cfg.drafter_layers,
            top_k=cfg.top_k, out=str(out / "head"),
        )
    )
    timings["build-head"] = time.perf_counter() - t

    base = GenerateConfig(
        target=cfg.model, drafter_layers=cfg.drafter_layers, prompts=[str(eval_prompts)], prompt_column="messages",
        id_column="id", max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
        gamma=cfg.gamma, batch_size=cfg.batch_size, workers=1, progress=cfg.progress, out="",
    )
    runs = {
        "target": replace(base, no_draft=True, out=str(out / "generate-target")),
        "full": replace(base, out=str(out / "generate-full-head")),
        "trimmed": replace(base, head=str(out / "head"), out=str(out / "generate-trimmed-head")),
    }
    summaries = {}
    for i, (key, run) in enumerate(runs.items()):
        t = time.perf_counter()
        what = {"target": "target alone", "full": "drafter with its full head", "trimmed": f"drafter with the K={head['k']} head"}[key]
        echo(f"[3/3] generate ({i + 1}/3): {what}, {cfg.eval_prompts} prompts × {cfg.max_new_tokens} tokens, batch {cfg.batch_size}")
        summaries[key] = run_generate(run)
        timings[f"generate {key}"] = time.perf_counter() - t

    rows = table_rows(summaries)
    echo("")
    echo(format_table(rows))
    same = {k: identical_rows(Path(runs["target"].out), Path(runs[k].out)) for k in ("full", "trimmed")}
    if cfg.temperature == 0:
        echo(
            f"greedy: completions identical to the target's own: full head {same['full'][0]}/{same['full'][1]}, "
            f"trimmed head {same['trimmed'][0]}/{same['trimmed'][1]} rows"
        )
    echo(
        f"head: K={head['k']} of {head['vocab_size']} ids, covering {head['coverage']:.4f} of the calibration tokens. "
        "tokens/s is decoding throughput inside the engine (model loading and Ray start excluded)."
    )
    echo(
        f"The drafter is an untrained {cfg.drafter_layers}-layer truncation of the 135M target: it rarely agrees with the "
        "target, so speculation loses to the target alone here; compare the trimmed head with the full head."
    )
    timings["total"] = time.perf_counter() - start
    echo("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return {"rows": rows, "summaries": summaries, "calibration": calibration, "head": head, "timings": timings,
            "identical": same, "out": str(out)}
