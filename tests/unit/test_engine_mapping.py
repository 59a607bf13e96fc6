"""vLLM finish reasons -> ours (engine.py imports vLLM lazily, so this needs no engine)."""

from __future__ import annotations

import pytest

from gateway.domain import FinishReason
from gateway.engine import _finish_reason


@pytest.mark.parametrize(
    ("reason", "stop_reason", "expected"),
    [
        (None, None, None),
        ("length", None, FinishReason.LENGTH),
        ("stop", None, FinishReason.EOS),
        ("stop", "###", FinishReason.STOP_SEQUENCE),
        ("stop", 42, FinishReason.STOP_SEQUENCE),
        ("abort", None, FinishReason.CANCELLED),
        ("error", None, FinishReason.ERROR),
        ("something-new", None, FinishReason.ERROR),
    ],
)
def test_finish_reason(reason, stop_reason, expected):
    assert _finish_reason(reason, stop_reason) is expected
