"""The sweep's report: ``report.md`` (tables and findings computed from the rows) and its plots
(matplotlib, Agg), written under the sweep folder through ``storage``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vocabtrim import storage
from vocabtrim.sweep.cells import KNEE_SHARE, LOAD_TOLERANCE, knee_k, load_outliers

REPORT_FILE = "report.md"
PLOTS = {"acceptance": "acceptance_vs_k.png", "speedup": "speedup_vs_k.png", "coverage": "coverage.png"}
TIMED_METRICS = ("speedup", "tokens_per_second", "drafter_step_ms")
SOURCE_COLORS = {"corpus": "tab:blue", "drafter": "tab:orange", "target": "tab:green"}
SOURCE_LABELS = {"corpus": "raw corpus tokens", "drafter": "drafter-generated", "target": "target-generated"}


@dataclass
class ReportContext:
    """What the report says about the setup besides the rows."""

    settings: dict
    sizes: dict  # ModelSizes as a dict
    calibrations: dict  # source -> calibration manifest
    histograms: dict  # source -> histogram.parquet location
    runs: list  # [{"run", "started"}] of the sweep folder


def fmt(value, spec: str = ".3f") -> str:
    """A number for the tables: ``-`` for a missing value."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


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


def _save(fig, where: str) -> str:
    fig.tight_layout()
    storage.write_with(where, lambda tmp: fig.savefig(tmp, format="png"))
    return where


def plot_metric_vs_k(rows: list[dict], panels: list[tuple[str, str]], vocab: int, path: str, title: str) -> str:
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


def plot_coverage_curves(histograms: dict, rows: list[dict], vocab: int, path: str) -> str:
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
            cells.append("failed" if r is not None and r["status"] == "failed" else fmt(r[metric] if r else None, spec))
        body.append([f"{k:,}"] + cells)
    if full is not None:
        body.append([f"full ({vocab:,})"] + [fmt(full[metric], spec)] * len(sources))
    return _md_table(["K"] + [SOURCE_LABELS.get(s, s) for s in sources], body)


def findings(rows: list[dict], vocab: int) -> list[str]:
    """Sentences computed from the rows: the source ranking per K, the knee, the best K by MBSU and speedup."""
    full = next(iter(_ok(rows, "full")), None)
    outliers = load_outliers(rows)
    lines = _ranking_lines(rows)
    if full is not None:
        lines.append(f"Full head: acceptance {fmt(full['acceptance_rate'], '.4f')}, τ {fmt(full['tokens_per_target_pass'], '.3f')}, "
                     f"MBSU {fmt(full['mbsu'], '.3f')}, measured speedup {fmt(full['speedup'], '.3f')}×.")
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
    drafter = storage.name(st["drafter"]) if st["drafter"] else st["drafter"]
    layers = f", first {st['drafter_layers']} layers" if st["drafter_layers"] else ""
    lines = [
        f"- Target: `{storage.name(st['target'])}` ({sz['target']:,} parameters); drafter: `{drafter}`{layers} "
        f"({sz['drafter_body']:,} parameters without its LM head; head {sz['vocab_size']:,} × {sz['hidden']} = "
        f"{sz['vocab_size'] * sz['hidden']:,}).",
        f"- Evaluation: {', '.join(storage.name(p) for p in st['prompts'])} (column `{st['prompt_column']}`"
        + (f", {target['rows']} rows" if target else "")
        + (f", {target['errored_rows']} of them error rows, left out of every figure" if target and target["errored_rows"] else "")
        + f"), {st['max_new_tokens']} new tokens per row, "
        f"temperature {st['temperature']:g}, γ = {st['gamma']} draft tokens per step, batch size {st['batch_size']}, "
        f"{st['workers']} worker(s).",
        f"- Calibration corpus: {', '.join(storage.name(p) for p in st['corpus'])} (column `{st['text_column']}`); generated "
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
        ppa = ", ".join(fmt(v, ".3f") for v in (r["per_position_acceptance"] or [])) or "-"
        body.append([
            r["cell"], "-" if r["k"] is None else f"{r['k']:,}", fmt(r["head_coverage"], ".4f"), fmt(r["eval_coverage"], ".4f"),
            fmt(r["acceptance_rate"], ".4f"), fmt(r["tokens_per_target_pass"], ".3f"), ppa, fmt(r["drafter_step_ms"], ".2f"),
            fmt(r["target_pass_ms"], ".1f"), fmt(r["tokens_per_second"], ".1f"), fmt(r["speedup"], ".3f"),
            fmt(r["param_ratio"], ".4f"), fmt(r["mbsu"], ".3f"), fmt(r["measured_in_run"], "d"),
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
        parts += [f"![acceptance against K]({storage.name(plots['acceptance'])})", ""]
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
        parts += [f"![speedup and MBSU against K]({storage.name(plots['speedup'])})", ""]
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
        parts += [f"![coverage curves]({storage.name(plots['coverage'])})", ""]
    parts += ["## All cells", _cells_table(rows), ""]
    if failed:
        parts += ["## Failed cells", *(f"- `{r['cell']}`: {r['error']}" for r in failed), ""]
    return "\n".join(parts)


def write_report(rows: list[dict], ctx: ReportContext, out: str) -> dict[str, str]:
    """Write the plots and ``report.md`` under ``out``; returns their locations by name."""
    vocab = ctx.sizes["vocab_size"]
    plots = {}
    if _ok(rows, "trimmed") or _ok(rows, "full"):
        plots["acceptance"] = plot_metric_vs_k(
            rows,
            [("acceptance_rate", "acceptance rate (accepted ÷ proposed drafts)"),
             ("tokens_per_target_pass", "block efficiency τ (tokens per target pass)")],
            vocab, storage.join(out, PLOTS["acceptance"]), "Acceptance against K, one line per calibration source",
        )
        plots["speedup"] = plot_metric_vs_k(
            rows,
            [("speedup", "measured speedup over the target alone (×)"), ("mbsu", "MBSU = τ / (c·γ + 1) (×)")],
            vocab, storage.join(out, PLOTS["speedup"]), "Speedup against K: measured tokens/s ratio and memory-bound model",
        )
    if ctx.histograms:
        plots["coverage"] = plot_coverage_curves(ctx.histograms, rows, vocab, storage.join(out, PLOTS["coverage"]))
    report = storage.join(out, REPORT_FILE)
    storage.write_bytes(report, (report_markdown(rows, ctx, plots) + "\n").encode())
    return {"report": report, **plots}
