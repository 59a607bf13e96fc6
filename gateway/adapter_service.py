"""AdapterService servicer: proto <-> registry conversion only.

The work happens in `gateway.registry.service.Registry`; errors are mapped by `gateway.errors`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from gateway.auth import (
    current_key,
    require_adapter,
    require_owner,
    require_unrestricted,
    visible,
)
from gateway.contract import VERDICT_FROM_PB, VERDICT_TO_PB
from gateway.errors import EngineUnavailable, InvalidRequest, NotSupported, grpc_errors
from gateway.metrics import GatewayMetrics
from gateway.pipeline import GenerationPipeline
from gateway.registry.records import (
    AdapterRecord,
    AliasMove,
    AuditEvent,
    EvaluationRecord,
    VersionRecord,
)
from gateway.registry.service import Registration, Registry
from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc

ACTOR_METADATA = "loraplex-actor"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _limit(field: str, value: int) -> int:
    """A page size: 0 means the default; at most MAX_PAGE_SIZE."""
    if value < 0:
        raise InvalidRequest(field, f"must be >= 0, got {value}")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def actor_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling: the API key (when keys are on), with the `loraplex-actor` metadata the
    client sent, else the peer address."""
    claimed = next(
        (str(v)[:128] for k, v in context.invocation_metadata() or () if k == ACTOR_METADATA and v),
        None,
    )
    key = current_key.get()
    if key is not None:
        return f"key:{key.name}[{key.id}]" + (f" ({claimed})" if claimed else "")
    return claimed or f"anonymous@{context.peer()}"


def to_timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _struct(value: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def _dict(message: struct_pb2.Struct) -> dict:
    return json_format.MessageToDict(message)


def evaluation_to_pb(e: EvaluationRecord) -> pb.Evaluation:
    return pb.Evaluation(
        id=e.id,
        suite=e.suite,
        verdict=VERDICT_TO_PB[e.verdict],
        report=_struct(e.report),
        actor=e.actor,
        create_time=to_timestamp(e.created_at),
    )


def version_to_pb(v: VersionRecord, residency: int = pb.RESIDENCY_UNSPECIFIED) -> pb.AdapterVersion:
    return pb.AdapterVersion(
        adapter=v.adapter,
        version=v.number,
        sha256=v.sha256,
        rank=v.rank,
        alpha=v.alpha,
        target_modules=v.target_modules,
        size_bytes=v.size_bytes,
        base_fingerprint=v.base_fingerprint,
        base_rule=v.base_rule,
        source=v.source,
        create_time=to_timestamp(v.created_at),
        actor=v.actor,
        metadata=_struct(v.metadata),
        evaluations=[evaluation_to_pb(e) for e in v.evaluations],
        aliases=v.aliases,
        residency=residency,
    )


def move_to_pb(m: AliasMove) -> pb.AliasMove:
    return pb.AliasMove(
        adapter=m.adapter,
        alias=m.alias,
        from_version=m.from_version,
        to_version=m.to_version,
        actor=m.actor,
        reason=m.reason,
        forced=m.forced,
        create_time=to_timestamp(m.created_at),
    )


def audit_to_pb(e: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=e.id,
        create_time=to_timestamp(e.created_at),
        actor=e.actor,
        action=e.action,
        adapter=e.adapter,
        version=e.version,
        details=_struct(e.details),
    )


class AdapterServicer(pb_grpc.AdapterServiceServicer):
    """Serves loraplex.v1.AdapterService; registration and promotion need the engine up."""

    def __init__(
        self,
        registry: Callable[[], Registry | None],
        pipeline: Callable[[], GenerationPipeline | None],
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._registry = registry
        self._pipeline = pipeline
        self._metrics = metrics

    @contextlib.contextmanager
    def _counted_registration(self, name: str) -> Iterator[None]:
        try:
            yield
        except BaseException:
            if self._metrics is not None:
                self._metrics.registration(name, ok=False)
            raise
        if self._metrics is not None:
            self._metrics.registration(name, ok=True)

    def _reg(self) -> Registry:
        registry = self._registry()
        if registry is None:
            raise NotSupported(
                "this gateway serves a directory of adapters (adapters_dir); the registry is off"
            )
        return registry

    def _serving(self) -> GenerationPipeline:
        pipeline = self._pipeline()
        if pipeline is None or not pipeline.engine.is_healthy():
            raise EngineUnavailable("the engine is starting or shutting down")
        return pipeline

    async def _residency(self) -> Callable[[str], int]:
        """Residency of a version by artifact sha256, from the engine's LoRA caches (one call)."""
        pipeline = self._pipeline()
        if pipeline is None or not pipeline.engine.is_healthy():
            return lambda _sha: pb.RESIDENCY_UNSPECIFIED
        active, cached = await pipeline.engine.adapter_residency()
        view = self._reg().view

        def of(sha256: str) -> int:
            engine_id = view.engine_id(sha256)
            if engine_id in active:
                return pb.RESIDENCY_LOADED
            return pb.RESIDENCY_CPU_CACHED if engine_id in cached else pb.RESIDENCY_DISK

        return of

    @staticmethod
    def _adapter_to_pb(a: AdapterRecord, residency: Callable[[str], int]) -> pb.Adapter:
        return pb.Adapter(
            name=a.name,
            description=a.description,
            owner=a.owner,
            create_time=to_timestamp(a.created_at),
            aliases=a.aliases,
            versions=[version_to_pb(v, residency(v.sha256)) for v in a.versions],
        )

    @grpc_errors
    async def RegisterAdapter(
        self, request: pb.RegisterAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterAdapterResponse:
        registry = self._reg()
        require_unrestricted(
            "RegisterAdapter reads any folder on the gateway host; use UploadAdapter"
        )
        if not request.path:
            raise InvalidRequest("path", "give the adapter folder on the gateway host")
        engine = self._serving().engine
        with self._counted_registration(request.name):
            record = await registry.register(
                Path(request.path),
                Registration(
                    name=request.name,
                    description=request.description,
                    owner=request.owner,
                    metadata=_dict(request.metadata),
                    source=request.source,
                    alias=request.alias,
                ),
                actor_of(context),
                engine.add_adapter,
            )
        return pb.RegisterAdapterResponse(version=version_to_pb(record))

    @grpc_errors
    async def UploadAdapter(
        self,
        request_iterator: AsyncIterator[pb.UploadAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadAdapterResponse:
        registry = self._reg()
        engine = self._serving().engine
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("content") != "header":
            raise InvalidRequest("header", "the first message must carry the upload header")
        header = first.header
        require_owner(header.name)

        async def chunks() -> AsyncIterator[bytes]:
            async for message in messages:
                if message.WhichOneof("content") != "chunk":
                    raise InvalidRequest("header", "only the first message may carry a header")
                yield message.chunk

        with self._counted_registration(header.name):
            record = await registry.upload(
                Registration(
                    name=header.name,
                    description=header.description,
                    owner=header.owner,
                    metadata=_dict(header.metadata),
                    source=header.source,
                    alias=header.alias,
                ),
                chunks(),
                header.archive_sha256,
                actor_of(context),
                engine.add_adapter,
            )
        return pb.UploadAdapterResponse(version=version_to_pb(record))

    @grpc_errors
    async def GetAdapter(
        self, request: pb.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAdapterResponse:
        require_adapter(request.name)
        record = await self._reg().get_adapter(request.name)
        return pb.GetAdapterResponse(adapter=self._adapter_to_pb(record, await self._residency()))

    @grpc_errors
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        size = _limit("page_size", request.page_size)
        records = await self._visible_adapters(size + 1, request.page_token)
        page, more = records[:size], len(records) > size
        residency = await self._residency()
        return pb.ListAdaptersResponse(
            adapters=[self._adapter_to_pb(a, residency) for a in page],
            next_page_token=page[-1].name if more else "",
        )

    async def _visible_adapters(self, limit: int, after: str) -> list[AdapterRecord]:
        """Up to `limit` adapters the caller may see, by name after `after`: filtered before
        paging, so neither a page nor its next-page token names anyone else's adapter."""
        found: list[AdapterRecord] = []
        while len(found) < limit:
            batch = await self._reg().list_adapters(MAX_PAGE_SIZE, after)
            found.extend(a for a in batch if visible(a.name))
            if len(batch) < MAX_PAGE_SIZE:
                break
            after = batch[-1].name
        return found[:limit]

    @grpc_errors
    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListVersionsResponse:
        require_adapter(request.adapter)
        record = await self._reg().get_adapter(request.adapter)
        residency = await self._residency()
        return pb.ListVersionsResponse(
            versions=[version_to_pb(v, residency(v.sha256)) for v in record.versions]
        )

    @grpc_errors
    async def SetAlias(
        self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAliasResponse:
        registry = self._reg()
        require_adapter(request.adapter)
        engine = self._serving().engine
        move = await registry.set_alias(
            request.adapter,
            request.alias,
            request.version,
            actor_of(context),
            engine.add_adapter,
            expected=request.expected_version if request.HasField("expected_version") else None,
            reason=request.reason,
            force=request.force,
        )
        if self._metrics is not None:
            self._metrics.alias_moved(move.adapter, move.alias, move.from_version, move.to_version)
        return pb.SetAliasResponse(move=move_to_pb(move))

    @grpc_errors
    async def GetAliasHistory(
        self, request: pb.GetAliasHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAliasHistoryResponse:
        require_adapter(request.adapter)
        moves = await self._reg().alias_history(
            request.adapter, request.alias, _limit("limit", request.limit)
        )
        return pb.GetAliasHistoryResponse(moves=[move_to_pb(m) for m in moves])

    @grpc_errors
    async def DeleteVersion(
        self, request: pb.DeleteVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteVersionResponse:
        require_adapter(request.adapter)
        pipeline = self._pipeline()
        key = (request.adapter, request.version)

        def in_flight() -> int:
            return pipeline.in_flight[key] if pipeline is not None else 0

        removed = await self._reg().delete_version(
            request.adapter, request.version, actor_of(context), request.reason, in_flight
        )
        # kept files mean another version (maybe another tenant's) has the same weights
        caller = current_key.get()
        return pb.DeleteVersionResponse(
            artifact_removed=removed or not (caller is None or caller.unrestricted)
        )

    @grpc_errors
    async def RecordEvaluation(
        self, request: pb.RecordEvaluationRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEvaluationResponse:
        require_adapter(request.adapter)
        verdict = VERDICT_FROM_PB.get(request.verdict)
        if verdict is None:  # unset, or a value this gateway does not know
            raise InvalidRequest("verdict", "say VERDICT_PASS, VERDICT_FAIL or VERDICT_ERROR")
        record = await self._reg().record_evaluation(
            request.adapter,
            request.version,
            request.suite,
            verdict,
            _dict(request.report),
            actor_of(context),
        )
        if self._metrics is not None:
            self._metrics.verdict(request.adapter, record.verdict)
        return pb.RecordEvaluationResponse(evaluation=evaluation_to_pb(record))

    @grpc_errors
    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        require_adapter(request.adapter)
        events = await self._reg().audit_events(request.adapter, _limit("limit", request.limit))
        return pb.ListAuditEventsResponse(
            events=[audit_to_pb(e) for e in events if visible(e.adapter)]
        )
