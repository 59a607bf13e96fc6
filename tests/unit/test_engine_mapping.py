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


def test_versions_of_one_adapter_stay_distinct_lora_requests(tmp_path):
    """vLLM dedupes LoRARequests by name: two versions in one batch must not collapse."""
    from gateway.domain import ResolvedAdapter
    from gateway.engine import lora_request_for

    v1 = ResolvedAdapter("acme", 1, 7, tmp_path / "a", 8, ("q_proj",))
    v2 = ResolvedAdapter("acme", 2, 9, tmp_path / "b", 8, ("q_proj",))
    same_weights = ResolvedAdapter("other-name", 3, 7, tmp_path / "a", 8, ("q_proj",))
    requests = {lora_request_for(v1), lora_request_for(v2), lora_request_for(same_weights)}
    assert sorted(r.lora_int_id for r in requests) == [7, 9]
