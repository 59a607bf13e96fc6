"""Statistics behind the eval suite's preference comparisons and the promotion gate.

Two questions get answered here:

* "Does the candidate beat the baseline?" — `summarize_pairwise` takes one outcome per prompt
  (both systems answered the same prompt and a judge picked a side) and reports the win rate with
  a paired bootstrap interval and an exact sign test, so the gate can require more than a lucky
  point estimate.
* "How do three or more systems rank?" — `bradley_terry` fits a Bradley-Terry model to pairwise
  comparisons and reports Elo-like ratings with bootstrap intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats

OUTCOME_WIN, OUTCOME_TIE, OUTCOME_LOSS = 1.0, 0.5, 0.0  # candidate's score per paired prompt
_OUTCOMES = (OUTCOME_WIN, OUTCOME_TIE, OUTCOME_LOSS)

# Bradley-Terry ratings are reported on the Elo scale: R = 400 * log10(strength), shifted so the
# mean rating is 1000. A rating gap of D then means P(win) = 1 / (1 + 10 ** (-D / 400)).
ELO_SCALE = 400.0 / math.log(10.0)  # rating points per natural-log unit of strength
ELO_MEAN = 1000.0
# Precision of the Gaussian prior on natural-log strengths (sd = 10 ≈ 1700 Elo points): tiny
# next to the data, but it keeps a system that wins (or loses) every game at a finite rating.
BT_REGULARIZATION = 0.01
_GTOL = 1e-7  # fit tolerance: max |expected - observed| score points per system


@dataclass(frozen=True)
class PairwiseSummary:
    """Candidate vs baseline over paired prompts; win_rate counts a tie as half a win."""

    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float  # (wins + ties / 2) / n
    ci_low: float  # paired bootstrap percentile interval of win_rate
    ci_high: float
    confidence: float
    sign_test_p: float  # two-sided exact sign test, wins vs losses, ties dropped

    def to_dict(self) -> dict:
        """Plain JSON-ready dict, for reports and the gate's decision record."""
        return asdict(self)


@dataclass(frozen=True)
class Rating:
    """One system's Bradley-Terry rating (Elo scale, mean 1000) and its bootstrap interval."""

    system: str
    rating: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        """Plain JSON-ready dict, for reports."""
        return asdict(self)


def _check_confidence(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1; got {confidence!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1; got {resamples!r}")


def _check_scores(values: Sequence[float], what: str) -> np.ndarray:
    """The scores as a float array, or ValueError naming the first bad value and its index."""
    for i, value in enumerate(values):  # strings, bools, None and the like are caller bugs
        if not _is_number(value):
            raise ValueError(
                f"{what} must be 1.0 (win), 0.5 (tie) or 0.0 (loss); got {value!r} at index {i}"
            )
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(
            f"{what} must be a flat sequence of 1.0 / 0.5 / 0.0; got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"{what} is empty: need at least one")
    ok = np.isin(arr, _OUTCOMES)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"{what} must be 1.0 (win), 0.5 (tie) or 0.0 (loss); got {values[bad]!r} at index {bad}"
        )
    return arr


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval along axis 0 (same rule as scipy's method='percentile')."""
    alpha = 1.0 - confidence
    low, high = np.percentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return low, high


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (H0: a decisive prompt is a coin flip); 1.0 with no data."""
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, p=0.5, alternative="two-sided").pvalue)


def summarize_pairwise(
    outcomes: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairwiseSummary:
    """Win rate of the candidate over paired prompts, with a bootstrap interval and sign test.

    Each outcome is the candidate's score on one prompt: 1.0 win, 0.5 tie, 0.0 loss. The prompt is
    the resampling unit (candidate and baseline answers to it stay together). Since a prompt only
    contributes its outcome, drawing n prompts with replacement is the same as drawing the
    (wins, ties, losses) counts from a multinomial with the observed proportions, which is what is
    done: exact, vectorised, and O(resamples) memory however many prompts there are.
    """
    arr = _check_scores(outcomes, "outcomes")
    _check_confidence(confidence, resamples)
    n = int(arr.size)
    wins = int(np.count_nonzero(arr == OUTCOME_WIN))
    ties = int(np.count_nonzero(arr == OUTCOME_TIE))
    losses = n - wins - ties
    win_rate = (wins + ties / 2) / n

    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.array([wins, ties, losses]) / n, size=resamples)
    boot = (counts[:, 0] + counts[:, 1] / 2) / n
    low, high = _percentile_interval(boot, confidence)
    return PairwiseSummary(
        n=n,
        wins=wins,
        ties=ties,
        losses=losses,
        win_rate=win_rate,
        ci_low=float(low),
        ci_high=float(high),
        confidence=confidence,
        sign_test_p=sign_test_p(wins, losses),
    )


def _fit_log_strengths(
    first: np.ndarray,
    second: np.ndarray,
    score: np.ndarray,
    games: np.ndarray,
    k: int,
    regularization: float,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """MAP natural-log strengths for pair totals: `score[p]` points for `first[p]` in `games[p]`.

    Minimises the Bradley-Terry negative log-likelihood plus regularization/2 * |theta|^2. The
    objective is strictly convex, and its minimiser has mean zero (the likelihood only sees
    differences), so no separate anchoring is needed.
    """
    lost = games - score

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d = theta[first] - theta[second]
        # -log sigmoid(x) == logaddexp(0, -x), stable for large |x|.
        nll = score @ np.logaddexp(0.0, -d) + lost @ np.logaddexp(0.0, d)
        g = games * _sigmoid(d) - score  # d nll / d d
        grad = np.bincount(first, g, k) - np.bincount(second, g, k) + regularization * theta
        return float(nll + 0.5 * regularization * theta @ theta), grad

    def hessian(theta: np.ndarray) -> np.ndarray:
        p = _sigmoid(theta[first] - theta[second])
        w = games * p * (1.0 - p)
        h = np.zeros((k, k))
        np.add.at(h, (first, first), w)
        np.add.at(h, (second, second), w)
        np.add.at(h, (first, second), -w)
        np.add.at(h, (second, first), -w)
        h[np.diag_indices(k)] += regularization
        return h

    x0 = np.zeros(k) if start is None else start
    result = optimize.minimize(
        objective, x0, jac=True, hess=hessian, method="trust-exact", options={"gtol": _GTOL}
    )
    # trust-exact can stop on "failure to predict improvement" at round-off level; that is the
    # optimum all the same. The gradient is in expected-minus-observed points per system.
    if not result.success and np.abs(result.jac).max() > 1e3 * _GTOL:
        raise RuntimeError(f"Bradley-Terry fit did not converge: {result.message}")
    return result.x - result.x.mean()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def bradley_terry(
    comparisons: Sequence[tuple[str, str, float]],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    regularization: float = BT_REGULARIZATION,
) -> list[Rating]:
    """Bradley-Terry ratings for two or more systems from pairwise judgements, best first.

    Each comparison is (system_a, system_b, score of a): 1 win, 0.5 tie, 0 loss; a tie is half a
    win for each side. Strengths are fitted by maximum likelihood with a weak Gaussian prior
    (`regularization`, see BT_REGULARIZATION) so an undefeated or winless system stays finite,
    then reported as Elo-like ratings: 400 * log10(strength), mean-centred to 1000.

    Intervals are percentile bootstrap intervals over comparisons resampled with replacement
    within each pair of systems (a stratified bootstrap: each pair keeps its number of games, as
    an eval that judges every pair on a fixed prompt set does by design). So no resample loses
    a system or disconnects the comparison graph. Resampling is done as multinomial counts over
    each pair's (win, tie, loss) cells, which is the same distribution and vectorised.
    Ratings are only comparable within a connected set of systems, and a system that won (or
    lost) every game has a rating and interval set by the prior, not the data: read them as
    "far above (below) the rest", never as a measured gap.
    """
    _check_confidence(confidence, resamples)
    if regularization <= 0:
        raise ValueError(f"regularization must be positive; got {regularization!r}")
    for i, comparison in enumerate(comparisons):
        if len(comparison) != 3:
            raise ValueError(
                f"comparison {i} must be (system_a, system_b, score); got {comparison!r}"
            )
        if comparison[0] == comparison[1]:
            raise ValueError(f"comparison {i} compares {comparison[0]!r} with itself")
    systems = sorted({c[0] for c in comparisons} | {c[1] for c in comparisons})
    if len(systems) < 2:
        raise ValueError(
            f"Bradley-Terry needs comparisons between at least 2 systems; got {len(systems)}"
        )
    scores = _check_scores([c[2] for c in comparisons], "comparison scores")
    index = {name: i for i, name in enumerate(systems)}
    a = np.array([index[c[0]] for c in comparisons])
    b = np.array([index[c[1]] for c in comparisons])
    # Orient each comparison as (lower index, higher index) and group identical (pair, score) cells.
    flip = a > b
    first, second = np.where(flip, b, a), np.where(flip, a, b)
    oriented = np.where(flip, 1.0 - scores, scores)
    cells, cell_counts = np.unique(
        np.stack([first, second, oriented * 2]).T, axis=0, return_counts=True
    )
    cell_first, cell_second = cells[:, 0].astype(int), cells[:, 1].astype(int)
    cell_score = cells[:, 2] / 2
    k = len(systems)

    def fit(counts: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
        used = counts > 0
        return _fit_log_strengths(
            cell_first[used],
            cell_second[used],
            (cell_score * counts)[used],
            counts[used].astype(float),
            k,
            regularization,
            start,
        )

    theta = fit(cell_counts)
    rng = np.random.default_rng(seed)
    _, cell_pair = np.unique(cells[:, :2], axis=0, return_inverse=True)
    boot_counts = np.zeros((resamples, len(cells)), dtype=np.int64)
    for pair in range(int(cell_pair.max()) + 1):
        in_pair = np.flatnonzero(cell_pair == pair)
        games = int(cell_counts[in_pair].sum())
        boot_counts[:, in_pair] = rng.multinomial(
            games, cell_counts[in_pair] / games, size=resamples
        )
    boot = np.array([fit(counts, theta) for counts in boot_counts])
    low, high = _percentile_interval(ELO_MEAN + ELO_SCALE * boot, confidence)
    ratings = ELO_MEAN + ELO_SCALE * theta
    result = [
        Rating(system=name, rating=float(ratings[i]), ci_low=float(low[i]), ci_high=float(high[i]))
        for i, name in enumerate(systems)
    ]
    return sorted(result, key=lambda r: (-r.rating, r.system))
