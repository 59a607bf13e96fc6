"""Access control over real gRPC, a real registry and key store (SQLite), with a fake engine.

The authorization matrix: every role x every RPC x own / other tenant's adapter, plus calls
with no key, a malformed one and a revoked one. A tenant's key sees other tenants' adapters as
NOT_FOUND with the very message a missing adapter gets, so names don't leak.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3

import grpc
import pytest

from gateway.auth import Access, access_of, bearer_secret
from gateway.client import tls_credentials
from gateway.keys import SECRET_FORMAT, KeyRing, KeyStore
from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc, generation_pb2_grpc, keys_pb2_grpc
from loraplex.v1 import generation_pb2 as gpb
from loraplex.v1 import keys_pb2 as kpb
from tests.support.registry_server import start_registry_server
from tests.support.tls import make_tls

OWN, OTHER = "team-a-chat", "team-b-chat"
ALLOWED = "allowed"
OK_CODES = {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION}
# FAILED_PRECONDITION: the call reached the registry, which refused on its own rules (deleting
# an aliased version); authorization had let it through. So did these domain answers:
REACHED = {
    "UploadAdapter": {grpc.StatusCode.INVALID_ARGUMENT},  # the archive is empty
    "RevokeKey": {grpc.StatusCode.NOT_FOUND},  # no key has that id
}


@pytest.fixture(scope="module")
async def world(tiny_model, tmp_path_factory):
    """A registry with one adapter per tenant (production v1) and keys of every kind."""
    data = tmp_path_factory.mktemp("auth")
    store = KeyStore(f"sqlite:///{data / 'registry.db'}")
    secrets = {}
    for name, role, adapters in [
        ("admin", "admin", []),
        ("admin-a", "admin", ["team-a-*"]),
        ("infer", "infer", []),
        ("infer-a", "infer", ["team-a-*"]),
        ("revoked", "admin", []),
    ]:
        key, secrets[name] = store.create(name, role, "test", adapters)
        if name == "revoked":
            store.revoke(key.id, "test")
    ring = KeyRing(store)
    server = await start_registry_server(tiny_model.base, data, keys=ring)
    admin = (("authorization", f"Bearer {secrets['admin']}"),)
    channel = grpc.aio.insecure_channel(server.target)
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    for name, source in ((OWN, "alpha"), (OTHER, "beta")):  # distinct weights: both listed
        await stub.RegisterAdapter(
            apb.RegisterAdapterRequest(name=name, path=str(tiny_model.adapters[source])),
            metadata=admin,
        )
        await stub.SetAlias(
            apb.SetAliasRequest(
                adapter=name, alias="production", version=1, expected_version=0, force=True,
                reason="fixture",
            ),
            metadata=admin,
        )  # fmt: skip
    yield server, channel, secrets, tiny_model, store
    await channel.close()
    await server.stop()
    store.close()


def _calls(channel, tiny_model):
    """Each RPC as (service access, call(adapter) -> awaitable)."""
    gen = generation_pb2_grpc.GenerationServiceStub(channel)
    reg = adapters_pb2_grpc.AdapterServiceStub(channel)
    keys = keys_pb2_grpc.KeyServiceStub(channel)
    adapter_path = str(tiny_model.adapters["alpha"])

    async def stream(adapter, md):
        call = gen.GenerateStream(
            gpb.GenerateStreamRequest(
                text="Hello", adapter=adapter, stopping=gpb.StoppingCriteria(max_tokens=2)
            ),
            metadata=md,
        )
        return [m async for m in call]

    async def upload(adapter, md):
        async def messages():
            yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=adapter))

        return await reg.UploadAdapter(messages(), metadata=md)

    return {
        "Generate": lambda a, md: gen.Generate(
            gpb.GenerateRequest(text="Hi", adapter=a, stopping=gpb.StoppingCriteria(max_tokens=2)),
            metadata=md,
        ),
        "GenerateStream": stream,
        "Tokenize": lambda a, md: gen.Tokenize(gpb.TokenizeRequest(text="Hi"), metadata=md),
        "GetModelInfo": lambda a, md: gen.GetModelInfo(gpb.GetModelInfoRequest(), metadata=md),
        "RegisterAdapter": lambda a, md: reg.RegisterAdapter(
            apb.RegisterAdapterRequest(name=a, path=adapter_path), metadata=md
        ),
        "UploadAdapter": upload,
        "GetAdapter": lambda a, md: reg.GetAdapter(apb.GetAdapterRequest(name=a), metadata=md),
        "ListAdapters": lambda a, md: reg.ListAdapters(apb.ListAdaptersRequest(), metadata=md),
        "ListVersions": lambda a, md: reg.ListVersions(
            apb.ListVersionsRequest(adapter=a), metadata=md
        ),
        "SetAlias": lambda a, md: reg.SetAlias(
            apb.SetAliasRequest(adapter=a, alias="candidate", version=1), metadata=md
        ),
        "GetAliasHistory": lambda a, md: reg.GetAliasHistory(
            apb.GetAliasHistoryRequest(adapter=a), metadata=md
        ),
        "DeleteVersion": lambda a, md: reg.DeleteVersion(
            apb.DeleteVersionRequest(adapter=a, version=1), metadata=md
        ),
        "RecordEvaluation": lambda a, md: reg.RecordEvaluation(
            apb.RecordEvaluationRequest(adapter=a, version=1, suite="s", verdict=apb.VERDICT_FAIL),
            metadata=md,
        ),
        "ListAuditEvents": lambda a, md: reg.ListAuditEvents(
            apb.ListAuditEventsRequest(adapter=a), metadata=md
        ),
        "CreateKey": lambda a, md: keys.CreateKey(
            kpb.CreateKeyRequest(name="new", role=kpb.ROLE_INFER), metadata=md
        ),
        "ListKeys": lambda a, md: keys.ListKeys(kpb.ListKeysRequest(), metadata=md),
        "RevokeKey": lambda a, md: keys.RevokeKey(
            kpb.RevokeKeyRequest(id="0000000000000000"), metadata=md
        ),
    }


GENERATION = {"Generate", "GenerateStream", "Tokenize", "GetModelInfo"}
KEYS = {"CreateKey", "ListKeys", "RevokeKey"}
NAMES_AN_ADAPTER = {
    "Generate", "GenerateStream", "GetAdapter", "ListVersions", "SetAlias", "GetAliasHistory",
    "DeleteVersion", "RecordEvaluation", "ListAuditEvents",
}  # fmt: skip
CREATES_AN_ADAPTER = {"RegisterAdapter", "UploadAdapter"}


def expected(key: str, rpc: str, tenant: str) -> grpc.StatusCode | str:
    """The matrix: what each key gets from each RPC on its own / the other tenant's adapter."""
    if key in ("none", "garbage", "revoked"):
        return grpc.StatusCode.UNAUTHENTICATED
    is_admin = key.startswith("admin")
    limited = key.endswith("-a")
    if rpc in KEYS:
        return ALLOWED if key == "admin" else grpc.StatusCode.PERMISSION_DENIED
    if rpc not in GENERATION and not is_admin:
        return grpc.StatusCode.PERMISSION_DENIED
    if limited and rpc == "RegisterAdapter":  # reads host paths: unrestricted admins only
        return grpc.StatusCode.PERMISSION_DENIED
    if limited and tenant == "other":
        if rpc in NAMES_AN_ADAPTER:
            return grpc.StatusCode.NOT_FOUND
        if rpc in CREATES_AN_ADAPTER:
            return grpc.StatusCode.PERMISSION_DENIED
    return ALLOWED


# Deleting v1 must come last: the other calls need it (DeleteVersion is refused anyway while
# `production` points at v1, but the order keeps the matrix independent of that rule).
RPCS = [
    "Generate", "GenerateStream", "Tokenize", "GetModelInfo", "RegisterAdapter",
    "UploadAdapter", "GetAdapter", "ListAdapters", "ListVersions", "SetAlias",
    "GetAliasHistory", "RecordEvaluation", "ListAuditEvents", "DeleteVersion",
    "CreateKey", "ListKeys", "RevokeKey",
]  # fmt: skip
KEY_KINDS = ["admin", "admin-a", "infer", "infer-a", "revoked", "garbage", "none"]


@pytest.mark.parametrize("tenant", ["own", "other"])
@pytest.mark.parametrize("key", KEY_KINDS)
async def test_authorization_matrix(world, key, tenant):
    _, channel, secrets, tiny_model, _ = world
    calls = _calls(channel, tiny_model)
    if key == "none":
        md = ()
    elif key == "garbage":
        md = (("authorization", "Bearer lpx_0123456789abcdef_not-a-real-secret-at-all-000000000"),)
    else:
        md = (("authorization", f"Bearer {secrets[key]}"),)
    adapter = OWN if tenant == "own" else OTHER
    outcomes, wanted = {}, {}
    for rpc in RPCS:
        wanted[rpc] = expected(key, rpc, tenant)
        try:
            reply = await calls[rpc](adapter, md)
            outcomes[rpc] = ALLOWED
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            reached = code in OK_CODES or code in REACHED.get(rpc, ())
            outcomes[rpc] = ALLOWED if reached else code
            if code == grpc.StatusCode.NOT_FOUND and rpc in NAMES_AN_ADAPTER:
                # the message a missing adapter gets: nothing says it exists
                assert exc.details() in (f"adapter {adapter!r} not found",), exc.details()
            reply = None
        if rpc == "ListAdapters" and reply is not None and key.endswith("-a"):
            assert [a.name for a in reply.adapters] == [OWN]
        if rpc == "GetModelInfo" and reply is not None:
            names = sorted(a.name for a in reply.adapters)
            assert names == ([OWN] if key.endswith("-a") else [OWN, OTHER])
    # a wrong expectation for a key that could not even authenticate would hide real answers
    assert outcomes == wanted


async def test_paging_never_names_another_tenants_adapter(world):
    _, channel, secrets, _, _ = world
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    md = (("authorization", f"Bearer {secrets['admin-a']}"),)
    seen, token = [], ""
    for _ in range(10):
        page = await stub.ListAdapters(
            apb.ListAdaptersRequest(page_size=1, page_token=token), metadata=md
        )
        seen += [a.name for a in page.adapters] + [page.next_page_token]
        token = page.next_page_token
        if not token:
            break
    assert not any(name.startswith("team-b") for name in seen), seen
    assert OWN in seen


def test_method_access_and_the_bearer_format():
    assert access_of("/grpc.health.v1.Health/Check") is Access.PUBLIC
    assert access_of("/loraplex.v1.Unknown/Call") is Access.KEY_ADMIN
    assert bearer_secret([("authorization", "Basic abc")]) is None
    assert bearer_secret([("authorization", "bearer  xyz ")]) == "xyz"


def test_keys_are_stored_only_as_salted_hashes(tmp_path):
    db = tmp_path / "registry.db"
    store = KeyStore(f"sqlite:///{db}")
    _, secret_a = store.create("a", "infer", "test")
    _, secret_b = store.create("b", "infer", "test")
    store.close()
    raw = db.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("registry.db-*"))
    for secret in (secret_a, secret_b):
        assert secret.encode() not in raw
        assert SECRET_FORMAT.match(secret).group(2).encode() not in raw  # nor its random part
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT salt, secret_hash FROM api_keys").fetchall()
    assert len({salt for salt, _ in rows}) == 2  # a salt per key
    assert all(len(h) == 64 for _, h in rows)


def test_key_ring_checks_secrets_and_sees_revocations(tmp_path):
    store = KeyStore(f"sqlite:///{tmp_path / 'registry.db'}")
    ring = KeyRing(store)
    key, secret = store.create("svc", "infer", "test", ["svc-*"], 10, 1000)
    assert ring.authenticate(secret) == key  # created elsewhere: found by the unknown-id reload
    assert key.allows("svc-chat") and not key.allows("other")
    assert ring.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert ring.authenticate("lpx_short") is None
    revoked = store.revoke(key.id, "test")
    assert revoked.revoked_at is not None and revoked.revoked_at <= dt.datetime.now(dt.UTC)
    assert ring.authenticate(secret) == key  # the copy until the next reload...
    ring.reload()
    assert ring.authenticate(secret) is None  # ...and refused after it
    store.close()


@pytest.mark.parametrize(
    ("name", "role", "adapters", "rpm", "field"),
    [
        ("bad name", "infer", [], None, "name"),
        ("ok", "root", [], None, "role"),
        ("ok", "infer", [""], None, "adapters"),
        ("ok", "infer", [], 0, "requests_per_minute"),
    ],
)
def test_invalid_keys_are_refused_and_nothing_is_stored(tmp_path, name, role, adapters, rpm, field):
    from gateway.errors import InvalidRequest

    store = KeyStore(f"sqlite:///{tmp_path / 'registry.db'}")
    with pytest.raises(InvalidRequest, match=field):
        store.create(name, role, "test", adapters, rpm)
    assert store.list(include_revoked=True) == []
    store.close()


async def test_tls_and_mutual_tls(tiny_model, tmp_path):
    """The server's TLS settings from GatewayConfig; a client without a certificate is refused."""
    from gateway.config import GatewayConfig
    from gateway.server import server_credentials

    tls = make_tls(tmp_path / "tls")
    config = GatewayConfig(
        model=str(tiny_model.base),
        tls_cert_file=tls.server_cert,
        tls_key_file=tls.server_key,
        tls_client_ca_file=tls.ca_cert,
    )
    server = await start_registry_server(
        tiny_model.base, tmp_path / "data", credentials=server_credentials(config)
    )
    target = f"localhost:{server.target.rsplit(':', 1)[1]}"
    request = gpb.TokenizeRequest(text="Hi")
    try:
        with_cert = tls_credentials(tls.ca_cert, tls.client_cert, tls.client_key)
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            reply = await generation_pb2_grpc.GenerationServiceStub(channel).Tokenize(request)
            assert list(reply.token_ids)
        for credentials in (tls_credentials(tls.ca_cert), None):  # no client cert; plaintext
            async with (
                grpc.aio.secure_channel(target, credentials)
                if credentials
                else grpc.aio.insecure_channel(target)
            ) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await generation_pb2_grpc.GenerationServiceStub(channel).Tokenize(
                        request, timeout=5
                    )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()
    shutil.rmtree(tmp_path / "tls")


@pytest.mark.parametrize(
    ("host", "settings", "admin_api"),
    [
        ("127.0.0.1", {}, True),
        ("0.0.0.0", {}, False),
        ("0.0.0.0", {"insecure_admin": True}, True),
        ("0.0.0.0", {"require_api_keys": True}, True),
    ],
)
async def test_admin_api_needs_keys_off_loopback(
    tiny_model, tmp_path, caplog, host, settings, admin_api
):
    """Without keys on a non-loopback address AdapterService is not served, and the log says so."""
    from gateway.config import GatewayConfig
    from gateway.server import Gateway

    config = GatewayConfig(
        model=str(tiny_model.base), host=host, port=0, metrics_port=None,
        data_dir=tmp_path / "data", **settings,
    )  # fmt: skip
    gateway = Gateway(config)
    await gateway.server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = adapters_pb2_grpc.AdapterServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListAdapters(apb.ListAdaptersRequest(), timeout=10)
    finally:
        await gateway.server.stop(0)
        if gateway.keys is not None:
            gateway.keys.store.close()
    if admin_api:  # served: refused for another reason (no key, or no registry yet)
        assert err.value.code() != grpc.StatusCode.UNIMPLEMENTED
    else:
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "admin API OFF" in caplog.text
    if settings.get("insecure_admin"):
        assert "INSECURE" in caplog.text
