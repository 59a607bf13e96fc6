"""Judges that compare each answer with the prompt's reference answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from evalsuite.errors import EvalInputError
from evalsuite.judges.base import LOSS, TIE, WIN, Judge, Judgement, outcome_from_scores, references

if TYPE_CHECKING:
    from evalsuite.compare import Pair


def normalize(text: str) -> str:
    """Case-folded, whitespace collapsed and trimmed: " Blue\\n" matches "blue"."""
    return " ".join(text.split()).casefold()


class ExactMatchJudge(Judge):
    """Right beats wrong; both right or both wrong is a tie (after `normalize`)."""

    name = "exact_match"
    needs_reference = True

    async def judge(self, pairs: Sequence[Pair]) -> list[Judgement]:
        judgements = []
        for pair, reference in zip(pairs, references(pairs, self.name), strict=True):
            target = normalize(reference)
            cand, base = normalize(pair.candidate) == target, normalize(pair.baseline) == target
            outcome = TIE if cand == base else WIN if cand else LOSS
            detail = {"candidate_correct": cand, "baseline_correct": base}
            judgements.append(Judgement(outcome, detail))
        return judgements


class RougeLJudge(Judge):
    """ROUGE-L F-measure against the reference (rouge-score's RougeScorer); higher wins, scores
    within `tolerance` tie. rouge-score's tokenizer keeps only ASCII letters and digits, so
    answers in other scripts all score 0 (a tie): use another judge for them."""

    name = "rouge_l"
    needs_reference = True

    def __init__(self, tolerance: float = 1e-6, use_stemmer: bool = False) -> None:
        from rouge_score import rouge_scorer

        if tolerance < 0:
            raise EvalInputError(f"rouge_l: tolerance must be >= 0, got {tolerance}")
        self.tolerance, self.use_stemmer = float(tolerance), bool(use_stemmer)
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=self.use_stemmer)

    def score(self, reference: str, answer: str) -> float:
        return self._scorer.score(reference, answer)["rougeL"].fmeasure

    async def judge(self, pairs: Sequence[Pair]) -> list[Judgement]:
        judgements = []
        for pair, reference in zip(pairs, references(pairs, self.name), strict=True):
            cand, base = self.score(reference, pair.candidate), self.score(reference, pair.baseline)
            detail = {"candidate_rouge_l": cand, "baseline_rouge_l": base}
            judgements.append(Judgement(outcome_from_scores(cand, base, self.tolerance), detail))
        return judgements

    def config(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "use_stemmer": self.use_stemmer}
