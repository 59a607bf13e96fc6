"""Shared fixtures: tiny models are built once per session; one real gateway per session."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gateway.client import AdapterClient, Client, wait_until_serving
from gateway.process import free_port, kill, start_gateway, stop
from tests.postgres import PostgresServer
from trainer.tiny import TinyModel, build_tiny_model

N_ADAPTERS = 5  # one more than the engine's 4 slots, and one with an lm_head LoRA
MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny Llama base and 5 LoRA adapters with different ranks and target modules."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), adapters=N_ADAPTERS)


@dataclass
class RunningGateway:
    """A `loraplex serve` child process and how to reach it."""

    target: str
    process: subprocess.Popen
    log: Path
    metrics_port: int

    def client(self) -> Client:
        return Client(self.target)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        return stop(self.process, timeout)


def launch_gateway(
    model: TinyModel,
    log: Path,
    *extra: str,
    data_dir: Path | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> RunningGateway:
    """Start a gateway on a free loopback port and wait until it is SERVING.

    Registry mode with `data_dir`; otherwise directory mode over the tiny model's adapters.
    """
    port, metrics_port = free_port(), free_port()
    mode = (
        ["--data-dir", str(data_dir)]
        if data_dir is not None
        else ["--adapters-dir", str(model.base.parent / "adapters")]
    )
    args = [
        "--model", str(model.base),
        *mode,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        *extra,
    ]  # fmt: skip
    process = start_gateway(args, log)
    gateway = RunningGateway(f"127.0.0.1:{port}", process, log, metrics_port)
    try:
        wait_until_serving(
            gateway.target, 300, lambda: process.poll() is None, credentials=credentials
        )
    except (TimeoutError, RuntimeError):
        kill(process)
        raise RuntimeError(f"gateway did not start; log:\n{log.read_text()[-4000:]}") from None
    return gateway


@pytest.fixture(scope="session")
def gateway(
    tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """THE session's real gateway: unquantized float32 base, so HF + peft is an exact reference.

    Registry mode: every tiny adapter is registered as v1 of its name and is its production.
    """
    workdir = tmp_path_factory.mktemp("gateway")
    log = workdir / "gateway.log"
    running = launch_gateway(tiny_model, log, "--dtype", "float32", data_dir=workdir / "data")
    with AdapterClient(running.target, actor="test-session") as registry:
        for name, path in sorted(tiny_model.adapters.items()):
            registry.register(name, str(path), owner="tests")
            registry.set_alias(name, "production", 1, expected=0, force=True, reason="session")
    yield running
    code = running.stop()
    assert code == 0, f"gateway exited {code}; log:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback for the session (Debian's binaries, `make test`)."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty registry database: SQLite (WAL) in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"t_{uuid.uuid4().hex[:16]}")
