"""The eval suite's statistics, checked against known values and scipy's own implementations."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats

from evalsuite.stats import (
    OUTCOME_LOSS,
    OUTCOME_TIE,
    OUTCOME_WIN,
    PairwiseSummary,
    Rating,
    bradley_terry,
    summarize_pairwise,
)

W, T, L = OUTCOME_WIN, OUTCOME_TIE, OUTCOME_LOSS


def _outcomes(wins: int, ties: int, losses: int) -> list[float]:
    return [W] * wins + [T] * ties + [L] * losses


def _win_prob(gap: float) -> float:
    """P(win) for an Elo rating gap."""
    return 1.0 / (1.0 + 10 ** (-gap / 400))


# --- summarize_pairwise: counts, win rate, sign test ---


def test_win_rate_counts_ties_as_half() -> None:
    s = summarize_pairwise([W, W, T, L, T], resamples=100)
    assert (s.n, s.wins, s.ties, s.losses) == (5, 2, 2, 1)
    assert s.win_rate == pytest.approx(0.6)  # (2 + 2/2) / 5
    assert s.confidence == 0.95


@pytest.mark.parametrize(
    ("wins", "ties", "losses", "expected"),
    [
        (9, 3, 1, 22 / 1024),  # 2 * P(X >= 9), X ~ Bin(10, 1/2) = 2 * 11/1024
        (9, 0, 1, 22 / 1024),  # ties change nothing
        (5, 7, 5, 1.0),
        (0, 4, 3, 0.25),  # 2 * (1/2)^3
        (12, 30, 3, None),  # no hand value: compared with scipy only
    ],
)
def test_sign_test_drops_ties_and_matches_binomtest(
    wins: int, ties: int, losses: int, expected: float | None
) -> None:
    s = summarize_pairwise(_outcomes(wins, ties, losses), resamples=100)
    reference = stats.binomtest(wins, wins + losses, p=0.5, alternative="two-sided").pvalue
    assert s.sign_test_p == pytest.approx(reference, rel=1e-12)
    if expected is not None:
        assert s.sign_test_p == pytest.approx(expected, rel=1e-12)


def test_all_ties_sign_test_is_one() -> None:
    s = summarize_pairwise([T] * 8, resamples=100)
    assert s.sign_test_p == 1.0
    assert s.win_rate == 0.5
    assert (s.ci_low, s.ci_high) == (0.5, 0.5)


def test_all_wins() -> None:
    s = summarize_pairwise([W] * 10, resamples=100)
    assert s.win_rate == 1.0
    assert (s.ci_low, s.ci_high) == (1.0, 1.0)
    assert s.sign_test_p == pytest.approx(2 * 0.5**10)


# --- summarize_pairwise: bootstrap interval ---


@pytest.mark.parametrize(("wins", "ties", "losses"), [(30, 10, 20), (55, 5, 20), (8, 2, 10)])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_bootstrap_interval_matches_scipy(
    wins: int, ties: int, losses: int, confidence: float
) -> None:
    outcomes = _outcomes(wins, ties, losses)
    ours = summarize_pairwise(outcomes, confidence=confidence, resamples=10_000, seed=7)
    ref = stats.bootstrap(
        (np.array(outcomes),),
        np.mean,
        method="percentile",
        confidence_level=confidence,
        n_resamples=10_000,
        vectorized=True,
        rng=np.random.default_rng(123),
    ).confidence_interval
    assert ours.ci_low == pytest.approx(ref.low, abs=0.01)
    assert ours.ci_high == pytest.approx(ref.high, abs=0.01)
    assert ours.ci_low <= ours.win_rate <= ours.ci_high


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    outcomes = _outcomes(17, 6, 11)
    assert summarize_pairwise(outcomes, seed=3) == summarize_pairwise(outcomes, seed=3)


def test_bootstrap_interval_narrows_with_more_data() -> None:
    small = summarize_pairwise(_outcomes(24, 8, 16))
    large = summarize_pairwise(_outcomes(24, 8, 16) * 4)
    assert large.win_rate == pytest.approx(small.win_rate)
    assert large.ci_low <= large.win_rate <= large.ci_high
    # Standard error scales as 1/sqrt(n): 4x the prompts should about halve the width.
    ratio = (large.ci_high - large.ci_low) / (small.ci_high - small.ci_low)
    assert 0.4 < ratio < 0.6


def test_summary_to_dict() -> None:
    s = summarize_pairwise(_outcomes(3, 1, 1), resamples=50)
    d = s.to_dict()
    assert d["n"] == 5 and d["wins"] == 3 and d["win_rate"] == pytest.approx(0.7)
    assert set(d) == set(PairwiseSummary.__dataclass_fields__)


# --- summarize_pairwise: bad input ---


@pytest.mark.parametrize(
    ("outcomes", "message"),
    [
        ([], "outcomes is empty"),
        ([W, 0.7, L], "got 0.7 at index 1"),
        ([W, T, 2], "got 2 at index 2"),
        ([W, math.nan], "got nan at index 1"),
        (["1"], "got '1' at index 0"),
        ([W, True], "got True at index 1"),
        ([None], "got None at index 0"),
    ],
)
def test_bad_outcomes_raise(outcomes: list, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        summarize_pairwise(outcomes)
    if outcomes:
        assert "must be 1.0 (win), 0.5 (tie) or 0.0 (loss)" in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"confidence": 1.0}, "confidence"), ({"confidence": 0}, "confidence"),
     ({"resamples": 0}, "resamples")],
)  # fmt: skip
def test_bad_parameters_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        summarize_pairwise([W, L], **kwargs)


# --- Bradley-Terry ---


def _assert_intervals_contain_estimates(ratings: list[Rating]) -> None:
    for r in ratings:
        assert all(math.isfinite(x) for x in (r.rating, r.ci_low, r.ci_high))
        assert r.ci_low <= r.rating <= r.ci_high, r


def _simulate(true: dict[str, float], games_per_pair: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    names = sorted(true)
    comparisons = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            won = rng.random(games_per_pair) < _win_prob(true[a] - true[b])
            comparisons += [(a, b, W) if w else (b, a, W) for w in won]  # both orientations
    return comparisons


def test_bt_two_systems_three_to_one() -> None:
    # A beats B 75% of the time -> strengths 3:1 -> a gap of 400 * log10(3) ≈ 190.85.
    ratings = bradley_terry([("A", "B", W)] * 300 + [("A", "B", L)] * 100, resamples=200)
    assert [r.system for r in ratings] == ["A", "B"]
    a, b = ratings
    assert a.rating - b.rating == pytest.approx(400 * math.log10(3), abs=0.1)
    assert (a.rating + b.rating) / 2 == pytest.approx(1000)
    _assert_intervals_contain_estimates(ratings)


def test_bt_ties_are_half_wins() -> None:
    # 2 wins + 2 ties out of 4 is also a 0.75 score; scores given from either side count the same.
    block = [("A", "B", W), ("A", "B", W), ("A", "B", T), ("B", "A", T)]
    ratings = bradley_terry(block * 100, resamples=200)
    assert ratings[0].rating - ratings[1].rating == pytest.approx(400 * math.log10(3), abs=0.1)


def test_bt_cycle_is_a_dead_heat() -> None:
    ratings = bradley_terry([("A", "B", W), ("B", "C", W), ("C", "A", W)], resamples=200)
    for r in ratings:
        assert r.rating == pytest.approx(1000, abs=1e-6)
    assert [r.system for r in ratings] == ["A", "B", "C"]  # equal ratings: by name


def test_bt_recovers_known_strengths() -> None:
    true = {"A": 1200.0, "B": 1000.0, "C": 800.0}  # already mean 1000
    comparisons = _simulate(true, games_per_pair=1000, seed=1)
    ratings = bradley_terry(comparisons, resamples=500)
    assert [r.system for r in ratings] == ["A", "B", "C"]
    got = {r.system: r.rating for r in ratings}
    assert got["A"] - got["B"] == pytest.approx(200, abs=30)
    assert got["B"] - got["C"] == pytest.approx(200, abs=30)
    assert got["A"] - got["C"] == pytest.approx(400, abs=30)
    _assert_intervals_contain_estimates(ratings)
    for r in ratings:  # with this seed the truth lies inside every 95% interval
        assert r.ci_low <= true[r.system] <= r.ci_high, r


def test_bt_is_the_maximum_likelihood_fit() -> None:
    # At the MLE every system's expected score equals its observed score (the prior is tiny).
    comparisons = _simulate({"A": 1100, "B": 1000, "C": 950, "D": 700}, 200, seed=5)
    comparisons += [("B", "D", T)] * 20
    got = {r.system: r.rating for r in bradley_terry(comparisons, resamples=20)}
    observed = dict.fromkeys(got, 0.0)
    expected = dict.fromkeys(got, 0.0)
    for a, b, score in comparisons:
        p = _win_prob(got[a] - got[b])
        observed[a] += score
        observed[b] += 1 - score
        expected[a] += p
        expected[b] += 1 - p
    for system in got:
        assert expected[system] == pytest.approx(observed[system], abs=0.1)


def test_bt_undefeated_system_stays_finite() -> None:
    comparisons = [("A", "B", W)] * 20 + [("C", "A", L)] * 20 + [("B", "C", W), ("C", "B", W)] * 10
    ratings = bradley_terry(comparisons, resamples=200)
    assert ratings[0].system == "A"
    _assert_intervals_contain_estimates(ratings)
    gap = ratings[0].rating - ratings[1].rating
    assert 400 < gap < 3000  # far ahead, but a number
    # Also when the only comparisons are one-sided.
    only = bradley_terry([("X", "Y", W)] * 5, resamples=50)
    _assert_intervals_contain_estimates(only)
    assert only[0].system == "X" and only[0].rating > only[1].rating


def test_bt_is_deterministic_and_serialisable() -> None:
    comparisons = _simulate({"A": 1050, "B": 1000, "C": 980}, 30, seed=2)
    first = bradley_terry(comparisons, resamples=100, seed=4)
    assert first == bradley_terry(comparisons, resamples=100, seed=4)
    assert first[0].to_dict().keys() == {"system", "rating", "ci_low", "ci_high"}
    assert [r.rating for r in first] == sorted((r.rating for r in first), reverse=True)


@pytest.mark.parametrize(
    ("comparisons", "message"),
    [
        ([], "at least 2 systems; got 0"),
        ([("A", "A", W)], "compares 'A' with itself"),
        ([("A", "B", W), ("A", "B", 0.25)], "got 0.25 at index 1"),
        ([("A", "B")], "must be \\(system_a, system_b, score\\)"),
    ],
)
def test_bt_bad_input_raises(comparisons: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bradley_terry(comparisons, resamples=10)
