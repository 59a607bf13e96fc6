"""Datasets of the colors tasks, read from the committed example files (offline, no hub).

lm-eval calls these through `custom_dataset: !function loaders.NAME`; paths are relative to this
file, so the tasks work from any working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from trainer.tiny import CORPUS

HERE = Path(__file__).parent
HELD_OUT = HERE.parent / "colors_eval.jsonl"
HELD_OUT_TEXT_EVERY = 8  # every 8th paragraph of the tiny corpus: general text, not the task


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def colors_qa(**_: Any) -> DatasetDict:
    """Held-out color questions: a prompt and its one-word answer."""
    return DatasetDict({"test": Dataset.from_list(_rows(HELD_OUT))})


def colors_mc(**_: Any) -> DatasetDict:
    """The same questions as multiple choice over every color the task uses."""
    rows = _rows(HELD_OUT)
    palette = sorted({r["completion"].strip() for r in rows})
    answers = [palette.index(r["completion"].strip()) for r in rows]
    docs = [
        {"prompt": r["prompt"], "choices": palette, "answer": answer}
        for r, answer in zip(rows, answers, strict=True)
    ]
    return DatasetDict({"test": Dataset.from_list(docs)})


def heldout_text(**_: Any) -> DatasetDict:
    """Paragraphs of everyday English, to catch adapters that forgot general text."""
    paragraphs = [p.strip() for p in CORPUS.read_text().split("\n\n") if p.strip()]
    texts = [{"text": p} for p in paragraphs[1::HELD_OUT_TEXT_EVERY]]
    return DatasetDict({"test": Dataset.from_list(texts)})
