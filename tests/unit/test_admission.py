"""Admission: the pending bound and per-key rate limits, alone and through real gRPC."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from gateway.admission import Admission, TokenBucket
from gateway.domain import EngineRequest, Sampling, Stopping
from gateway.errors import RETRY_AFTER_METADATA, Overloaded
from gateway.keys import ApiKey, KeyRing, KeyStore, Role
from loraplex.v1 import generation_pb2 as gpb
from loraplex.v1 import generation_pb2_grpc
from tests.support.registry_server import start_registry_server


def _request(prompt: int = 10, max_tokens: int = 20) -> EngineRequest:
    return EngineRequest(
        "r", tuple(range(prompt)), Sampling(), Stopping(), max_tokens, None, None, None
    )


def _enter(admission: Admission, key: ApiKey | None, request: EngineRequest) -> None:
    with admission.admit(key, request):
        pass


def _key(rpm: int | None = None, tpm: int | None = None) -> ApiKey:
    return ApiKey("k1", "k", Role.INFER, (), rpm, tpm, "t", dt.datetime.now(dt.UTC))


def test_token_bucket_refills_per_minute():
    bucket = TokenBucket(60.0)
    bucket.take(60)
    assert bucket.wait_for(1, bucket.updated) == pytest.approx(1.0)
    assert bucket.wait_for(30, bucket.updated + 30) == 0.0  # 30 s later: 30 units back


def test_pending_bound_refuses_at_once_and_frees_on_exit():
    admission = Admission(max_pending=2)
    with admission.admit(None, _request()), admission.admit(None, _request()):
        with pytest.raises(Overloaded) as refused:
            _enter(admission, None, _request())
        assert refused.value.retry_after_s and refused.value.retry_after_s > 0
        assert admission.pending == 2
    assert admission.pending == 0
    with admission.admit(None, _request()):
        assert admission.pending == 1


def test_requests_per_minute_with_retry_hint():
    admission = Admission(max_pending=100)
    key = _key(rpm=2)
    for _ in range(2):
        with admission.admit(key, _request()):
            pass
    with pytest.raises(Overloaded, match="requests per minute") as refused:
        _enter(admission, key, _request())
    assert 0 < refused.value.retry_after_s <= 30.0  # one request comes back in 30 s
    other = ApiKey("k2", "k", Role.INFER, (), 2, None, "t", dt.datetime.now(dt.UTC))
    with admission.admit(other, _request()):
        pass


def test_tokens_are_charged_up_front_and_unused_ones_refunded():
    admission = Admission(max_pending=100)
    key = _key(tpm=100)
    with admission.admit(key, _request(prompt=10, max_tokens=80)) as used:
        with pytest.raises(Overloaded, match="tokens per minute"):  # 90 of 100 are reserved
            _enter(admission, key, _request(prompt=10, max_tokens=10))
        used(5)  # generated 5 of 80: 75 come back at the end
    with admission.admit(key, _request(prompt=10, max_tokens=60)):
        pass
    with pytest.raises(Overloaded, match="more than the key's 100 tokens") as never:
        _enter(admission, key, _request(prompt=50, max_tokens=60))
    assert never.value.retry_after_s is None  # waiting would not help: no hint


def test_gateway_default_limits_apply_to_keys_without_their_own():
    admission = Admission(max_pending=100, default_requests_per_minute=1)
    with admission.admit(_key(), _request()):
        pass
    with pytest.raises(Overloaded):
        _enter(admission, _key(), _request())
    with admission.admit(None, _request()):  # no keys (auth off): no per-key limits
        pass


async def test_rate_limited_call_gets_resource_exhausted_with_retry_after(tiny_model, tmp_path):
    store = KeyStore(f"sqlite:///{tmp_path / 'registry.db'}")
    _, secret = store.create("slow", "infer", "test", requests_per_minute=1)
    server = await start_registry_server(
        tiny_model.base, tmp_path, keys=KeyRing(store), admission=Admission(max_pending=8)
    )
    md = (("authorization", f"Bearer {secret}"),)
    request = gpb.GenerateRequest(text="Hi", stopping=gpb.StoppingCriteria(max_tokens=2))
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            await stub.Generate(request, metadata=md)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(request, metadata=md)
    finally:
        await server.stop()
        store.close()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(refused.value.trailing_metadata())
    assert 30 < float(trailers[RETRY_AFTER_METADATA]) <= 60
