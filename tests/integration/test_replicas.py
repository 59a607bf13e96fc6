"""Two gateway replicas, each with its own vLLM engine, on one PostgreSQL registry and one
artifact directory: what one registers the other serves, a promotion through one is served by
the other within 2 seconds, and concurrent promotions through both are settled by
compare-and-swap (exactly one wins).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from gateway.client import AdapterClient
from tests.support.gateway import RunningGateway, launch_gateway

pytestmark = pytest.mark.integration

PROPAGATION_LIMIT_S = 2.0


@pytest.fixture(scope="module")
def replicas(tiny_model, postgres, tmp_path_factory) -> Iterator[list[RunningGateway]]:
    workdir = tmp_path_factory.mktemp("replicas")
    url = postgres.create_database("shared_replicas")
    shared = ["--registry-url", url, "--dtype", "float32"]
    running: list[RunningGateway] = []
    try:
        for i in range(2):
            log = workdir / f"replica-{i}.log"
            running.append(launch_gateway(tiny_model, log, *shared, data_dir=workdir / "data"))
        yield running
    finally:
        for replica in running:
            code = replica.stop()
            assert code == 0, f"replica exited {code}; log:\n{replica.log.read_text()[-3000:]}"


def served_version(replica: RunningGateway, reference: str) -> int | None:
    """The version `reference` resolves to on this replica (None: not found there)."""
    with replica.client() as client:
        try:
            return client.generate("Once upon a time", reference, max_tokens=1).adapter.version
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise


def wait_until_served(replica: RunningGateway, reference: str, version: int) -> float:
    """Seconds until the replica serves `version` for `reference` (raises after 10 s)."""
    started = time.monotonic()
    while served_version(replica, reference) != version:
        assert time.monotonic() - started < 10, f"{reference} never became v{version}"
        time.sleep(0.02)
    return time.monotonic() - started


def test_registered_on_one_is_servable_on_the_other(replicas, tiny_model):
    a, b = replicas
    with AdapterClient(a.target, actor="replica-test") as registry:
        v1 = registry.register("shared", tiny_model.adapters["alpha"]).version
    assert v1 == 1
    wait_until_served(b, "shared@v1", 1)
    with b.client() as client:
        reply = client.generate("Once upon a time", "shared@v1", max_tokens=4, temperature=0.0)
    assert reply.adapter.name == "shared" and len(reply.token_ids) == 4


def test_a_promotion_through_one_is_served_by_the_other_within_2s(replicas, tiny_model):
    a, b = replicas
    with AdapterClient(a.target, actor="replica-test") as registry:
        registry.register("promoted", tiny_model.adapters["alpha"])
        registry.register("promoted", tiny_model.adapters["beta"])
        registry.set_alias("promoted", "production", 1, force=True, reason="test")
        wait_until_served(b, "promoted", 1)
        registry.set_alias("promoted", "production", 2, expected=1, force=True, reason="test")
        delay = wait_until_served(b, "promoted", 2)
    assert delay < PROPAGATION_LIMIT_S, f"replica b served v2 after {delay:.2f}s"


def test_concurrent_promotions_through_both_one_wins(replicas, tiny_model):
    a, b = replicas
    with AdapterClient(a.target, actor="replica-a") as registry:
        for source in ("alpha", "beta", "gamma"):
            registry.register("contested", tiny_model.adapters[source])
        registry.set_alias("contested", "production", 1, force=True, reason="start")
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def promote(replica: RunningGateway, version: int) -> None:
        with AdapterClient(replica.target, actor=f"promoter-{version}") as client:
            barrier.wait()
            try:
                outcomes[replica.target] = client.set_alias(
                    "contested", "production", version, expected=1, force=True, reason="race"
                )
            except grpc.RpcError as exc:
                outcomes[replica.target] = exc.code()

    threads = [
        threading.Thread(target=promote, args=(a, 2)),
        threading.Thread(target=promote, args=(b, 3)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    codes = [o for o in outcomes.values() if isinstance(o, grpc.StatusCode)]
    moves = [o for o in outcomes.values() if not isinstance(o, grpc.StatusCode)]
    assert len(moves) == 1 and codes == [grpc.StatusCode.FAILED_PRECONDITION], outcomes
    winner = moves[0].to_version
    with AdapterClient(b.target) as client:
        assert client.get("contested").aliases["production"] == winner
    for replica in replicas:  # both serve the winner, neither the loser
        wait_until_served(replica, "contested", winner)
