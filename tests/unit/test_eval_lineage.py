"""The gate knows how a candidate was made: reward-hacking checks and an independent judge."""

from __future__ import annotations

import asyncio
import json

import pytest

from evalsuite.behaviour import behaviour, distinct_n
from evalsuite.decisions import decide, policy_checks
from evalsuite.errors import EvalInputError
from evalsuite.gate import run_gate
from evalsuite.judges.reward import RewardModelJudge
from evalsuite.lineage import check_judge_independence, lineage
from evalsuite.policy import parse_policy
from gateway.client import AdapterClient
from gateway.contract import folder_digest
from tests.support.registry_server import start_registry_server

SUMMARY = {"ci_low": 0.6, "ci_high": 0.9, "win_rate": 0.75, "confidence": 0.95,
           "sign_test_p": 0.01, "wins": 6, "ties": 0, "losses": 2}  # fmt: skip
ANSWERS = ["the cat is red", "a dog barks twice", "blue skies over the sea", "green grass grows"]
# What a policy trained on a reward that pays for length learns: the same padding everywhere.
PADDED = [a + " and so on" * 12 for a in ANSWERS]


def _pairs(candidate: list[str], baseline: list[str]) -> list[dict]:
    return [{"candidate": c, "baseline": b} for c, b in zip(candidate, baseline, strict=True)]


def test_distinct_n_counts_unique_ngrams_over_all_responses():
    assert distinct_n(["a b c", "a b d"], 2) == 3 / 4  # (a b) twice, (b c), (b d)
    assert distinct_n(["a a a a"], 1) == 1 / 4
    assert distinct_n(["one"], 2) == 0.0  # no bigram at all


def test_a_padded_candidate_is_long_and_repetitive_next_to_the_baseline():
    stats = behaviour(_pairs(PADDED, ANSWERS))
    assert stats["length_ratio"] > 5 and stats["distinct_ratio"] < 0.5
    same = behaviour(_pairs(ANSWERS, ANSWERS))
    assert same["length_ratio"] == same["distinct_ratio"] == 1.0
    silent = behaviour(_pairs(ANSWERS, ["", "", "", ""]))
    assert silent["length_ratio"] is None and silent["distinct_ratio"] is None
    json.dumps(silent, allow_nan=False)  # goes into the JSON report as is


def _policy(**preference):
    section = {"prompts": "p.jsonl", "min_win_rate_lower_bound": 0.5, **preference}
    return parse_policy({"preference": section})


def test_reward_hacking_checks_fail_the_gate_where_the_judge_is_fooled():
    policy = _policy(max_length_ratio=1.5, min_distinct_ratio=0.8)
    hacked = policy_checks(policy, {}, {}, SUMMARY, behaviour(_pairs(PADDED, ANSWERS)))
    assert [(c.kind, c.passed) for c in hacked] == [
        ("preference", True),  # the judge liked the padding
        ("length_ratio", False),
        ("distinct_ratio", False),
    ]
    verdict, failed = decide(hacked)
    assert verdict == "fail" and "mean words" in failed[0].detail
    honest = policy_checks(policy, {}, {}, SUMMARY, behaviour(_pairs(ANSWERS, ANSWERS)))
    assert decide(honest) == ("pass", [])
    silent = policy_checks(policy, {}, {}, SUMMARY, behaviour(_pairs(ANSWERS, [""] * 4)))
    assert [c.passed for c in silent] == [True, False, True]  # longer than nothing: unbounded
    assert len(policy_checks(_policy(), {}, {}, SUMMARY, behaviour(_pairs(PADDED, ANSWERS)))) == 1


def _manifest(*digests: str) -> dict:
    rewards = [{"reward_model": f"/runs/rm{i}/adapter", "sha256": d, "weight": 1.0}
               for i, d in enumerate(digests)]  # fmt: skip
    return {"method": "rl", "rl": {"algorithm": "grpo", "rewards": rewards}}


def test_the_candidates_own_reward_model_may_not_judge_it():
    with pytest.raises(EvalInputError, match=r"trained against.*allow_training_judge"):
        check_judge_independence("reward_model", ["abc", "def"], _manifest("def"), False)
    note = check_judge_independence("reward_model", ["def"], _manifest("def"), True)
    assert note is not None and "not independent evidence" in note and "/runs/rm0" in note
    assert check_judge_independence("reward_model", ["abc"], _manifest("def"), False) is None
    assert check_judge_independence("reward_model", ["abc"], {"method": "sft"}, False) is None
    assert check_judge_independence("exact_match", [], _manifest("def"), False) is None


@pytest.fixture
async def gateway_with_rl_candidate(tiny_model, tmp_path):
    """A registry (fake engine) where acme v2 is an RL candidate trained against `rm/`."""
    reward = tmp_path / "rm"
    reward.mkdir()
    (reward / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}')
    server = await start_registry_server(tiny_model.base, tmp_path / "data")

    def register() -> None:
        with AdapterClient(server.target, actor="tests") as registry:
            registry.register("acme", tiny_model.adapters["alpha"])
            registry.set_alias("acme", "production", 1, force=True, reason="tests")
            registry.register(
                "acme", tiny_model.adapters["beta"], alias="candidate",
                metadata=_manifest(folder_digest(reward)),
            )  # fmt: skip

    await asyncio.to_thread(register)
    yield server, reward
    await server.stop()


async def test_the_gate_refuses_the_training_reward_model_as_judge_before_running(
    gateway_with_rl_candidate, tmp_path
):
    server, reward = gateway_with_rl_candidate
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "q{i}"}}\n' for i in range(4)))
    section = {"prompts": str(prompts), "judge": "reward_model",
               "judge_options": {"path": str(reward)}, "min_win_rate_lower_bound": 0.0,
               "sampling": {"temperature": 0.0, "max_tokens": 2}}  # fmt: skip
    policy = parse_policy({"preference": section})
    before = len(server.engine.seen)
    result = await asyncio.to_thread(run_gate, server.target, "acme@candidate", policy)
    assert (result.verdict, result.exit_code) == ("error", 2)
    assert "trained against" in result.report.error
    assert folder_digest(reward)[:12] in result.report.error  # named by the manifest's record
    assert len(server.engine.seen) == before  # refused before a single generation
    assert RewardModelJudge(reward).model_digests() == [folder_digest(reward)]


def test_the_lineage_reads_sft_then_reward_model_then_rl():
    manifest = {**_manifest("abcdef0123456789"), "init_from": "/runs/sft/adapter", "steps": 60}
    manifest["rl"]["beta"] = 0.04
    assert lineage(manifest) == [
        "started from the adapter /runs/sft/adapter",
        "reward: /runs/rm0/adapter (sha256 abcdef012345), weight 1.0",
        "trained: rl (grpo, KL beta 0.04), 60 steps",
    ]
    assert lineage({"method": "sft", "steps": 10}) == ["trained: sft, 10 steps"]
    assert lineage({}) == []  # an adapter registered without a trainer manifest
