"""A real Prometheus scrapes the session gateway while a known workload runs over two adapters.

The per-adapter request and token counts Prometheus stores must equal what the test sent (token
counts as the gateway reported them in each response's usage), and the repo's recording and
alerting rules must load and evaluate against the live series.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import grpc
import pytest

from gateway.client import AdapterClient
from tests.support.prometheus import JOB, PrometheusServer

pytestmark = pytest.mark.integration

ADAPTERS = {"prom-a": "alpha", "prom-b": "beta"}  # fresh names: their series start at zero
T = TypeVar("T")
SCRAPE_S = 0.5
WAIT_S = 30.0


def wait_for(read: Callable[[], T], expected: T, timeout: float = WAIT_S) -> T:
    """Poll `read()` until it returns `expected` (or time out, returning the last value)."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(SCRAPE_S)
        value = read()
    return value


def by_adapter(result: dict) -> dict:
    return {dict(labels)["adapter"]: value for labels, value in result.items()}


def test_prometheus_sees_exactly_the_workload_per_adapter(gateway, tiny_model):
    with AdapterClient(gateway.target, actor="prometheus-test") as registry:
        for name, source in ADAPTERS.items():
            registry.register(name, tiny_model.adapters[source], owner="tests")
            registry.set_alias(name, "production", 1, force=True, reason="metrics test")

    requests: Counter[tuple[str, str, str]] = Counter()
    prompt_tokens: Counter[str] = Counter()
    generated: Counter[str] = Counter()
    workload = [("prom-a", "Generate", 5)] * 4 + [("prom-a", "GenerateStream", 3)] * 2
    workload += [("prom-b", "Generate", 4)] * 3 + [("prom-b", "GenerateStream", 6)]

    with PrometheusServer([f"127.0.0.1:{gateway.metrics_port}"], SCRAPE_S) as prometheus:
        with gateway.client() as client:
            for i, (adapter, method, max_tokens) in enumerate(workload):
                prompt = f"request {i} for {adapter}: once upon a time"
                if method == "Generate":
                    reply = client.generate(prompt, adapter, max_tokens=max_tokens)
                    usage = reply.usage
                else:
                    usage = [d for d in client.stream(prompt, adapter, max_tokens=max_tokens)][
                        -1
                    ].usage
                requests[(adapter, method, "OK")] += 1
                prompt_tokens[adapter] += usage.prompt_tokens
                generated[adapter] += usage.completion_tokens
            with pytest.raises(grpc.RpcError):  # a refused request is counted with its code
                client.generate("x", "prom-b", max_tokens=0)
            requests[("prom-b", "Generate", "INVALID_ARGUMENT")] += 1

        selector = '{adapter=~"prom-a|prom-b"}'

        def counts() -> dict:
            result = prometheus.query(
                f"sum by (adapter, method, code) (loraplex_requests_total{selector})"
            )
            return {
                (d["adapter"], d["method"], d["code"]): v
                for d, v in ((dict(labels), v) for labels, v in result.items())
            }

        assert wait_for(counts, dict(requests)) == dict(requests)
        for metric, sent in (
            ("loraplex_prompt_tokens_total", prompt_tokens),
            ("loraplex_generation_tokens_total", generated),
        ):
            stored = by_adapter(prometheus.query(f"sum by (adapter) ({metric}{selector})"))
            assert stored == dict(sent), metric
        assert dict(generated) == {"prom-a": 4 * 5 + 2 * 3, "prom-b": 3 * 4 + 6}

        ttft = by_adapter(
            prometheus.query(
                f"sum by (adapter) (loraplex_time_to_first_token_seconds_count{selector})"
            )
        )
        assert ttft == {"prom-a": 6, "prom-b": 4}
        aliases = prometheus.query(f"loraplex_alias_info{selector}")
        assert {(dict(k)["adapter"], dict(k)["version"]) for k in aliases} == {
            ("prom-a", "1"),
            ("prom-b", "1"),
        }
        assert prometheus.query(f'up{{job="{JOB}"}}') and all(
            v == 1 for v in prometheus.query(f'up{{job="{JOB}"}}').values()
        )
        assert prometheus.query('loraplex_serving{job="loraplex-gateway"}')
        vllm = prometheus.query("vllm:num_requests_running")
        assert vllm, "vLLM's engine metrics are exported on the same endpoint"
        # vLLM's scheduler reports its queue through our stat logger
        assert prometheus.query('loraplex_requests_waiting{adapter="base"}')

        # adapter lifecycle, from the engine's LoRA manager (polled every few seconds): the
        # session's adapters were loaded from disk, and this workload's batches needed them
        def lifecycle() -> bool:
            loads = prometheus.query('sum(loraplex_adapter_loads_total{result="ok"})')
            lookups = prometheus.query(  # a fresh engine may have only hits (no miss series)
                'sum({__name__=~"loraplex_adapter_cache_(hits|misses)_total"})'
            )
            resident = prometheus.query("count(loraplex_adapter_resident)")
            return all(q and min(q.values()) > 0 for q in (loads, lookups, resident))

        assert wait_for(lifecycle, True), "no adapter loads, cache lookups or residency"

        # the repo's rules load, evaluate without errors, and the recording rules have data
        healthy = wait_for(lambda: {r["health"] for r in prometheus.rules()}, {"ok"})
        assert healthy == {"ok"}, prometheus.rules()
        rate = wait_for(
            lambda: set(
                by_adapter(prometheus.query(f"adapter:loraplex_requests:rate1m{selector}"))
            ),
            set(ADAPTERS),
        )
        assert rate == set(ADAPTERS)
        firing = prometheus.query('ALERTS{alertstate="firing"}')
        assert not firing, f"alerts fire on a healthy gateway: {firing}"
