"""A small client for the loraplex gateway: sync (`Client`) and asyncio (`AsyncClient`) for
generation, and a blocking `AdapterClient` for the adapter registry.

    with Client("localhost:50051") as c:
        print(c.generate("Once upon a time", adapter="alpha", max_tokens=32).text)

    with AdapterClient("localhost:50051") as reg:
        reg.register("acme", "/srv/adapters/acme-run-7", alias="candidate")

Keyword arguments are the fields of SamplingParams and StoppingCriteria (temperature, top_p,
max_tokens, stop, ...) plus logprobs / prompt_logprobs / logprob_token_ids / request_id.

Every client takes an API key (`api_key`, default `$LORAPLEX_API_KEY`) and TLS credentials
(`credentials`, default from `$LORAPLEX_TLS_CA_FILE`, plus `$LORAPLEX_TLS_CERT_FILE` /
`$LORAPLEX_TLS_KEY_FILE` for mutual TLS), so every `loraplex` command and the lm-eval backend
reach a gateway with keys and TLS without extra flags.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import socket
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc as apb_grpc
from loraplex.v1 import generation_pb2 as pb
from loraplex.v1 import generation_pb2_grpc as pb_grpc
from loraplex.v1 import keys_pb2 as kpb
from loraplex.v1 import keys_pb2_grpc as kpb_grpc

API_KEY_ENV = "LORAPLEX_API_KEY"
TLS_CA_ENV = "LORAPLEX_TLS_CA_FILE"
TLS_CERT_ENV = "LORAPLEX_TLS_CERT_FILE"
TLS_KEY_ENV = "LORAPLEX_TLS_KEY_FILE"

_SAMPLING = set(pb.SamplingParams.DESCRIPTOR.fields_by_name)
_STOPPING = set(pb.StoppingCriteria.DESCRIPTOR.fields_by_name)
VERDICTS = {"pass": apb.VERDICT_PASS, "fail": apb.VERDICT_FAIL, "error": apb.VERDICT_ERROR}
_TOP_LEVEL = {"request_id", "logprobs", "prompt_logprobs", "logprob_token_ids"}

Request = TypeVar("Request", pb.GenerateRequest, pb.GenerateStreamRequest)


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


def _channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    credentials = credentials or tls_credentials()
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)


def _aio_channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    credentials = credentials or tls_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, credentials)


def build_request(
    message: type[Request], prompt: str | Sequence[int], adapter: str = "", **options: Any
) -> Request:
    """A GenerateRequest / GenerateStreamRequest from a prompt (text or ids) and keyword options."""
    unknown = set(options) - _SAMPLING - _STOPPING - _TOP_LEVEL
    if unknown:
        raise TypeError(f"unknown generation options: {sorted(unknown)}")
    request = message(
        adapter=adapter,
        sampling=pb.SamplingParams(**{k: v for k, v in options.items() if k in _SAMPLING}),
        stopping=pb.StoppingCriteria(**{k: v for k, v in options.items() if k in _STOPPING}),
        **{k: v for k, v in options.items() if k in _TOP_LEVEL},
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


class Client:
    """Blocking client; one channel, reused for every call."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        self.channel = _channel(target, credentials)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.metadata = auth_metadata(api_key)

    def generate(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> pb.GenerateResponse:
        """The whole completion."""
        request = build_request(pb.GenerateRequest, prompt, adapter, **options)
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def stream(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> Iterator[pb.GenerateStreamResponse]:
        """Deltas as they are generated; `.cancel()` on the result aborts the request."""
        request = build_request(pb.GenerateStreamRequest, prompt, adapter, **options)
        return self.stub.GenerateStream(request, timeout=timeout, metadata=self.metadata)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        return self.stub.Tokenize(
            pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
            metadata=self.metadata,
        )

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client (grpc.aio); create it inside the running event loop."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        self.channel = _aio_channel(target, credentials)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.metadata = auth_metadata(api_key)

    async def generate(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> pb.GenerateResponse:
        """The whole completion."""
        request = build_request(pb.GenerateRequest, prompt, adapter, **options)
        return await self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    async def stream(
        self,
        prompt: str | Sequence[int],
        adapter: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Deltas as they are generated; leaving the loop early cancels the request."""
        request = build_request(pb.GenerateStreamRequest, prompt, adapter, **options)
        call = self.stub.GenerateStream(request, timeout=timeout, metadata=self.metadata)
        try:
            async for delta in call:
                yield delta
        finally:
            call.cancel()

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> pb.TokenizeResponse:
        return await self.stub.Tokenize(
            pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
            metadata=self.metadata,
        )

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


ACTOR_METADATA = "loraplex-actor"
MAX_CHUNK = (4 << 20) - (64 << 10)  # under gRPC's default 4 MiB message limit, with room


def default_actor() -> str:
    """`$USER@hostname`: who registry changes are recorded as by default."""
    user = os.environ.get("USER")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _struct(value: dict | None) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value or {})
    return message


def tar_folder(folder: Path, archive: Path) -> None:
    """Pack an adapter folder's plain files (flat, arcname = file name) into a .tar.gz."""
    entries = sorted(folder.iterdir())
    for path in entries:
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{path}: only plain files can be uploaded (no folders or links)")
    with tarfile.open(archive, "w:gz") as tar:
        for path in entries:
            tar.add(path, arcname=path.name, recursive=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class AdapterClient:
    """Blocking client of the adapter registry (AdapterService); one channel for every call.

    Every call carries the `loraplex-actor` metadata (default `$USER@hostname`), which the
    registry records as who made the change. Errors are raised as `grpc.RpcError`.
    """

    def __init__(
        self,
        target: str,
        actor: str | None = None,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        self.target = target
        self.actor = actor or default_actor()
        self.timeout = timeout
        self.channel = _channel(target, credentials)
        self.stub = apb_grpc.AdapterServiceStub(self.channel)
        self._metadata = ((ACTOR_METADATA, self.actor), *auth_metadata(api_key))

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, metadata=self._metadata, timeout=self.timeout)

    def register(
        self,
        name: str,
        path: str | Path,
        description: str = "",
        owner: str = "",
        metadata: dict | None = None,
        source: str = "",
        alias: str = "",
    ) -> apb.AdapterVersion:
        """Register a folder on the gateway host as the adapter's next version."""
        request = apb.RegisterAdapterRequest(
            name=name,
            path=str(path),
            description=description,
            owner=owner,
            metadata=_struct(metadata),
            source=source,
            alias=alias,
        )
        return self._call(self.stub.RegisterAdapter, request).version

    def upload(
        self,
        name: str,
        archive_path_or_folder: str | Path,
        description: str = "",
        owner: str = "",
        metadata: dict | None = None,
        source: str = "",
        alias: str = "",
        chunk_size: int = 1 << 20,
    ) -> apb.AdapterVersion:
        """Stream a local .tar(.gz)/.zip archive, or a folder (tarred first), as a new version."""
        if not 0 < chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK}")
        path = Path(archive_path_or_folder)
        if not path.is_dir():
            return self._upload(name, path, description, owner, metadata, source, alias, chunk_size)
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
            archive = Path(tmp) / f"{path.name or 'adapter'}.tar.gz"
            tar_folder(path, archive)
            return self._upload(
                name, archive, description, owner, metadata, source, alias, chunk_size
            )

    def _upload(
        self,
        name: str,
        archive: Path,
        description: str,
        owner: str,
        metadata: dict | None,
        source: str,
        alias: str,
        chunk_size: int,
    ) -> apb.AdapterVersion:
        header = apb.UploadHeader(
            name=name,
            description=description,
            owner=owner,
            metadata=_struct(metadata),
            source=source,
            alias=alias,
            archive_sha256=_sha256(archive),
        )

        def messages() -> Iterator[apb.UploadAdapterRequest]:
            yield apb.UploadAdapterRequest(header=header)
            with archive.open("rb") as f:
                while chunk := f.read(chunk_size):
                    yield apb.UploadAdapterRequest(chunk=chunk)

        return self._call(self.stub.UploadAdapter, messages()).version

    def get(self, name: str) -> apb.Adapter:
        """One adapter with all its versions, evaluations and aliases."""
        return self._call(self.stub.GetAdapter, apb.GetAdapterRequest(name=name)).adapter

    def list(self, page_size: int = 100) -> Iterator[apb.Adapter]:
        """Every adapter in name order, fetched a page at a time."""
        token = ""
        while True:
            request = apb.ListAdaptersRequest(page_size=page_size, page_token=token)
            page = self._call(self.stub.ListAdapters, request)
            yield from page.adapters
            token = page.next_page_token
            if not token:
                return

    def versions(self, name: str) -> list[apb.AdapterVersion]:
        """The live versions, oldest first."""
        reply = self._call(self.stub.ListVersions, apb.ListVersionsRequest(adapter=name))
        return [*reply.versions]

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        expected: int | None = None,
        reason: str = "",
        force: bool = False,
    ) -> apb.AliasMove:
        """Point `alias` at `version`; with `expected` (0: no alias yet), compare-and-swap."""
        request = apb.SetAliasRequest(
            adapter=name,
            alias=alias,
            version=version,
            expected_version=expected,
            reason=reason,
            force=force,
        )
        return self._call(self.stub.SetAlias, request).move

    def history(self, name: str, alias: str = "", limit: int = 100) -> list[apb.AliasMove]:
        """Alias moves, newest first (all aliases when `alias` is empty)."""
        request = apb.GetAliasHistoryRequest(adapter=name, alias=alias, limit=limit)
        return [*self._call(self.stub.GetAliasHistory, request).moves]

    def delete(self, name: str, version: int, reason: str = "") -> bool:
        """Delete a version; returns whether its artifact files were removed too."""
        request = apb.DeleteVersionRequest(adapter=name, version=version, reason=reason)
        return self._call(self.stub.DeleteVersion, request).artifact_removed

    def record_evaluation(
        self, name: str, version: int, suite: str, verdict: str, report: dict | None = None
    ) -> apb.Evaluation:
        """Attach an evaluation report and its verdict ("pass", "fail" or "error") to a version."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {sorted(VERDICTS)}, got {verdict!r}")
        request = apb.RecordEvaluationRequest(
            adapter=name,
            version=version,
            suite=suite,
            verdict=VERDICTS[verdict],
            report=_struct(report),
        )
        return self._call(self.stub.RecordEvaluation, request).evaluation

    def audit(self, adapter: str = "", limit: int = 100) -> list[apb.AuditEvent]:
        """Registry mutations, newest first (all adapters when `adapter` is empty)."""
        request = apb.ListAuditEventsRequest(adapter=adapter, limit=limit)
        return [*self._call(self.stub.ListAuditEvents, request).events]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AdapterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KeyClient:
    """Blocking client of the API key admin (KeyService); needs an unrestricted admin key."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        self.channel = _channel(target, credentials)
        self.stub = kpb_grpc.KeyServiceStub(self.channel)
        self.metadata = auth_metadata(api_key)
        self.timeout = timeout

    def create(
        self,
        name: str,
        role: str,
        adapters: Sequence[str] = (),
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
    ) -> kpb.CreateKeyResponse:
        """A new key; the response's `secret` is shown only this once."""
        request = kpb.CreateKeyRequest(
            name=name,
            role=kpb.Role.Value(f"ROLE_{role.upper()}"),
            adapters=adapters,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )
        return self.stub.CreateKey(request, metadata=self.metadata, timeout=self.timeout)

    def list(self, include_revoked: bool = False) -> list[kpb.ApiKey]:
        request = kpb.ListKeysRequest(include_revoked=include_revoked)
        return [*self.stub.ListKeys(request, metadata=self.metadata, timeout=self.timeout).keys]

    def revoke(self, key_id: str) -> kpb.ApiKey:
        request = kpb.RevokeKeyRequest(id=key_id)
        return self.stub.RevokeKey(request, metadata=self.metadata, timeout=self.timeout).key

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> KeyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until_serving(
    target: str,
    timeout: float = 300.0,
    alive: Callable[[], bool] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Block until the gateway's health service reports SERVING (engine loaded).

    `alive` (e.g. ``lambda: proc.poll() is None``) stops the wait early if the server died.
    """
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with _channel(target, credentials) as channel:
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
