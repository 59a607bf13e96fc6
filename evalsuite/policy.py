"""The promotion gate's policy: which benchmarks and comparisons a candidate must pass (YAML).

    include_paths: [tasks]              # lm-eval task folders, relative to this file
    request_timeout_s: 600              # deadline of every request to the gateway
    benchmarks:
      - task: colors_qa
        metric: exact_match
        threshold: 0.5                  # absolute: >= (higher is better) or <= (lower is better)
        max_regression_vs_production: 0.05
      - task: heldout_ppl
        metric: word_perplexity         # lower is better: lm-eval's higher_is_better says so
        max_regression_vs_base: 0.10
        relative: true                  # 10% worse than the base at most
    preference:
      prompts: prompts.jsonl
      judge: exact_match
      min_win_rate_lower_bound: 0.5

A regression is a move in the metric's bad direction (from lm-eval's `higher_is_better`);
comparing with the base catches a candidate that forgot general ability on tasks unrelated to
its own (catastrophic forgetting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evalsuite.errors import EvalInputError
from evalsuite.fanout import DEFAULT_TIMEOUT_S
from gateway.config_files import SettingsFileError, apply_overrides, read_mapping, validate
from gateway.contract import PRODUCTION

# Greedy and short unless the policy says otherwise: comparisons must be reproducible.
DEFAULT_SAMPLING: dict[str, Any] = {"temperature": 0.0, "max_tokens": 64}


class _Section(BaseModel):
    """Unknown keys are errors: a typo must not silently drop a check."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BenchmarkCheck(_Section):
    """Bounds on one lm-eval metric of one task."""

    task: str = Field(min_length=1)
    """lm-eval task name (from lm-eval's own tasks, or a folder in include_paths)."""
    metric: str = Field(min_length=1)
    """Metric as the task reports it: acc, exact_match, word_perplexity, ..."""
    filter: str = "none"
    """lm-eval filter the metric is read under ("none" unless the task defines filters)."""
    threshold: float | None = None
    """Absolute bound: the score must be >= this (higher is better) or <= this (lower)."""
    max_regression_vs_production: float | None = Field(None, ge=0)
    """Largest move in the bad direction allowed against the production version."""
    max_regression_vs_base: float | None = Field(None, ge=0)
    """Largest move in the bad direction allowed against the base model (no adapter)."""
    relative: bool = False
    """Regressions are fractions of the reference score instead of metric units."""
    required: bool = True
    """A failed required check fails the gate; others are reported as warnings."""

    @model_validator(mode="after")
    def _has_a_bound(self) -> BenchmarkCheck:
        bounds = (self.threshold, self.max_regression_vs_production, self.max_regression_vs_base)
        if all(b is None for b in bounds):
            raise ValueError(
                "needs threshold, max_regression_vs_production or max_regression_vs_base"
            )
        return self

    @property
    def key(self) -> str:
        """`task/metric,filter`: how reports name the score."""
        return f"{self.task}/{self.metric},{self.filter}"


class PreferenceCheck(_Section):
    """A candidate-vs-baseline comparison on a prompt set, judged pair by pair."""

    prompts: Path
    """JSONL prompt set (prompt, optional id and reference), relative to the policy file."""
    baseline: str = PRODUCTION
    """`production` (the base when there is none yet), `base`, or any adapter reference."""
    judge: str = "exact_match"
    """Judge name from evalsuite.judges (exact_match, rouge_l, reward_model, llm_judge)."""
    judge_options: dict[str, Any] = Field(default_factory=dict)
    """Keyword options for the judge (e.g. reward model path, judge adapter, template)."""
    sampling: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_SAMPLING))
    """Generation options, the same for both systems (temperature, max_tokens, stop, seed...)."""
    min_win_rate_lower_bound: float = Field(0.5, ge=0, le=1)
    """The win rate's confidence interval must start at or above this (ties count half)."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Confidence level of the paired bootstrap interval."""
    required: bool = True
    """A failed required check fails the gate; otherwise it is a warning."""
    max_length_ratio: float | None = Field(None, gt=0)
    """Reward-hacking check: the candidate's mean response length (words) over the baseline's
    must stay at or below this (e.g. 1.5; a policy that learned to pad fails)."""
    min_distinct_ratio: float | None = Field(None, gt=0)
    """Reward-hacking check: the candidate's distinct-n (unique n-grams over all n-grams of its
    responses) over the baseline's must stay at or above this (e.g. 0.8)."""
    distinct_n: int = Field(2, ge=1, le=4)
    """The n of distinct-n."""
    allow_training_judge: bool = False
    """Let a reward model the candidate was trained against (its manifest says so) judge it;
    its verdict is then not independent evidence, and the report says so. Off: refused."""


class GatePolicy(_Section):
    """Everything the gate runs and the bounds it applies."""

    include_paths: list[Path] = Field(default_factory=list)
    """Folders of lm-eval task YAMLs, relative to the policy file."""
    limit: int | None = Field(None, gt=0)
    """Documents per task (None: all); for smoke runs, not for decisions."""
    concurrency: int = Field(32, gt=0)
    """Requests in flight to the gateway."""
    request_timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)
    """Deadline of each request to the gateway, in seconds (benchmarks, both sides of the
    comparison, the LLM judge unless its options set `timeout`): a gateway that stops answering
    ends the gate as an error instead of hanging it."""
    benchmarks: list[BenchmarkCheck] = Field(default_factory=list)
    """Benchmark checks."""
    preference: PreferenceCheck | None = None
    """The preference comparison, if any."""

    @model_validator(mode="after")
    def _consistent(self) -> GatePolicy:
        if not self.benchmarks and self.preference is None:
            raise ValueError("a policy needs at least one benchmark or a preference section")
        keys = [b.key for b in self.benchmarks]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"benchmarks listed twice: {', '.join(duplicates)}")
        return self

    @property
    def tasks(self) -> list[str]:
        """Distinct task names, in policy order."""
        return list(dict.fromkeys(b.task for b in self.benchmarks))


def parse_policy(data: Any, base_dir: Path | None = None) -> GatePolicy:
    """Validate a raw mapping; relative paths are taken from `base_dir`."""
    if not isinstance(data, dict):
        raise EvalInputError("a gate policy must be a mapping (benchmarks:, preference:, ...)")
    try:
        policy = validate(GatePolicy, data, "gate policy")
    except SettingsFileError as exc:
        raise EvalInputError(str(exc)) from None
    if base_dir is None:
        return policy
    preference = policy.preference
    if preference is not None:
        preference = preference.model_copy(
            update={"prompts": (base_dir / preference.prompts).resolve()}
        )
    return policy.model_copy(
        update={
            "include_paths": [(base_dir / p).resolve() for p in policy.include_paths],
            "preference": preference,
        }
    )


def load_policy(path: Path, overrides: list[str] | None = None) -> GatePolicy:
    """Read and validate a policy file after `--set` overrides; every problem is listed, with
    did-you-mean for typos."""
    try:
        data = apply_overrides(read_mapping(path, "policy"), overrides or [])
    except SettingsFileError as exc:
        raise EvalInputError(str(exc)) from None
    policy = parse_policy(data, Path(path).resolve().parent)
    missing = [p for p in policy.include_paths if not p.is_dir()]
    if policy.preference is not None and not policy.preference.prompts.exists():  # or captures
        missing.append(policy.preference.prompts)
    if missing:
        raise EvalInputError(f"{path}: not found: {', '.join(map(str, missing))}")
    return policy
