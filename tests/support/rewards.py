"""Reward functions for RL tests (trl's contract: f(prompts, completions, **columns) -> floats)."""

from __future__ import annotations

from typing import Any


def pays_for_length(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """A reward that pays for length only: what a reward hack looks like, on purpose."""
    return [float(len(str(c).split())) for c in completions]
