"""The gate: its policy parser, pinning, decisions, and run_gate against an in-process gateway
(real gRPC and registry, fake engine; lm-eval benchmarks on a real engine are in the end-to-end
test)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from evalsuite import gate
from evalsuite.benchmarks import run_benchmarks
from evalsuite.decisions import Check, benchmark_checks, decide, policy_checks, preference_check
from evalsuite.errors import DeadlineExceeded, EvalInputError
from evalsuite.gate import GateResult, run_gate
from evalsuite.gate_report import GateReport, Promotion
from evalsuite.pinning import GatePins, Pin, Pinner, split_reference
from evalsuite.policy import GatePolicy, load_policy, parse_policy
from gateway.client import AdapterClient
from gateway.process import free_port
from loraplex.v1 import adapters_pb2 as apb
from tests.support.registry_server import RegistryServer, start_registry_server

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "colors" / "gate.yaml"


def test_the_example_policy_loads_with_paths_relative_to_it():
    policy = load_policy(EXAMPLE)
    assert policy.tasks == ["colors_qa", "colors_mc", "heldout_ppl"]
    assert policy.include_paths == [EXAMPLE.parent / "tasks"]
    assert policy.preference is not None and policy.preference.prompts.is_file()
    assert policy.benchmarks[2].relative and policy.benchmarks[2].max_regression_vs_base == 0.5


def test_policies_take_set_overrides_and_suggest_the_key_meant():
    """The gateway's, the trainer's and the gate's YAML files share one loader."""
    assert load_policy(EXAMPLE, ["limit=8", "concurrency=3"]).limit == 8
    with pytest.raises(EvalInputError, match="concurency: unknown key; did you mean 'concurrency'"):
        load_policy(EXAMPLE, ["concurency=3"])


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


SUMMARY = {"win_rate": 0.7, "ci_low": 0.48, "ci_high": 0.9, "confidence": 0.95,
           "sign_test_p": 0.1, "wins": 7, "ties": 0, "losses": 3}  # fmt: skip


def test_preference_check_uses_the_intervals_lower_bound():
    policy = parse_policy({"preference": {"prompts": "p.jsonl", "min_win_rate_lower_bound": 0.5}})
    assert not preference_check(policy, SUMMARY).passed
    assert preference_check(policy, {**SUMMARY, "ci_low": 0.5}).passed


def test_policy_checks_in_policy_order_and_only_required_failures_fail_the_gate():
    policy = parse_policy(
        {
            "benchmarks": [
                {"task": "a", "metric": "acc", "threshold": 0.5},
                {"task": "b", "metric": "acc", "threshold": 0.5, "required": False},
            ],
            "preference": {"prompts": "p.jsonl", "min_win_rate_lower_bound": 0.4},
        }
    )
    scores = {"candidate": {"a/acc,none": 0.6, "b/acc,none": 0.1}}
    directions = {"a/acc,none": True, "b/acc,none": True}
    checks = policy_checks(policy, scores, directions, SUMMARY)
    assert [(c.name, c.passed) for c in checks] == [
        ("a acc >= 0.5", True),
        ("b acc >= 0.5", False),
        ("win rate CI low >= 0.4", True),
    ]
    assert decide(checks) == ("pass", [])  # b failed, but it is only a warning
    verdict, failed = decide(policy_checks(policy, scores, directions, {**SUMMARY, "ci_low": 0.3}))
    assert verdict == "fail" and [c.kind for c in failed] == ["preference"]
    assert all(isinstance(c, Check) for c in failed)


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
    promotion = Promotion(requested=requested, done=promoted)
    result = GateResult(GateReport("colors", {}, "", promotion, verdict=verdict))
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


# ---------------------------------------------------------------- pinning


class FakeRegistry:
    """AdapterClient.get over fixed adapters, counting the reads."""

    def __init__(self, *adapters: apb.Adapter) -> None:
        self.adapters = {a.name: a for a in adapters}
        self.reads: list[str] = []

    def get(self, name: str) -> apb.Adapter:
        self.reads.append(name)
        return self.adapters[name]


def adapter(name: str, versions: int, **aliases: int) -> apb.Adapter:
    live = [apb.AdapterVersion(adapter=name, version=v) for v in range(1, versions + 1)]
    return apb.Adapter(name=name, aliases=aliases, versions=live)


def preference_policy(**preference: object) -> GatePolicy:
    return parse_policy({"preference": {"prompts": "p.jsonl", **preference}})


def test_every_reference_is_pinned_at_the_start_with_one_read_per_adapter():
    registry = FakeRegistry(
        adapter("acme", 3, candidate=3, production=2, stable=1), adapter("judge", 2, production=2)
    )
    pinner = Pinner(registry)  # type: ignore[arg-type]
    policy = preference_policy(
        baseline="acme@stable", judge="llm_judge", judge_options={"adapter": "judge"}
    )
    pins = pinner.gate(pinner.candidate("acme@candidate"), policy)
    assert pins == GatePins(
        candidate=Pin("acme@candidate", "acme", 3),
        production=Pin("acme@production", "acme", 2),
        baseline=Pin("acme@stable", "acme", 1),
        judge=Pin("judge", "judge", 2),  # a bare name is its production, as the gateway reads it
    )
    assert registry.reads == ["acme", "judge"]
    assert pins.to_report() == {
        "candidate": {"requested": "acme@candidate", "ref": "acme@v3", "version": 3},
        "production": {"requested": "acme@production", "ref": "acme@v2", "version": 2},
        "baseline": {"requested": "acme@stable", "ref": "acme@v1", "version": 1},
        "judge_adapter": {"requested": "judge", "ref": "judge@v2", "version": 2},
    }


@pytest.mark.parametrize(
    ("baseline", "has_production", "expected", "ref"),
    [
        ("production", True, Pin("production", "acme", 2), "acme@v2"),
        ("production", False, Pin("production"), ""),  # no production yet: the base
        ("base", True, Pin("base"), ""),
        ("other@v1", True, Pin("other@v1", "other", 1), "other@v1"),
        ("other", True, Pin("other", "other", 1), "other@v1"),
    ],
)
def test_the_baseline_is_pinned_and_the_base_stays_the_base(
    baseline, has_production, expected, ref
):
    aliases = {"candidate": 3, "production": 2} if has_production else {"candidate": 3}
    registry = FakeRegistry(adapter("acme", 3, **aliases), adapter("other", 1, production=1))
    pinner = Pinner(registry)  # type: ignore[arg-type]
    pins = pinner.gate(pinner.candidate("acme@candidate"), preference_policy(baseline=baseline))
    assert pins.baseline == expected and pins.baseline.ref == ref
    assert pins.judge is None  # exact_match asks no served model


def test_a_judge_on_the_base_stays_there_and_bad_references_are_refused_up_front():
    registry = FakeRegistry(adapter("acme", 3, candidate=3), adapter("nopro", 1))
    pinner = Pinner(registry)  # type: ignore[arg-type]
    candidate = pinner.candidate("acme@candidate")
    pins = pinner.gate(candidate, preference_policy(judge="llm_judge"))  # adapter="" by default
    assert pins.judge == Pin("") and pins.judge.to_dict()["ref"] == "base"
    for baseline, message in [
        ("acme@v9", "acme has no version 9 (live: [1, 2, 3])"),
        ("acme@gone", "acme has no alias 'gone'"),
        ("nopro", "nopro has no alias 'production'"),
        ("@v1", "adapter reference '@v1' has no adapter name"),
    ]:
        with pytest.raises(EvalInputError, match=re.escape(message)):
            pinner.gate(candidate, preference_policy(baseline=baseline))
    with pytest.raises(EvalInputError, match="name the version to gate"):
        pinner.candidate("acme")


# ---------------------------------------------------------------- deadlines and run_gate


class RpcFailure(grpc.RpcError):
    """A failed call as grpc raises it (code and details)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name.lower()


def test_benchmark_requests_carry_the_policys_deadline(monkeypatch):
    import lm_eval
    import lm_eval.tasks

    import evalsuite.lm_eval_backend as backend

    made: dict = {}

    class FakeLM:
        def __init__(self, **options: object) -> None:
            made.update(options)

    class FakeTasks:
        def __init__(self, include_path: object = None) -> None:
            self.all_tasks = ["t"]

    def evaluate(**_: object) -> None:
        raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED)

    monkeypatch.setattr(backend, "LoraplexLM", FakeLM)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeTasks)
    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)
    policy = parse_policy(
        {"request_timeout_s": 42, "benchmarks": [{"task": "t", "metric": "m", "threshold": 1}]}
    )
    message = "gateway gw:1: an lm-eval request to 'acme@v2' got no answer within its 42 s deadline"
    with pytest.raises(DeadlineExceeded, match=re.escape(message)):
        run_benchmarks("gw:1", "acme@v2", policy)
    assert made["timeout"] == 42


@pytest.fixture
async def fake_gateway(tiny_model, tmp_path) -> AsyncIterator[RegistryServer]:
    """An in-process gateway (fake engine) with acme v1 (production, stable) and v2 (candidate),
    and judge v1 (production) and v2."""
    server = await start_registry_server(tiny_model.base, tmp_path / "data")

    def register() -> None:
        with AdapterClient(server.target, actor="tests") as registry:
            registry.register("acme", tiny_model.adapters["alpha"])
            registry.register("acme", tiny_model.adapters["beta"], alias="candidate")
            registry.set_alias("acme", "production", 1, force=True, reason="tests")
            registry.set_alias("acme", "stable", 1)
            registry.register("judge", tiny_model.adapters["gamma"])
            registry.register("judge", tiny_model.adapters["delta"])
            registry.set_alias("judge", "production", 1, force=True, reason="tests")

    await asyncio.to_thread(register)
    yield server
    await server.stop()


def _policy(tmp_path: Path, request_timeout_s: float = 30, **preference: object) -> GatePolicy:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "q{i}", "reference": "x"}}\n' for i in range(4)))
    section = {"prompts": str(prompts), "sampling": {"temperature": 0.0, "max_tokens": 2},
               "min_win_rate_lower_bound": 0.0, **preference}  # fmt: skip
    return parse_policy({"request_timeout_s": request_timeout_s, "preference": section})


def _gate_records(target: str, name: str) -> dict[int, list[tuple[int, dict]]]:
    """Each version's `gate` evaluations: (verdict, report summary)."""
    with AdapterClient(target) as registry:
        return {
            v.version: [
                (e.verdict, json_format.MessageToDict(e.report))
                for e in v.evaluations
                if e.suite == "gate"
            ]
            for v in registry.get(name).versions
        }


async def test_aliases_moved_mid_run_change_nothing_that_is_evaluated(
    fake_gateway, tmp_path, monkeypatch
):
    target = fake_gateway.target
    judge = {"adapter": "judge", "template": "{answer_a}|{answer_b}", "max_tokens": 2,
             "max_unparseable": 1, "progress": False}  # fmt: skip
    policy = _policy(tmp_path, baseline="acme@stable", judge="llm_judge", judge_options=judge)
    build = gate.build_preference

    def build_while_someone_moves_the_aliases(*args: object) -> object:
        with AdapterClient(target, actor="someone-else") as registry:
            registry.set_alias("acme", "stable", 2)
            registry.set_alias("judge", "production", 2, force=True, reason="meanwhile")
        return build(*args)

    monkeypatch.setattr(gate, "build_preference", build_while_someone_moves_the_aliases)
    result = await asyncio.to_thread(run_gate, target, "acme@candidate", policy, tmp_path / "out")
    report = result.report
    assert result.verdict == "pass", report.error
    assert report.baseline == {"requested": "acme@stable", "ref": "acme@v1", "version": 1}
    assert report.judge_adapter == {"requested": "judge", "ref": "judge@v1", "version": 1}
    comparison = report.preference
    assert comparison is not None
    assert (comparison["candidate"], comparison["baseline"]) == ("acme@v2", "acme@v1")
    assert (comparison["candidate_version"], comparison["baseline_version"]) == (
        "acme@v2",
        "acme@v1",
    )
    assert comparison["judge_config"]["adapter"] == "judge@v1"
    served = {(r.adapter.name, r.adapter.version) for r in fake_gateway.engine.seen if r.adapter}
    assert served == {("acme", 2), ("acme", 1), ("judge", 1)}
    [(verdict, summary)] = (await asyncio.to_thread(_gate_records, target, "acme"))[2]
    assert verdict == apb.VERDICT_PASS
    assert summary["baseline"]["ref"] == "acme@v1" and summary["judge_adapter"]["ref"] == "judge@v1"


def _slow(engine: object, seconds: float) -> None:
    """Every generation of `engine` waits `seconds` before its first token."""
    generate = engine.generate  # type: ignore[attr-defined]

    async def slow_generate(request: object, stream: bool) -> AsyncIterator[object]:
        await asyncio.sleep(seconds)
        async for chunk in generate(request, stream):
            yield chunk

    engine.generate = slow_generate  # type: ignore[attr-defined]


async def test_a_request_past_its_deadline_is_verdict_error_and_recorded_as_such(
    fake_gateway, tmp_path
):
    _slow(fake_gateway.engine, 10.0)
    policy = _policy(tmp_path, request_timeout_s=0.2)
    result = await asyncio.to_thread(
        run_gate, fake_gateway.target, "acme@candidate", policy, tmp_path / "out", promote=True
    )
    assert (result.verdict, result.exit_code, result.promoted) == ("error", 2, False)
    assert "got no answer within its 0.2 s deadline (DEADLINE_EXCEEDED)" in result.report.error
    assert "request_timeout_s" in result.report.error
    records = await asyncio.to_thread(_gate_records, fake_gateway.target, "acme")
    [(verdict, summary)] = records[2]
    assert verdict == apb.VERDICT_ERROR and summary["error"] == result.report.error
    assert records[1] == []


async def test_without_the_registry_nothing_is_recorded_and_the_exit_code_is_2(
    fake_gateway, tmp_path, monkeypatch
):
    down = await asyncio.to_thread(
        run_gate, f"127.0.0.1:{free_port()}", "acme@candidate", _policy(tmp_path)
    )
    assert (down.verdict, down.exit_code) == ("error", 2) and "UNAVAILABLE" in down.report.error
    assert down.report.candidate is None and down.report.recorded is None

    def registry_gone(*_: object) -> None:
        raise RpcFailure(grpc.StatusCode.UNAVAILABLE)

    monkeypatch.setattr(gate.AdapterClient, "record_evaluation", registry_gone)
    for slow in (False, True):  # a pass that cannot be recorded; an error that cannot either
        if slow:
            _slow(fake_gateway.engine, 10.0)
        result = await asyncio.to_thread(
            run_gate, fake_gateway.target, "acme@candidate",
            _policy(tmp_path, request_timeout_s=0.2 if slow else 30), promote=True,
        )  # fmt: skip
        assert (result.verdict, result.exit_code, result.promoted) == ("error", 2, False)
        assert result.report.recorded is False
        assert result.report.record_error == "gateway registry: UNAVAILABLE: unavailable"


async def test_a_report_that_cannot_be_written_is_an_error_recorded_on_the_version(
    fake_gateway, tmp_path
):
    not_a_folder = tmp_path / "report"
    not_a_folder.write_text("")
    result = await asyncio.to_thread(
        run_gate, fake_gateway.target, "acme@candidate", _policy(tmp_path), not_a_folder,
        promote=True,
    )  # fmt: skip
    assert (result.verdict, result.promoted, result.report_paths) == ("error", False, None)
    [(verdict, summary)] = (await asyncio.to_thread(_gate_records, fake_gateway.target, "acme"))[2]
    assert verdict == apb.VERDICT_ERROR and summary["report"] is None
    assert summary["error"].startswith(f"cannot write the report to {not_a_folder}")
