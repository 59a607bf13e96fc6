"""Errors of the eval suite: the gate reports an EvalError as verdict "error", never as a fail."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class EvalError(Exception):
    """Base of every error the eval suite raises on purpose."""


class EvalInputError(EvalError, ValueError):
    """A bad input file, option or name; the message says where (file:line when there is one)."""


class DeadlineExceeded(EvalError):
    """A request to the gateway got no answer within its deadline: the evaluation has a hole."""


@contextmanager
def gateway_deadline(target: str, what: str, timeout: float) -> Iterator[None]:
    """Re-raise the gateway's DEADLINE_EXCEEDED as DeadlineExceeded, saying which request waited
    how long and which setting sets the deadline; other errors pass through as they are."""
    import grpc

    try:
        yield
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        raise DeadlineExceeded(
            f"gateway {target}: {what} got no answer within its {timeout:g} s deadline "
            "(DEADLINE_EXCEEDED); if the gateway is only slow, raise request_timeout_s in the "
            "gate policy (--timeout for compare and rank)"
        ) from exc


def describe_failure(exc: BaseException, target: str) -> str:
    """One line for a failure, the same in reports and on the command line."""
    import grpc

    if isinstance(exc, grpc.RpcError):
        return f"gateway {target}: {exc.code().name}: {exc.details()}"
    return str(exc) if isinstance(exc, EvalError) else f"{type(exc).__name__}: {exc}"
