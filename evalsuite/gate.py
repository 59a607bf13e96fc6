"""The promotion gate: evaluate one exact candidate version through the gateway, apply the
policy, record the verdict in the registry and, if asked and it passed, promote it.

The candidate's alias is resolved to a version once, at the start, and every request names that
version (`NAME@vN`): an alias that moves during the run cannot change what is evaluated. Any
failure (gateway down, adapter missing, a task or judge failing) makes the verdict `error`, which
is never a pass and never promotes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import grpc

from evalsuite.errors import EvalError, EvalInputError, describe_failure
from evalsuite.policy import BenchmarkCheck, GatePolicy
from gateway.client import AdapterClient

log = logging.getLogger(__name__)
Verdict = Literal["pass", "fail", "error"]
SUITE = "gate"
PRODUCTION = "production"
REGISTRY_TIMEOUT_S = 60.0  # a hung registry call must end the gate (as an error), not hang it
BOOTSTRAP_ITERS = 1000  # lm-eval's stderr estimates; its default (100k) is slow and not used here


@dataclass(frozen=True)
class Check:
    """One policy check and how the candidate did on it."""

    name: str
    kind: str  # benchmark_min | benchmark_vs_production | benchmark_vs_base | preference
    required: bool
    passed: bool
    value: float | None
    threshold: float | None
    detail: str


@dataclass
class GateResult:
    """What the gate decided and where the evidence is."""

    verdict: Verdict
    report: dict[str, Any]
    report_paths: tuple[Path, Path] | None = None
    promoted: bool = False
    failed_checks: list[Check] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 pass (and promoted, if asked), 1 fail, 2 error or a refused promotion."""
        if self.verdict != "pass":
            return 1 if self.verdict == "fail" else 2
        return 2 if self.report["promotion"]["requested"] and not self.promoted else 0


def split_reference(reference: str) -> tuple[str, str]:
    """("name", "alias" or "vN") of NAME@ALIAS / NAME@vN. A bare NAME is refused: the gateway
    reads it as production, a gate would mean the candidate; the caller must say which."""
    name, _, selector = reference.partition("@")
    if not name or not selector:
        raise EvalInputError(
            f"adapter reference {reference!r}: name the version to gate, e.g. NAME@candidate "
            "or NAME@v3"
        )
    return name, selector


def resolve_versions(registry: AdapterClient, reference: str) -> tuple[str, int, int | None]:
    """(name, candidate version, production version or None), read once from the registry."""
    name, selector = split_reference(reference)
    adapter = registry.get(name)
    live = {v.version for v in adapter.versions}
    if selector[0] == "v" and selector[1:].isdigit():
        version = int(selector[1:])
        if version not in live:
            raise EvalInputError(f"{name} has no version {version} (live: {sorted(live)})")
    elif selector in adapter.aliases:
        version = adapter.aliases[selector]
    else:
        raise EvalInputError(
            f"{name} has no alias {selector!r} (aliases: {dict(adapter.aliases) or 'none'})"
        )
    return name, version, adapter.aliases.get(PRODUCTION)


def run_benchmarks(
    target: str, reference: str, policy: GatePolicy
) -> tuple[dict[str, float], dict[str, bool]]:
    """lm-eval scores of one served system: ({check key: score}, {check key: higher is better}).

    The backend reports which versions answered; anything but `reference` is an error (an
    evaluation must be of exactly one version)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evalsuite.lm_eval_backend import LoraplexLM

    lm = LoraplexLM(target=target, adapter=reference, concurrency=policy.concurrency)
    manager = TaskManager(include_path=[str(p) for p in policy.include_paths] or None)
    unknown = [t for t in policy.tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalInputError(f"unknown lm-eval task(s) {unknown}; check include_paths")
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=policy.tasks,
        task_manager=manager,
        limit=policy.limit,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=False,
    )
    expected = {reference if reference else "base"}
    if lm.served_versions != expected:
        raise EvalError(f"asked for {expected} but {sorted(lm.served_versions)} answered")
    scores: dict[str, float] = {}
    directions: dict[str, bool] = {}
    for check in policy.benchmarks:
        task_results = output["results"].get(check.task, {})
        metric_key = f"{check.metric},{check.filter}"
        if metric_key not in task_results:
            reported = sorted(k for k in task_results if "," in k and "_stderr" not in k)
            raise EvalInputError(
                f"task {check.task} reports no {metric_key!r} (it reports: {reported})"
            )
        scores[check.key] = float(task_results[metric_key])
        directions[check.key] = bool(output["higher_is_better"][check.task][check.metric])
    return scores, directions


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


def build_preference(target: str, policy: GatePolicy) -> tuple[Any, list[Any]]:
    """(judge, prompts) of the policy's comparison, built and checked before anything runs: a bad
    judge option, prompt file or sampling key must not surface after an hour of benchmarks."""
    from evalsuite.compare import load_prompts
    from evalsuite.fanout import check_generation_options
    from evalsuite.judges import make_judge

    pref = policy.preference
    assert pref is not None
    check_generation_options(pref.sampling)
    judge = make_judge(pref.judge, gateway=target, **pref.judge_options)
    return judge, load_prompts(pref.prompts)


def run_preference(
    target: str, candidate: str, baseline: str, policy: GatePolicy, judge: Any, prompts: list[Any]
) -> dict[str, Any]:
    """The policy's comparison through the gateway, as a JSON-ready dict."""
    from evalsuite.compare import compare

    pref = policy.preference
    assert pref is not None
    result = asyncio.run(
        compare(
            target,
            candidate,
            baseline,
            prompts,
            judge,
            pref.sampling,
            policy.concurrency,
            confidence=pref.confidence,
        )
    )
    return result.to_dict()


def run_gate(
    target: str,
    adapter: str,
    policy: GatePolicy,
    out_dir: Path | None = None,
    promote: bool = False,
    actor: str | None = None,
) -> GateResult:
    """Evaluate, decide, report, record and (with `promote`, on pass) promote. Never raises for
    evaluation failures: they become verdict `error`."""
    started, clock = datetime.now(UTC), time.perf_counter()
    report: dict[str, Any] = {
        "adapter": adapter,
        "candidate": None,
        "production": None,
        "verdict": "error",
        "error": None,
        "started": started.isoformat(),
        "policy": policy.model_dump(mode="json"),
        "benchmarks": [],
        "preference": None,
        "checks": [],
        "promotion": {"requested": promote, "done": False},
    }
    result = GateResult("error", report)
    registry = AdapterClient(target, actor=actor, timeout=REGISTRY_TIMEOUT_S)
    name = version = None
    try:
        if promote and policy.limit is not None:
            raise EvalInputError("a policy with `limit` is a smoke run: it cannot --promote")
        name, version, production = resolve_versions(registry, adapter)
        report["adapter"] = name
        report["candidate"] = {"ref": f"{name}@v{version}", "version": version}
        if production is not None:
            report["production"] = {"ref": f"{name}@v{production}", "version": production}
        checks = _evaluate(target, name, version, production, policy, report)
        report["checks"] = [asdict(c) for c in checks]
        result.failed_checks = [c for c in checks if c.required and not c.passed]
        result.verdict = "fail" if result.failed_checks else "pass"
    except Exception as exc:  # every failure is verdict "error": never a pass
        log.exception("gate error")
        report["error"] = describe_failure(exc, target)
    report["verdict"] = result.verdict
    report["finished"] = datetime.now(UTC).isoformat()
    report["wall_seconds"] = round(time.perf_counter() - clock, 2)
    try:
        _record_and_promote(registry, name, version, result, promote, out_dir)
    finally:
        registry.close()
    return result


def _evaluate(
    target: str,
    name: str,
    version: int,
    production: int | None,
    policy: GatePolicy,
    report: dict[str, Any],
) -> list[Check]:
    """Run what the policy asks for, fill the report, return the checks."""
    systems = {"candidate": f"{name}@v{version}"}
    vs_production = any(b.max_regression_vs_production is not None for b in policy.benchmarks)
    if production is not None:
        systems["production"] = f"{name}@v{production}"  # every chart compares with it
    if any(b.max_regression_vs_base is not None for b in policy.benchmarks) or (
        vs_production and production is None
    ):
        systems["base"] = ""  # with no production yet, the base stands in for it
    preference = build_preference(target, policy) if policy.preference is not None else None
    scores: dict[str, dict[str, float]] = {}
    directions: dict[str, bool] = {}
    if policy.benchmarks:
        for role, reference in systems.items():
            log.info("benchmarks for %s (%s)", role, reference or "base")
            scores[role], directions = run_benchmarks(target, reference, policy)
    checks: list[Check] = []
    for bench in policy.benchmarks:
        report["benchmarks"].append(
            {
                "task": bench.task,
                "metric": bench.metric,
                "filter": bench.filter,
                "higher_is_better": directions[bench.key],
                "scores": {role: s[bench.key] for role, s in scores.items()},
            }
        )
        checks += benchmark_checks(bench, scores, directions[bench.key])
    if policy.preference is not None:
        baseline = policy.preference.baseline
        if baseline == PRODUCTION:
            baseline = f"{name}@v{production}" if production is not None else ""
        elif baseline == "base":
            baseline = ""
        assert preference is not None
        comparison = run_preference(target, systems["candidate"], baseline, policy, *preference)
        report["preference"] = comparison
        checks.append(preference_check(policy, comparison["summary"]))
    return checks


def _record_and_promote(
    registry: AdapterClient,
    name: str | None,
    version: int | None,
    result: GateResult,
    promote: bool,
    out_dir: Path | None,
) -> None:
    """Write the report, record the verdict on the version, promote on pass (compare-and-swap),
    then write the report again with what happened. No report on disk: no record, no promotion."""
    from evalsuite.report import write_report

    report = result.report
    html = out_dir / "report.html" if out_dir is not None else None
    if out_dir is not None:
        try:
            result.report_paths = write_report(report, out_dir)
        except OSError as exc:
            result.verdict = report["verdict"] = "error"
            report["error"] = f"cannot write the report to {out_dir}: {exc}"
            return
    if name is None or version is None:
        return  # nothing resolved: no version to record on
    summary = {
        k: report[k]
        for k in ("verdict", "error", "candidate", "production", "benchmarks", "checks")
    }
    if report["preference"]:
        summary["preference"] = {
            k: report["preference"][k]
            for k in ("judge", "candidate_version", "baseline_version", "summary")
        }
    summary["report"] = str(html) if html else None
    try:
        # The registry keeps pass / fail: an error is recorded as not passed; the report says why.
        registry.record_evaluation(name, version, SUITE, result.verdict == "pass", summary)
        report["recorded"] = True
    except grpc.RpcError as exc:
        report["recorded"] = False
        report["record_error"] = describe_failure(exc, "registry")
        if result.verdict == "pass":
            result.verdict = report["verdict"] = "error"
            report["error"] = f"verdict not recorded: {report['record_error']}"
    if promote and result.verdict == "pass":
        production = (report["production"] or {}).get("version")
        try:
            registry.set_alias(
                name, PRODUCTION, version, expected=production or 0,
                reason=f"gate pass ({html or 'no report file'})",
            )  # fmt: skip
            result.promoted = report["promotion"]["done"] = True
        except grpc.RpcError as exc:
            report["promotion"]["error"] = describe_failure(exc, "registry")
    if out_dir is not None:
        try:
            result.report_paths = write_report(report, out_dir)
        except OSError as exc:  # the first write worked; the record and alias are what count
            log.error("could not rewrite the report after recording: %s", exc)
