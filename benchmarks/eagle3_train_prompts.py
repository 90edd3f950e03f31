"""Write the prompts the bundled EAGLE-3 drafter (``smollm2-135m-eagle3``) was trained on.

The same templates as ``vocabtrim/data/prompts.parquet`` (instructions, questions, code), but other
topics and other coding tasks: no training prompt is one of the shipped prompts the drafter is measured on.
Deterministic:

    python benchmarks/eagle3_train_prompts.py runs/eagle3/train_prompts.parquet [N]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vocabtrim.data.make_prompts import CODE_TEMPLATES, INSTRUCTIONS, QUESTIONS, TOPICS  # noqa: E402

TRAIN_TOPICS = [
    "glaciers", "the Silk Road", "jet engines", "octopuses", "the periodic table", "mushrooms", "hurricanes",
    "ancient Egypt", "wind turbines", "the Renaissance", "bacteria", "satellites", "penguins", "the Great Wall of China",
    "batteries", "deserts", "the Olympic Games", "DNA", "bridges", "jazz music", "the Amazon river", "telescopes",
    "dinosaurs", "nuclear power", "the human brain", "spiders", "the Industrial Revolution", "rainbows", "submarines",
    "the Sahara", "photography", "elephants", "the metric system", "lightning", "the violin", "cheese making",
    "airplanes", "the ozone layer", "whales", "democracy", "gardening", "the Arctic", "trains", "vitamins",
    "the Moon's phases", "origami", "skyscrapers", "migratory birds",
]
TRAIN_TASKS = [
    ("sort a list of numbers without using sort()", "manual_sort"),
    ("compute the average of a list of numbers", "average"),
    ("check whether a year is a leap year", "is_leap_year"),
    ("convert a string to title case", "title_case"),
    ("find the second largest number in a list", "second_largest"),
    ("compute the power set of a list", "power_set"),
    ("count how often each character occurs in a string", "char_counts"),
    ("reverse the words of a sentence", "reverse_words"),
    ("compute the least common multiple of two integers", "lcm"),
    ("check whether a list is sorted", "is_sorted"),
    ("convert a binary string to an integer", "binary_to_int"),
    ("find the index of a value with binary search", "binary_search"),
    ("remove all whitespace from a string", "strip_spaces"),
    ("compute the square root of a number with Newton's method", "newton_sqrt"),
    ("rotate a list by k positions", "rotate"),
    ("transpose a matrix given as a list of lists", "transpose"),
]
assert not set(TRAIN_TOPICS) & set(TOPICS)


def make_rows(n: int) -> list[dict]:
    rng = random.Random(20261202)
    grid = [tpl.format(t=t) for tpl in INSTRUCTIONS + QUESTIONS for t in TRAIN_TOPICS]
    grid += [tpl.format(task=task, f=f) for tpl in CODE_TEMPLATES for task, f in TRAIN_TASKS]
    rng.shuffle(grid)
    return [{"id": f"train-{i:04d}", "prompt": p} for i, p in enumerate(grid[:n])]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n)
    pq.write_table(pa.Table.from_pylist(rows), out)
    print(f"wrote {len(rows)} prompts to {out}")
