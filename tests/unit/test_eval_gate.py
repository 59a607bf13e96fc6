"""The gate's policy parser and decision logic (no gateway: the end-to-end test has one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evalsuite.errors import EvalInputError
from evalsuite.gate import GateResult, benchmark_checks, preference_check, split_reference
from evalsuite.policy import load_policy, parse_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "colors" / "gate.yaml"


def test_the_example_policy_loads_with_paths_relative_to_it():
    policy = load_policy(EXAMPLE)
    assert policy.tasks == ["colors_qa", "colors_mc", "heldout_ppl"]
    assert policy.include_paths == [EXAMPLE.parent / "tasks"]
    assert policy.preference is not None and policy.preference.prompts.is_file()
    assert policy.benchmarks[2].relative and policy.benchmarks[2].max_regression_vs_base == 0.5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a mapping"),
        ({}, "at least one benchmark or a preference"),
        ({"benchmarks": [{"task": "t", "metric": "acc"}]}, "needs threshold, max_regression"),
        (
            {"benchmarks": [{"task": "t", "metric": "acc", "treshold": 0.5}]},
            "benchmarks.0.treshold: unknown key; did you mean 'threshold'?",
        ),
        (
            {"benchmarks": [{"task": "t", "metric": "acc", "max_regression_vs_base": -1}]},
            "benchmarks.0.max_regression_vs_base: Input should be greater than or equal to 0",
        ),
        (
            {"benchmarks": [{"task": "t", "metric": "acc", "threshold": 1}] * 2},
            "benchmarks listed twice: t/acc,none",
        ),
        (
            {"preference": {"prompts": "p.jsonl", "min_win_rate_lower_bound": 1.5}},
            "preference.min_win_rate_lower_bound: Input should be less than or equal to 1",
        ),
        ({"preference": {"judge": "exact_match"}}, "preference.prompts: Field required"),
    ],
)
def test_bad_policies_get_clear_errors(data, message):
    with pytest.raises(EvalInputError, match=r"invalid gate policy|must be a mapping") as error:
        parse_policy(data)
    assert message in str(error.value)


def test_missing_files_and_bad_yaml_are_reported(tmp_path):
    policy = tmp_path / "gate.yaml"
    policy.write_text("include_paths: [nowhere]\npreference: {prompts: gone.jsonl}\n")
    with pytest.raises(EvalInputError, match=r"not found: .*nowhere.*gone\.jsonl"):
        load_policy(policy)
    policy.write_text("benchmarks: [")
    with pytest.raises(EvalInputError, match="not valid YAML"):
        load_policy(policy)
    with pytest.raises(EvalInputError, match="cannot read policy"):
        load_policy(tmp_path / "absent.yaml")


def _check(**fields):
    return parse_policy({"benchmarks": [{"task": "t", "metric": "m", **fields}]}).benchmarks[0]


def test_threshold_follows_the_metrics_direction():
    check = _check(threshold=0.5)
    (higher,) = benchmark_checks(check, {"candidate": {check.key: 0.6}}, higher_is_better=True)
    assert higher.passed and higher.detail == "0.6 >= 0.5"
    (lower,) = benchmark_checks(check, {"candidate": {check.key: 0.6}}, higher_is_better=False)
    assert not lower.passed and lower.detail == "0.6 > 0.5" and lower.name == "t m <= 0.5"


@pytest.mark.parametrize(
    ("candidate", "production", "higher", "passed"),
    [
        (0.75, 0.8, True, True),  # dropped 0.05 <= 0.1
        (0.65, 0.8, True, False),  # dropped 0.15
        (0.95, 0.8, True, True),  # improved
        (10.5, 10.0, False, True),  # perplexity up 0.5 <= 1
        (11.5, 10.0, False, False),  # perplexity up 1.5
        (8.0, 10.0, False, True),  # perplexity down: better
    ],
)
def test_regression_against_production(candidate, production, higher, passed):
    check = _check(max_regression_vs_production=0.1 if higher else 1.0)
    scores = {"candidate": {check.key: candidate}, "production": {check.key: production}}
    (result,) = benchmark_checks(check, scores, higher)
    assert result.passed is passed and result.kind == "benchmark_vs_production"


def test_relative_regression_against_the_base_catches_forgetting():
    check = _check(max_regression_vs_base=0.1, relative=True)
    base = {check.key: 100.0}
    (ok,) = benchmark_checks(check, {"candidate": {check.key: 109.0}, "base": base}, False)
    (forgot,) = benchmark_checks(check, {"candidate": {check.key: 111.0}, "base": base}, False)
    assert ok.passed and not forgot.passed and forgot.threshold == pytest.approx(10.0)
    assert "allowed 10 (10% of 100)" in forgot.detail


def test_with_no_production_yet_a_first_version_must_not_regress_from_the_base():
    check = _check(max_regression_vs_production=0.0)
    scores = {"candidate": {check.key: 0.1}, "base": {check.key: 0.3}}
    (result,) = benchmark_checks(check, scores, True)
    assert not result.passed and result.detail.startswith("0.1 vs base 0.3: regression 0.2")


def test_preference_check_uses_the_intervals_lower_bound():
    policy = parse_policy({"preference": {"prompts": "p.jsonl", "min_win_rate_lower_bound": 0.5}})
    summary = {"win_rate": 0.7, "ci_low": 0.48, "ci_high": 0.9, "confidence": 0.95,
               "sign_test_p": 0.1, "wins": 7, "ties": 0, "losses": 3}  # fmt: skip
    assert not preference_check(policy, summary).passed
    assert preference_check(policy, {**summary, "ci_low": 0.5}).passed


@pytest.mark.parametrize(
    ("verdict", "requested", "promoted", "code"),
    [
        ("pass", False, False, 0),
        ("pass", True, True, 0),
        ("pass", True, False, 2),  # production moved meanwhile: compare-and-swap refused
        ("fail", True, False, 1),
        ("error", True, False, 2),
        ("error", False, False, 2),
    ],
)
def test_exit_codes(verdict, requested, promoted, code):
    result = GateResult(verdict, {"promotion": {"requested": requested}}, promoted=promoted)
    assert result.exit_code == code


def test_adapter_references():
    assert split_reference("colors@candidate") == ("colors", "candidate")
    assert split_reference("colors@v3") == ("colors", "v3")
    for bare in ("colors", "@v1", "colors@"):  # the gateway reads a bare name as production
        with pytest.raises(EvalInputError, match="name the version to gate"):
            split_reference(bare)


def test_importing_evalsuite_keeps_lm_evals_own_models():
    """lm-eval loads its built-in models only into an empty registry: ours must not hide them."""
    from lm_eval.api.registry import model_registry

    import evalsuite  # noqa: F401

    assert {"loraplex", "hf", "vllm"} <= set(model_registry)
