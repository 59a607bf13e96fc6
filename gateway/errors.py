"""Domain errors and their one translation into gRPC status codes.

Code raises the domain error that says what went wrong; `grpc_errors` turns it into a status at
the gRPC boundary. An exception that is not a domain error is a bug: it is logged with its
traceback and answered INTERNAL. A bad request is never INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class LoraplexError(Exception):
    """Base of the errors a client may see; `code` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(LoraplexError):
    """The request is malformed; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class AdapterNotFound(LoraplexError):
    """No adapter answers to the requested reference."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, reference: str) -> None:
        super().__init__(f"adapter {reference!r} not found")
        self.reference = reference


class InvalidAdapter(LoraplexError):
    """An adapter offered for registration fails a check; nothing was stored."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AdapterUnavailable(LoraplexError):
    """The adapter exists but cannot be served (too large a rank, broken files, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotSupported(LoraplexError):
    """The request asks for something this gateway's engine cannot do safely."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PreconditionFailed(LoraplexError):
    """The registry is not in the state the call needs (alias moved meanwhile, version in use,
    no passing evaluation); nothing was changed."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class EngineUnavailable(LoraplexError):
    """The engine is starting, draining or dead; the client may retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(LoraplexError):
    """Admission refused the request (queue full, rate limit); retry after `retry_after_s`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(LoraplexError):
    """No valid API key came with the call."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LoraplexError):
    """The caller's key may not make this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


RETRY_AFTER_METADATA = "retry-after"
"""Trailing metadata of RESOURCE_EXHAUSTED answers: seconds to wait before retrying."""


def trailing_metadata_of(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """What a failed call sends besides its status (the retry-after hint of admission)."""
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is None:
        return ()
    return ((RETRY_AFTER_METADATA, f"{max(retry_after, 0.001):.3f}"),)


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status code a call ending with `exc` gets (for metrics; no logging)."""
    if isinstance(exc, LoraplexError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):  # the client cancelled or its deadline passed
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


# An absolute path not inside a word, a URL or a relative path: "/a/b/c" -> its group "c".
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/(?:[\w.@+~-]+/)*([\w.@+~-]+)")


def without_host_paths(message: str) -> str:
    """A client message with every absolute path cut to its last part: where the gateway
    keeps its files (data_dir, model, temporary folders) is not the client's business."""
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1), message)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an exception raised while serving a request."""
    if isinstance(exc, LoraplexError):
        return exc.code, without_host_paths(str(exc))
    log.exception("internal error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see gateway logs"


Handler = TypeVar("Handler", bound=Callable[..., Any])


def grpc_errors(handler: Handler) -> Handler:
    """Wrap a grpc.aio servicer coroutine (unary, or streaming through `context.write`)."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped (or logged as a bug) in status_of
            code, message = status_of(exc)
            await context.abort(code, message, trailing_metadata_of(exc))

    return wrapper  # type: ignore[return-value]
