"""`loraplex adapters ...` end to end: the CLI against an in-process registry gateway.

The grpc.aio server runs in the test's event loop, so the (blocking) CLI runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
import tarfile

import grpc
import pytest
from click.testing import Result
from typer.testing import CliRunner

from gateway.cli import app
from gateway.client import AdapterClient, default_actor
from gateway.process import free_port
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc
from tests.support.registry_server import start_registry_server

runner = CliRunner()


@pytest.fixture(scope="module")
async def server(tiny_model, tmp_path_factory):
    running = await start_registry_server(tiny_model.base, tmp_path_factory.mktemp("registry"))
    yield running
    await running.stop()


async def run(server, *args: str, target: str = "") -> Result:
    """`loraplex adapters ARGS --target <server>`, in a thread; wide terminal for tables."""
    command = ["adapters", *args, "--target", target or server.target]
    return await asyncio.to_thread(runner.invoke, app, command, env={"COLUMNS": "240"})


async def ok(server, *args: str) -> str:
    result = await run(server, *args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


async def as_json(server, *args: str) -> dict | list:
    return json.loads(await ok(server, *args, "--json"))


async def refused(server, code: int, *args: str) -> str:
    result = await run(server, *args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ")
    return result.stderr


async def test_register_promote_rollback_delete(server, tiny_model):
    alpha, beta, gamma = (str(tiny_model.adapters[n]) for n in ("alpha", "beta", "gamma"))
    out = await ok(
        server, "register", "acme", alpha, "--description", "support bot", "--owner", "t"
    )
    assert out.startswith("registered acme@v1 (rank 8")
    out = await ok(
        server, "register", "acme", beta, "--alias", "candidate", "--metadata", '{"r": 7}'
    )
    assert out.startswith("registered acme@v2 as candidate")

    table = await ok(server, "list")
    assert "acme" in table and "candidate=v2" in table and "2 loaded" in table
    [listed] = [a for a in await as_json(server, "list") if a["name"] == "acme"]
    assert listed["owner"] == "t" and listed["aliases"] == {"candidate": 2}
    assert [v["version"] for v in listed["versions"]] == [1, 2]

    shown = await as_json(server, "show", "acme")
    assert shown["description"] == "support bot" and shown["versions"][1]["metadata"]["r"] == 7
    table = await ok(server, "show", "acme")
    assert "aliases: candidate=v2" in table
    for v in shown["versions"]:
        assert f"v{v['version']}" in table and v["sha256"][:12] in table

    # production needs a passing evaluation, or a forced move with a reason
    err = await refused(server, 4, "promote", "acme", "1", "--reason", "first")
    assert "FAILED_PRECONDITION" in err and "has no evaluation" in err
    err = await refused(server, 2, "promote", "acme", "1", "--force")
    assert "INVALID_ARGUMENT" in err and "reason" in err
    out = await ok(
        server, "promote", "acme", "v1", "--force", "--reason", "bootstrap", "--actor", "alice@ci"
    )
    assert out.strip() == "acme@production: (new) -> v1 (by alice@ci, forced)"

    out = await ok(
        server,
        "evaluate",
        "acme",
        "2",
        "--suite",
        "gate:smoke",
        "--verdict",
        "pass",
        "--report",
        '{"s": 1}',
    )
    assert out.startswith("recorded gate:smoke=pass for acme@v2")
    err = await refused(server, 2, "evaluate", "acme", "2", "--suite", "x", "--verdict", "maybe")
    assert "--verdict must be one of pass, fail, error" in err
    out = await ok(server, "promote", "acme", "2", "--reason", "passed the gate")
    assert out.startswith("acme@production: v1 -> v2 (by ")
    shown = await as_json(server, "show", "acme")
    assert shown["aliases"] == {"candidate": 2, "production": 2}
    assert shown["versions"][1]["evaluations"][0]["verdict"] == "VERDICT_PASS"
    assert "gate:smoke=pass" in await ok(server, "show", "acme")

    # --expect is compare-and-swap against what the caller saw
    err = await refused(server, 4, "promote", "acme", "1", "--expect", "1")
    assert "holds v2, not v1 as expected" in err

    err = await refused(server, 4, "rollback", "acme")  # v1 never passed an evaluation
    assert "acme@v1 cannot go to production" in err
    out = await ok(server, "rollback", "acme", "--force")
    assert out.startswith("acme@production: v2 -> v1")
    assert (await as_json(server, "show", "acme"))["aliases"]["production"] == 1

    moves = await as_json(server, "history", "acme", "--alias", "production")
    assert [(m["from_version"], m["to_version"]) for m in moves] == [(2, 1), (1, 2), (0, 1)]
    assert [m["forced"] for m in moves] == [True, False, True]
    assert moves[2]["actor"] == "alice@ci" and moves[0]["actor"] == default_actor()
    assert moves[0]["reason"] == "rollback from v2"
    table = await ok(server, "history", "acme")
    assert "alice@ci" in table and "bootstrap" in table and "candidate" in table

    err = await refused(server, 4, "delete", "acme", "1")
    assert "production points to" in err
    out = await ok(server, "register", "acme", gamma)
    assert out.startswith("registered acme@v3")
    out = await ok(server, "delete", "acme", "3", "--reason", "unused")
    assert out.strip() == "deleted acme@v3 (artifact removed)"
    assert [v["version"] for v in await as_json(server, "versions", "acme")] == [1, 2]
    assert "v3" not in await ok(server, "versions", "acme")
    events = await as_json(server, "audit", "acme")
    assert events[0]["action"] == "delete_version" and events[0]["details"]["reason"] == "unused"


async def test_upload_a_folder_and_an_archive(server, tiny_model, tmp_path):
    folder = tiny_model.adapters["delta"]
    version = await as_json(server, "upload", "uploaded", str(folder), "--alias", "candidate")
    assert version["version"] == 1 and version["source"] == "upload"
    assert version["aliases"] == ["candidate"]
    archive = tmp_path / "delta.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    out = await ok(server, "upload", "uploaded", str(archive))
    assert out.startswith("registered uploaded@v2")
    first, second = await as_json(server, "versions", "uploaded")
    assert first["sha256"] == second["sha256"]  # same files, one artifact
    out = await ok(server, "delete", "uploaded", "2")
    assert "artifact kept" in out
    err = await refused(server, 2, "upload", "uploaded", str(tmp_path / "missing"))
    assert "does not exist" in err


async def test_rollback_needs_an_earlier_version(server, tiny_model):
    await ok(server, "register", "solo", str(tiny_model.adapters["alpha"]))
    err = await refused(server, 1, "rollback", "solo")
    assert "nothing to roll back" in err
    await ok(server, "promote", "solo", "1", "--force", "--reason", "first")
    err = await refused(server, 1, "rollback", "solo")
    assert "solo@production held no version before" in err


async def test_error_exit_codes(server, tiny_model):
    err = await refused(server, 3, "show", "nope")
    assert err.startswith("error: NOT_FOUND: adapter 'nope' not found")
    await refused(server, 3, "delete", "nope", "1")
    await refused(server, 2, "register", "Bad Name", str(tiny_model.adapters["alpha"]))
    await refused(server, 2, "register", "x", "/p", "--metadata", "[1]")
    result = await run(server, "show", "nope", "v0")
    assert result.exit_code == 2  # usage error from the CLI itself
    result = await run(server, "list", target=f"127.0.0.1:{free_port()}")
    assert result.exit_code == 5
    assert result.stderr.startswith("error: UNAVAILABLE: cannot reach the gateway at 127.0.0.1:")


async def test_client_pages_through_adapters_and_records_its_actor(server, tiny_model):
    def work() -> tuple[list[str], list[str], str]:
        with AdapterClient(server.target, actor="bob@laptop") as client:
            client.register("paged-a", tiny_model.adapters["alpha"])
            client.register("paged-b", tiny_model.adapters["beta"])
            small = [a.name for a in client.list(page_size=1)]
            large = [a.name for a in client.list(page_size=1000)]
            return small, large, client.audit("paged-b", limit=1)[0].actor

    small, large, actor = await asyncio.to_thread(work)
    assert small == large == sorted(large) and {"paged-a", "paged-b"} <= set(small)
    assert actor == "bob@laptop"


async def test_show_names_every_verdict(server, tiny_model):
    await ok(server, "register", "judged", str(tiny_model.adapters["alpha"]))
    verdicts = {"a": apb.VERDICT_PASS, "b": apb.VERDICT_FAIL, "c": apb.VERDICT_ERROR}
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        for suite, verdict in verdicts.items():
            await stub.RecordEvaluation(
                apb.RecordEvaluationRequest(
                    adapter="judged", version=1, suite=suite, verdict=verdict
                )
            )
    assert "a=pass, b=fail, c=error" in await ok(server, "show", "judged")
