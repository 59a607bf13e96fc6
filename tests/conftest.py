"""Shared fixtures: tiny models are built once per session; one real gateway per session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.client import AdapterClient
from tests.support.gateway import N_ADAPTERS, RunningGateway, launch_gateway
from tests.support.postgres import PostgresServer
from trainer.tiny import TinyModel, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny Llama base and 5 LoRA adapters with different ranks and target modules."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), adapters=N_ADAPTERS)


@pytest.fixture(scope="session")
def gateway(
    tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """THE session's real gateway: unquantized float32 base, so HF + peft is an exact reference.

    Registry mode: every tiny adapter is registered as v1 of its name and is its production.
    Traffic capture is on (rate 1.0) into `capture_dir`.
    """
    workdir = tmp_path_factory.mktemp("gateway")
    log = workdir / "gateway.log"
    capture = workdir / "capture"  # every request captured: the feedback loop's raw material
    running = launch_gateway(
        tiny_model, log, "--dtype", "float32", "--capture-dir", str(capture),
        data_dir=workdir / "data",
    )  # fmt: skip
    running.capture_dir = capture
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
