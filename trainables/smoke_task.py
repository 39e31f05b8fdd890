"""The embedded default's task: a small, deterministic world of facts.

The tiny builtin base models are pretrained on plain sentences about these facts
("the color of a mango is orange ."), and the smoke sweep fine-tunes them on instructions that
ask about the same facts ("What color is this fruit?" / "mango" -> "orange"). A tiny model can
learn that mapping in a few dozen LoRA steps, and how fast it does depends visibly on the
learning rate, the rank and which layers are adapted: what a sweep should discover.

Regenerate the shipped datasets (and the GSM8K-shaped variant smoke_answers.jsonl, and the
forgetting set smoke_general.txt, beside it) with:
    python -m trainables.smoke_task sweeps/data/smoke_instructions.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

TASK_VERSION = 1

FRUIT_COLORS = {
    "apple": "red",
    "banana": "yellow",
    "cherry": "red",
    "grape": "purple",
    "lemon": "yellow",
    "mango": "orange",
    "olive": "green",
    "peach": "pink",
    "pear": "green",
    "plum": "purple",
    "blueberry": "blue",
    "lime": "green",
}
LETTERS = "abcde"
MAX_NUMBER = 60


def _fact(rng: random.Random) -> tuple[str, dict[str, str]]:
    """One fact as (pretraining sentence, instruction row)."""
    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randrange(MAX_NUMBER)
        return (
            f"the number after {n} is {n + 1} .",
            {"instruction": "What number comes after this one?", "input": str(n), "output": str(n + 1)},
        )
    if kind == 1:
        fruit = rng.choice(sorted(FRUIT_COLORS))
        return (
            f"the color of a {fruit} is {FRUIT_COLORS[fruit]} .",
            {"instruction": "What color is this fruit?", "input": fruit, "output": FRUIT_COLORS[fruit]},
        )
    letters = [rng.choice(LETTERS) for _ in range(3)]
    return (
        f"the letters {' '.join(letters)} sorted are {' '.join(sorted(letters))} .",
        {"instruction": "Sort these letters.", "input": " ".join(letters), "output": " ".join(sorted(letters))},
    )


def pretraining_sentences(count: int, seed: int = 1) -> list[str]:
    """Plain sentences stating facts, for pretraining the tiny base models."""
    rng = random.Random(seed)
    return [_fact(rng)[0] for _ in range(count)]


def instruction_rows(count: int = 1200, seed: int = 0) -> list[dict[str, str]]:
    """Instruction rows (instruction, input, output) about the same facts."""
    rng = random.Random(seed)
    return [_fact(rng)[1] for _ in range(count)]


def answer_rows(count: int = 600, seed: int = 2) -> list[dict[str, str]]:
    """The smoke task with GSM8K-shaped answers: the fact as a sentence, then '### <answer>'
    (sweeps/data/smoke_answers.jsonl; '###' because the builtin word-level tokenizer knows it
    from the prompt template, and '####' would be <unk>), so exact match needs the extraction regex to score the answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        sentence, row = _fact(rng)
        rows.append({**row, "output": f"{sentence} ### {row['output']}"})
    return rows


def write_jsonl(path: str | Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "sweeps/data/smoke_instructions.jsonl"
    write_jsonl(target, instruction_rows())
    print(f"wrote {target}")
    folder = Path(target).parent
    write_jsonl(folder / "smoke_answers.jsonl", answer_rows())
    # A forgetting set (eval.metrics: forgetting): plain sentences like those the tiny models were
    # pretrained on, drawn with another seed.
    (folder / "smoke_general.txt").write_text("".join(s + "\n" for s in pretraining_sentences(64, seed=7)))
    print(f"wrote {folder / 'smoke_answers.jsonl'} and {folder / 'smoke_general.txt'}")
