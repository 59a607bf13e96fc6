"""Reliability and security against a real gateway: mutual TLS, API keys, 24 adapters.

One gateway for the module (registry mode, keys required, mutual TLS, a small admission bound):
tenants and key management, rate limits, a load test, a cancellation storm, fuzzing of every
request field, adapter files vanishing or changing under it, and at the very end the engine
process killed under it. Each test checks that nothing leaked: the engine has no requests left,
the gateway's in-flight gauge is back to zero and its memory near its baseline.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from gateway.client import AdapterClient, AsyncClient, Client, tls_credentials
from gateway.errors import RETRY_AFTER_METADATA
from gateway.process import kill
from loraplex.v1 import generation_pb2 as pb
from tests.support.gateway import RunningGateway, launch_gateway
from tests.support.tls import Tls, make_tls

pytestmark = pytest.mark.integration

N_ADAPTERS = 24
MAX_PENDING = 96
TEAMS = ("team-a", "team-b")


@dataclass
class Secure:
    """The module's gateway and what it takes to talk to it."""

    gateway: RunningGateway
    tls: Tls
    credentials: grpc.ChannelCredentials
    keys: dict[str, str]  # name -> secret
    adapters: list[str]
    data_dir: Path

    def client(self, key: str | None = "admin") -> AsyncClient:
        secret = self.keys[key] if key else None
        return AsyncClient(self.gateway.target, self.credentials, api_key=secret)

    def env(self, key: str = "admin") -> dict[str, str]:
        """Environment for `loraplex` commands: TLS files and an API key."""
        return {
            **os.environ,
            "LORAPLEX_API_KEY": self.keys[key],
            "LORAPLEX_TLS_CA_FILE": str(self.tls.ca_cert),
            "LORAPLEX_TLS_CERT_FILE": str(self.tls.client_cert),
            "LORAPLEX_TLS_KEY_FILE": str(self.tls.client_key),
        }


def _distinct_adapters(tiny_model, out: Path) -> dict[str, Path]:
    """24 adapters with distinct weights (scaled copies of the tiny ones), 12 per team."""
    sources = sorted(tiny_model.adapters.values())
    made = {}
    for i in range(N_ADAPTERS):
        name = f"{TEAMS[i % 2]}-{i:02d}"
        folder = out / name
        shutil.copytree(sources[i % len(sources)], folder)
        weights = folder / "adapter_model.safetensors"
        tensors = load_file(weights)
        scale = 1.0 + 0.05 * (i + 1)
        save_file({k: v * scale if "lora_B" in k else v for k, v in tensors.items()}, weights)
        made[name] = folder
    return made


def _cli_key(data_dir: Path, name: str, *options: str) -> str:
    """`loraplex keys create` on the registry database (the bootstrap path); its secret."""
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", "create", name, *options,
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def secure(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("secure")
    tls = make_tls(work / "tls")
    data_dir = work / "data"
    keys = {
        "admin": _cli_key(data_dir, "ops", "--role", "admin"),
        "team-a": _cli_key(data_dir, "team-a", "--role", "infer", "--adapter", "team-a-*"),
        "slow": _cli_key(data_dir, "slow", "--role", "infer", "--requests-per-minute", "3"),
    }
    config = work / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "require_api_keys": True,
                "tls_cert_file": str(tls.server_cert),
                "tls_key_file": str(tls.server_key),
                "tls_client_ca_file": str(tls.ca_cert),
                "max_pending_requests": MAX_PENDING,
                "max_loras": 4,
                "max_cpu_loras": 8,
                "registry_poll_interval_s": 0.5,
            }
        )
    )
    credentials = tls_credentials(tls.ca_cert, tls.client_cert, tls.client_key)
    gateway = launch_gateway(
        tiny_model, work / "gateway.log", "--config", str(config),
        data_dir=data_dir, credentials=credentials,
    )  # fmt: skip
    adapters = _distinct_adapters(tiny_model, work / "adapters")
    try:
        with AdapterClient(
            gateway.target, "tests", credentials=credentials, api_key=keys["admin"]
        ) as registry:
            for name, path in adapters.items():
                registry.register(name, str(path))
                registry.set_alias(name, "production", 1, expected=0, force=True, reason="test")
    except BaseException:
        kill(gateway.process)
        raise
    yield Secure(gateway, tls, credentials, keys, sorted(adapters), data_dir)
    if gateway.process.poll() is None:
        kill(gateway.process)


# ---------------------------------------------------------------- helpers


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def _metric_sum(secure: Secure, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{secure.gateway.metrics_port}/metrics"
    total = 0.0
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _settled(secure: Secure, timeout: float = 20.0) -> tuple[int, float]:
    """(engine's unfinished requests, gateway's in-flight gauge), once both are 0 or at timeout."""
    deadline = time.monotonic() + timeout
    async with secure.client() as client:
        while True:
            unfinished = (await client.model_info()).unfinished_requests
            in_flight = await asyncio.to_thread(_metric_sum, secure, "loraplex_requests_in_flight")
            if (unfinished == 0 and in_flight == 0) or time.monotonic() > deadline:
                return unfinished, in_flight
            await asyncio.sleep(0.2)


def _stream_request(adapter: str, max_tokens: int, i: int) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        text=f"Request {i}: the", adapter=adapter,
        sampling=pb.SamplingParams(temperature=0.8, seed=i),
        stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )  # fmt: skip


# ---------------------------------------------------------------- access


async def test_tls_keys_and_tenants_on_the_real_gateway(secure):
    target = secure.gateway.target
    async with grpc.aio.insecure_channel(target) as plaintext:  # TLS only
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(plaintext).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(target, secure.credentials) as channel:
        status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING  # no key needed
    async with secure.client(key=None) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await anonymous.generate("Hi", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with secure.client("team-a") as tenant:
        info = await tenant.model_info()
        assert sorted(a.name for a in info.adapters) == [
            n for n in secure.adapters if n.startswith("team-a-")
        ]
        served = await tenant.generate("Hi", "team-a-00", max_tokens=3, ignore_eos=True)
        assert served.adapter.name == "team-a-00" and len(served.token_ids) == 3
        for reference in ("team-b-01", "team-b-01@production", "team-b-99"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await tenant.generate("Hi", reference, max_tokens=2)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == f"adapter {reference!r} not found"
    with AdapterClient(target, credentials=secure.credentials, api_key=secure.keys["team-a"]) as a:
        with pytest.raises(grpc.RpcError) as err:
            a.get("team-a-00")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # infer keys: no registry


def _loraplex(secure: Secure, *args: str, key: str = "admin") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True, text=True, env=secure.env(key), timeout=60,
    )  # fmt: skip


async def test_keys_created_and_revoked_through_the_gateway(secure):
    target = secure.gateway.target
    made = await asyncio.to_thread(
        _loraplex, secure, "keys", "create", "ci-bot", "--role", "infer", "--target", target
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    key_id = made.stdout.split()[1]
    async with AsyncClient(target, secure.credentials, api_key=secret) as bot:
        assert (await bot.generate("Hi", max_tokens=2)).token_ids
        listed = await asyncio.to_thread(
            _loraplex, secure, "keys", "list", "--json", "--target", target
        )
        assert key_id in listed.stdout and secret not in listed.stdout
        denied = await asyncio.to_thread(
            _loraplex, secure, "keys", "list", "--target", target, key="team-a"
        )
        assert denied.returncode == 6 and "PERMISSION_DENIED" in denied.stderr
        revoked = await asyncio.to_thread(
            _loraplex, secure, "keys", "revoke", key_id, "--target", target
        )
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(grpc.aio.AioRpcError) as err:  # this gateway: at once
            await bot.generate("Hi", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_rate_limit_answers_resource_exhausted_with_retry_after(secure):
    async with secure.client("slow") as slow:
        for _ in range(3):
            await slow.generate("Hi", max_tokens=2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await slow.generate("Hi", max_tokens=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit" in err.value.details()
    retry_after = float(dict(err.value.trailing_metadata())[RETRY_AFTER_METADATA])
    assert 0 < retry_after <= 20  # 3 per minute: one comes back every 20 s
    async with secure.client("team-a") as other:  # other keys are not affected
        assert (await other.generate("Hi", "team-a-02", max_tokens=2)).token_ids


async def test_oversized_message_is_refused_before_it_is_read(secure):
    async with secure.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.generate("x" * (4 << 20), max_tokens=2)  # max_request_bytes: 4 MiB
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await client.generate("Hi", max_tokens=2)).token_ids  # and all is well


# ---------------------------------------------------------------- load


async def _load(
    secure: Secure, concurrency: int, seconds: float, seed: int, finished: int | None = None
) -> dict[str, int]:
    """`concurrency` streams kept open for `seconds` over every adapter and the base model, or
    until `finished` streams have finished (so a slow machine takes longer, not fails).

    Returns outcome counts; anything but tokens + a finish reason, or RESOURCE_EXHAUSTED from
    admission, fails the test.
    """
    rng = random.Random(seed)
    outcomes = {"finished": 0, "resource_exhausted": 0}
    stop_at = time.monotonic() + seconds

    def going_on() -> bool:
        return time.monotonic() < stop_at and (finished is None or outcomes["finished"] < finished)

    counter = iter(range(10**9))
    async with secure.client() as client:

        async def worker() -> None:
            while going_on():
                i = next(counter)
                adapter = rng.choice([*secure.adapters, ""])
                call = client.stub.GenerateStream(
                    _stream_request(adapter, rng.randint(4, 48), i), metadata=client.metadata
                )
                tokens, finish = 0, pb.FINISH_REASON_UNSPECIFIED
                try:
                    async for delta in call:
                        tokens += len(delta.token_ids)
                        finish = delta.finish_reason or finish
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), exc)
                    assert RETRY_AFTER_METADATA in dict(exc.trailing_metadata())
                    outcomes["resource_exhausted"] += 1
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
                    continue
                assert tokens > 0 and finish == pb.FINISH_REASON_LENGTH, (tokens, finish)
                outcomes["finished"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def test_load_hundreds_of_streams_over_24_adapters(secure):
    pid = secure.gateway.process.pid
    await _load(secure, 300, 6, seed=1)  # warm-up: caches, compiled shapes, allocator pools
    assert await _settled(secure) == (0, 0)
    baseline = _rss_mib(pid)
    # 300 finished streams whatever the machine's speed (about 25 s here); the cap only stops
    # a gateway that stopped finishing anything.
    outcomes = await _load(secure, 300, 300, seed=2, finished=300)
    after = await _settled(secure)
    rss = _rss_mib(pid)
    print(f"load: {outcomes}, RSS {baseline:.0f} -> {rss:.0f} MiB")
    assert after == (0, 0), "requests left in the engine or the gateway after the load"
    assert outcomes["finished"] >= 300  # every adapter served, many times over
    assert outcomes["resource_exhausted"] > 0  # 300 streams > the bound of 96: refused at once
    assert rss < baseline * 1.10 + 64, f"gateway RSS grew {baseline:.0f} -> {rss:.0f} MiB"


async def test_cancellation_storm_leaks_nothing(secure):
    pid = secure.gateway.process.pid
    rng = random.Random(3)
    baseline = _rss_mib(pid)
    cancelled = finished = refused = 0
    async with secure.client() as client:

        async def one(i: int) -> None:
            nonlocal cancelled, finished, refused
            adapter = secure.adapters[i % N_ADAPTERS]
            call = client.stub.GenerateStream(
                _stream_request(adapter, 64, i), metadata=client.metadata
            )
            cancel_after = rng.randint(0, 20) if i % 2 == 0 else None
            await asyncio.sleep(rng.uniform(0, 0.5))
            seen = 0
            try:
                if cancel_after == 0:  # before the first token: still queued or just admitted
                    await asyncio.sleep(rng.uniform(0, 0.2))
                    call.cancel()
                    cancelled += 1
                    return
                async for delta in call:
                    seen += len(delta.token_ids)
                    if cancel_after is not None and seen >= cancel_after:
                        call.cancel()
                        cancelled += 1
                        return
                finished += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                refused += 1

        for wave in range(3):
            await asyncio.gather(*(one(wave * 100 + i) for i in range(100)))
    after = await _settled(secure)
    rss = _rss_mib(pid)
    print(f"storm: cancelled {cancelled}, finished {finished}, refused {refused}; "
          f"RSS {baseline:.0f} -> {rss:.0f} MiB")  # fmt: skip
    assert after == (0, 0), "cancelled requests left in the engine or the gateway"
    assert cancelled >= 100 and finished >= 50
    assert rss < baseline * 1.10 + 64


# ---------------------------------------------------------------- hostile input

_text = st.text(max_size=40)
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_int32 = st.integers(-(2**31), 2**31 - 1)


def _fields(hostile: bool) -> dict[str, st.SearchStrategy]:
    """Field strategies: anything the wire allows (hostile), or values a client would send."""
    if hostile:
        return {
            "float": st.none() | _floats, "top_k": st.none() | _int32,
            "seed": st.none() | st.integers(-(2**63), 2**63 - 1),
            "max_tokens": st.none() | st.integers(-5, 40) | _int32,
            "min_tokens": st.integers(-5, 40) | _int32,
            "stop": st.lists(st.text(max_size=300), max_size=20),
            "token_id": st.integers(-5, 1100) | _int32,
            "logprobs": st.none() | st.integers(-3, 30) | _int32,
        }  # fmt: skip
    return {
        "float": st.none() | st.floats(0.01, 1.0), "top_k": st.none() | st.integers(-1, 50),
        "seed": st.none() | st.integers(0, 2**31), "max_tokens": st.none() | st.integers(1, 40),
        "min_tokens": st.integers(0, 2), "stop": st.lists(st.text(min_size=1, max_size=8),
                                                          max_size=3),
        "token_id": st.integers(0, 1023), "logprobs": st.none() | st.integers(0, 5),
    }  # fmt: skip


def _requests(adapters: list[str], hostile: bool) -> st.SearchStrategy[pb.GenerateRequest]:
    f = _fields(hostile)
    sampling = st.builds(
        pb.SamplingParams,
        temperature=f["float"], top_p=f["float"], top_k=f["top_k"], min_p=f["float"],
        seed=f["seed"], repetition_penalty=f["float"].map(lambda v: v if hostile or v is None
                                                          else v + 0.5),
        presence_penalty=f["float"], frequency_penalty=f["float"],
    )  # fmt: skip
    stopping = st.builds(
        pb.StoppingCriteria,
        max_tokens=f["max_tokens"], min_tokens=f["min_tokens"], stop=f["stop"],
        stop_token_ids=st.lists(f["token_id"], max_size=70 if hostile else 3),
        ignore_eos=st.booleans(),
    )  # fmt: skip
    adapter = st.sampled_from([*adapters, "", "team-a-00@production", "team-a-00@v1"])
    if hostile:
        adapter = adapter | _text
    common = {
        "request_id": _text if hostile else st.just(""), "adapter": adapter,
        "sampling": st.none() | sampling, "stopping": st.none() | stopping,
        "logprobs": f["logprobs"], "prompt_logprobs": f["logprobs"],
    }  # fmt: skip
    text_prompt = st.builds(
        lambda text, **kw: pb.GenerateRequest(text=text, **kw),
        text=st.text(max_size=200) | st.just("word " * 600) if hostile
        else st.text(min_size=1, max_size=60),
        **common,
    )  # fmt: skip
    id_prompt = st.builds(
        lambda ids, **kw: pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), **kw),
        ids=st.lists(f["token_id"], max_size=600 if hostile else 60, min_size=0 if hostile else 1),
        **common,
    )  # fmt: skip
    return text_prompt | id_prompt


def test_fuzzed_requests_never_get_internal_or_unknown(secure):
    """Every field at random (NaN, huge, negative, unknown adapters, long prompts)."""
    seen: dict[str, int] = {}
    with Client(secure.gateway.target, secure.credentials, api_key=secure.keys["admin"]) as c:

        @settings(
            max_examples=150, deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )  # fmt: skip
        @given(
            request=_requests(secure.adapters, True) | _requests(secure.adapters, False),
            streaming=st.booleans(),
        )
        def check(request: pb.GenerateRequest, streaming: bool) -> None:
            if request.HasField("stopping") and request.stopping.HasField("max_tokens"):
                request.stopping.max_tokens = min(request.stopping.max_tokens, 64)  # keep it fast
            try:
                if streaming:
                    stream_request = pb.GenerateStreamRequest()
                    stream_request.ParseFromString(request.SerializeToString())
                    for _ in c.stub.GenerateStream(stream_request, metadata=c.metadata, timeout=60):
                        pass
                else:
                    c.stub.Generate(request, metadata=c.metadata, timeout=60)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                    exc.details()
                )
            seen[code.name] = seen.get(code.name, 0) + 1
            assert secure.gateway.process.poll() is None, "the gateway died"

        check()
    print(f"fuzz outcomes: {seen}")
    assert seen.get("OK", 0) > 10 and seen.get("INVALID_ARGUMENT", 0) > 10  # both sides hit
    with Client(secure.gateway.target, secure.credentials, api_key=secure.keys["admin"]) as c:
        assert c.model_info().unfinished_requests == 0


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor, names: list[str]) -> st.SearchStrategy:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return st.integers(-3, 40) | st.integers(low, high)
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=300)
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.sampled_from(numbers) | st.integers(-5, 2**31 - 1)  # open enums
    return st.sampled_from(names) | st.text(max_size=60)  # strings


def _message(descriptor, names: list[str], depth: int = 0) -> st.SearchStrategy:
    """Any message of this type: each field unset or any value its wire type allows."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 2:
        return st.just(cls())
    parts = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            value = st.deferred(lambda f=field: _message(f.message_type, names, depth + 1))
        else:
            value = _scalar(field, names)
        if field.is_repeated:
            value = st.lists(value, max_size=4)
        parts[field.name] = st.none() | value

    def build(values: dict) -> object:
        message = cls()
        for name, value in values.items():
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            target = getattr(message, name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for entry in value:  # map<k, v> arrives as a list of entry messages
                    if field.message_type.fields_by_name["value"].message_type is not None:
                        target[entry.key].CopyFrom(entry.value)
                    else:
                        target[entry.key] = entry.value
            elif field.is_repeated:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    for item in value:
                        target.add().CopyFrom(item)
                else:
                    target.extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(parts).map(build)


def _every_method() -> list:
    from loraplex.v1 import adapters_pb2, keys_pb2

    return [
        method
        for file in (pb, adapters_pb2, keys_pb2)
        for service in file.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def test_fuzzed_messages_of_every_rpc_never_get_internal_or_unknown(secure):
    """Every field of every request message of every RPC, as an admin (so calls get through)."""
    methods = _every_method()
    names = [*secure.adapters[:4], "production", "candidate", "v1", "team-a-00@v1", ""]
    seen: dict[str, int] = {}
    channel = grpc.secure_channel(secure.gateway.target, secure.credentials)
    metadata = (("authorization", f"Bearer {secure.keys['admin']}"),)
    call_of = {}
    for method in methods:
        path = f"/{method.containing_service.full_name}/{method.name}"
        request_cls = message_factory.GetMessageClass(method.input_type)
        reply_cls = message_factory.GetMessageClass(method.output_type)
        kind = ("stream_" if method.client_streaming else "unary_") + (
            "stream" if method.server_streaming else "unary"
        )
        call_of[method.full_name] = getattr(channel, kind)(
            path, request_serializer=request_cls.SerializeToString,
            response_deserializer=reply_cls.FromString,
        )  # fmt: skip

    @settings(
        max_examples=30, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )  # fmt: skip
    @given(data=st.data())
    def check(method, data) -> None:
        requests = data.draw(st.lists(_message(method.input_type, names), min_size=1, max_size=3))
        if method.input_type.name in ("GenerateRequest", "GenerateStreamRequest"):
            for request in requests:  # keep generation short; everything else stays random
                if request.stopping.HasField("max_tokens"):
                    request.stopping.max_tokens = min(request.stopping.max_tokens, 32)
        call = call_of[method.full_name]
        try:
            if method.client_streaming:
                call(iter(requests), metadata=metadata, timeout=60)
            elif method.server_streaming:
                for _ in call(requests[0], metadata=metadata, timeout=60):
                    pass
            else:
                call(requests[0], metadata=metadata, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                method.full_name, exc.details(),
            )  # fmt: skip
        key = f"{method.name}:{code.name}"
        seen[key] = seen.get(key, 0) + 1
        assert secure.gateway.process.poll() is None, "the gateway died"

    try:
        for method in methods:  # 30 examples of every RPC
            check(method)
    finally:
        channel.close()
    print(f"fuzz outcomes by RPC: {dict(sorted(seen.items()))}")
    called = {key.split(":")[0] for key in seen}
    assert called == {m.name for m in methods}  # every RPC was fuzzed


# ---------------------------------------------------------------- faults


async def test_adapter_files_vanish_or_change_after_registration(secure):
    name, bystander = "team-a-04", "team-a-06"
    with AdapterClient(
        secure.gateway.target, credentials=secure.credentials, api_key=secure.keys["admin"]
    ) as registry:
        sha = registry.get(name).versions[0].sha256
    stored = secure.data_dir / "artifacts" / "objects" / sha
    weights = stored / "adapter_model.safetensors"
    original = weights.read_bytes()
    async with secure.client() as client:
        assert (await client.generate("Hi", name, max_tokens=2)).adapter.name == name
        aside = stored.with_name(sha + ".aside")
        stored.rename(aside)  # the files disappear
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.generate("Hi", name, max_tokens=2)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert name in err.value.details() and "missing" in err.value.details()
            other = await client.generate("Hi", bystander, max_tokens=2)
            assert other.adapter.name == bystander  # everyone else is served
        finally:
            aside.rename(stored)
        assert (await client.generate("Hi", name, max_tokens=2)).adapter.name == name  # healed

        weights.chmod(0o644)  # the files are corrupted in place
        weights.write_bytes(original[:-16] + b"\x00" * 16)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.generate("Hi", name, max_tokens=2)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "changed since registration" in err.value.details()
        finally:
            weights.write_bytes(original)
            weights.chmod(0o444)
        assert (await client.generate("Hi", name, max_tokens=2)).adapter.name == name
    for reason in ("missing", "changed"):
        assert _metric_sum(secure, "loraplex_adapter_file_errors_total", adapter=name,
                           reason=reason) == 1  # fmt: skip
    log = secure.gateway.log.read_text()
    assert f"adapter {name}@v1 cannot be served: its stored files are missing" in log
    assert f"adapter {name}@v1 cannot be served: its stored files are changed" in log


def _engine_core_pids(gateway_pid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == gateway_pid and b"EngineCore" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


async def test_engine_death_fails_requests_unavailable_and_exits_1(secure):
    """Last in the module: it ends the gateway. Kubernetes (deploy/) restarts the pod."""
    gateway = secure.gateway
    pids = _engine_core_pids(gateway.process.pid)
    assert pids, "no engine core process found under the gateway"
    async with (
        secure.client() as client,
        grpc.aio.secure_channel(gateway.target, secure.credentials) as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        # 8 adapters, max_loras 4: half the streams wait for the other half's 480 tokens, so
        # however fast the engine is, at least 24 are unfinished when it dies.
        calls = [
            client.stub.GenerateStream(
                _stream_request(secure.adapters[i % 8], 480, i), metadata=client.metadata
            )
            for i in range(48)
        ]
        # Kill once the engine reports running requests (vLLM's own gauge, read over HTTP in
        # another thread): not on a stream's first delta, which a busy gateway may send late.
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(_metric_sum, secure, "vllm:num_requests_running") < 1:
            assert time.monotonic() < deadline, "the engine never started the streams"
            await asyncio.sleep(0.05)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

        async def outcome(call) -> str:
            tokens = 0
            try:
                while (delta := await call.read()) != grpc.aio.EOF:
                    tokens += len(delta.token_ids)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "finished" if tokens == 480 else f"cut short at {tokens} tokens"

        outcomes = await asyncio.gather(*(outcome(c) for c in calls))
        print(f"in flight when the engine died: {collections.Counter(outcomes)}")
        # streams that were done before the kill finished whole; every other one is UNAVAILABLE
        assert set(outcomes) <= {"UNAVAILABLE", "finished"}, outcomes
        assert outcomes.count("UNAVAILABLE") >= 24
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.generate("Hi", max_tokens=2, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await asyncio.to_thread(gateway.process.wait, 60) == 1
    assert "the engine died" in gateway.log.read_text()
