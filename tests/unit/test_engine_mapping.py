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


def test_flat_logprobs_keep_the_actual_tokens_rank_when_it_is_also_scored():
    """vLLM lists the generated token first (vocabulary rank), then the scored ids with their
    list positions as "ranks"; a dict would let the second entry overwrite the first."""
    from vllm.logprobs import FlatLogprobs

    from gateway.engine import _token_logprobs

    flat = FlatLogprobs()
    flat.append_fast(
        [40, 7, 40, 9], [-0.5, -3.0, -0.5, -2.0], iter([4, 1, 2, 3]), ["a", "b", "a", "c"]
    )
    [scored] = _token_logprobs([40], flat, 0, scored=True)
    assert (scored.token_id, scored.rank, scored.logprob) == (40, 4, -0.5)
    assert [(t.token_id, t.rank) for t in scored.top] == [(7, 0), (40, 0), (9, 0)]
    prompt = FlatLogprobs()
    prompt.append(None)  # the first prompt token has no context
    prompt.append_fast([5, 5, 6], [-1.0, -1.0, -0.2], iter([2, 1, 2]), ["x", "x", "y"])
    first, second = _token_logprobs([3, 5], prompt, 1)
    assert first.logprob is None and (second.rank, second.logprob) == (2, -1.0)
    assert [(t.token_id, t.rank) for t in second.top] == [(5, 1)]  # top-1 only


def test_engine_environment_on_cpu():
    from gateway.config import GatewayConfig
    from gateway.engine import engine_environment
    from gateway.engine_patches import SPIN_WAIT_ENV

    default = engine_environment(GatewayConfig(model="m", kv_cache_space_gib=2))
    assert default == {"VLLM_CPU_KVCACHE_SPACE": "2", SPIN_WAIT_ENV: "0"}  # vLLM's cores
    tuned = engine_environment(
        GatewayConfig(model="m", cpu_reserved_cores=0, engine_spin_wait=True)
    )
    assert tuned["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and tuned[SPIN_WAIT_ENV] == "1"


def test_vllm_settings_are_read_once_after_the_engine_starts(monkeypatch):
    """vLLM's settings cache: a later change to os.environ no longer reaches vLLM's hot paths."""
    from vllm import envs

    from gateway.engine import cache_vllm_environment

    monkeypatch.setenv("VLLM_COMPUTE_NANS_IN_LOGITS", "0")
    try:
        cache_vllm_environment()
        monkeypatch.setenv("VLLM_COMPUTE_NANS_IN_LOGITS", "1")
        assert envs.VLLM_COMPUTE_NANS_IN_LOGITS is False  # cached, not read again
    finally:
        envs.disable_envs_cache()  # the rest of this test process reads os.environ again
    assert envs.VLLM_COMPUTE_NANS_IN_LOGITS is True
