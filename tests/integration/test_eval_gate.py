"""The eval suite end to end: real training, the real gateway (vLLM) and real lm-eval.

Two adapters are trained on the colors task (examples/colors): a good one and one trained on
shuffled answers. The gate must pass and promote the first and block the second, the registry
must show exactly that, and no failure may ever promote. The lm-eval backend's scores must agree
with lm-eval's own `hf` backend on the same base + adapter (faithfulness).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.tasks import TaskManager

import evalsuite  # noqa: F401  (registers the loraplex lm-eval model)
from evalsuite.gate import run_gate
from evalsuite.judges import WIN, Judge, Judgement
from evalsuite.policy import load_policy
from gateway.client import AdapterClient
from gateway.process import free_port
from loraplex.v1 import adapters_pb2 as apb
from tests.support.cli import run_loraplex
from trainer.config import load_config
from trainer.run import run_training

EXAMPLES = Path(__file__).parents[2] / "examples" / "colors"
POLICY = EXAMPLES / "gate.yaml"
TASKS = EXAMPLES / "tasks"
MIN_SAME_CHOICE = 0.95  # documents whose multiple-choice pick is the same in both backends
LOGPROB_TOLERANCE = 1e-3  # nats, per choice: float32 on both sides, different kernels
PPL_RELATIVE_TOLERANCE = 1e-3


def _train(yaml_name: str, base: Path, out: Path, *overrides: str) -> Path:
    config = load_config(
        "sft",
        EXAMPLES / f"{yaml_name}.yaml",
        [f"output_dir={out}", f"model.path={base}", *overrides],
    )
    result = run_training(config, echo=lambda _: None)
    assert result.adapter_dir is not None
    return result.adapter_dir


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A good colors adapter (LoRA SFT) and a bad one (shuffled answers), trained once."""
    runs = tmp_path_factory.mktemp("eval-runs")
    return {
        "good": _train("sft", tiny_model.base, runs / "good"),
        "bad": _train("shuffled", tiny_model.base, runs / "bad", "training.max_steps=60"),
    }


def _gate(target: str, adapter: str, out: Path, *extra: str, policy: Path = POLICY):
    return run_loraplex(
        "eval", "gate", "--target", target, "--adapter", adapter, "--policy", str(policy),
        "--out", str(out), *extra,
    )  # fmt: skip


def _verdicts(registry: AdapterClient, name: str) -> dict[int, list[int]]:
    return {
        v.version: [e.verdict for e in v.evaluations if e.suite == "gate"]
        for v in registry.get(name).versions
    }


def test_gate_passes_the_good_adapter_and_blocks_the_bad_one(gateway, adapters, tmp_path):
    with AdapterClient(gateway.target, actor="tests") as registry:
        registry.upload("gate-colors", adapters["good"], alias="candidate")
        passed = _gate(gateway.target, "gate-colors@candidate", tmp_path / "good", "--promote")
        assert passed.returncode == 0, passed.stdout[-3000:] + passed.stderr[-3000:]
        assert "verdict: PASS for gate-colors@v1" in passed.stdout
        assert "promoted: gate-colors production -> v1" in passed.stdout
        assert registry.get("gate-colors").aliases["production"] == 1

        registry.upload("gate-colors", adapters["bad"], alias="candidate")
        blocked = _gate(gateway.target, "gate-colors@candidate", tmp_path / "bad", "--promote")
        assert blocked.returncode == 1, blocked.stdout[-3000:] + blocked.stderr[-3000:]
        assert "verdict: FAIL for gate-colors@v2" in blocked.stdout
        assert "[FAIL] colors_qa exact_match >= 0.5" in blocked.stdout
        assert "[FAIL] colors_qa exact_match vs production" in blocked.stdout
        assert "[FAIL] win rate CI low >= 0.5" in blocked.stdout
        assert "not promoted: verdict fail" in blocked.stderr + blocked.stdout

        adapter = registry.get("gate-colors")
        assert dict(adapter.aliases) == {"production": 1, "candidate": 2}
        assert _verdicts(registry, "gate-colors") == {1: [apb.VERDICT_PASS], 2: [apb.VERDICT_FAIL]}
        moves = registry.history("gate-colors", "production")
        assert [(m.from_version, m.to_version) for m in moves] == [(0, 1)]

    good = json.loads((tmp_path / "good" / "report.json").read_text())
    bad = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert good["verdict"] == "pass" and good["promotion"]["done"]
    assert all(c["passed"] for c in good["checks"])
    scores = {b["task"]: b["scores"] for b in bad["benchmarks"]}
    assert scores["colors_qa"]["candidate"] < 0.5 <= scores["colors_qa"]["production"]
    assert bad["preference"]["baseline_version"] == "gate-colors@v1"
    assert bad["preference"]["candidate_version"] == "gate-colors@v2"
    # pinned at the start: the base while there was no production, then v1
    assert good["baseline"] == {"requested": "production", "ref": "base", "version": None}
    assert bad["baseline"] == {"requested": "production", "ref": "gate-colors@v1", "version": 1}
    html = (tmp_path / "bad" / "report.html").read_text()
    assert "colors_qa" in html and "<svg" in html


def _write_policy(path: Path, **changes: object) -> Path:
    policy = yaml.safe_load(POLICY.read_text())
    policy["include_paths"] = [str(TASKS)]
    policy["preference"]["prompts"] = str(EXAMPLES / "prompts.jsonl")
    policy.update(changes)
    path.write_text(yaml.safe_dump(policy))
    return path


def test_errors_are_verdict_error_exit_2_and_promote_nothing(gateway, adapters, tmp_path):
    with AdapterClient(gateway.target, actor="tests") as registry:
        registry.upload("colors-err", adapters["good"], alias="candidate")

        down = _gate(f"127.0.0.1:{free_port()}", "colors-err@candidate", tmp_path / "down",
                     "--promote")  # fmt: skip
        assert down.returncode == 2 and "UNAVAILABLE" in down.stderr, down.stderr[-2000:]

        missing = _gate(gateway.target, "no-such-adapter@candidate", tmp_path / "missing",
                        "--promote")  # fmt: skip
        assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr, missing.stderr[-2000:]

        no_alias = _gate(gateway.target, "colors-err@staging", tmp_path / "no-alias",
                         "--promote")  # fmt: skip
        assert no_alias.returncode == 2 and "has no alias 'staging'" in no_alias.stderr

        broken_judge = _write_policy(
            tmp_path / "judge.yaml",
            benchmarks=[],
            preference={
                "prompts": str(EXAMPLES / "prompts.jsonl"),
                "judge": "reward_model",
                "judge_options": {"path": str(tmp_path / "no-reward-model")},
            },
        )
        judged = _gate(gateway.target, "colors-err@candidate", tmp_path / "judge", "--promote",
                       policy=broken_judge)  # fmt: skip
        assert judged.returncode == 2, judged.stdout[-2000:] + judged.stderr[-2000:]
        assert "no-reward-model" in judged.stderr and "verdict: ERROR" in judged.stdout
        report = json.loads((tmp_path / "judge" / "report.json").read_text())
        assert report["verdict"] == "error" and not report["promotion"]["done"]

        typo = tmp_path / "typo.yaml"
        typo.write_text("benchmarks:\n  - {task: colors_qa, metric: exact_match, treshold: 1}\n")
        bad_policy = _gate(
            gateway.target, "colors-err@candidate", tmp_path / "typo", "--promote", policy=typo
        )
        assert bad_policy.returncode == 2 and "did you mean 'threshold'" in bad_policy.stderr

        adapter = registry.get("colors-err")
        assert "production" not in adapter.aliases  # nothing was ever promoted
        # The one run that resolved the version recorded its error as such.
        assert _verdicts(registry, "colors-err") == {1: [apb.VERDICT_ERROR]}


class MovesProductionJudge(Judge):
    """Says the candidate wins everything, and meanwhile someone else promotes another version
    (a concurrent promotion the gate's compare-and-swap must not overwrite)."""

    name = "moves-production"

    def __init__(self, target: str, adapter: str, to_version: int) -> None:
        self.target, self.adapter, self.to_version = target, adapter, to_version

    async def judge(self, pairs: Sequence) -> list[Judgement]:
        with AdapterClient(self.target, actor="someone-else") as registry:
            registry.set_alias(self.adapter, "production", self.to_version, force=True,
                               reason="concurrent promotion")  # fmt: skip
        return [Judgement(WIN) for _ in pairs]


def test_a_concurrent_promotion_is_not_overwritten(gateway, adapters, tmp_path):
    with AdapterClient(gateway.target, actor="tests") as registry:
        for _ in range(3):
            registry.upload("colors-race", adapters["good"])
        registry.set_alias("colors-race", "production", 1, expected=0, force=True, reason="v1")
        registry.set_alias("colors-race", "candidate", 2)
        policy = _write_policy(
            tmp_path / "race.yaml",
            benchmarks=[],
            preference={
                "prompts": str(EXAMPLES / "prompts.jsonl"),
                "judge": f"{__name__}:MovesProductionJudge",
                "judge_options": {"adapter": "colors-race", "to_version": 3},
            },
        )
        result = run_gate(gateway.target, "colors-race@candidate", load_policy(policy),
                          tmp_path / "report", promote=True)  # fmt: skip
        assert result.verdict == "pass" and not result.promoted and result.exit_code == 2
        assert "FAILED_PRECONDITION" in result.report.promotion.error
        assert registry.get("colors-race").aliases["production"] == 3  # theirs, not ours


def _per_document(output: dict, task: str) -> list[list[float]]:
    """Per document, the summed logprob of every choice (or the rolling loglikelihood)."""
    docs = sorted(output["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in doc["filtered_resps"]] for doc in docs]


def test_gateway_scores_agree_with_lm_evals_hf_backend(gateway, adapters, tiny_model):
    """On the unquantized float32 base: the same per-document choices on >= 95% of documents,
    choice logprobs within 1e-3 nats, perplexity within 0.1%."""
    with AdapterClient(gateway.target, actor="tests") as registry:
        version = registry.upload("colors-faith", adapters["good"]).version
    manager = TaskManager(include_path=str(TASKS))
    tasks = ["colors_mc", "heldout_ppl"]
    common = {"tasks": tasks, "task_manager": manager, "log_samples": True, "bootstrap_iters": 0}
    served = lm_eval.simple_evaluate(
        model="loraplex",
        model_args=f"target={gateway.target},adapter=colors-faith@v{version}",
        **common,
    )
    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model.base},peft={adapters['good']},dtype=float32,device=cpu",
        batch_size=16,
        **common,
    )
    ours, theirs = _per_document(served, "colors_mc"), _per_document(reference, "colors_mc")
    same = [a.index(max(a)) == b.index(max(b)) for a, b in zip(ours, theirs, strict=True)]
    assert sum(same) / len(same) >= MIN_SAME_CHOICE
    for a, b in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=LOGPROB_TOLERANCE)
    acc = served["results"]["colors_mc"]["acc,none"]
    assert acc == reference["results"]["colors_mc"]["acc,none"] and acc > 0.5  # it learned
    ppl = served["results"]["heldout_ppl"]["word_perplexity,none"]
    assert ppl == pytest.approx(
        reference["results"]["heldout_ppl"]["word_perplexity,none"], rel=PPL_RELATIVE_TOLERANCE
    )


def test_compare_rank_and_human_votes_from_the_command_line(gateway, tiny_model, tmp_path):
    """`loraplex eval compare` (with a blinded export), `score-votes` and `rank` on served
    adapters: the human votes go through the key into the same statistics."""
    prompts = str(EXAMPLES / "prompts.jsonl")
    compared = run_loraplex(
        "eval", "compare", "--target", gateway.target, "--candidate", "alpha@v1",
        "--baseline", "base", "--prompts", prompts, "--judge", "rouge_l",
        "--sampling", "max_tokens=4",
        "--out", str(tmp_path / "cmp.json"), "--export-human", str(tmp_path / "raters"),
        "--key", str(tmp_path / "key.json"),
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr[-2000:]
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert result["candidate_version"] == "alpha@v1" and result["baseline_version"] == "base"
    assert len(result["pairs"]) == result["summary"]["n"] == 12
    for export in ("pairs.csv", "pairs.jsonl"):  # blinded: no system or version anywhere
        text = (tmp_path / "raters" / export).read_text()
        assert not any(word in text for word in ("alpha", "@v1", "candidate", "baseline"))

    key = json.loads((tmp_path / "key.json").read_text())
    votes = tmp_path / "votes.csv"
    votes.write_text("id,vote\n" + "".join(f"{i},A\n" for i in key["candidate_side"]))
    scored = run_loraplex("eval", "score-votes", str(votes), "--key", str(tmp_path / "key.json"),
                       "--out", str(tmp_path / "human.json"))  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    human = json.loads((tmp_path / "human.json").read_text())["summary"]
    wins = sum(side == "A" for side in key["candidate_side"].values())
    assert (human["wins"], human["losses"], human["ties"]) == (wins, 12 - wins, 0)

    ranked = run_loraplex(
        "eval", "rank", "alpha", "beta", "", "--target", gateway.target, "--prompts", prompts,
        "--sampling", "max_tokens=4", "--out", str(tmp_path / "rank.json"),
    )  # fmt: skip
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    ratings = json.loads((tmp_path / "rank.json").read_text())["ratings"]
    assert {r["system"] for r in ratings} == {"alpha", "beta", "base"}
    assert all(r["ci_low"] <= r["rating"] <= r["ci_high"] for r in ratings)

    bad = run_loraplex("eval", "compare", "--target", gateway.target, "--candidate", "alpha",
                    "--prompts", prompts, "--judge", "no-such-judge")  # fmt: skip
    assert bad.returncode == 2 and "unknown judge 'no-such-judge'" in bad.stderr
