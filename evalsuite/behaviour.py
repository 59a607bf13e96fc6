"""Response statistics that catch reward hacking: length and diversity against the baseline.

A policy optimised against a reward model can learn what that model overpays for (longer
answers, one phrase over and over) instead of better answers, and a judge that shares the
reward model's taste will not object. The candidate's responses next to the baseline's, on the
same prompts, show it whatever the judge says. Words are whitespace-separated: the ratios
compare two systems on one tokenizer-free scale.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique word n-grams over all word n-grams of the responses (Li et al., 2016); 0 if none."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_words(texts: Sequence[str]) -> float:
    return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0


def _ratio(candidate: float, baseline: float) -> float | None:
    """candidate / baseline; None where the baseline has none and the candidate some (JSON has
    no infinity)."""
    if baseline > 0:
        return candidate / baseline
    return 1.0 if candidate == 0 else None


def behaviour(pairs: Sequence[dict[str, Any]], n: int = 2) -> dict[str, Any]:
    """Both systems' mean response length and distinct-n, and the candidate's ratios to the
    baseline's, from a comparison's pairs (`candidate` and `baseline` texts)."""
    sides = {side: [p[side] for p in pairs] for side in ("candidate", "baseline")}
    stats = {
        side: {"mean_words": mean_words(texts), f"distinct_{n}": distinct_n(texts, n)}
        for side, texts in sides.items()
    }
    return {
        **stats,
        "distinct_n": n,
        "length_ratio": _ratio(stats["candidate"]["mean_words"], stats["baseline"]["mean_words"]),
        "distinct_ratio": _ratio(
            stats["candidate"][f"distinct_{n}"], stats["baseline"][f"distinct_{n}"]
        ),
    }
