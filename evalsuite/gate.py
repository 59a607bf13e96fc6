"""The promotion gate's orchestration: pin the versions, run what the policy asks for through the
gateway, decide, report, record the verdict in the registry and, if asked and it passed, promote.

The steps live in their own modules (`pinning`, `benchmarks`, `compare`, `decisions`, `report`);
this one keeps their order and the one rule across them: any failure (gateway down, adapter
missing, a task or judge failing, a request past its deadline) makes the verdict `error`, which
is never a pass and never promotes, and is recorded as such whenever the registry still answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from evalsuite.behaviour import behaviour
from evalsuite.benchmarks import run_benchmarks
from evalsuite.decisions import Check, decide, policy_checks
from evalsuite.errors import EvalInputError, describe_failure
from evalsuite.gate_report import GateReport, Promotion
from evalsuite.lineage import check_judge_independence, lineage
from evalsuite.pinning import GatePins, Pin, Pinner
from evalsuite.policy import GatePolicy
from gateway.client import AdapterClient
from gateway.contract import PRODUCTION, Verdict

log = logging.getLogger(__name__)
SUITE = "gate"
REGISTRY_TIMEOUT_S = 60.0  # a hung registry call must end the gate (as an error), not hang it


@dataclass
class GateResult:
    """What the gate decided (its report holds the verdict) and where the evidence is."""

    report: GateReport
    report_paths: tuple[Path, Path] | None = None
    failed_checks: list[Check] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        return self.report.verdict

    @property
    def promoted(self) -> bool:
        return self.report.promotion.done

    @property
    def exit_code(self) -> int:
        """0 pass (and promoted, if asked), 1 fail, 2 error or a refused promotion."""
        if self.verdict != "pass":
            return 1 if self.verdict == "fail" else 2
        return 2 if self.report.promotion.requested and not self.promoted else 0


def build_preference(target: str, policy: GatePolicy, judge: Pin | None) -> tuple[Any, list[Any]]:
    """(judge, prompts) of the policy's comparison, built and checked before anything runs: a bad
    judge option, prompt file or sampling key must not surface after an hour of benchmarks. The
    judge asks the version `judge` pinned, with the policy's per-request deadline."""
    from evalsuite.compare import load_prompts
    from evalsuite.fanout import check_generation_options
    from evalsuite.judges import judge_class, make_judge

    pref = policy.preference
    assert pref is not None
    check_generation_options(pref.sampling)
    options = dict(pref.judge_options)
    if judge is not None:
        options[judge_class(pref.judge).adapter_option] = judge.ref
    made = make_judge(pref.judge, gateway=target, deadline=policy.request_timeout_s, **options)
    return made, load_prompts(pref.prompts)


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
            timeout=policy.request_timeout_s,
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
    """Pin, evaluate, decide, report, record and (with `promote`, on pass) promote. Never raises
    for evaluation failures: they become verdict `error`."""
    started, clock = datetime.now(UTC), time.perf_counter()
    report = GateReport(
        adapter=adapter,
        policy=policy.model_dump(mode="json"),
        started=started.isoformat(),
        promotion=Promotion(requested=promote),
    )
    result = GateResult(report)
    registry = AdapterClient(target, actor=actor, timeout=REGISTRY_TIMEOUT_S)
    candidate: Pin | None = None
    try:
        if promote and policy.limit is not None:
            raise EvalInputError("a policy with `limit` is a smoke run: it cannot --promote")
        pinner = Pinner(registry)
        candidate = pinner.candidate(adapter)  # from here on, there is a version to record on
        report.adapter, report.candidate = candidate.name, candidate.to_dict()
        pins = pinner.gate(candidate, policy)
        report.pin(pins.to_report())
        manifest = pinner.manifest(candidate)
        report.lineage = lineage(manifest)
        checks = _evaluate(target, pins, policy, report, manifest)
        report.checks = [asdict(c) for c in checks]
        report.verdict, result.failed_checks = decide(checks)
    except Exception as exc:  # every failure is verdict "error": never a pass
        log.exception("gate error")
        report.verdict, report.error = "error", describe_failure(exc, target)
    report.finished = datetime.now(UTC).isoformat()
    report.wall_seconds = round(time.perf_counter() - clock, 2)
    try:
        _record_and_promote(registry, candidate, result, promote, out_dir)
    finally:
        registry.close()
    return result


def _evaluate(
    target: str, pins: GatePins, policy: GatePolicy, report: GateReport, manifest: dict[str, Any]
) -> list[Check]:
    """Run what the policy asks for on the pinned versions, fill the report, return the checks.
    `manifest`: the candidate's (its training reward models may not judge it unless allowed)."""
    systems = {"candidate": pins.candidate.ref}
    vs_production = any(b.max_regression_vs_production is not None for b in policy.benchmarks)
    if pins.production is not None:
        systems["production"] = pins.production.ref  # every chart compares with it
    if any(b.max_regression_vs_base is not None for b in policy.benchmarks) or (
        vs_production and pins.production is None
    ):
        systems["base"] = ""  # with no production yet, the base stands in for it
    preference, independence = None, None
    if policy.preference is not None:
        preference = build_preference(target, policy, pins.judge)
        independence = check_judge_independence(
            policy.preference.judge,
            preference[0].model_digests(),
            manifest,
            policy.preference.allow_training_judge,
        )  # before anything runs
    scores: dict[str, dict[str, float]] = {}
    directions: dict[str, bool] = {}
    if policy.benchmarks:
        for role, reference in systems.items():
            log.info("benchmarks for %s (%s)", role, reference or "base")
            scores[role], directions = run_benchmarks(target, reference, policy)
    report.benchmarks = [
        {
            "task": bench.task,
            "metric": bench.metric,
            "filter": bench.filter,
            "higher_is_better": directions[bench.key],
            "scores": {role: s[bench.key] for role, s in scores.items()},
        }
        for bench in policy.benchmarks
    ]
    summary, stats = None, None
    if preference is not None:
        assert pins.baseline is not None and policy.preference is not None
        report.preference = run_preference(
            target, pins.candidate.ref, pins.baseline.ref, policy, *preference
        )
        summary = report.preference["summary"]
        stats = behaviour(report.preference["pairs"], policy.preference.distinct_n)
        report.preference["behaviour"] = stats
        report.preference["judge_independence"] = independence or "independent"
    return policy_checks(policy, scores, directions, summary, stats)


def _record_and_promote(
    registry: AdapterClient,
    candidate: Pin | None,
    result: GateResult,
    promote: bool,
    out_dir: Path | None,
) -> None:
    """Write the report, record the verdict on the version, promote on pass (compare-and-swap),
    then write the report again with what happened. No report on disk: verdict error (recorded
    as such), no promotion."""
    from evalsuite.report import write_report

    report = result.report
    html = out_dir / "report.html" if out_dir is not None else None
    if out_dir is not None:
        try:
            result.report_paths = write_report(report, out_dir)
        except OSError as exc:
            report.verdict = "error"
            report.error = f"cannot write the report to {out_dir}: {exc}"
            html = None
    if candidate is None:
        return  # nothing resolved: no version to record on
    summary = report.registry_summary(str(html) if html else None)
    try:
        registry.record_evaluation(
            candidate.name, candidate.version, SUITE, report.verdict, summary
        )
        report.recorded = True
    except grpc.RpcError as exc:  # the exit code says error either way; nothing is promoted
        report.recorded = False
        report.record_error = describe_failure(exc, "registry")
        if report.verdict == "pass":
            report.verdict = "error"
            report.error = f"verdict not recorded: {report.record_error}"
    if promote and report.verdict == "pass":
        production = (report.production or {}).get("version")
        try:
            registry.set_alias(
                candidate.name, PRODUCTION, candidate.version, expected=production or 0,
                reason=f"gate pass ({html or 'no report file'})",
            )  # fmt: skip
            report.promotion.done = True
        except grpc.RpcError as exc:
            report.promotion.error = describe_failure(exc, "registry")
    if result.report_paths is not None and out_dir is not None:
        try:
            result.report_paths = write_report(report, out_dir)
        except OSError as exc:  # the first write worked; the record and alias are what count
            log.error("could not rewrite the report after recording: %s", exc)
