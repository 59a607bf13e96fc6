"""Builds and runs the gateway: grpc.aio server + vLLM engine in one process.

The gRPC server listens first (health NOT_SERVING) so probes get an answer while the engine
loads; health turns SERVING once the engine is up. SIGTERM/SIGINT drain: health goes
NOT_SERVING, new calls are refused, in-flight calls get `grace_period_s` to finish, exit 0.
If the engine dies, health goes NOT_SERVING and the process exits 1 so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.adapter_service import AdapterServicer
from gateway.config import ConfigError, GatewayConfig
from gateway.domain import Engine
from gateway.generation import GenerationServicer
from gateway.metrics import REGISTRY, AdapterLabels, AliasCollector, GatewayMetrics, serve_http
from gateway.pipeline import GenerationPipeline
from gateway.registry.service import Registry
from gateway.registry.validate import BaseModelFacts
from gateway.resolver import AdapterResolver, DirectoryResolver
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
ADAPTER_SERVICE = adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name
WATCHDOG_INTERVAL_S = 1.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def open_registry(config: GatewayConfig) -> Registry:
    """The registry of registry mode (creates the data dir and database on first use)."""
    if not Path(config.model).is_dir():
        raise ConfigError(
            "registry mode needs `model` to be a local model folder (registration checks "
            "adapters against its config and tokenizer); download it first, or set adapters_dir"
        )
    base = BaseModelFacts.from_folder(Path(config.model), tuple(config.base_model_names))
    return Registry.open(
        config.registry_database,
        config.data_dir,
        base,
        config.max_lora_rank,
        config.max_adapter_bytes,
    )


class Gateway:
    """One gateway process: the gRPC server, the engine and their lifecycle."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.pipeline: GenerationPipeline | None = None
        self.registry: Registry | None = None
        self.resolver: AdapterResolver | None = None
        self.metrics: GatewayMetrics | None = None
        if config.metrics_port is not None:
            labels = AdapterLabels(self._knows, config.metrics_max_adapters)
            # the default registry: vLLM registers its engine metrics there too
            self.metrics = GatewayMetrics(labels, REGISTRY)
            REGISTRY.register(AliasCollector(self._aliases, labels))
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # HTTP/2 BDP probing pings (window tuning for bulk transfers over long links)
                # cost token streams +15-30% throughput and 4x the TTFT p99 (benchmarks/).
                ("grpc.http2.bdp_probe", 0),
            ]
        )
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(lambda: self.pipeline, self.metrics), self.server
        )
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
            AdapterServicer(lambda: self.registry, lambda: self.pipeline, self.metrics),
            self.server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                GENERATION_SERVICE,
                ADAPTER_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        self._stop = asyncio.Event()
        self._exit_code = 0

    def _knows(self, name: str) -> bool:
        return self.resolver is not None and self.resolver.knows(name)

    def _aliases(self) -> list[tuple[str, str, int]]:
        return self.resolver.aliases() if self.resolver is not None else []

    async def _set_health(self, serving: bool) -> None:
        if self.metrics is not None:
            self.metrics.serving.set(serving)
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", GENERATION_SERVICE, ADAPTER_SERVICE):
            await self.health.set(service, status)

    async def _start_engine(self, resolver: AdapterResolver) -> Engine:
        from gateway.engine import VllmEngine  # the only vLLM import

        metrics = self.metrics
        sink = metrics.record_queue if metrics is not None else None
        engine = await asyncio.to_thread(VllmEngine.start, self.config, True, sink)
        if metrics is not None:  # the first call installs the counters: before any load
            metrics.record_adapter_stats(await engine.adapter_stats(), [])
            info = engine.info
            metrics.started(info.engine, info.base_model, info.quantization)
        for adapter in resolver.servable()[: self.config.max_cpu_loras or self.config.max_loras]:
            try:
                await engine.add_adapter(adapter)
            except Exception as exc:  # noqa: BLE001 - a broken adapter must not stop the gateway
                log.warning("pre-loading adapter %s failed: %s", adapter.name, exc)
        return engine

    async def _watchdog(self, engine: Engine) -> None:
        while not self._stop.is_set():
            if not engine.is_healthy():
                log.error("the engine died; health NOT_SERVING, exiting 1 for a restart")
                await self._set_health(False)
                self._exit_code = 1
                self._stop.set()
                return
            await asyncio.sleep(WATCHDOG_INTERVAL_S)

    def request_stop(self) -> None:
        """Begin a graceful drain (signal handler)."""
        log.info("stop requested: draining for up to %.0fs", self.config.grace_period_s)
        self._stop.set()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT or engine death; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._set_health(False)
        await self.server.start()
        log.info("loraplex gateway listening on %s:%d", self.config.host, self.port)
        if self.config.metrics_port is not None:
            port = serve_http(REGISTRY, self.config.host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.host, port)
        resolver: AdapterResolver
        if self.config.adapters_dir is not None:
            resolver = DirectoryResolver(self.config.adapters_dir, self.config.max_lora_rank)
        else:
            self.registry = await asyncio.to_thread(open_registry, self.config)
            await self.registry.view.refresh(force=True)
            resolver = self.registry.view
            log.info("registry: %s", self.config.registry_database.split("@")[-1])
        self.resolver = resolver
        engine = await self._start_engine(resolver)
        # Everything allocated so far lives as long as the process: keep it out of every
        # future GC pass (a full pass over torch/vLLM objects stalled the loop; benchmarks/).
        gc.freeze()
        tasks = []
        if not self._stop.is_set():
            self.pipeline = GenerationPipeline(engine, resolver)
            await self._set_health(True)
            log.info("engine ready: %s, %d adapters", engine.info.engine, len(resolver.servable()))
            tasks.append(asyncio.create_task(self._watchdog(engine)))
            if self.metrics is not None:
                poll = self.metrics.poll_engine(
                    engine.adapter_stats,
                    resolver,
                    self.config.metrics_poll_interval_s,
                    self._stop,
                )
                tasks.append(asyncio.create_task(poll))
            if self.registry is not None:
                self.registry.view.prewarm = engine.add_adapter
                follow = self.registry.view.follow(self.config.registry_poll_interval_s, self._stop)
                tasks.append(asyncio.create_task(follow))
        await self._stop.wait()
        await self._set_health(False)
        await self.server.stop(self.config.grace_period_s)
        for task in tasks:
            task.cancel()
        self.pipeline = None
        await engine.shutdown()
        if self.registry is not None:
            self.registry.close()
        log.info("gateway stopped (exit %d)", self._exit_code)
        return self._exit_code


def serve(config: GatewayConfig) -> int:
    """Run a gateway in a fresh event loop; returns its exit code."""

    async def main() -> int:  # grpc.aio objects must be created inside the running loop
        return await Gateway(config).run()

    # uvloop: measured +23% streaming throughput over asyncio's default loop (benchmarks/).
    return uvloop.run(main())
