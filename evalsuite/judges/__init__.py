"""Judges for preference comparisons, registered lazily by import string (lm-eval style): a
judge's heavy dependencies (torch for the reward model) load only when it is used.

    judge = make_judge("rouge_l", tolerance=0.01)
    judge = make_judge("my_pkg.judges:ToxicityJudge", threshold=0.5)  # any Judge subclass
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from evalsuite.errors import EvalInputError
from evalsuite.judges.base import LOSS, TIE, WIN, Judge, Judgement

__all__ = [
    "JUDGES",
    "LOSS",
    "TIE",
    "WIN",
    "Judge",
    "Judgement",
    "judge_adapter",
    "judge_class",
    "make_judge",
]

JUDGES: dict[str, str] = {
    "exact_match": "evalsuite.judges.reference:ExactMatchJudge",
    "rouge_l": "evalsuite.judges.reference:RougeLJudge",
    "reward_model": "evalsuite.judges.reward:RewardModelJudge",
    "llm_judge": "evalsuite.judges.llm:LLMJudge",
}


def judge_class(name: str) -> type[Judge]:
    """The class registered as `name`, or named by a "module:Class" import string."""
    if name in JUDGES:
        module, _, attr = JUDGES[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    if ":" not in name:
        raise EvalInputError(f"unknown judge {name!r}; known judges: {', '.join(sorted(JUDGES))}")
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise EvalInputError(f"judge {name!r}: cannot import it: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Judge)):
        raise EvalInputError(f"judge {name!r} is not a subclass of evalsuite.judges.Judge")
    return cls


def judge_adapter(name: str, options: Mapping[str, Any]) -> tuple[str, str] | None:
    """(option, reference) of the served model judge `name` would ask through the gateway with
    these options (the option's default when they leave it out), or None if it asks none."""
    cls = judge_class(name)
    option = cls.adapter_option
    if option is None:
        return None
    default = inspect.signature(cls).parameters[option].default
    reference = options.get(option, "" if default is inspect.Parameter.empty else default)
    return option, str(reference)


def make_judge(
    name: str, *, gateway: str | None = None, deadline: float | None = None, **options: Any
) -> Judge:
    """A judge built from its options; a wrong or missing option is an EvalInputError that lists
    the options the judge takes. `gateway` (host:port) and `deadline` (seconds per request)
    become the `target` and `timeout` of judges that ask a served model, unless the options set
    their own."""
    cls = judge_class(name)
    signature = inspect.signature(cls)
    for option, value in (("target", gateway), ("timeout", deadline)):
        if value is not None and option in signature.parameters:
            options.setdefault(option, value)
    try:
        signature.bind(**options)
    except TypeError as e:
        takes = ", ".join(
            p.name if p.default is p.empty else f"{p.name}={p.default!r}"
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )
        raise EvalInputError(f"judge {name!r}: {e}; it takes: {takes or 'no options'}") from None
    return cls(**options)
