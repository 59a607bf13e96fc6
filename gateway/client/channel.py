"""One connection to a gateway, shared by every client class: the channel (TLS from the
LORAPLEX_TLS_* variables unless given), the API key metadata ($LORAPLEX_API_KEY unless given)
and a default deadline."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import grpc

API_KEY_ENV = "LORAPLEX_API_KEY"
TLS_CA_ENV = "LORAPLEX_TLS_CA_FILE"
TLS_CERT_ENV = "LORAPLEX_TLS_CERT_FILE"
TLS_KEY_ENV = "LORAPLEX_TLS_KEY_FILE"


def tls_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files (default: the LORAPLEX_TLS_* variables); None: plaintext.

    `cert_file` + `key_file` present a client certificate (mutual TLS).
    """
    ca_file = ca_file or os.environ.get(TLS_CA_ENV)
    cert_file = cert_file or os.environ.get(TLS_CERT_ENV)
    key_file = key_file or os.environ.get(TLS_KEY_ENV)
    if not (ca_file or cert_file):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


def auth_metadata(api_key: str | None = None) -> tuple[tuple[str, str], ...]:
    """The `authorization` metadata for an API key (default: $LORAPLEX_API_KEY)."""
    api_key = api_key or os.environ.get(API_KEY_ENV)
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A blocking channel: TLS with `credentials` (default: from the environment), else plain."""
    credentials = credentials or tls_credentials()
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)


def open_aio_channel(
    target: str, credentials: grpc.ChannelCredentials | None = None
) -> grpc.aio.Channel:
    """An asyncio channel (grpc.aio), with the same credentials rule as `open_channel`."""
    credentials = credentials or tls_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, credentials)


class Connection:
    """Base of the blocking clients: one channel, reused for every call, its metadata, and the
    service stub of `stub_class` over it."""

    stub_class: Any  # the generated gRPC stub of the client's service

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.channel = open_channel(target, credentials)
        self.metadata = (*metadata, *auth_metadata(api_key))
        self.stub = self.stub_class(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AioConnection:
    """Base of the asyncio clients (as Connection); create them inside the running event loop."""

    stub_class: Any

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        self.target = target
        self.channel = open_aio_channel(target, credentials)
        self.metadata = auth_metadata(api_key)
        self.stub = self.stub_class(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def wait_until_serving(
    target: str,
    timeout: float = 300.0,
    alive: Callable[[], bool] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Block until the gateway's health service reports SERVING (engine loaded).

    `alive` (e.g. ``lambda: proc.poll() is None``) stops the wait early if the server died.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with open_channel(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if alive is not None and not alive():
                raise RuntimeError(f"gateway at {target} exited before it was SERVING")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway at {target} not SERVING after {timeout:.0f}s")
            time.sleep(0.5)
