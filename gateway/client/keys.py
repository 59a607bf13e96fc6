"""The API key admin client (KeyService); it needs an unrestricted admin key."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from gateway.client.channel import Connection
from loraplex.v1 import keys_pb2 as kpb
from loraplex.v1 import keys_pb2_grpc as kpb_grpc


class KeyClient(Connection):
    """Blocking client of the API key admin (KeyService); needs an unrestricted admin key."""

    stub_class = kpb_grpc.KeyServiceStub

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        super().__init__(target, credentials, api_key, timeout)

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
