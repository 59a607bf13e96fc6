"""Builds and runs the gateway: grpc.aio server + vLLM engine in one process.

The gRPC server listens first (health NOT_SERVING) so probes get an answer while the engine
loads; health turns SERVING once the engine is up. SIGTERM/SIGINT drain: health goes
NOT_SERVING, new calls are refused, in-flight calls get `grace_period_s` to finish, exit 0.
If the engine dies, health goes NOT_SERVING, new calls get UNAVAILABLE for a moment, and the
process exits 1 so a supervisor restarts it.
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
from gateway.admission import Admission
from gateway.auth import AuthInterceptor
from gateway.capture import TrafficCapture
from gateway.config import ConfigError, GatewayConfig
from gateway.domain import Engine
from gateway.generation import GenerationServicer
from gateway.key_service import KeyServicer
from gateway.keys import KeyRing, KeyStore
from gateway.metrics import REGISTRY, AdapterLabels, AliasCollector, GatewayMetrics, serve_http
from gateway.pipeline import GenerationPipeline, RequestLimits
from gateway.registry.base_model import BaseLayers, BaseModelFacts
from gateway.registry.integrity import ArtifactCheck
from gateway.registry.service import Registry
from gateway.resolver import AdapterResolver, DirectoryResolver
from loraplex.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
)

log = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
ADAPTER_SERVICE = adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name
KEY_SERVICE = keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name
WATCHDOG_INTERVAL_S = 1.0
ENGINE_DEATH_UNAVAILABLE_S = 2.0  # answering UNAVAILABLE before the exit once the engine died
MAX_SEND_MESSAGE_BYTES = 64 * 1024 * 1024  # a long completion with top-20 logprobs is large


def open_key_ring(config: GatewayConfig) -> KeyRing:
    """The API keys of `require_api_keys`, from the registry database."""
    if config.registry_url is None:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    ring = KeyRing(KeyStore(config.registry_database))
    if not config.tls and not config.is_loopback:
        log.warning(
            "API keys travel in plaintext to %s: set tls_cert_file/tls_key_file, or terminate "
            "TLS in front of the gateway",
            config.host,
        )
    if not len(ring):
        log.warning(
            "require_api_keys is on but no key exists: every call will be refused until an "
            "admin runs `loraplex keys create` against %s",
            config.registry_database.split("@")[-1],
        )
    return ring


def admin_api_allowed(config: GatewayConfig) -> bool:
    """Whether to serve AdapterService: with keys, on loopback, or when told it is insecure."""
    if config.require_api_keys or config.is_loopback:
        return True
    if config.insecure_admin:
        log.warning(
            "INSECURE: the admin API on %s takes calls from anyone who can reach it "
            "(no API keys; insecure_admin is set)",
            config.host,
        )
        return True
    log.error(
        "admin API OFF: no API keys (require_api_keys) on the non-loopback address %s; "
        "registration and promotion are refused (UNIMPLEMENTED). Create keys and set "
        "require_api_keys, or set insecure_admin to serve it without keys",
        config.host,
    )
    return False


def server_credentials(config: GatewayConfig) -> grpc.ServerCredentials:
    """TLS (mutual TLS with tls_client_ca_file) from the configured PEM files."""
    assert config.tls_cert_file is not None and config.tls_key_file is not None
    client_ca = config.tls_client_ca_file.read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


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
        config.max_concurrent_uploads,
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
        self.keys = open_key_ring(config) if config.require_api_keys else None
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.keys)] if self.keys is not None else None,
            options=[
                ("grpc.max_receive_message_length", config.max_request_bytes),
                ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
                # HTTP/2 BDP probing pings (window tuning for bulk transfers over long links)
                # cost token streams +15-30% throughput and 4x the TTFT p99 (benchmarks/).
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        admission = Admission(
            config.max_pending_requests, config.requests_per_minute, config.tokens_per_minute
        )
        settings = config.capture
        self.capture = (
            TrafficCapture(settings, self.metrics.capture_outcome if self.metrics else None)
            if settings is not None
            else None
        )
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(lambda: self.pipeline, self.metrics, admission, self.capture),
            self.server,
        )
        services = [GENERATION_SERVICE]
        if admin_api_allowed(config):
            adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
                AdapterServicer(lambda: self.registry, lambda: self.pipeline, self.metrics),
                self.server,
            )
            services.append(ADAPTER_SERVICE)
        if self.keys is not None:
            keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(self.keys), self.server)
            services.append(KEY_SERVICE)
        self.services = tuple(services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                *services,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        address = f"{config.host}:{config.port}"
        if config.tls:
            self.port = self.server.add_secure_port(address, server_credentials(config))
        else:
            self.port = self.server.add_insecure_port(address)
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
        for service in ("", *self.services):
            await self.health.set(service, status)

    async def _start_engine(self, resolver: AdapterResolver) -> Engine:
        from gateway.engine import VllmEngine, cache_vllm_environment  # the vLLM import

        metrics = self.metrics
        sink = metrics.record_queue if metrics is not None else None
        engine = await VllmEngine.start(self.config, True, sink)
        cache_vllm_environment()  # this process starts no other engine
        if metrics is not None:  # the first call installs the counters: before any load
            metrics.record_adapter_stats(await engine.adapter_stats(), [])
            info = engine.info
            metrics.started(info.engine, info.base_model, info.quantization)
            metrics.engine_fixes(info.engine_fixes)
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
                # New calls get UNAVAILABLE (retryable) from the servicer meanwhile; once the
                # server stops, gRPC would cancel calls that raced in (CANCELLED, measured).
                await asyncio.sleep(ENGINE_DEATH_UNAVAILABLE_S)
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
        log.info(
            "loraplex gateway listening on %s:%d (%s, %s)",
            self.config.host,
            self.port,
            "mutual TLS"
            if self.config.tls_client_ca_file
            else "TLS"
            if self.config.tls
            else "plaintext",
            f"API keys: {len(self.keys)} active" if self.keys is not None else "no API keys",
        )
        if self.config.metrics_port is not None:
            port = serve_http(REGISTRY, self.config.host, self.config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.config.host, port)
        resolver: AdapterResolver
        if self.config.adapters_dir is not None:
            try:
                layers = await asyncio.to_thread(BaseLayers.of_model, self.config.model)
            except Exception as exc:  # a missing folder, a hub id not cached offline, bad JSON
                raise ConfigError(
                    "directory mode checks every adapter against the base's layers, but the "
                    f"base's config.json cannot be read ({type(exc).__name__}: {exc})"
                ) from exc
            resolver = DirectoryResolver(
                self.config.adapters_dir, self.config.max_lora_rank, layers
            )
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
            limits = RequestLimits(
                max_prompt_tokens=self.config.max_prompt_tokens,
                max_new_tokens=self.config.max_new_tokens,
                max_stop_strings=self.config.max_stop_strings,
                max_stop_string_chars=self.config.max_stop_string_chars,
            )
            file_check = None
            if self.registry is not None:  # immutable artifacts: a change is damage
                hook = self.metrics.adapter_files_broken if self.metrics is not None else None
                file_check = ArtifactCheck(hook).check
            self.pipeline = GenerationPipeline(engine, resolver, limits, file_check)
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
            if self.keys is not None:
                follow_keys = self.keys.follow(self.config.registry_poll_interval_s, self._stop)
                tasks.append(asyncio.create_task(follow_keys))
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
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)
        if self.registry is not None:
            self.registry.close()
        if self.keys is not None:
            self.keys.store.close()
        log.info("gateway stopped (exit %d)", self._exit_code)
        return self._exit_code


def serve(config: GatewayConfig) -> int:
    """Run a gateway in a fresh event loop; returns its exit code."""
    from gateway.engine import check_parallelism, check_quantization  # the vLLM import

    check_quantization(config)
    check_parallelism(config)

    async def main() -> int:  # grpc.aio objects must be created inside the running loop
        return await Gateway(config).run()

    # uvloop: measured +23% streaming throughput over asyncio's default loop (benchmarks/).
    return uvloop.run(main())
