"""Write the prompts the bundled EAGLE-3 drafter (``smollm2-135m-eagle3``) is trained on.

The templates of ``vocabtrim/data/prompts.parquet`` (instructions, questions, code) plus more of the
same kinds, over other topics and other coding tasks: no training prompt is one of the shipped prompts
the drafter is measured on (checked below). Deterministic; the first N rows of the shuffled grid, then
CHATS multi-turn chats (the shipped chat kind's turns over the training topics; ``messages`` column only):

    python benchmarks/eagle3_train_prompts.py runs/eagle3/train_prompts.parquet [N [CHATS]]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vocabtrim.data.make_prompts import CHATS, CODE_TASKS, CODE_TEMPLATES, INSTRUCTIONS, QUESTIONS, TOPICS, _cap  # noqa: E402

TRAIN_TOPICS = [
    "glaciers", "the Silk Road", "jet engines", "octopuses", "the periodic table", "mushrooms", "hurricanes",
    "ancient Egypt", "wind turbines", "the Renaissance", "bacteria", "satellites", "penguins", "the Great Wall of China",
    "batteries", "deserts", "the Olympic Games", "DNA", "bridges", "jazz music", "the Amazon river", "telescopes",
    "dinosaurs", "nuclear power", "the human brain", "spiders", "the Industrial Revolution", "rainbows", "submarines",
    "the Sahara", "photography", "elephants", "the metric system", "lightning", "the violin", "cheese making",
    "airplanes", "the ozone layer", "whales", "democracy", "gardening", "the Arctic", "trains", "vitamins",
    "the Moon's phases", "origami", "skyscrapers", "migratory birds",
    "the solar system", "magnets", "the human skeleton", "volcanic islands", "the Cold War", "ancient Greece",
    "the Vikings", "the Maya civilization", "the Ottoman Empire", "the Aztecs", "medieval castles", "the samurai",
    "the Wright brothers", "Marie Curie", "Isaac Newton", "Charles Darwin", "Albert Einstein", "Ada Lovelace",
    "Leonardo da Vinci", "William Shakespeare", "the Beatles", "Mozart", "impressionist painting", "ballet",
    "hip hop", "the guitar", "the piano", "film editing", "video games", "board games", "soccer", "basketball",
    "marathon running", "yoga", "meditation", "nutrition", "protein", "sugar", "tea", "chocolate", "olive oil",
    "fermentation", "sourdough", "spices", "rice farming", "beekeeping", "composting", "soil erosion", "wetlands",
    "mangroves", "kelp forests", "deep sea creatures", "sharks", "dolphins", "wolves", "tigers", "owls", "ants",
    "butterflies", "frogs", "bats", "snakes", "crows", "parrots", "cats", "dogs", "horses", "camels",
    "the Milky Way", "comets", "Mars", "Jupiter", "the Sun", "exoplanets", "gravity", "friction", "sound waves",
    "light", "electricity", "magnetism", "atoms", "chemical reactions", "acids and bases", "plastics", "glass",
    "steel", "concrete", "3D printing", "robots", "drones", "self-driving cars", "smartphones", "computer chips",
    "the cloud", "cybersecurity", "passwords", "encryption", "open source software", "databases", "spreadsheets",
    "email", "social media", "online shopping", "cryptocurrency", "banks", "taxes", "budgeting", "saving money",
    "insurance", "supply and demand", "small businesses", "job interviews", "remote work", "time management",
    "public speaking", "negotiation", "leadership", "teamwork", "friendship", "kindness", "habits", "memory",
    "dreams", "emotions", "stress", "laughter", "languages", "sign language", "the alphabet", "poetry", "novels",
    "fairy tales", "mythology", "libraries of the ancient world", "maps", "compasses", "lighthouses", "canals",
    "the Panama Canal", "the Suez Canal", "the Eiffel Tower", "the pyramids", "Stonehenge", "Mount Everest",
    "the Pacific Ocean", "icebergs", "clouds", "fog", "snowflakes", "droughts", "floods", "tornadoes", "wildfires",
    "air pollution", "clean water", "plastic in the ocean", "biodiversity", "endangered species", "national parks",
    "zoos", "museums", "architecture", "city planning", "bicycles", "public transport", "highways", "ships",
    "the space station", "rockets", "astronauts", "the Hubble telescope", "weather forecasts", "thermometers",
    "clocks", "calendars", "the number zero", "prime numbers", "fractions", "probability", "statistics",
    "geometry", "algebra", "the Pythagorean theorem", "infinity", "puzzles", "riddles", "chess openings",
    "knitting", "pottery", "woodworking", "painting with watercolors", "camping", "hiking", "fishing", "sailing",
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
    ("multiply two matrices", "matmul"),
    ("check whether a string has balanced parentheses", "is_balanced"),
    ("convert an integer to a Roman numeral", "to_roman"),
    ("convert a Roman numeral to an integer", "from_roman"),
    ("find all prime numbers below n with a sieve", "primes_below"),
    ("compute the median of a list", "median"),
    ("compute the mode of a list", "mode"),
    ("capitalize the first letter of each sentence", "capitalize_sentences"),
    ("count the lines of a text file", "count_lines"),
    ("read a CSV file and return its rows as dictionaries", "read_csv_rows"),
    ("write a list of dictionaries to a JSON file", "write_json"),
    ("check whether an email address looks valid", "is_valid_email"),
    ("generate a random password of a given length", "random_password"),
    ("compute the Levenshtein distance between two strings", "edit_distance"),
    ("find the longest common prefix of a list of strings", "common_prefix"),
    ("group words that are anagrams of each other", "group_anagrams"),
    ("find two numbers in a list that add up to a target", "two_sum"),
    ("compute the running sum of a list", "running_sum"),
    ("chunk a list into pieces of size n", "chunk"),
    ("interleave two lists", "interleave"),
    ("find the most frequent element of a list", "most_frequent"),
    ("check whether a number is a perfect square", "is_perfect_square"),
    ("convert a decimal number to binary", "to_binary"),
    ("compute the distance between two points", "distance"),
    ("compute the area of a circle", "circle_area"),
    ("convert kilometers to miles", "km_to_miles"),
    ("count the uppercase letters in a string", "count_upper"),
    ("replace every vowel in a string with a star", "star_vowels"),
    ("find the longest word in a sentence", "longest_word"),
    ("check whether a number is an Armstrong number", "is_armstrong"),
    ("compute the sum of the squares of a list", "sum_of_squares"),
    ("return the unique elements of two lists", "symmetric_difference"),
    ("implement a stack with push and pop", "Stack"),
    ("implement a queue using two stacks", "TwoStackQueue"),
    ("reverse a linked list", "reverse_linked_list"),
    ("compute the depth of a binary tree", "tree_depth"),
    ("do a breadth-first search on a graph given as a dictionary", "bfs"),
    ("memoize a function with a dictionary", "memoize"),
    ("time how long a function takes to run", "timed"),
    ("validate that a string is a valid IPv4 address", "is_ipv4"),
    ("parse a date string in the format YYYY-MM-DD", "parse_date"),
    ("compute the number of days between two dates", "days_between"),
    ("shuffle a list in place", "shuffle_list"),
    ("compute compound interest", "compound_interest"),
]

EXTRA_INSTRUCTIONS = [
    "Write a short blog post introduction about {t}.",
    "Explain {t} as if you were a museum guide.",
    "Write a limerick about {t}.",
    "Give three tips for someone who wants to get into {t}.",
    "Write a short dialogue between a student and a teacher about {t}.",
    "Compare {t} with something from everyday life.",
    "Write a product description for a book about {t}.",
    "Explain {t} in exactly three sentences.",
]
EXTRA_QUESTIONS = [
    "What is the history of {t}?",
    "How does {t} affect our daily lives?",
    "What are the biggest challenges related to {t}?",
    "Can you explain how {t} works?",
    "What is the most important thing to understand about {t}?",
    "What careers are connected to {t}?",
]
EXTRA_CODE_TEMPLATES = [
    "Write a Python function called {f} that will {task}. Include an example of how to call it.",
    "How do I {task} in Python?",
    "Write unit tests with pytest for a function `{f}` that should {task}.",
]

assert not set(TRAIN_TOPICS) & set(TOPICS), "a training topic is a shipped prompt's topic"
assert not {f for _, f in TRAIN_TASKS} & {f for _, f in CODE_TASKS}, "a training task is a shipped prompt's task"


def make_rows(n: int, chats: int = 0) -> list[dict]:
    rng = random.Random(20261202)
    text = INSTRUCTIONS + QUESTIONS + EXTRA_INSTRUCTIONS + EXTRA_QUESTIONS
    grid = [tpl.format(t=t) for tpl in text for t in TRAIN_TOPICS]
    code = [tpl.format(task=task, f=f) for tpl in CODE_TEMPLATES + EXTRA_CODE_TEMPLATES for task, f in TRAIN_TASKS]
    # a third of the rows are code where the grid allows it
    rng.shuffle(grid)
    rng.shuffle(code)
    n_code = min(len(code), n // 3)
    rows = grid[: n - n_code] + code[:n_code]
    rng.shuffle(rows)
    out = [{"id": f"train-{i:05d}", "prompt": p, "messages": [{"role": "user", "content": p}]} for i, p in enumerate(rows)]
    # multi-turn chats (the shipped chat kind's turns over the training topics): a messages column only,
    # prompt null (train-drafter's --text-column prompt skips them)
    talks = [[{"role": r, "content": c.format(t=t, T=_cap(t))} for r, c in turns] for turns in CHATS for t in TRAIN_TOPICS]
    random.Random(20261204).shuffle(talks)
    out += [{"id": f"chat-{i:05d}", "prompt": None, "messages": m} for i, m in enumerate(talks[:chats])]
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the Parquet file to write")
    parser.add_argument("n", type=int, nargs="?", default=10_000, help="single prompts (default 10000)")
    parser.add_argument("chats", type=int, nargs="?", default=0, help="multi-turn chats after them (default 0)")
    args = parser.parse_args()
    out, n, chats = args.out, args.n, args.chats
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n, chats)
    pq.write_table(pa.Table.from_pylist(rows), out)
    print(f"wrote {len(rows)} prompts to {out}")
