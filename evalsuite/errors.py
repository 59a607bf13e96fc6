"""Errors of the eval suite: the gate reports an EvalError as verdict "error", never as a fail."""

from __future__ import annotations


class EvalError(Exception):
    """Base of every error the eval suite raises on purpose."""


class EvalInputError(EvalError, ValueError):
    """A bad input file, option or name; the message says where (file:line when there is one)."""


def describe_failure(exc: BaseException, target: str) -> str:
    """One line for a failure, the same in reports and on the command line."""
    import grpc

    if isinstance(exc, grpc.RpcError):
        return f"gateway {target}: {exc.code().name}: {exc.details()}"
    return str(exc) if isinstance(exc, EvalError) else f"{type(exc).__name__}: {exc}"
