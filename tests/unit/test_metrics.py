"""Gateway metrics: naming conventions, bounded cardinality, per-adapter counts (fake engine)."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gateway.client import AsyncClient
from gateway.domain import AdapterStats, ResolvedAdapter
from gateway.engine_fixes import FIX_NAMES
from gateway.generation import GenerationServicer
from gateway.metrics import BASE, OTHER, AdapterLabels, AliasCollector, GatewayMetrics
from gateway.pipeline import GenerationPipeline
from gateway.resolver import DirectoryResolver
from loraplex.v1 import generation_pb2_grpc as pb_grpc
from tests.support.fakes import FAKE_BASE, FakeEngine, make_adapter

NAME = re.compile(r"loraplex_[a-z0-9_]+")

UNITS = ("_seconds", "_bytes", "_total", "_info")  # the unit (or kind) suffixes in use
# The metrics without a unit suffix, and why: states (1/0) and two counts of requests.
UNITLESS = {"loraplex_serving", "loraplex_requests_in_flight", "loraplex_requests_waiting",
            "loraplex_adapter_resident", "loraplex_engine_fix_applied"}  # fmt: skip


def sample_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
async def served(tmp_path):
    """(client, registry, metrics, engine) for a gateway over adapters alpha and beta."""
    for name in ("alpha", "beta"):
        make_adapter(tmp_path, name)
    engine = FakeEngine()
    resolver = DirectoryResolver(tmp_path, 16, FAKE_BASE)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(AdapterLabels(resolver.knows, cap=10), registry)
    pipeline = GenerationPipeline(engine, resolver)
    server = grpc.aio.server()
    pb_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(lambda: pipeline, metrics), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = AsyncClient(f"127.0.0.1:{port}")
    yield client, registry, metrics, engine
    await client.close()
    await server.stop(0)


async def test_requests_and_tokens_are_counted_per_adapter_method_and_code(served):
    client, registry, _, _ = served
    for _ in range(3):
        await client.generate("hello", "alpha", max_tokens=4)
    async for _ in client.stream("hi", "beta", max_tokens=5):
        pass
    await client.generate("base!", max_tokens=2)
    with pytest.raises(grpc.aio.AioRpcError):
        await client.generate("x", "made-up-name")
    with pytest.raises(grpc.aio.AioRpcError):
        await client.generate("x", "alpha", max_tokens=0)

    def requests(adapter: str, method: str, code: str) -> float:
        labels = {"adapter": adapter, "method": method, "code": code}
        return sample_value(registry, "loraplex_requests_total", **labels)

    assert requests("alpha", "Generate", "OK") == 3
    assert requests("beta", "GenerateStream", "OK") == 1
    assert requests(BASE, "Generate", "OK") == 1
    assert requests(OTHER, "Generate", "NOT_FOUND") == 1
    assert requests("alpha", "Generate", "INVALID_ARGUMENT") == 1
    # the fake tokenizer: one token per character plus BOS
    assert sample_value(registry, "loraplex_prompt_tokens_total", adapter="alpha") == 3 * 6
    assert sample_value(registry, "loraplex_generation_tokens_total", adapter="alpha") == 12
    assert sample_value(registry, "loraplex_prompt_tokens_total", adapter="beta") == 3
    assert sample_value(registry, "loraplex_generation_tokens_total", adapter="beta") == 5
    assert sample_value(registry, "loraplex_generation_tokens_total", adapter=BASE) == 2
    ttft = sample_value(registry, "loraplex_time_to_first_token_seconds_count", adapter="alpha")
    assert ttft == 3
    itl = sample_value(registry, "loraplex_inter_token_latency_seconds_sum", adapter="beta")
    assert itl == pytest.approx(0.001)
    e2e = "loraplex_request_duration_seconds_count"
    assert sample_value(registry, e2e, adapter="alpha", method="Generate") == 4
    assert sample_value(registry, "loraplex_requests_in_flight", adapter="alpha") == 0


async def test_in_flight_and_cancelled_streams(served):
    client, registry, _, engine = served
    release = asyncio.Event()
    original = engine.generate

    async def slow(request, stream):
        await release.wait()
        async for chunk in original(request, stream):
            yield chunk

    engine.generate = slow
    stream = client.stream("hi", "alpha", max_tokens=3)
    task = asyncio.create_task(anext(aiter(stream)))
    for _ in range(100):
        if sample_value(registry, "loraplex_requests_in_flight", adapter="alpha") == 1:
            break
        await asyncio.sleep(0.01)
    assert sample_value(registry, "loraplex_requests_in_flight", adapter="alpha") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        cancelled = sample_value(
            registry, "loraplex_requests_total", adapter="alpha", method="GenerateStream",
            code="CANCELLED",
        )  # fmt: skip
        if cancelled == 1:
            break
        await asyncio.sleep(0.01)
    assert cancelled == 1
    assert sample_value(registry, "loraplex_requests_in_flight", adapter="alpha") == 0


def test_cardinality_cap_holds_for_1000_adapter_names():
    registered = {f"tenant-{i}" for i in range(1000)}
    registry = CollectorRegistry()
    metrics = GatewayMetrics(AdapterLabels(registered.__contains__, cap=50), registry)
    for name in sorted(registered) + [f"unknown-{i}" for i in range(1000)]:
        with metrics.request("Generate", f"{name}@production") as record:
            record.generated = 1
    adapters = {
        sample.labels["adapter"]
        for family in registry.collect()
        for sample in family.samples
        if "adapter" in sample.labels
    }
    assert len(adapters) == 51 and OTHER in adapters
    assert sample_value(registry, "loraplex_generation_tokens_total", adapter=OTHER) == 1950
    total = sum(
        sample_value(registry, "loraplex_requests_total", adapter=a, method="Generate", code="OK")
        for a in adapters
    )
    assert total == 2000


def test_a_name_keeps_its_label_and_unregistered_names_are_other():
    known = {"alpha"}
    labels = AdapterLabels(known.__contains__, cap=1)
    assert labels("") == BASE and labels("ghost") == OTHER
    assert labels.of_reference("alpha@v3") == "alpha"
    known.add("beta")
    assert labels("beta") == OTHER  # over the cap
    known.add("ghost")
    assert labels("ghost") == OTHER  # the cap still holds once a name registers later


def test_lifecycle_metrics_from_engine_stats(served):
    _, registry, metrics, _ = served
    a = ResolvedAdapter("alpha", 3, 7, None, 8, ("q_proj",))  # type: ignore[arg-type]
    stats = AdapterStats(
        active={7},
        cached={9},
        loads=[(7, 0.2)],
        load_failures=[9],
        evictions={(7, "slot"): 2},
        lookups={(7, "slot"): 5, (7, "cpu"): 2, (7, "disk"): 1},
    )
    metrics.record_adapter_stats(stats, [a])
    assert sample_value(registry, "loraplex_adapter_loads_total", adapter="alpha", result="ok") == 1
    failed = {"adapter": OTHER, "result": "error"}  # engine id 9 was never seen
    assert sample_value(registry, "loraplex_adapter_loads_total", **failed) == 1
    assert sample_value(registry, "loraplex_adapter_load_seconds_sum", adapter="alpha") == 0.2
    hits, misses = "loraplex_adapter_cache_hits_total", "loraplex_adapter_cache_misses_total"
    assert sample_value(registry, hits, adapter="alpha", tier="slot") == 5
    assert sample_value(registry, misses, adapter="alpha", tier="slot") == 3
    assert sample_value(registry, hits, adapter="alpha", tier="cpu") == 2
    assert sample_value(registry, misses, adapter="alpha", tier="cpu") == 1
    evicted = {"adapter": "alpha", "tier": "slot"}
    assert sample_value(registry, "loraplex_adapter_evictions_total", **evicted) == 2
    resident = {"adapter": "alpha", "version": "3", "tier": "slot"}
    assert sample_value(registry, "loraplex_adapter_resident", **resident) == 1
    metrics.record_adapter_stats(AdapterStats(), [])  # evicted everywhere: the series go
    assert registry.get_sample_value("loraplex_adapter_resident", resident) is None


def test_queue_rollbacks_verdicts_and_aliases(served):
    _, registry, metrics, _ = served
    a = metrics.labels("alpha")
    metrics._engine_ids[4] = (a, 1)
    metrics.record_queue({4: 3}, base_waiting=2)
    assert sample_value(registry, "loraplex_requests_waiting", adapter="alpha") == 3
    assert sample_value(registry, "loraplex_requests_waiting", adapter=BASE) == 2
    metrics.record_queue({}, base_waiting=0)
    assert sample_value(registry, "loraplex_requests_waiting", adapter="alpha") == 0
    metrics.alias_moved("alpha", "production", 0, 1)
    metrics.alias_moved("alpha", "production", 1, 2)
    metrics.alias_moved("alpha", "production", 2, 1)
    moves = {"adapter": "alpha", "alias": "production"}
    assert sample_value(registry, "loraplex_adapter_promotions_total", **moves) == 2
    assert sample_value(registry, "loraplex_adapter_rollbacks_total", **moves) == 1
    for verdict in ("fail", "error", "error"):
        metrics.verdict("alpha", verdict)
    for verdict, count in (("pass", 0), ("fail", 1), ("error", 2)):
        labels = {"adapter": "alpha", "verdict": verdict}
        assert sample_value(registry, "loraplex_gate_verdicts_total", **labels) == count
    registry.register(AliasCollector(lambda: [("alpha", "production", 1)], metrics.labels))
    info = {"adapter": "alpha", "alias": "production", "version": "1"}
    assert sample_value(registry, "loraplex_alias_info", **info) == 1


async def test_every_metric_follows_the_naming_conventions(served):
    client, registry, metrics, _ = served
    metrics.started("fake 0", "tiny", "none")
    metrics.engine_fixes(["cpu_lora_ops"])
    await client.generate("Hi", "alpha", max_tokens=2)  # counters with samples to look at
    registry.register(AliasCollector(lambda: [("alpha", "production", 1)], metrics.labels))
    families = list(registry.collect())
    assert len(families) >= 20
    counted = 0
    for family in families:
        name = family.name
        assert NAME.fullmatch(name), f"{name}: one prefix, snake case, no colons"
        assert family.documentation, f"{name} has no help text"
        if family.type == "counter":  # the names a scrape sees, not names built here
            assert not name.endswith("_total"), f"{name}: exposed as {name}_total_total"
            samples = {sample.name for sample in family.samples}
            assert samples <= {f"{name}_total", f"{name}_created"}, samples
            counted += f"{name}_total" in samples
        elif family.type == "histogram":
            assert name.endswith("_seconds"), f"{name}: histograms are of seconds here"
        else:
            assert name.endswith(UNITS) or name in UNITLESS, f"{name}: unit suffix missing"
        assert not any(word in name for word in ("_ms", "millis", "_kb", "_mb")), name
    assert counted >= 3  # the sample check above saw real counters
    build = next(f for f in families if f.name == "loraplex_build_info")
    assert build.type == "gauge" and build.samples[0].value == 1
    fix_family = next(f for f in families if f.name == "loraplex_engine_fix_applied")
    fixes = {sample.labels["fix"]: sample.value for sample in fix_family.samples}
    assert fixes == {name: float(name == "cpu_lora_ops") for name in FIX_NAMES}
