"""deploy/prometheus and deploy/grafana: promtool accepts them, and they name real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import AdapterLabels, AliasCollector, GatewayMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"
SERIES = re.compile(r"\b((?:loraplex_|adapter:loraplex_|vllm:)[a-z0-9_:]+)")
VLLM_USED = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}


def promtool(*args: str) -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool missing: `make test` installs Debian's prometheus package")
    result = subprocess.run(
        [binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def exported_series() -> set[str]:
    """Every series name the gateway can export (histograms with their _bucket/_sum/_count)."""
    registry = CollectorRegistry()
    metrics = GatewayMetrics(AdapterLabels(lambda _: True, 10), registry)
    registry.register(AliasCollector(lambda: [], metrics.labels))
    names = set()
    for family in registry.collect():
        kind = family.type
        if kind == "counter":
            names.add(family.name + "_total")
        elif kind == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def recorded_series() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS / "rules" / "recording.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"]}


def test_promtool_checks_config_and_rules():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    promtool("check", "rules", *sorted(str(p) for p in (PROMETHEUS / "rules").glob("*.yml")))


def test_promtool_unit_tests_cover_every_alert():
    alerts = yaml.safe_load((PROMETHEUS / "rules" / "alerts.yml").read_text())
    names = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "tests" / "alerts_test.yml").read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert names == fired, f"alerts without a firing test: {names - fired}"
    assert "SUCCESS" in promtool("test", "rules", "tests/alerts_test.yml")


def test_rules_and_dashboard_only_name_series_that_exist():
    known = exported_series() | recorded_series() | VLLM_USED
    for path in [*(PROMETHEUS / "rules").glob("*.yml"), DASHBOARD]:
        text = path.read_text()
        used = {m for m in SERIES.findall(text) if not m.endswith(":")}
        unknown = used - known
        assert not unknown, f"{path.name} names series nobody exports: {sorted(unknown)}"


def test_dashboard_has_an_overview_and_a_per_adapter_row():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "adapter" in variables and "loraplex_requests_total" in json.dumps(variables["adapter"])
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows[0] == "Overview" and any("$adapter" in title for title in rows)
    per_adapter = dashboard["panels"][[p["title"] for p in dashboard["panels"]].index(rows[-1]) :]
    targets = [t["expr"] for p in per_adapter for t in p.get("targets", [])]
    assert targets and all('adapter="$adapter"' in expr for expr in targets)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
