"""The gate's decisions: scores and a comparison summary in, the policy's checks and a verdict
out. Pure functions of their inputs, kept apart from running anything, so the rules that block a
release can be read, and tested, on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evalsuite.policy import BenchmarkCheck, GatePolicy
from gateway.contract import Verdict


@dataclass(frozen=True)
class Check:
    """One policy check and how the candidate did on it."""

    name: str
    kind: str  # benchmark_min | benchmark_vs_production | benchmark_vs_base | preference |
    # length_ratio | distinct_ratio
    required: bool
    passed: bool
    value: float | None
    threshold: float | None
    detail: str


def _regression(candidate: float, reference: float, higher_is_better: bool) -> float:
    """How far the candidate moved in the bad direction (negative: it improved)."""
    return reference - candidate if higher_is_better else candidate - reference


def benchmark_checks(
    check: BenchmarkCheck,
    scores: dict[str, dict[str, float]],
    higher_is_better: bool,
) -> list[Check]:
    """The bounds of one benchmark, applied to the candidate's score."""
    key, value = check.key, scores["candidate"][check.key]
    label = f"{check.task} {check.metric}"
    out: list[Check] = []
    if check.threshold is not None:
        ok = value >= check.threshold if higher_is_better else value <= check.threshold
        op, miss = (">=", "<") if higher_is_better else ("<=", ">")
        detail = f"{value:.4g} {op if ok else miss} {check.threshold:g}"
        out.append(
            Check(f"{label} {op} {check.threshold:g}", "benchmark_min", check.required, ok,
                  value, check.threshold, detail)
        )  # fmt: skip
    for role, allowed in (
        ("production", check.max_regression_vs_production),
        ("base", check.max_regression_vs_base),
    ):
        if allowed is None:
            continue
        name, against = f"{label} vs {role}", role
        if role == "production" and role not in scores:
            against = "base"  # no production yet: a first version must not regress from the base
        reference = scores[against][key]
        budget = allowed * abs(reference) if check.relative else allowed
        moved = _regression(value, reference, higher_is_better)
        unit = f" ({allowed:.0%} of {reference:.4g})" if check.relative else ""
        out.append(
            Check(
                name,
                f"benchmark_vs_{role}",
                check.required,
                moved <= budget,
                value,
                budget,
                f"{value:.4g} vs {against} {reference:.4g}: regression {moved:.4g}, "
                f"allowed {budget:.4g}{unit}",
            )
        )
    return out


def preference_check(policy: GatePolicy, summary: dict[str, Any]) -> Check:
    """The win rate's interval against the policy's lowest acceptable lower bound."""
    pref = policy.preference
    assert pref is not None
    low, bound = summary["ci_low"], pref.min_win_rate_lower_bound
    return Check(
        f"win rate CI low >= {bound:g}",
        "preference",
        pref.required,
        low >= bound,
        low,
        bound,
        f"win rate {summary['win_rate']:.3f}, {summary['confidence']:.0%} CI "
        f"[{summary['ci_low']:.3f}, {summary['ci_high']:.3f}], sign test p "
        f"{summary['sign_test_p']:.3g} ({summary['wins']}W/{summary['ties']}T/"
        f"{summary['losses']}L)",
    )


def _show(ratio: float | None) -> str:
    return "unbounded (the baseline has none)" if ratio is None else f"{ratio:.3g}"


def behaviour_checks(policy: GatePolicy, behaviour: dict[str, Any]) -> list[Check]:
    """The reward-hacking bounds: response length and distinct-n against the baseline's."""
    pref = policy.preference
    assert pref is not None
    out = []
    n, stats = behaviour["distinct_n"], (behaviour["candidate"], behaviour["baseline"])
    if pref.max_length_ratio is not None:  # None: the baseline said nothing, the candidate did
        ratio = behaviour["length_ratio"]
        out.append(
            Check(f"length ratio <= {pref.max_length_ratio:g}", "length_ratio", pref.required,
                  ratio is not None and ratio <= pref.max_length_ratio, ratio,
                  pref.max_length_ratio, f"mean words {stats[0]['mean_words']:.1f} vs baseline "
                  f"{stats[1]['mean_words']:.1f}: ratio {_show(ratio)}")
        )  # fmt: skip
    if pref.min_distinct_ratio is not None:  # None: only the candidate has n-grams at all
        ratio, key = behaviour["distinct_ratio"], f"distinct_{n}"
        out.append(
            Check(f"distinct-{n} ratio >= {pref.min_distinct_ratio:g}", "distinct_ratio",
                  pref.required, ratio is None or ratio >= pref.min_distinct_ratio, ratio,
                  pref.min_distinct_ratio, f"distinct-{n} {stats[0][key]:.3f} vs baseline "
                  f"{stats[1][key]:.3f}: ratio {_show(ratio)}")
        )  # fmt: skip
    return out


def policy_checks(
    policy: GatePolicy,
    scores: dict[str, dict[str, float]],
    directions: dict[str, bool],
    preference: dict[str, Any] | None,
    behaviour: dict[str, Any] | None = None,
) -> list[Check]:
    """Every check of the policy, benchmarks first: `scores` by role (candidate, production,
    base) then check key, `directions` (higher is better) by check key, and the comparison's
    summary and response statistics (evalsuite/behaviour.py) when the policy has one."""
    checks = [
        c
        for bench in policy.benchmarks
        for c in benchmark_checks(bench, scores, directions[bench.key])
    ]
    if policy.preference is not None:
        assert preference is not None, "the policy's comparison did not run"
        checks.append(preference_check(policy, preference))
        if behaviour is not None:
            checks.extend(behaviour_checks(policy, behaviour))
    return checks


def decide(checks: list[Check]) -> tuple[Verdict, list[Check]]:
    """("fail", the failed required checks) if any required check failed, else ("pass", [])
    (a failed check that is not required is a warning). "error" is never decided here: it is
    what the gate says when there is nothing complete to decide on."""
    failed = [c for c in checks if c.required and not c.passed]
    return ("fail" if failed else "pass"), failed
