"""The study's calibration corpus and evaluation prompts.

    python docs/study/make_study_inputs.py --out /tmp/vt-study/inputs [--eval 64] [--calibration 2000]

``eval.parquet`` (``id``, ``kind``, ``prompt``, ``messages``): the first ``--eval`` odd rows of
``vocabtrim/data/prompts.parquet``. ``calibration.parquet`` (``id``, ``kind``, ``text``): the even rows
of the shipped prompts (160, the last user turn as plain text) followed by ``--calibration`` minus 160
prompts of the grid the bundled EAGLE-3 drafter was trained on (``benchmarks/eagle3_train_prompts.py``:
other topics and tasks than the shipped prompts, kind ``grid``), so the calibration sources (the prompts'
own text, or the target's responses to them) differ by more than sampling noise. Calibration and
evaluation rows are disjoint. Deterministic.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from eagle3_train_prompts import make_rows  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[2] / "vocabtrim" / "data" / "prompts.parquet"


def split(out: Path, n_eval: int, n_calibration: int = 2000) -> tuple[Path, Path]:
    table = pq.read_table(SHIPPED)
    even = table.take(list(range(0, table.num_rows, 2)))
    odd = table.take(list(range(1, table.num_rows, 2)))
    if not 0 < n_eval <= odd.num_rows:
        raise SystemExit(f"--eval must be between 1 and {odd.num_rows}")
    if n_calibration < even.num_rows:
        raise SystemExit(f"--calibration must be at least {even.num_rows} (the even shipped rows)")
    out.mkdir(parents=True, exist_ok=True)
    calibration = even.select(["id", "kind", "prompt"]).rename_columns(["id", "kind", "text"])
    grid = make_rows(n_calibration - even.num_rows)
    calibration = pa.concat_tables([calibration, pa.table({
        "id": [r["id"] for r in grid], "kind": ["grid"] * len(grid), "text": [r["prompt"] for r in grid]})])
    evaluation = odd.slice(0, n_eval).select(["id", "kind", "prompt", "messages"])
    pq.write_table(calibration, out / "calibration.parquet")
    pq.write_table(evaluation, out / "eval.parquet")
    for name, t in (("calibration", calibration), ("eval", evaluation)):
        print(f"{name}: {t.num_rows} rows, kinds {dict(Counter(t.column('kind').to_pylist()))}")
    return out / "calibration.parquet", out / "eval.parquet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--eval", type=int, default=64, help="evaluation prompts (from the odd rows)")
    parser.add_argument("--calibration", type=int, default=2000, help="calibration rows (160 shipped, the rest from the grid)")
    args = parser.parse_args()
    split(args.out, args.eval, args.calibration)


if __name__ == "__main__":
    main()
