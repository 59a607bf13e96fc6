"""Errors of the eval suite: the gate reports an EvalError as verdict "error", never as a fail."""

from __future__ import annotations


class EvalError(Exception):
    """Base of every error the eval suite raises on purpose."""


class EvalInputError(EvalError, ValueError):
    """A bad input file, option or name; the message says where (file:line when there is one)."""
