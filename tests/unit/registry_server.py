"""An in-process gateway in registry mode with a fake engine: real gRPC, real registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway.adapter_service import AdapterServicer
from gateway.admission import Admission
from gateway.auth import AuthInterceptor
from gateway.generation import GenerationServicer
from gateway.key_service import KeyServicer
from gateway.keys import KeyRing
from gateway.metrics import GatewayMetrics
from gateway.pipeline import GenerationPipeline
from gateway.registry.base_model import BaseModelFacts
from gateway.registry.service import Registry
from loraplex.v1 import adapters_pb2_grpc, generation_pb2_grpc, keys_pb2_grpc
from tests.unit.fakes import FakeEngine

MAX_RANK = 16
MAX_BYTES = 50 * 1024 * 1024


@dataclass
class RegistryServer:
    """A running server and its parts, for assertions on state."""

    target: str
    registry: Registry
    engine: FakeEngine
    pipeline: GenerationPipeline
    server: grpc.aio.Server
    data_dir: Path

    async def stop(self) -> None:
        await self.server.stop(0)
        self.registry.close()


async def start_registry_server(
    base_dir: Path,
    data_dir: Path,
    url: str = "",
    max_rank: int = MAX_RANK,
    max_bytes: int = MAX_BYTES,
    keys: KeyRing | None = None,
    credentials: grpc.ServerCredentials | None = None,
    admission: Admission | None = None,
    metrics: GatewayMetrics | None = None,
    max_uploads: int = 2,
) -> RegistryServer:
    """Serve AdapterService + GenerationService on a free loopback port.

    With `keys`: API keys required (the gateway's interceptor) and KeyService served; with
    `credentials`: TLS; with `metrics`: the registry's lifecycle metrics counted there.
    """
    registry = Registry.open(
        url or f"sqlite:///{data_dir / 'registry.db'}",
        data_dir,
        BaseModelFacts.from_folder(base_dir),
        max_rank,
        max_bytes,
        max_uploads,
    )
    await registry.view.refresh(force=True)
    engine = FakeEngine()
    pipeline = GenerationPipeline(engine, registry.view)
    server = grpc.aio.server(interceptors=[AuthInterceptor(keys)] if keys is not None else None)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(lambda: pipeline, admission=admission), server
    )
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
        AdapterServicer(lambda: registry, lambda: pipeline, metrics), server
    )
    if keys is not None:
        keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(keys), server)
    if credentials is not None:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return RegistryServer(f"127.0.0.1:{port}", registry, engine, pipeline, server, data_dir)
