"""Who may call what: API-key authentication and the role each RPC needs, in one table.

`AuthInterceptor` checks the `authorization: Bearer <secret>` metadata of every call against
`METHOD_ACCESS` before the servicer runs, and leaves the caller's key in `current_key` for
the servicers' adapter checks (`require_adapter`, `visible`): a key limited to some adapters
gets NOT_FOUND for the others, exactly as for adapters that do not exist. Health and
reflection stay open (probes and grpcurl carry no keys). Without a key ring (auth off) there is
no interceptor and `current_key` is None: every call may do everything.
"""

from __future__ import annotations

import contextvars
import enum
import inspect
from collections.abc import Callable
from typing import Any

import grpc

from gateway.errors import AdapterNotFound, PermissionDenied, Unauthenticated, status_of
from gateway.keys import ApiKey, KeyRing, Role

AUTHORIZATION_METADATA = "authorization"


class Access(enum.Enum):
    """What a method needs."""

    PUBLIC = "public"
    INFER = "infer"  # any key
    ADMIN = "admin"  # an admin key (limited to its adapters)
    KEY_ADMIN = "key_admin"  # an admin key not limited to some adapters


SERVICE_ACCESS = {
    "grpc.health.v1.Health": Access.PUBLIC,
    "grpc.reflection.v1alpha.ServerReflection": Access.PUBLIC,
    "grpc.reflection.v1.ServerReflection": Access.PUBLIC,
    "loraplex.v1.GenerationService": Access.INFER,
    "loraplex.v1.AdapterService": Access.ADMIN,
    "loraplex.v1.KeyService": Access.KEY_ADMIN,
}
"""Access by service; a service not listed here is refused to everyone but key admins."""

current_key: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar(
    "loraplex_current_key", default=None
)


def access_of(method: str) -> Access:
    """The access a full method name (`/package.Service/Method`) needs."""
    service = method.lstrip("/").split("/", 1)[0]
    return SERVICE_ACCESS.get(service, Access.KEY_ADMIN)


def adapter_name(reference: str) -> str:
    """The adapter name of a reference (`name`, `name@alias`, `name@vN`)."""
    return reference.split("@", 1)[0]


def visible(name: str) -> bool:
    """Whether the caller may see and use the adapter of this name."""
    key = current_key.get()
    return key is None or key.allows(name)


def require_adapter(reference: str) -> None:
    """NOT_FOUND, as for a missing adapter, when the caller's key may not use this one."""
    if reference and not visible(adapter_name(reference)):
        raise AdapterNotFound(reference)


def require_owner(name: str) -> None:
    """Creating an adapter: PERMISSION_DENIED outside the key's patterns (reveals nothing)."""
    key = current_key.get()
    if key is not None and not key.allows(name):
        raise PermissionDenied(
            f"this key may only create adapters matching {list(key.adapters)}, not {name!r}"
        )


def require_unrestricted(why: str) -> None:
    """PERMISSION_DENIED for keys limited to some adapters."""
    key = current_key.get()
    if key is not None and not key.unrestricted:
        raise PermissionDenied(f"this key is limited to adapters {list(key.adapters)}: {why}")


def bearer_secret(metadata: Any) -> str | None:
    """The secret of an `authorization: Bearer <secret>` metadata entry, if any."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_METADATA:
            scheme, _, secret = str(value).partition(" ")
            return secret.strip() if scheme.lower() == "bearer" else None
    return None


def authorize(ring: KeyRing, method: str, metadata: Any) -> ApiKey | None:
    """The caller's key for a call, or raises UNAUTHENTICATED / PERMISSION_DENIED."""
    access = access_of(method)
    if access is Access.PUBLIC:
        return None
    secret = bearer_secret(metadata)
    if secret is None:
        raise Unauthenticated("send an API key as `authorization: Bearer <key>` metadata")
    key = ring.authenticate(secret)
    if key is None:
        raise Unauthenticated("the API key is not valid (unknown, revoked or malformed)")
    if access is not Access.INFER and key.role is not Role.ADMIN:
        raise PermissionDenied(f"{method} needs an admin key; key {key.id!r} is {key.role}")
    if access is Access.KEY_ADMIN and not key.unrestricted:
        raise PermissionDenied(f"{method} needs an admin key that is not limited to adapters")
    return key


def _guard(behavior: Callable, ring: KeyRing, method: str) -> Callable:
    """Wrap one handler behavior: authorize, then run it with `current_key` set.

    Guarded servicers are coroutines (streams write through `context.write`); only the public
    services (not wrapped) are async generators.
    """
    assert not inspect.isasyncgenfunction(behavior), f"{method}: write streams via context"

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            key = authorize(ring, method, context.invocation_metadata())
        except (Unauthenticated, PermissionDenied) as exc:
            await context.abort(*status_of(exc))
        token = current_key.set(key)
        try:
            return await behavior(request, context)
        finally:
            current_key.reset(token)

    return guarded


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authorizes every call that is not public against the key ring."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or access_of(method) is Access.PUBLIC:
            return handler
        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        changes = {
            kind: _guard(getattr(handler, kind), self.ring, method)
            for kind in kinds
            if getattr(handler, kind) is not None
        }
        return handler._replace(**changes)
