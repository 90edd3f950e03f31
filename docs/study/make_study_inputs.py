"""Split the shipped prompts into the study's calibration corpus and evaluation prompts.

    python docs/study/make_study_inputs.py --out /tmp/vt-study/inputs [--eval 64]

Even rows of ``vocabtrim/data/prompts.parquet`` (160 of 320) become ``calibration.parquet`` (columns
``id``, ``kind``, ``text``: the last user turn, as plain text); odd rows become ``eval.parquet``
(``id``, ``kind``, ``prompt``, ``messages``), the first ``--eval`` of them. The two halves are disjoint
and hold every kind of prompt (the shipped file is shuffled). Deterministic.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

SHIPPED = Path(__file__).resolve().parents[2] / "vocabtrim" / "data" / "prompts.parquet"


def split(out: Path, n_eval: int) -> tuple[Path, Path]:
    table = pq.read_table(SHIPPED)
    even = table.take(list(range(0, table.num_rows, 2)))
    odd = table.take(list(range(1, table.num_rows, 2)))
    if not 0 < n_eval <= odd.num_rows:
        raise SystemExit(f"--eval must be between 1 and {odd.num_rows}")
    out.mkdir(parents=True, exist_ok=True)
    calibration = even.select(["id", "kind", "prompt"]).rename_columns(["id", "kind", "text"])
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
    args = parser.parse_args()
    split(args.out, args.eval)


if __name__ == "__main__":
    main()
