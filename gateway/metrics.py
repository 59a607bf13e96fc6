"""Prometheus metrics of the gateway, per adapter, with bounded cardinality.

vLLM labels its metrics by model only, so the gateway measures per adapter itself: every
generation request is recorded under the *registered adapter name* it asked for (`base` for
none). Names outside the registered set, and registered names beyond `max_adapters`, fold into
`other`, so a client cannot create series by sending made-up names.

Naming follows Prometheus conventions: one prefix `loraplex_`, base units (`_seconds`), counters
end in `_total`. The `/metrics` endpoint (`serve_http`) exposes these together with vLLM's own
engine metrics, which vLLM registers in prometheus_client's default registry.

Hot-path cost is kept to a dict lookup and a few counter/histogram updates per request (no
per-token work): the benchmark measures throughput with metrics on vs off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from gateway.domain import AdapterStats, EngineRequest, GenerationChunk, ResolvedAdapter, Timing
from gateway.engine_fixes import FIX_NAMES
from gateway.errors import code_of
from gateway.resolver import AdapterResolver

log = logging.getLogger(__name__)

PREFIX = "loraplex_"
BASE = "base"
OTHER = "other"
TEXT_FORMAT = "text/plain; version=0.0.4"  # what /metrics answers in (see serve_http)

# Buckets for LLM latencies: sub-10 ms (tiny models, cache hits) up to minutes (long outputs).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)  # fmt: skip
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0,
               300.0, 600.0)  # fmt: skip
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AdapterLabels:
    """Adapter name -> label value: registered names (up to `cap` of them), `base`, `other`.

    A name keeps its label once given one, so series do not flip between a name and `other`.
    """

    def __init__(self, is_registered: Callable[[str], bool], cap: int) -> None:
        self.is_registered = is_registered
        self.cap = cap
        self._given: dict[str, str] = {}
        self._named = 0
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        label = self._given.get(name)
        if label is not None:
            return label
        if not name:
            return BASE
        with self._lock:
            label = self._given.get(name)
            if label is not None:
                return label
            if not self.is_registered(name):
                return OTHER  # not remembered: it may be registered later
            label = name if self._named < self.cap else OTHER
            self._named += label == name
            self._given[name] = label
            return label

    def of_reference(self, reference: str) -> str:
        """The label of a request's adapter reference (`name`, `name@alias`, `name@vN`)."""
        return self(reference.partition("@")[0])


@dataclass
class _Series:
    """The children of one adapter label, looked up once (`.labels()` is the slow part)."""

    label: str
    in_flight: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    ttft: Histogram
    itl: Histogram
    requests: dict[tuple[str, grpc.StatusCode], Counter] = field(default_factory=dict)
    duration: dict[str, Histogram] = field(default_factory=dict)


class RequestRecord:
    """One generation request on its way through the gateway (see `GatewayMetrics.request`)."""

    __slots__ = ("_admitted", "_metrics", "_series", "generated", "method", "started", "timing")

    def __init__(self, metrics: GatewayMetrics, series: _Series, method: str) -> None:
        self._metrics = metrics
        self._series = series
        self.method = method
        self.started = time.time()  # wall clock: vLLM's first-token time is wall clock too
        self.generated = 0
        self.timing: Timing | None = None
        self._admitted = False

    def admitted(self, request: EngineRequest) -> None:
        """The request was validated and goes to the engine."""
        self._admitted = True
        self._series.in_flight.inc()
        self._series.prompt_tokens.inc(len(request.prompt_token_ids))
        if request.adapter is not None:
            self._metrics.saw_adapter(request.adapter)

    def chunk(self, chunk: GenerationChunk) -> None:
        """Output arrived (each delta of a stream, or the one result of a unary call)."""
        self.generated += len(chunk.token_ids)
        if chunk.timing is not None:
            self.timing = chunk.timing

    def finished(self, code: grpc.StatusCode) -> None:
        series = self._series
        if self._admitted:
            series.in_flight.dec()
        if self.generated:
            series.generation_tokens.inc(self.generated)
        timing = self.timing
        if timing is not None and timing.first_token_at is not None:
            series.ttft.observe(max(0.0, timing.first_token_at - self.started))
            if timing.mean_inter_token_s is not None:
                series.itl.observe(timing.mean_inter_token_s)
        self._metrics.count(series, self.method, code, time.time() - self.started)


class Unrecorded:
    """Stands in for a RequestRecord when metrics are off, so callers need no checks."""

    def admitted(self, request: EngineRequest) -> None:
        pass

    def chunk(self, chunk: GenerationChunk) -> None:
        pass


UNRECORDED = Unrecorded()


class GatewayMetrics:
    """Every metric the gateway exports, registered in one prometheus_client registry."""

    def __init__(self, labels: AdapterLabels, registry: CollectorRegistry = REGISTRY) -> None:
        self.labels = labels
        self.registry = registry
        self._series: dict[str, _Series] = {}
        self._engine_ids: dict[int, tuple[str, int]] = {}  # engine id -> (label, version)
        self._waiting_labels: set[str] = set()
        self._resident: dict[tuple[str, str, str], None] = {}
        r = registry
        adapter = ["adapter"]
        self.build_info = Gauge(
            PREFIX + "build_info",
            "Always 1; labels say what is running.",
            ["version", "engine", "base_model", "quantization"],
            registry=r,
        )
        self.engine_fix = Gauge(
            PREFIX + "engine_fix_applied",
            "1 for each loraplex fix to vLLM every engine worker applied, 0 for the others.",
            ["fix"],
            registry=r,
        )
        self.captured = Counter(
            PREFIX + "capture_records",
            "Traffic capture: sampled requests by outcome (written, dropped_full, dropped_by_hook, "
            "dropped_hook_error, dropped_error).",
            ["outcome"],
            registry=r,
        )
        self.serving = Gauge(
            PREFIX + "serving", "1 while the engine serves requests (health SERVING).", registry=r
        )
        self.requests = Counter(
            PREFIX + "requests_total",
            "Generation requests by adapter, method and gRPC status code.",
            ["adapter", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds",
            "End-to-end latency of generation requests, as the gateway sees them.",
            ["adapter", "method"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens_total", "Prompt tokens sent to the engine.", adapter, registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens_total", "Tokens generated.", adapter, registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "From the request reaching the gateway to the engine's first token.",
            adapter,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Mean time between generated tokens of each request (decode time / (tokens - 1)).",
            adapter,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            PREFIX + "requests_in_flight",
            "Generation requests admitted and not finished.",
            adapter,
            registry=r,
        )
        self.waiting = Gauge(
            PREFIX + "requests_waiting",
            "Requests queued in the engine's scheduler, not yet running.",
            adapter,
            registry=r,
        )
        self.load_seconds = Histogram(
            PREFIX + "adapter_load_seconds",
            "Time to load an adapter's weights from disk into the engine.",
            adapter,
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.loads = Counter(
            PREFIX + "adapter_loads_total",
            "Adapter loads from disk into the engine, by result (ok / error).",
            ["adapter", "result"],
            registry=r,
        )
        self.evictions = Counter(
            PREFIX + "adapter_evictions_total",
            "Adapters evicted from a cache tier (slot: engine batch slot, cpu: CPU memory).",
            ["adapter", "tier"],
            registry=r,
        )
        self.cache_hits = Counter(
            PREFIX + "adapter_cache_hits_total",
            "Batches needing an adapter that found it in the tier (slot, then cpu).",
            ["adapter", "tier"],
            registry=r,
        )
        self.cache_misses = Counter(
            PREFIX + "adapter_cache_misses_total",
            "Batches needing an adapter that did not find it in the tier (slot, then cpu).",
            ["adapter", "tier"],
            registry=r,
        )
        self.resident = Gauge(
            PREFIX + "adapter_resident",
            "1 per adapter version held by the engine, by tier (slot / cpu).",
            ["adapter", "version", "tier"],
            registry=r,
        )
        self.registrations = Counter(
            PREFIX + "adapter_registrations_total",
            "Registration attempts by result (ok / error).",
            ["adapter", "result"],
            registry=r,
        )
        self.promotions = Counter(
            PREFIX + "adapter_promotions_total",
            "Alias moves to a newer version.",
            ["adapter", "alias"],
            registry=r,
        )
        self.rollbacks = Counter(
            PREFIX + "adapter_rollbacks_total",
            "Alias moves back to an older version.",
            ["adapter", "alias"],
            registry=r,
        )
        self.file_errors = Counter(
            PREFIX + "adapter_file_errors_total",
            "Adapter versions found with stored files missing or changed (each time one breaks).",
            ["adapter", "reason"],
            registry=r,
        )
        self.gate_verdicts = Counter(
            PREFIX + "gate_verdicts_total",
            "Evaluation verdicts recorded for adapter versions (pass / fail / error).",
            ["adapter", "verdict"],
            registry=r,
        )

    # -- generation requests

    def _series_of(self, label: str) -> _Series:
        series = self._series.get(label)
        if series is None:
            series = _Series(
                label=label,
                in_flight=self.in_flight.labels(label),
                prompt_tokens=self.prompt_tokens.labels(label),
                generation_tokens=self.generation_tokens.labels(label),
                ttft=self.ttft.labels(label),
                itl=self.itl.labels(label),
            )
            self._series[label] = series
        return series

    @contextlib.contextmanager
    def request(self, method: str, reference: str) -> Iterator[RequestRecord]:
        """Record one generation call; its status code comes from how the block ends."""
        record = RequestRecord(self, self._series_of(self.labels.of_reference(reference)), method)
        try:
            yield record
        except BaseException as exc:
            record.finished(code_of(exc))
            raise
        record.finished(grpc.StatusCode.OK)

    def count(self, series: _Series, method: str, code: grpc.StatusCode, duration_s: float) -> None:
        label = series.label
        counter = series.requests.get((method, code))
        if counter is None:
            counter = series.requests[(method, code)] = self.requests.labels(
                label, method, code.name
            )
        counter.inc()
        histogram = series.duration.get(method)
        if histogram is None:
            histogram = series.duration[method] = self.request_duration.labels(label, method)
        histogram.observe(duration_s)

    def saw_adapter(self, adapter: ResolvedAdapter) -> None:
        """Remember which adapter an engine id holds (engine stats speak in engine ids)."""
        if adapter.engine_id not in self._engine_ids:
            self._engine_ids[adapter.engine_id] = (self.labels(adapter.name), adapter.version)

    # -- engine statistics

    def record_queue(self, waiting: dict[int, int], base_waiting: int) -> None:
        """Per-adapter scheduler queue (called by the engine after each step)."""
        counts: collections.Counter[str] = collections.Counter()
        for engine_id, n in waiting.items():
            counts[self._engine_ids.get(engine_id, (OTHER, 0))[0]] += n
        counts[BASE] += base_waiting  # always present: shows the engine reports its queue
        for label in self._waiting_labels - counts.keys():
            self.waiting.labels(label).set(0)
        for label, n in counts.items():
            self.waiting.labels(label).set(n)
        self._waiting_labels = set(counts)

    def record_adapter_stats(self, stats: AdapterStats, known: Iterable[ResolvedAdapter]) -> None:
        """Lifecycle counters and residency from the engine's LoRA manager (polled)."""
        for adapter in known:
            self.saw_adapter(adapter)
        ids = self._engine_ids

        def label(engine_id: int) -> str:
            return ids.get(engine_id, (OTHER, 0))[0]

        for engine_id, seconds in stats.loads:
            self.loads.labels(label(engine_id), "ok").inc()
            self.load_seconds.labels(label(engine_id)).observe(seconds)
        for engine_id in stats.load_failures:
            self.loads.labels(label(engine_id), "error").inc()
        for (engine_id, tier), n in stats.evictions.items():
            self.evictions.labels(label(engine_id), tier).inc(n)
        for (engine_id, found_in), n in stats.lookups.items():
            # A batch looks in the engine's slots first, then in CPU memory, then on disk.
            name = label(engine_id)
            if found_in == "slot":
                self.cache_hits.labels(name, "slot").inc(n)
                continue
            self.cache_misses.labels(name, "slot").inc(n)
            cpu = self.cache_hits if found_in == "cpu" else self.cache_misses
            cpu.labels(name, "cpu").inc(n)
        resident: dict[tuple[str, str, str], None] = {}
        for tier, engine_ids in (("slot", stats.active), ("cpu", stats.cached)):
            for engine_id in engine_ids:
                name, version = ids.get(engine_id, (OTHER, 0))
                resident[(name, str(version), tier)] = None
        for key in self._resident.keys() - resident.keys():
            self.resident.remove(*key)
        for key in resident:
            self.resident.labels(*key).set(1)
        self._resident = resident

    # -- registry lifecycle

    def registration(self, name: str, ok: bool) -> None:
        self.registrations.labels(self.labels(name), "ok" if ok else "error").inc()

    def alias_moved(self, name: str, alias: str, from_version: int, to_version: int) -> None:
        """A move to an older version is a rollback; to a newer one (or a new alias) a promotion."""
        if to_version == from_version:
            return
        kind = self.rollbacks if 0 < to_version < from_version else self.promotions
        kind.labels(self.labels(name), alias).inc()

    def adapter_files_broken(self, name: str, reason: str) -> None:
        self.file_errors.labels(self.labels(name), reason).inc()

    def verdict(self, name: str, verdict: str) -> None:
        """An evaluation recorded: `verdict` is pass, fail or error."""
        self.gate_verdicts.labels(self.labels(name), verdict).inc()

    def started(self, engine: str, base_model: str, quantization: str) -> None:
        version = metadata.version("loraplex")
        self.build_info.labels(version, engine, base_model, quantization).set(1)

    def capture_outcome(self, outcome: str) -> None:
        """A sampled request written or dropped by traffic capture (its writer thread)."""
        self.captured.labels(outcome).inc()

    def engine_fixes(self, applied: Iterable[str]) -> None:
        """Which of loraplex's vLLM fixes the engine reported (gateway/engine_fixes.py)."""
        applied = set(applied)
        for name in FIX_NAMES:
            self.engine_fix.labels(name).set(1 if name in applied else 0)

    def touch(
        self, adapters: Iterable[ResolvedAdapter], aliases: Iterable[tuple[str, str, int]]
    ) -> None:
        """Create the rare-event series at 0 before their first event.

        `increase()` cannot see a counter's first increment when the series is born at 1, so
        the load-failure and rollback alerts need these series to exist beforehand.
        """
        for adapter in adapters:
            self.loads.labels(self.labels(adapter.name), "error")
        for name, alias, _ in aliases:
            label = self.labels(name)
            self.rollbacks.labels(label, alias)
            self.promotions.labels(label, alias)

    async def poll_engine(
        self,
        stats: Callable[[], Awaitable[AdapterStats]],
        resolver: AdapterResolver,
        interval_s: float,
        stop: asyncio.Event,
    ) -> None:
        """Collect the engine's adapter statistics every `interval_s` until `stop`."""
        while not stop.is_set():
            try:
                servable = resolver.servable()
                self.record_adapter_stats(await stats(), servable)
                self.touch(servable, resolver.aliases())
            except Exception as exc:  # noqa: BLE001 - metrics must never stop serving
                log.warning("collecting adapter statistics failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


class AliasCollector:
    """`loraplex_alias_info{adapter, alias, version}`: which version each alias serves.

    Read from the registry snapshot at scrape time: one series per alias, never per request.
    """

    def __init__(
        self, aliases: Callable[[], Iterable[tuple[str, str, int]]], labels: AdapterLabels
    ) -> None:
        self._aliases = aliases
        self._labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            PREFIX + "alias_info",
            "1 per alias; `version` is the adapter version the alias serves.",
            labels=["adapter", "alias", "version"],
        )
        for name, alias, version in self._aliases():
            label = self._labels(name)
            if label == name:  # names folded into `other` would collide
                family.add_metric([name, alias, str(version)], 1)
        yield family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # one log line per scrape would drown the gateway's log


def serve_http(registry: CollectorRegistry, host: str, port: int) -> int:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port.

    Always answers in the Prometheus text format: under OpenMetrics negotiation
    prometheus_client rewrites vLLM's `vllm:` names to `vllm_`, and which one a Prometheus
    stored would depend on its version. The text format keeps the names vLLM documents.
    The `_created` samples prometheus_client adds to counters are turned off (for vLLM's
    metrics too): Prometheus does not use them and they double the scrape size.
    """
    disable_created_metrics()
    app = make_wsgi_app(registry)

    def text_format(environ: dict, start_response: Callable) -> Iterable[bytes]:
        return app({**environ, "HTTP_ACCEPT": TEXT_FORMAT}, start_response)

    server = make_server(host, port, text_format, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server.server_port
