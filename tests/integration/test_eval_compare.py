"""Preference comparisons through the real gateway (the session's tiny adapters), and a reward
model judge trained here on examples/colors. The tiny adapters answer nonsense: the LLM-judge test
checks the mechanics (both orders asked, verdicts parsed as served), not the quality of judging."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from evalsuite.compare import Pair, PromptItem, compare, generate_pairs
from evalsuite.judges import make_judge
from evalsuite.judges.llm import LLMJudge
from gateway.client import Client
from trainer.config import load_config
from trainer.run import run_training

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).parents[2] / "examples" / "colors"
GREEDY = {"temperature": 0.0, "max_tokens": 12}
PROMPTS = [
    PromptItem(id="weather", prompt="The weather today is"),
    PromptItem(id="story", prompt="Once upon a time there was"),
    PromptItem(id="garden", prompt="The garden was full of"),
    PromptItem(id="baker", prompt="In the morning the baker"),
]


async def test_generate_pairs_matches_direct_calls_and_names_the_served_versions(gateway):
    pairs = await generate_pairs(
        gateway.target, "alpha", "beta@v1", PROMPTS, GREEDY, concurrency=3, progress=False
    )
    assert [p.id for p in pairs] == [p.id for p in PROMPTS]
    assert {(p.candidate_version, p.baseline_version) for p in pairs} == {("alpha@v1", "beta@v1")}
    with Client(gateway.target) as client:
        for item, p in zip(PROMPTS, pairs, strict=True):
            assert p.candidate == client.generate(item.prompt, "alpha", **GREEDY).text
            assert p.baseline == client.generate(item.prompt, "beta@v1", **GREEDY).text
    assert any(p.candidate != p.baseline for p in pairs)  # two different adapters


async def test_llm_judge_through_the_gateway_asks_both_orders(gateway):
    # gamma is a random tiny adapter: its replies are rarely A/B; this checks the mechanics.
    judge = LLMJudge(
        adapter="gamma", target=gateway.target, max_tokens=6, progress=False, max_unparseable=1
    )
    result = await compare(
        gateway.target, "alpha", "", PROMPTS, judge, GREEDY, resamples=200, progress=False
    )
    assert result.candidate_version == "alpha@v1" and result.baseline_version == "base"
    judged = zip(result.pairs, result.details, strict=True)
    asked = [(p, d) for p, d in judged if not d.get("identical")]
    assert asked, "alpha and the base should differ on some prompt"
    with Client(gateway.target) as client:
        for pair, detail in asked:
            assert detail["judge_version"] == "gamma@v1"
            for key, candidate_first in (("candidate_as_a", True), ("candidate_as_b", False)):
                prompt = judge.render(pair, candidate_first)
                reply = client.generate(prompt, "gamma", temperature=0.0, max_tokens=6).text
                assert detail[key] == {"reply": reply, "verdict": judge.verdict(reply)}
    for outcome, detail in zip(result.outcomes, result.details, strict=True):
        if detail.get("identical"):
            assert outcome == 0.5
            continue
        verdicts = (detail["candidate_as_a"]["verdict"], detail["candidate_as_b"]["verdict"])
        expected = {("A", "B"): 1.0, ("B", "A"): 0.0}.get(verdicts, 0.5)
        assert outcome == expected and detail["consistent"] == (expected != 0.5)
    report = json.loads(json.dumps(result.to_dict()))
    assert report["judge"] == "llm_judge" and report["judge_config"]["adapter"] == "gamma"
    assert report["summary"]["n"] == len(PROMPTS)


def test_reward_model_judge_prefers_the_chosen_answers(tiny_model, tmp_path):
    config = load_config(
        "reward",
        EXAMPLES / "reward.yaml",
        [f"output_dir={tmp_path}", f"model.path={tiny_model.base}"],
    )
    trained = run_training(config, echo=lambda _: None)
    rows = [json.loads(line) for line in (EXAMPLES / "pairs_eval.jsonl").open()]
    pairs = [
        Pair(str(i), r["prompt"], None, r["chosen"], r["rejected"], "chosen", "rejected")
        for i, r in enumerate(rows)
    ]
    judge = make_judge("reward_model", path=trained.adapter_dir, base=tiny_model.base)

    judgements = asyncio.run(judge.judge(pairs))
    wins = sum(j.outcome == 1.0 for j in judgements)
    losses = sum(j.outcome == 0.0 for j in judgements)
    assert wins > len(pairs) / 2 and wins > losses, (wins, losses)
    first = judgements[0].detail
    assert set(first) == {"candidate_reward", "baseline_reward", "identical"}
    # Swapping the sides swaps the outcomes: the rewards, not the position, decide.
    swapped = [
        Pair(p.id, p.prompt, None, p.baseline, p.candidate, "rejected", "chosen") for p in pairs
    ]
    back = asyncio.run(judge.judge(swapped))
    assert [1.0 - j.outcome for j in back] == [j.outcome for j in judgements]
