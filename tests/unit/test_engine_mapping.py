"""vLLM finish reasons -> ours (engine.py imports vLLM lazily, so this needs no engine)."""

from __future__ import annotations

import pytest

from gateway.domain import FinishReason
from gateway.engine import _finish_reason


@pytest.mark.parametrize(
    ("reason", "stop_reason", "asked", "expected"),
    [
        (None, None, (), None),
        ("length", None, (), FinishReason.LENGTH),
        ("stop", None, (), FinishReason.EOS),
        ("stop", "###", (), FinishReason.STOP_SEQUENCE),
        ("stop", 42, (42,), FinishReason.STOP_SEQUENCE),
        ("stop", 128009, (), FinishReason.EOS),  # an extra EOS id from generation_config
        ("abort", None, (), FinishReason.CANCELLED),
        ("error", None, (), FinishReason.ERROR),
        ("something-new", None, (), FinishReason.ERROR),
    ],
)
def test_finish_reason(reason, stop_reason, asked, expected):
    assert _finish_reason(reason, stop_reason, asked) is expected
