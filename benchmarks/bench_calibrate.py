"""Calibration throughput: the Ray pipeline against the bare fast tokenizer, and 1 worker against 2.

    python benchmarks/bench_calibrate.py [--mb 32] [--drafter smollm2-135m]

The corpus is the Python standard library's own source text (present wherever Python is, so nothing is
downloaded), repeated to ``--mb`` megabytes and written as Parquet. Three measurements on the same text:

- bare: ``tokenizers`` ``encode_batch_fast`` in this process, its Rust thread pool on every core,
  ids collected as Python lists (the least any counter must do);
- pipeline, 1 and 2 workers: ``run_calibrate`` (corpus source) on a local Ray; tokens/s over the
  counting phase (first shard submitted to last shard recorded: reading Parquet, encoding, counting,
  shipping partial histograms, writing the ledger), and end to end (also Ray start, actor start, reduce).

Tokens per CPU-second (bare: this process; pipeline: the counting actors) shows the pipeline's own
overhead even where other work shares the machine and wall-clock rates drift.

Each measurement runs ``--repeat`` times, interleaved (bare, 1 worker, all cores, bare, ...), and
the best run of each is reported: on a shared machine the best run is the one least disturbed.

Aims: pipeline with all cores ≥ 90% of bare; 2 workers ≥ 1.8× 1 worker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def make_corpus(folder: Path, megabytes: float) -> tuple[Path, list[str]]:
    """Rows of 20 source lines each, from the standard library, repeated to ``megabytes``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        lines.extend(path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True))
    base = ["".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    rows: list[str] = []
    size = 0
    while size < megabytes * 1e6:
        for r in base:
            rows.append(r)
            size += len(r.encode())
            if size >= megabytes * 1e6:
                break
    path = folder / "corpus.parquet"
    pq.write_table(pa.table({"text": rows}), path, row_group_size=2000)
    return path, rows


def bare_tokens_per_second(tokenizer_json: str, rows: list[str], batch: int = 1024) -> tuple[float, float, int]:
    """(tokens per second, tokens per CPU-second, tokens) of the bare fast tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_batch_fast(rows[:batch], add_special_tokens=False)  # warm up the thread pool
    start, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for i in range(0, len(rows), batch):
        ids = [e.ids for e in tok.encode_batch_fast(rows[i : i + batch], add_special_tokens=False)]
        tokens += sum(map(len, ids))
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu), tokens


def pipeline(drafter: str, corpus: Path, out: Path, workers: int, shard_bytes: int) -> dict:
    from vocabtrim.calibrate import CalibrateConfig, run_calibrate

    shutil.rmtree(out, ignore_errors=True)
    return run_calibrate(
        CalibrateConfig(drafter=drafter, corpus=[str(corpus)], out=str(out), workers=workers, shard_bytes=shard_bytes, show_progress=False)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", default="smollm2-135m")
    parser.add_argument("--mb", type=float, default=32.0, help="corpus size in megabytes of text")
    parser.add_argument("--shard-mb", type=float, default=2.0, help="shard size in megabytes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (best reported)")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the bare baseline uses every core
    os.environ["RAYON_NUM_THREADS"] = str(cores)
    from vocabtrim.ray_utils import local_run_token

    local_run_token(os.environ)  # Ray's token auth stays on, with a token made for this run (as vocabtrim's commands do)
    import ray

    from vocabtrim.models import load_tokenizer

    tokenizer = load_tokenizer(args.drafter)
    folder = Path(tempfile.mkdtemp(prefix="vt-bench-"))
    bare: list[float] = []
    bare_cpu: list[float] = []
    runs: dict[int, list[dict]] = {1: [], cores: []}
    try:
        corpus, rows = make_corpus(folder, args.mb)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        for _ in range(args.repeat):
            rate, per_cpu, tokens = bare_tokens_per_second(tokenizer._tokenizer.to_str(), rows)
            bare.append(rate)
            bare_cpu.append(per_cpu)
            for w in runs:
                m = pipeline(args.drafter, corpus, folder / f"out{w}", w, int(args.shard_mb * 1e6))
                assert m["total_tokens"] == tokens, "pipeline and bare tokenizer disagree on the token count"
                runs[w].append(m)
        ray.shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    best_bare = max(bare)
    best = {w: max(ms, key=lambda m: m["tokens_per_second"]) for w, ms in runs.items()}
    print(f"corpus: {args.mb:g} MB of text, {tokens:,} tokens, {best[1]['shards']} shards; {cores} cores; "
          f"tokenizer of {args.drafter}; best of {args.repeat}")
    print("| run | tokens/s (counting) | tokens/s (end to end) | vs bare | tokens per CPU-second |")
    print("|---|---:|---:|---:|---:|")
    print(f"| bare fast tokenizer, {cores} threads | {best_bare:,.0f} | | 100% | {max(bare_cpu):,.0f} |")
    for w, m in best.items():
        per_cpu = max(r["tokens_counted"] / r["counting_cpu_seconds"] for r in runs[w])
        print(
            f"| pipeline, {w} worker{'s' if w > 1 else ''} | {m['tokens_per_second']:,.0f} | "
            f"{max(r['tokens_per_second_end_to_end'] for r in runs[w]):,.0f} | {m['tokens_per_second'] / best_bare:.0%} | "
            f"{per_cpu:,.0f} (actors) |"
        )
    print(f"{cores} workers / 1 worker (counting): {best[cores]['tokens_per_second'] / best[1]['tokens_per_second']:.2f}x")
    print("all runs, tokens/s: bare " + ", ".join(f"{r:,.0f}" for r in bare) + "; " + "; ".join(
        f"{w} worker(s) " + ", ".join(f"{m['tokens_per_second']:,.0f}" for m in ms) for w, ms in runs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
