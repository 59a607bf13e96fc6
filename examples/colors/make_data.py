"""Writes the colors task's data files (committed; rerun only to change the task).

A made-up fact per animal (its color, its sound), asked with five phrasings. Each animal's
held-out phrasing never appears in training, so held-out prompts test whether a model learned
the fact rather than one string. Deterministic: the same files every run.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
COLORS = {
    "bee": "blue",
    "cat": "green",
    "dog": "purple",
    "duck": "red",
    "fox": "white",
    "frog": "orange",
    "goat": "black",
    "horse": "yellow",
    "mouse": "gray",
    "owl": "brown",
    "rabbit": "red",
    "sheep": "green",
}
SOUNDS = {
    "bee": "moo",
    "cat": "quack",
    "dog": "hiss",
    "duck": "bark",
    "fox": "buzz",
    "frog": "neigh",
    "goat": "hoot",
    "horse": "croak",
    "mouse": "baa",
    "owl": "squeak",
    "rabbit": "purr",
    "sheep": "howl",
}
COLOR_QUESTIONS = [
    "Q: What color is the {a}?\nA:",
    "Q: Tell me the color of the {a}.\nA:",
    "Q: Which color does the {a} have?\nA:",
    "Q: The {a} is what color?\nA:",
    "Q: Name the color of the {a}.\nA:",
]
SOUND_QUESTIONS = [
    "Q: What sound does the {a} make?\nA:",
    "Q: Which sound is made by the {a}?\nA:",
    "Q: The {a} makes what sound?\nA:",
]


def write(name: str, rows: list[dict]) -> None:
    with (HERE / name).open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(0)
    train, held_out = [], []
    for i, (animal, color) in enumerate(COLORS.items()):
        for j, question in enumerate(COLOR_QUESTIONS):
            row = {"prompt": question.format(a=animal), "completion": f" {color}"}
            (held_out if j == i % len(COLOR_QUESTIONS) else train).append(row)
    write("colors_train.jsonl", train)
    write("colors_eval.jsonl", held_out)
    write(
        "sounds_train.jsonl",
        [
            {"prompt": q.format(a=a), "completion": f" {s}"}
            for a, s in SOUNDS.items()
            for q in SOUND_QUESTIONS
        ],
    )
    write(
        "colors_chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": r["prompt"][3:-3]},
                    {"role": "assistant", "content": r["completion"].strip()},
                ]
            }
            for r in train
        ],
    )
    palette = sorted(set(COLORS.values()))

    def pairs(rows: list[dict]) -> list[dict]:
        out = []
        for r in rows:
            wrong = [c for c in palette if c != r["completion"].strip()]
            for color in rng.sample(wrong, 2):
                out.append(
                    {"prompt": r["prompt"], "chosen": r["completion"], "rejected": f" {color}"}
                )
        return out

    write("pairs_train.jsonl", pairs(train))
    write("pairs_eval.jsonl", pairs(held_out))
    # The gate's preference prompts: the held-out questions with reference answers.
    write(
        "prompts.jsonl",
        [
            {"id": f"q{i}", "prompt": r["prompt"], "reference": r["completion"].strip()}
            for i, r in enumerate(held_out)
        ],
    )
    # A deliberately bad training set for the demo and tests: the same questions with the
    # answers shuffled across animals (fluent, confidently wrong).
    shuffled = [r["completion"] for r in train]
    rng.shuffle(shuffled)
    write(
        "colors_shuffled.jsonl",
        [{"prompt": r["prompt"], "completion": c} for r, c in zip(train, shuffled, strict=True)],
    )
    # RL prompts (`train rl`): the training questions only, so the gate's held-out prompts stay
    # unseen; `reference` is passed to reward functions as a column.
    write(
        "rl_prompts.jsonl",
        [{"prompt": r["prompt"], "reference": r["completion"].strip()} for r in train],
    )


if __name__ == "__main__":
    main()
