"""What every judge is: pairs in, the candidate's outcome per pair out (1 win, 0.5 tie, 0 loss),
with the evidence behind each outcome kept for the report."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from evalsuite.errors import EvalInputError
from evalsuite.stats import OUTCOME_LOSS, OUTCOME_TIE, OUTCOME_WIN

if TYPE_CHECKING:
    from evalsuite.compare import Pair

WIN, TIE, LOSS = OUTCOME_WIN, OUTCOME_TIE, OUTCOME_LOSS  # the candidate's outcome on a pair


@dataclass(frozen=True)
class Judgement:
    """The candidate's outcome on one pair and a JSON-ready record of why."""

    outcome: float
    detail: dict[str, Any] = field(default_factory=dict)


class Judge(ABC):
    """A pluggable judge (registered by import string in `evalsuite.judges.JUDGES`)."""

    name: ClassVar[str] = ""
    # True when the judge compares against `Pair.reference` (checked before generating).
    needs_reference: bool = False
    # The option naming the served model the judge asks through the gateway ("" base, NAME,
    # NAME@alias, NAME@vN), if it asks one: the gate pins it to NAME@vN before anything runs.
    adapter_option: ClassVar[str | None] = None

    @abstractmethod
    async def judge(self, pairs: Sequence[Pair]) -> list[Judgement]:
        """One Judgement per pair, in order."""

    def config(self) -> dict[str, Any]:
        """The options that define this judge, JSON-ready, so a report says how it judged."""
        return {}

    def model_digests(self) -> list[str]:
        """Content hashes (gateway.contract.folder_digest) of the local models it scores with,
        so the gate can tell whether it is a reward model the candidate was trained against."""
        return []


def outcome_from_scores(candidate: float, baseline: float, tolerance: float) -> float:
    """Higher score wins; scores within `tolerance` of each other are a tie."""
    if abs(candidate - baseline) <= tolerance:
        return TIE
    return WIN if candidate > baseline else LOSS


def references(pairs: Sequence[Pair], judge: str) -> list[str]:
    """Every pair's reference, or EvalInputError naming the pairs that have none."""
    missing = [p.id for p in pairs if p.reference is None]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EvalInputError(
            f"judge {judge!r} needs a reference answer; pairs without: {shown}{more}"
        )
    return [p.reference for p in pairs]  # type: ignore[misc]
