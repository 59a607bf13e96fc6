"""AdapterService over real gRPC and a real registry (SQLite or PostgreSQL), fake engine.

Every registration rule is checked through RegisterAdapter / UploadAdapter with an adapter
broken in that one way: the status code, the message, and that the registry and the artifact
store are exactly as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gateway.client import AsyncClient
from gateway.metrics import AdapterLabels, GatewayMetrics
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc
from tests.support.adapters import BROKEN, tar_of
from tests.support.registry_server import (
    ACTOR,
    copy_adapter,
    expect_error,
    register,
    start_registry_server,
    state,
    upload_messages,
)


@pytest.fixture
async def served(tiny_model, tmp_path):
    server = await start_registry_server(tiny_model.base, tmp_path / "data")
    channel = grpc.aio.insecure_channel(server.target)
    yield server, adapters_pb2_grpc.AdapterServiceStub(channel)
    await channel.close()
    await server.stop()


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_each_broken_adapter_is_refused_and_leaves_nothing(
    served, tiny_model, tmp_path, case
):
    server, stub = served
    await register(stub, copy_adapter(tiny_model, tmp_path, "beta"))  # already registered
    before = state(server)
    folder = copy_adapter(tiny_model, tmp_path, "alpha")  # the generators break this one
    breaks, message = BROKEN[case]
    breaks(folder)
    code = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(register(stub, folder), code, message.split("rule:")[0].strip())
    assert state(server) == before


async def test_limits_and_the_engine_load_are_checked_before_anything_is_kept(tiny_model, tmp_path):
    server = await start_registry_server(tiny_model.base, tmp_path / "d", max_rank=8)
    stub = adapters_pb2_grpc.AdapterServiceStub(grpc.aio.insecure_channel(server.target))
    before = state(server)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    beta = copy_adapter(tiny_model, tmp_path, "beta")  # rank 16
    await expect_error(register(stub, beta), invalid, "above the gateway's max_lora_rank 8")
    server.engine.refuse_adapters.add("acme")
    await expect_error(
        register(stub, copy_adapter(tiny_model, tmp_path)), invalid, "engine could not load"
    )
    await expect_error(register(stub, tmp_path / "missing"), invalid, "is not a directory")
    await expect_error(
        register(stub, copy_adapter(tiny_model, tmp_path, "delta"), name="Bad Name"),
        invalid,
        "not a valid adapter name",
    )
    await expect_error(
        register(stub, copy_adapter(tiny_model, tmp_path, "delta"), alias="production"),
        invalid,
        "cannot go to production at registration",
    )
    assert state(server) == before
    await server.stop()
    small = await start_registry_server(tiny_model.base, tmp_path / "e", max_bytes=4096)
    stub = adapters_pb2_grpc.AdapterServiceStub(grpc.aio.insecure_channel(small.target))
    before = state(small)
    await expect_error(
        register(stub, copy_adapter(tiny_model, tmp_path, "epsilon")), invalid, "over the limit"
    )
    assert state(small) == before
    await small.stop()


async def test_upload_registers_an_archive_and_refuses_hostile_ones(served, tiny_model, tmp_path):
    server, stub = served
    folder = copy_adapter(tiny_model, tmp_path)
    archive = tar_of(tmp_path, {p.name: p.read_bytes() for p in folder.iterdir()}).read_bytes()
    header = apb.UploadHeader(
        name="acme", alias="candidate", archive_sha256=hashlib.sha256(archive).hexdigest()
    )
    reply = await stub.UploadAdapter(upload_messages(header, archive), metadata=ACTOR)
    assert (reply.version.version, reply.version.source, list(reply.version.aliases)) == (
        1,
        "upload",
        ["candidate"],
    )
    before = state(server)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    bad_sum = apb.UploadHeader(name="acme", archive_sha256="0" * 64)
    await expect_error(
        stub.UploadAdapter(upload_messages(bad_sum, archive)), invalid, "as declared"
    )
    hostile = tar_of(tmp_path, {"../adapter_config.json": b"{}"}).read_bytes()
    await expect_error(
        stub.UploadAdapter(upload_messages(apb.UploadHeader(name="acme"), hostile)),
        invalid,
        "only plain file names",
    )
    linked = tar_of(tmp_path, {}, symlink="adapter_model.safetensors").read_bytes()
    await expect_error(
        stub.UploadAdapter(upload_messages(apb.UploadHeader(name="acme"), linked)),
        invalid,
        "not a regular file",
    )
    await expect_error(
        stub.UploadAdapter(upload_messages(apb.UploadHeader(name="acme"), b"junk" * 10)),
        invalid,
        "neither a tar nor a zip",
    )
    await expect_error(
        stub.UploadAdapter(iter([apb.UploadAdapterRequest(chunk=b"x")])),
        invalid,
        "first message must carry the upload header",
    )
    assert state(server) == before


async def test_versions_resolve_by_name_alias_and_number(served, tiny_model, tmp_path):
    server, stub = served
    v1 = (await register(stub, copy_adapter(tiny_model, tmp_path, "alpha"))).version
    v2 = (await register(stub, copy_adapter(tiny_model, tmp_path, "beta"))).version
    assert (v1.version, v2.version) == (1, 2) and v1.sha256 != v2.sha256
    assert v1.actor == "tester" and v1.base_rule == "declared-name"
    client = AsyncClient(server.target)
    reply = await client.generate("hi", "acme@v2", max_tokens=2)
    assert (reply.adapter.name, reply.adapter.version) == ("acme", 2)
    await expect_error(
        client.generate("hi", "acme", max_tokens=2), grpc.StatusCode.NOT_FOUND, "'acme'"
    )
    await stub.SetAlias(
        apb.SetAliasRequest(adapter="acme", alias="production", version=1, force=True, reason="go"),
        metadata=ACTOR,
    )
    assert (await client.generate("hi", "acme", max_tokens=2)).adapter.version == 1
    await stub.RecordEvaluation(
        apb.RecordEvaluationRequest(
            adapter="acme", version=2, suite="gate", verdict=apb.VERDICT_PASS
        )
    )
    engine_id_v2 = server.registry.view.version("acme", 2).engine_id
    server.engine.loaded.clear()
    move = await stub.SetAlias(
        apb.SetAliasRequest(adapter="acme", alias="production", version=2, expected_version=1)
    )
    assert engine_id_v2 in server.engine.loaded  # pre-warmed before the move was reported
    assert (move.move.from_version, move.move.to_version) == (1, 2)
    served_by = await client.generate("hi", "acme@production", max_tokens=2)
    assert served_by.adapter.version == 2 and served_by.adapter.engine_id == engine_id_v2
    await expect_error(
        client.generate("hi", "acme@v9", max_tokens=2), grpc.StatusCode.NOT_FOUND, "acme@v9"
    )
    await client.close()


async def test_identical_files_are_stored_once_and_deleted_with_the_last_version(
    served, tiny_model, tmp_path
):
    server, stub = served
    folder = copy_adapter(tiny_model, tmp_path)
    a = (await register(stub, folder)).version
    b = (await register(stub, folder)).version
    assert a.sha256 == b.sha256 and len(list(server.registry.artifacts.objects.iterdir())) == 1
    server.pipeline.in_flight[("acme", 2)] += 1  # a request running on v2
    await expect_error(
        stub.DeleteVersion(apb.DeleteVersionRequest(adapter="acme", version=2)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "1 requests in flight",
    )
    del server.pipeline.in_flight[("acme", 2)]
    first = await stub.DeleteVersion(apb.DeleteVersionRequest(adapter="acme", version=2))
    assert not first.artifact_removed
    last = await stub.DeleteVersion(apb.DeleteVersionRequest(adapter="acme", version=1))
    assert last.artifact_removed and list(server.registry.artifacts.objects.iterdir()) == []
    await expect_error(
        stub.GetAdapter(apb.GetAdapterRequest(name="nope")), grpc.StatusCode.NOT_FOUND, "nope"
    )


async def test_two_names_on_one_artifact_are_both_servable(served, tiny_model, tmp_path):
    """One weights file under two names (one engine id): GetModelInfo lists both."""
    server, stub = served
    folder = copy_adapter(tiny_model, tmp_path)
    for name in ("acme", "copy"):
        await register(stub, folder, name=name)
        await stub.SetAlias(apb.SetAliasRequest(adapter=name, alias="production", version=1,
                                                force=True, reason="test"))  # fmt: skip
    await server.registry.view.refresh(force=True)
    servable = server.registry.view.servable()
    assert sorted(a.name for a in servable) == ["acme", "copy"]
    assert len({a.engine_id for a in servable}) == 1


async def test_list_adapters_pages_and_reports_residency(served, tiny_model, tmp_path):
    server, stub = served
    for name in ["alpha", "beta", "gamma"]:
        await register(stub, copy_adapter(tiny_model, tmp_path, name), name=f"team-{name}")
    server.engine.loaded.clear()
    await server.engine.add_adapter(server.registry.view.version("team-beta", 1))
    page = await stub.ListAdapters(apb.ListAdaptersRequest(page_size=2))
    assert [a.name for a in page.adapters] == ["team-alpha", "team-beta"]
    rest = await stub.ListAdapters(apb.ListAdaptersRequest(page_token=page.next_page_token))
    assert [a.name for a in rest.adapters] == ["team-gamma"] and not rest.next_page_token
    residency = {a.name: a.versions[0].residency for a in [*page.adapters, *rest.adapters]}
    assert residency == {
        "team-alpha": apb.RESIDENCY_DISK,
        "team-beta": apb.RESIDENCY_LOADED,
        "team-gamma": apb.RESIDENCY_DISK,
    }


async def test_twenty_concurrent_set_alias_calls_one_wins(served, tiny_model, tmp_path):
    _, stub = served
    await register(stub, copy_adapter(tiny_model, tmp_path, "alpha"), alias="candidate")
    await register(stub, copy_adapter(tiny_model, tmp_path, "beta"))
    calls = [
        stub.SetAlias(
            apb.SetAliasRequest(adapter="acme", alias="candidate", version=2, expected_version=1),
            metadata=(("loraplex-actor", f"w{i}"),),
        )
        for i in range(20)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    wins = [r for r in results if isinstance(r, apb.SetAliasResponse)]
    losses = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(wins) == 1 and len(losses) == 19
    assert {e.code() for e in losses} == {grpc.StatusCode.FAILED_PRECONDITION}
    history = await stub.GetAliasHistory(apb.GetAliasHistoryRequest(adapter="acme"))
    assert [(m.from_version, m.to_version, m.actor) for m in history.moves] == [
        (1, 2, wins[0].move.actor),
        (0, 1, "tester"),
    ]


async def test_a_replica_sees_a_promotion_within_two_seconds(tiny_model, tmp_path, postgres):
    """Two gateways sharing one PostgreSQL registry and one data dir."""
    url = postgres.create_database("replicas")
    a = await start_registry_server(tiny_model.base, tmp_path / "shared", url)
    b = await start_registry_server(tiny_model.base, tmp_path / "shared", url)
    stop = asyncio.Event()
    b.registry.view.prewarm = b.engine.add_adapter
    follower = asyncio.create_task(b.registry.view.follow(0.5, stop))
    stub = adapters_pb2_grpc.AdapterServiceStub(grpc.aio.insecure_channel(a.target))
    await register(stub, copy_adapter(tiny_model, tmp_path, "alpha"))
    await register(stub, copy_adapter(tiny_model, tmp_path, "beta"))
    await stub.SetAlias(
        apb.SetAliasRequest(adapter="acme", alias="production", version=1, force=True, reason="x")
    )
    client_b = AsyncClient(b.target)
    for _ in range(40):
        if b.registry.view.generation == a.registry.view.generation:
            break
        await asyncio.sleep(0.1)
    assert (await client_b.generate("hi", "acme", max_tokens=1)).adapter.version == 1
    moved = time.monotonic()
    await stub.SetAlias(
        apb.SetAliasRequest(adapter="acme", alias="production", version=2, force=True, reason="y")
    )
    while (await client_b.generate("hi", "acme", max_tokens=1)).adapter.version != 2:
        assert time.monotonic() - moved < 2.0, "replica b did not see the promotion in 2 s"
        await asyncio.sleep(0.05)
    assert b.registry.view.version("acme", 2).engine_id in b.engine.loaded  # pre-warmed on b
    stop.set()
    await follower
    await client_b.close()
    await a.stop()
    await b.stop()


async def test_directory_mode_gateway_refuses_registry_calls(tmp_path):
    from gateway.adapter_service import AdapterServicer

    server = grpc.aio.server()
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
        AdapterServicer(lambda: None, lambda: None), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stub = adapters_pb2_grpc.AdapterServiceStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
    await expect_error(
        stub.ListAdapters(apb.ListAdaptersRequest()),
        grpc.StatusCode.FAILED_PRECONDITION,
        "directory of adapters",
    )
    await server.stop(0)


async def test_a_caller_cancelled_mid_commit_leaves_a_complete_version(
    served, tiny_model, tmp_path, monkeypatch
):
    """The commit outlives its caller: no version without files, no files without a version."""
    from gateway.registry.service import Registration

    server, _ = served
    store = server.registry.store
    original = store.add_version

    def slow_add_version(*args, **kwargs):
        time.sleep(0.5)  # a commit waiting on a lock, say
        return original(*args, **kwargs)

    monkeypatch.setattr(store, "add_version", slow_add_version)
    call = asyncio.create_task(
        server.registry.register(
            copy_adapter(tiny_model, tmp_path), Registration("acme"), "t", server.engine.add_adapter
        )
    )
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(50):
        if store.snapshot().versions:
            break
        await asyncio.sleep(0.05)
    [(name, number, sha, *_)] = store.snapshot().versions
    assert (name, number) == ("acme", 1)
    assert server.registry.artifacts.path(sha).is_dir()


async def test_record_evaluation_keeps_pass_fail_and_error_and_counts_them(tiny_model, tmp_path):
    collected = CollectorRegistry()
    metrics = GatewayMetrics(AdapterLabels(lambda _: True, cap=10), collected)
    server = await start_registry_server(tiny_model.base, tmp_path / "data", metrics=metrics)
    channel = grpc.aio.insecure_channel(server.target)
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    try:
        await register(stub, copy_adapter(tiny_model, tmp_path))
        verdicts = [apb.VERDICT_PASS, apb.VERDICT_FAIL, apb.VERDICT_ERROR]
        for verdict in verdicts:
            request = apb.RecordEvaluationRequest(
                adapter="acme", version=1, suite="gate", verdict=verdict
            )
            assert (await stub.RecordEvaluation(request)).evaluation.verdict == verdict
        adapter = (await stub.GetAdapter(apb.GetAdapterRequest(name="acme"))).adapter
        assert [e.verdict for e in adapter.versions[0].evaluations] == verdicts
        for label in ("pass", "fail", "error"):
            sample = {"adapter": "acme", "verdict": label}
            assert collected.get_sample_value("loraplex_gate_verdicts_total", sample) == 1
        await expect_error(  # production's rule reads the latest: an error blocks it
            stub.SetAlias(apb.SetAliasRequest(adapter="acme", alias="production", version=1)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "its latest evaluation ended in error",
        )
        before = state(server)
        for unknown in (apb.VERDICT_UNSPECIFIED, 7):  # unset, or newer than this gateway
            request = apb.RecordEvaluationRequest(
                adapter="acme", version=1, suite="gate", verdict=unknown
            )
            await expect_error(
                stub.RecordEvaluation(request),
                grpc.StatusCode.INVALID_ARGUMENT,
                "say VERDICT_PASS, VERDICT_FAIL or VERDICT_ERROR",
            )
        assert state(server) == before
    finally:
        await channel.close()
        await server.stop()
