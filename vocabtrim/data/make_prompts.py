"""Write ``prompts.parquet``: the prompts that ship with vocabtrim (written by us, templates × topics).

Run from the repository root to regenerate the file (the output is deterministic):

    python vocabtrim/data/make_prompts.py

Columns (one type per column, as Parquet needs):
- ``id``       string, e.g. ``"code-017"``;
- ``kind``     string: ``instruction``, ``question``, ``code`` or ``chat``;
- ``prompt``   string: the last user turn as plain text (use with ``--prompt-column prompt``);
- ``messages`` list of ``{role, content}`` structs: the whole conversation, one user turn for the first
  three kinds and several turns for ``chat`` (use with ``--prompt-column messages``: chat template applied).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "volcanoes", "the French Revolution",
    "compound interest", "vaccines", "climate change", "the printing press", "machine learning",
    "plate tectonics", "the Roman Empire", "electric cars", "honeybees", "the immune system",
    "renewable energy", "the internet", "coral reefs", "inflation", "the moon landing",
    "sleep", "coffee", "recycling", "earthquakes", "the stock market", "rainforests",
    "solar panels", "the human heart", "chess", "public libraries", "bread baking", "tides",
]

INSTRUCTIONS = [
    "Write a short paragraph explaining {t} to a ten-year-old.",
    "Summarize the key facts about {t} in three bullet points.",
    "Write a haiku about {t}.",
    "Give me five interesting facts about {t}.",
    "Write a two-sentence story that involves {t}.",
    "Explain the pros and cons of learning about {t} at school.",
    "Draft a friendly email inviting a colleague to a talk on {t}.",
    "Write a tweet that makes {t} sound exciting.",
    "Describe {t} using a simple analogy.",
    "List three common misconceptions about {t} and correct them.",
    "Write a short quiz with three questions about {t}.",
    "Write the opening line of a poem about {t}.",
]

QUESTIONS = [
    "What should everyone know about {t}?",
    "Why should anyone care about {t}?",
    "What are the mechanisms behind {t}?",
    "Who first studied {t}, and when?",
    "What would happen if {t} suddenly disappeared?",
    "How has our understanding of {t} changed over time?",
    "Tell me one surprising thing about {t}.",
    "How can I learn more about {t} in a weekend?",
    "What is the environmental impact of {t}?",
    "What questions do scientists still ask about {t}?",
    "How would you explain {t} in one sentence?",
    "What are the main parts of {t}?",
]

CODE_TASKS = [
    ("reverse a string", "reverse_string"),
    ("check whether a number is prime", "is_prime"),
    ("compute the n-th Fibonacci number", "fibonacci"),
    ("count the words in a sentence", "count_words"),
    ("find the largest element of a list", "largest"),
    ("remove duplicates from a list while keeping order", "dedupe"),
    ("check whether a string is a palindrome", "is_palindrome"),
    ("merge two sorted lists", "merge_sorted"),
    ("convert Celsius to Fahrenheit", "celsius_to_fahrenheit"),
    ("compute the factorial of n", "factorial"),
    ("flatten a nested list", "flatten"),
    ("count the vowels in a string", "count_vowels"),
    ("compute the greatest common divisor of two integers", "gcd"),
    ("return the n most common words in a text", "most_common_words"),
    ("check whether two strings are anagrams", "are_anagrams"),
    ("sum the digits of an integer", "digit_sum"),
]

CODE_TEMPLATES = [
    "Write a Python function `{f}` to {task}.",
    "Write a JavaScript function named {f} that can {task}.",
    "Here is a stub:\n\ndef {f}(*args):\n    pass\n\nComplete it so that it can {task}, and add a docstring.",
    "Explain, step by step, how you would {task} in Python, then show the code.",
]

CHATS = [
    [
        ("user", "I want to learn about {t}."),
        ("assistant", "Happy to help! What would you like to know about {t}?"),
        ("user", "Start with the basics, please."),
    ],
    [
        ("system", "You are a concise teacher."),
        ("user", "Can you tell me something about {t}?"),
        ("assistant", "Sure. Many people find {t} fascinating."),
        ("user", "Why do people find it fascinating?"),
    ],
    [
        ("user", "My friend says learning about {t} is boring."),
        ("assistant", "Many people think so at first. What do you find interesting about it?"),
        ("user", "I am not sure yet. Convince me it is worth reading about."),
    ],
    [
        ("user", "Give me a one-line summary of {t}."),
        ("assistant", "{T}, in one line: a subject worth a closer look."),
        ("user", "That is too vague. Be more specific."),
    ],
]

COUNTS = {"instruction": 96, "question": 96, "code": 64, "chat": 64}
SEED = 20260101


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def make_rows() -> list[dict]:
    rng = random.Random(SEED)
    rows = []

    def pairs(templates, items, n):
        grid = [(a, b) for a in templates for b in items]
        rng.shuffle(grid)
        return grid[:n]

    for i, (tpl, t) in enumerate(pairs(INSTRUCTIONS, TOPICS, COUNTS["instruction"])):
        rows.append(("instruction", i, [("user", tpl.format(t=t))]))
    for i, (tpl, t) in enumerate(pairs(QUESTIONS, TOPICS, COUNTS["question"])):
        rows.append(("question", i, [("user", tpl.format(t=t))]))
    for i, (tpl, (task, f)) in enumerate(pairs(CODE_TEMPLATES, CODE_TASKS, COUNTS["code"])):
        rows.append(("code", i, [("user", tpl.format(task=task, f=f))]))
    for i, (turns, t) in enumerate(pairs(CHATS, TOPICS, COUNTS["chat"])):
        rows.append(("chat", i, [(r, c.format(t=t, T=_cap(t))) for r, c in turns]))

    out = []
    for kind, i, turns in rows:
        messages = [{"role": r, "content": c} for r, c in turns]
        out.append({"id": f"{kind}-{i:03d}", "kind": kind, "prompt": messages[-1]["content"], "messages": messages})
    rng.shuffle(out)  # kinds interleaved: any slice of the file is varied
    return out


SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),
        ("prompt", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ]
)


def write(path: Path) -> int:
    rows = make_rows()
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, path)
    return table.num_rows


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("prompts.parquet")
    print(f"wrote {write(target)} prompts to {target}")
