"""An in-process gateway in registry mode with a fake engine (real gRPC, real registry), and
what the registry tests do with it: copy an adapter, call, compare the state before and after."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gateway.adapter_service import AdapterServicer
from gateway.admission import Admission
from gateway.auth import AuthInterceptor
from gateway.capture import TrafficCapture
from gateway.generation import GenerationServicer
from gateway.key_service import KeyServicer
from gateway.keys import KeyRing
from gateway.metrics import GatewayMetrics
from gateway.pipeline import GenerationPipeline
from gateway.registry.base_model import BaseModelFacts
from gateway.registry.service import Registry
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc, generation_pb2_grpc, keys_pb2_grpc
from tests.support.fakes import FakeEngine

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
    capture: TrafficCapture | None = None,
) -> RegistryServer:
    """Serve AdapterService + GenerationService on a free loopback port.

    With `keys`: API keys required (the gateway's interceptor) and KeyService served; with
    `credentials`: TLS; with `metrics`: the registry's lifecycle metrics counted there; with
    `capture`: traffic capture on.
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
        GenerationServicer(lambda: pipeline, admission=admission, capture=capture), server
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


ACTOR = (("loraplex-actor", "tester"),)
"""Metadata of the calls the registry tests make: who the audit log records."""


def copy_adapter(tiny_model, tmp_path, name="alpha"):
    folder = tmp_path / f"src-{name}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(tiny_model.adapters[name], folder)
    (folder / "README.md").unlink(missing_ok=True)
    return folder


def state(server):
    """Everything a failed call must leave untouched."""
    store = server.registry.store
    artifacts = server.registry.artifacts
    return (
        store.snapshot(),
        store.audit_events(limit=1000),
        sorted(p.name for p in artifacts.objects.iterdir()),
        sorted(p.name for p in artifacts.tmp.iterdir()),
        sorted(p.name for p in server.registry.uploads.iterdir()),
    )


async def register(stub, path, name="acme", **fields):
    return await stub.RegisterAdapter(
        apb.RegisterAdapterRequest(name=name, path=str(path), **fields), metadata=ACTOR
    )


async def expect_error(call, code, message):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()


def upload_messages(header, data, chunk=1000):
    yield apb.UploadAdapterRequest(header=header)
    for i in range(0, len(data), chunk):
        yield apb.UploadAdapterRequest(chunk=data[i : i + chunk])
