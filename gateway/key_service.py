"""KeyService servicer: proto <-> key store conversion only (who may call it: gateway/auth.py)."""

from __future__ import annotations

import asyncio

import grpc

from gateway.adapter_service import actor_of, to_timestamp
from gateway.errors import InvalidRequest, grpc_errors
from gateway.keys import ApiKey, KeyRing, Role
from loraplex.v1 import keys_pb2 as pb
from loraplex.v1 import keys_pb2_grpc as pb_grpc

ROLE_TO_PB = {Role.INFER: pb.ROLE_INFER, Role.ADMIN: pb.ROLE_ADMIN}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}


def key_to_pb(key: ApiKey) -> pb.ApiKey:
    message = pb.ApiKey(
        id=key.id,
        name=key.name,
        role=ROLE_TO_PB[key.role],
        adapters=key.adapters,
        requests_per_minute=key.requests_per_minute or 0,
        tokens_per_minute=key.tokens_per_minute or 0,
        created_by=key.created_by,
    )
    message.create_time.CopyFrom(to_timestamp(key.created_at))
    if key.revoked_at is not None:
        message.revoke_time.CopyFrom(to_timestamp(key.revoked_at))
    return message


class KeyServicer(pb_grpc.KeyServiceServicer):
    """Serves loraplex.v1.KeyService; changes reach this gateway's key ring at once."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring

    @grpc_errors
    async def CreateKey(
        self, request: pb.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateKeyResponse:
        role = ROLE_FROM_PB.get(request.role)
        if role is None:
            raise InvalidRequest("role", "say ROLE_INFER or ROLE_ADMIN")
        key, secret = await asyncio.to_thread(
            self._ring.store.create,
            request.name,
            role.value,
            actor_of(context),
            list(request.adapters),
            request.requests_per_minute or None,
            request.tokens_per_minute or None,
        )
        await asyncio.to_thread(self._ring.reload)
        return pb.CreateKeyResponse(key=key_to_pb(key), secret=secret)

    @grpc_errors
    async def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListKeysResponse:
        keys = await asyncio.to_thread(self._ring.store.list, request.include_revoked)
        return pb.ListKeysResponse(keys=[key_to_pb(k) for k in keys])

    @grpc_errors
    async def RevokeKey(
        self, request: pb.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeKeyResponse:
        if not request.id:
            raise InvalidRequest("id", "give the id of the key to revoke")
        key = await asyncio.to_thread(self._ring.store.revoke, request.id, actor_of(context))
        await asyncio.to_thread(self._ring.reload)
        return pb.RevokeKeyResponse(key=key_to_pb(key))
