"""The loop end to end on the real stack: traffic the gateway captured -> a judged comparison ->
preference pairs -> a reward model -> RL against it -> registered -> the gate, which refuses
that reward model as its judge and decides with an independent one.

The session's gateway (real vLLM engine, registry mode) captures every request. The judge of
the comparison is a reward model trained here on the colors pairs; the RL candidate's own reward
model is trained on the comparison's pairs. Runs are short: this checks that every step reads
what the one before wrote, on the real parts; learning is tested in test_trainer.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from evalsuite.compare import compare, load_prompts
from evalsuite.gate import run_gate
from evalsuite.judges import make_judge
from evalsuite.pairs import build_pairs, write_pairs
from evalsuite.policy import parse_policy
from gateway.capture import FILE_GLOB
from gateway.client import AdapterClient, AsyncClient
from gateway.contract import CANDIDATE, PRODUCTION, folder_digest
from tests.support.training import EXAMPLES, config_for
from trainer.run import run_training

pytestmark = pytest.mark.integration

SAMPLING = {"temperature": 0.0, "max_tokens": 4, "stop": ["\n"]}
SHORT = ("training.save_steps=1000", "data.eval_file=null")


def _captured(folder: Path, request_ids: set[str], timeout: float = 30) -> list[dict]:
    """The capture records of these requests, once the writer has written them all."""
    deadline = time.monotonic() + timeout
    while True:
        records = [json.loads(line) for f in sorted(folder.glob(FILE_GLOB)) for line in f.open()]
        mine = [r for r in records if r["id"] in request_ids]
        if len(mine) == len(request_ids) or time.monotonic() > deadline:
            return mine
        time.sleep(0.2)


async def _serve_traffic(target: str, prompts: list[str], adapter: str) -> set[str]:
    async with AsyncClient(target) as client:
        ids = {f"loop-{adapter}-{i}" for i in range(len(prompts))}
        await asyncio.gather(
            *[client.generate(p, adapter, request_id=f"loop-{adapter}-{i}", **SAMPLING)
              for i, p in enumerate(prompts)]
        )  # fmt: skip
    return ids


def test_captured_traffic_becomes_pairs_a_reward_model_an_rl_candidate_and_a_gate_verdict(
    gateway, tiny_model, tmp_path
):
    assert gateway.capture_dir is not None
    questions = [
        json.loads(line)["prompt"]
        for line in (EXAMPLES / "colors_eval.jsonl").read_text().splitlines()
        if line.strip()
    ]
    # 1. Served traffic, captured with the version that answered.
    ids = asyncio.run(_serve_traffic(gateway.target, questions, "alpha"))
    records = _captured(gateway.capture_dir, ids)
    assert len(records) == len(questions)
    assert {(r["adapter"], r["version"], r["requested"]) for r in records} == {
        ("alpha", 1, "alpha")
    }

    # This test's records (the session's folder holds every other test's traffic too).
    captured = tmp_path / "captured"
    captured.mkdir()
    (captured / "capture-loop.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    # 2. A judge: a reward model trained on the colors pairs (independent of what comes next).
    judge_run = run_training(
        config_for("reward", "reward", tiny_model.base, tmp_path / "judge", *SHORT,
                   "training.max_steps=40"),
        echo=lambda _: None,
    )  # fmt: skip
    judge = make_judge("reward_model", path=str(judge_run.adapter_dir))

    # 3. The captured prompts, answered by two versions and judged, become preference pairs.
    prompts = load_prompts(captured, captured_adapter="alpha")
    assert {p.prompt for p in prompts} == set(questions)
    judged = asyncio.run(
        compare(gateway.target, "alpha", "beta", prompts, judge, SAMPLING, 16, progress=False)
    )
    comparison = tmp_path / "comparison.json"
    comparison.write_text(json.dumps(judged.to_dict()))
    pairs = build_pairs([comparison], ties="keep")
    pairs_file, sidecar = write_pairs(pairs, tmp_path / "pairs.jsonl")
    assert len(pairs.rows) >= 2
    provenance = [json.loads(line) for line in sidecar.open()]
    assert {s["judge"] for p in provenance for s in p["sources"]} == {"reward_model"}

    # 4. A reward model on those pairs, and RL from alpha against it.
    reward_run = run_training(
        config_for("reward", "reward", tiny_model.base, tmp_path / "reward", *SHORT,
                   f"data.train=[{{path: {pairs_file}}}]", "training.max_steps=20"),
        echo=lambda _: None,
    )  # fmt: skip
    rl_run = run_training(
        config_for("rl", "rl", tiny_model.base, tmp_path / "rl", *SHORT,
                   f"lora.init_from={tiny_model.adapters['alpha']}",
                   f"rl.rewards=[{{reward_model: {reward_run.adapter_dir}}}]",
                   "training.max_steps=4"),
        echo=lambda _: None,
    )  # fmt: skip
    assert rl_run.manifest["rl"]["rewards"][0]["sha256"] == folder_digest(reward_run.adapter_dir)

    # 5. Registered as a candidate next to alpha's weights as production.
    with AdapterClient(gateway.target, actor="tests") as registry:
        registry.register("loop", str(tiny_model.adapters["alpha"]), owner="tests")
        registry.set_alias("loop", PRODUCTION, 1, expected=0, force=True, reason="loop test")
        candidate = registry.register(
            "loop", str(rl_run.adapter_dir), owner="tests", alias=CANDIDATE
        )
    section = {"prompts": str(captured), "judge": "reward_model",
               "sampling": SAMPLING, "min_win_rate_lower_bound": 0.0,
               "max_length_ratio": 3.0}  # fmt: skip

    # 6. The gate refuses the candidate's own reward model as judge, before anything runs ...
    own = parse_policy(
        {"preference": {**section, "judge_options": {"path": str(reward_run.adapter_dir)}}}
    )
    refused = run_gate(gateway.target, "loop@candidate", own, tmp_path / "refused")
    assert refused.verdict == "error" and "trained against" in refused.report.error
    # ... and decides with the independent one, the lineage in its report.
    independent = parse_policy(
        {"preference": {**section, "judge_options": {"path": str(judge_run.adapter_dir)}}}
    )
    result = run_gate(gateway.target, "loop@candidate", independent, tmp_path / "gate")
    report = result.report
    assert result.verdict in ("pass", "fail"), report.error
    assert (report.candidate or {}).get("version") == candidate.version
    assert report.preference is not None and report.preference["judge_independence"] == (
        "independent"
    )
    assert report.preference["summary"]["n"] == len(questions)
    assert any(step.startswith("reward: ") for step in report.lineage), report.lineage
    assert {c["kind"] for c in report.checks} == {"preference", "length_ratio"}
    html = (tmp_path / "gate" / "report.html").read_text()
    assert 'id="lineage"' in html and folder_digest(reward_run.adapter_dir)[:12] in html
