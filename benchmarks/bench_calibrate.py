"""Calibration throughput: the Ray pipeline against the bare fast tokenizer, and 1 worker against 2.

    RAY_AUTH_MODE=disabled python benchmarks/bench_calibrate.py [--mb 48] [--drafter smollm2-135m]

The corpus is the Python standard library's own source text (present wherever Python is, so nothing is
downloaded), repeated to ``--mb`` megabytes and written as Parquet. Three measurements on the same text:

- bare: ``tokenizers`` ``encode_batch_fast`` in this process, its Rust thread pool on every core,
  ids collected as Python lists (the least any counter must do);
- pipeline, 1 and 2 workers: ``run_calibrate`` (corpus source) on a local Ray; tokens/s over the
  counting phase (first shard submitted to last shard recorded: reading Parquet, encoding, counting,
  shipping partial histograms, writing the ledger), and end to end (also Ray start, actor start, reduce).

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


def bare_tokens_per_second(tokenizer_json: str, rows: list[str], batch: int = 1024) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_batch_fast(rows[:batch], add_special_tokens=False)  # warm up the thread pool
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(rows), batch):
        ids = [e.ids for e in tok.encode_batch_fast(rows[i : i + batch], add_special_tokens=False)]
        tokens += sum(map(len, ids))
    return tokens / (time.perf_counter() - start), tokens


def pipeline(drafter: str, corpus: Path, out: Path, workers: int, shard_bytes: int) -> dict:
    from vocabtrim.calibrate import CalibrateConfig, run_calibrate

    shutil.rmtree(out, ignore_errors=True)
    return run_calibrate(
        CalibrateConfig(drafter=drafter, corpus=[str(corpus)], out=str(out), workers=workers, shard_bytes=shard_bytes, show_progress=False)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", default="smollm2-135m")
    parser.add_argument("--mb", type=float, default=48.0, help="corpus size in megabytes of text")
    parser.add_argument("--shard-mb", type=float, default=2.0, help="shard size in megabytes")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the bare baseline uses every core
    os.environ["RAYON_NUM_THREADS"] = str(cores)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from vocabtrim.models import load_tokenizer

    tokenizer = load_tokenizer(args.drafter)
    folder = Path(tempfile.mkdtemp(prefix="vt-bench-"))
    try:
        corpus, rows = make_corpus(folder, args.mb)
        bare, tokens = bare_tokens_per_second(tokenizer._tokenizer.to_str(), rows)
        del rows
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        results = {w: pipeline(args.drafter, corpus, folder / f"out{w}", w, int(args.shard_mb * 1e6)) for w in (1, cores)}
        ray.shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    for m in results.values():
        assert m["total_tokens"] == tokens, "pipeline and bare tokenizer disagree on the token count"
    one, full = results[1], results[cores]
    print(f"corpus: {args.mb:g} MB of text, {tokens:,} tokens, {one['shards']} shards; {cores} cores; tokenizer of {args.drafter}")
    print(f"| run | tokens/s (counting) | tokens/s (end to end) | vs bare |")
    print(f"|---|---:|---:|---:|")
    print(f"| bare fast tokenizer, {cores} threads | {bare:,.0f} | | 100% |")
    for w, m in results.items():
        print(
            f"| pipeline, {w} worker{'s' if w > 1 else ''} | {m['tokens_per_second']:,.0f} | "
            f"{m['tokens_per_second_end_to_end']:,.0f} | {m['tokens_per_second'] / bare:.0%} |"
        )
    print(f"{cores} workers / 1 worker (counting): {full['tokens_per_second'] / one['tokens_per_second']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
