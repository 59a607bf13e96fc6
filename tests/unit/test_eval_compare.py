"""Preference comparisons without a gateway: a fake `generate` coroutine stands in for it."""

from __future__ import annotations

import asyncio
import csv
import json
import time
from pathlib import Path

import pytest

from evalsuite.compare import (
    ComparisonResult,
    Pair,
    PromptItem,
    compare,
    generate_pairs,
    load_prompts,
)
from evalsuite.errors import DeadlineExceeded, EvalError, EvalInputError
from evalsuite.fanout import DEFAULT_TIMEOUT_S
from evalsuite.human import export_for_rating, load_key, load_votes, score_votes
from evalsuite.judges import JUDGES, Judge, judge_class, make_judge
from evalsuite.judges.llm import LLMJudge
from evalsuite.judges.reward import RewardModelJudge
from loraplex.v1 import generation_pb2 as pb
from tests.support.registry_server import start_registry_server

VERSIONS = {"": ("", 0), "acme@candidate": ("acme", 3), "acme": ("acme", 2), "judge": ("j", 1)}


class FakeGateway:
    """Answers `generate` like the gateway would; `answer(prompt, adapter)` makes the text."""

    def __init__(self, answer=None, versions=None, delay: float = 0.0) -> None:
        self.answer = answer or (lambda prompt, adapter: f"{adapter or 'base'}: {prompt}")
        self.versions = versions or VERSIONS
        self.delay = delay
        self.calls: list[tuple[str, str, dict]] = []
        self.in_flight = self.max_in_flight = 0

    async def generate(self, prompt: str, adapter: str = "", **options) -> pb.GenerateResponse:
        self.calls.append((prompt, adapter, options))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            name, version = self.versions[adapter]
            return pb.GenerateResponse(
                text=self.answer(prompt, adapter),
                finish_reason=pb.FINISH_REASON_EOS,
                adapter=pb.ServedAdapter(name=name, version=version),
            )
        finally:
            self.in_flight -= 1


def items(n: int, reference: bool = False) -> list[PromptItem]:
    return [
        PromptItem(id=f"p{i}", prompt=f"question {i}", reference=f"ref {i}" if reference else None)
        for i in range(n)
    ]


def pair(id_: str, candidate: str, baseline: str, reference: str | None = None) -> Pair:
    return Pair(id_, f"prompt {id_}", reference, candidate, baseline, "acme@v3", "acme@v2")


def judge_now(judge: Judge, pairs: list[Pair]) -> list:
    return asyncio.run(judge.judge(pairs))


# ---------------------------------------------------------------- prompt sets


def test_load_prompts_reads_ids_references_and_line_number_ids(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "Q1", "id": "a", "reference": "R1"}\n'
        "\n"
        '{"prompt": "Q2"}\n'
        '{"prompt": "Q3", "id": 7, "reference": null}\n'
    )
    loaded = load_prompts(path)
    assert [(p.id, p.prompt, p.reference) for p in loaded] == [
        ("a", "Q1", "R1"),
        ("3", "Q2", None),
        ("7", "Q3", None),
    ]
    assert loaded[1].source == f"{path}:3"


def test_load_prompts_reports_every_bad_line_as_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "ok", "id": "x"}\n'
        "not json\n"
        '{"id": "y"}\n'
        '{"prompt": "Q", "refrence": "typo"}\n'
        '{"prompt": "Q", "reference": 3}\n'
        '{"prompt": "  "}\n'
        '{"prompt": "Q", "id": "x"}\n'
        '["prompt"]\n'
        '{"prompt": "Q", "id": true}\n'
    )
    with pytest.raises(EvalInputError) as e:
        load_prompts(path)
    lines = str(e.value).splitlines()
    assert lines == [
        f"{path}:2: not valid JSON (Expecting value)",
        f"{path}:3: missing key 'prompt'",
        f"{path}:4: unknown key(s) ['refrence']; expected ['id', 'prompt', 'reference']",
        f"{path}:5: 'reference' must be a string or null",
        f"{path}:6: 'prompt' must be a non-empty string",
        f"{path}:7: duplicate id 'x' (first on line 1)",
        f"{path}:8: expected a JSON object, got list",
        f"{path}:9: 'id' must be a non-empty string or an integer",
    ]
    assert isinstance(e.value, ValueError)


def test_load_prompts_refuses_an_empty_or_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalInputError, match=r"empty\.jsonl: no prompts"):
        load_prompts(tmp_path / "empty.jsonl")
    with pytest.raises(EvalInputError, match=r"missing\.jsonl: cannot read"):
        load_prompts(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- generating pairs


async def test_generate_pairs_sends_both_systems_the_same_options_concurrently():
    fake = FakeGateway(delay=0.01)
    sampling = {"temperature": 0.7, "seed": 11, "max_tokens": 5, "stop": ["\n"]}
    pairs = await generate_pairs(
        None, "acme@candidate", "", items(10), sampling, concurrency=4,
        generate=fake.generate, progress=False,
    )  # fmt: skip
    assert [p.id for p in pairs] == [f"p{i}" for i in range(10)]
    assert pairs[3].candidate == "acme@candidate: question 3"
    assert pairs[3].baseline == "base: question 3"
    assert {(p.candidate_version, p.baseline_version) for p in pairs} == {("acme@v3", "base")}
    assert len(fake.calls) == 20 and all(options == sampling for _, _, options in fake.calls)
    assert fake.max_in_flight == 4  # bounded, and really concurrent


async def test_generate_pairs_refuses_unknown_options_before_any_request():
    fake = FakeGateway()
    with pytest.raises(EvalInputError, match=r"unknown sampling option\(s\) \['temprature'\]"):
        await generate_pairs(None, "acme", "", items(2), {"temprature": 0}, generate=fake.generate)
    assert fake.calls == []


async def test_a_failed_request_propagates_as_itself_and_cancels_the_rest():
    class Unavailable(Exception):
        pass

    cancelled = []

    async def generate(prompt, adapter="", **options):
        if prompt == "question 0":
            await asyncio.sleep(0.01)
            raise Unavailable("gateway down")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(prompt)
            raise

    with pytest.raises(Unavailable, match="gateway down"):
        await generate_pairs(None, "acme", "", items(4), {}, generate=generate, progress=False)
    assert len(cancelled) == 6  # both answers to question 0 failed; the rest were aborted


async def test_an_alias_moving_mid_run_or_a_failed_completion_is_an_error():
    moves = iter(range(100))

    async def moving(prompt, adapter="", **options):
        # production moves from v2 to v3 and back, call after call
        version = 2 + next(moves) % 2 if adapter == "acme" else 0
        return pb.GenerateResponse(
            text="x", adapter=pb.ServedAdapter(name=adapter, version=version)
        )

    with pytest.raises(EvalError, match=r"'acme' was served by several versions"):
        await generate_pairs(None, "acme", "", items(4), {}, generate=moving, progress=False)

    async def failing(prompt, adapter="", **options):
        return pb.GenerateResponse(text="par", finish_reason=pb.FINISH_REASON_ERROR)

    with pytest.raises(EvalError, match="ended with ERROR"):
        await generate_pairs(None, "acme", "", items(1), {}, generate=failing, progress=False)


async def test_compare_summarises_the_judges_outcomes_as_json():
    # The candidate answers the reference on even prompts; the baseline never does.
    def answer(prompt: str, adapter: str) -> str:
        i = int(prompt.split()[-1])
        return f"ref {i}" if adapter == "acme@candidate" and i % 2 == 0 else "nope"

    fake = FakeGateway(answer)
    result = await compare(
        None, "acme@candidate", "acme", items(6, reference=True), make_judge("exact_match"),
        {"temperature": 0.0}, generate=fake.generate, progress=False, resamples=200,
    )  # fmt: skip
    assert isinstance(result, ComparisonResult)
    assert result.outcomes == [1.0, 0.5, 1.0, 0.5, 1.0, 0.5]
    summary = result.summary
    assert (summary.n, summary.wins, summary.ties, summary.losses) == (6, 3, 3, 0)
    report = json.loads(json.dumps(result.to_dict()))
    assert report["candidate_version"] == "acme@v3" and report["baseline_version"] == "acme@v2"
    assert report["judge"] == "exact_match" and report["summary"]["win_rate"] == 0.75
    assert report["pairs"][0]["judge"] == {"candidate_correct": True, "baseline_correct": False}
    assert report["pairs"][0]["outcome"] == 1.0 and report["pairs"][0]["reference"] == "ref 0"


async def test_compare_refuses_a_reference_judge_without_references_before_generating(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Q1", "reference": "R"}\n{"prompt": "Q2"}\n')
    fake = FakeGateway()
    with pytest.raises(EvalInputError, match=rf"'rouge_l' needs a 'reference'.*{path}:2"):
        await compare(None, "acme", "", load_prompts(path), make_judge("rouge_l"), {},
                      generate=fake.generate)  # fmt: skip
    assert fake.calls == []


# ---------------------------------------------------------------- reference judges


def test_exact_match_ties_when_both_right_or_both_wrong():
    judgements = judge_now(
        make_judge("exact_match"),
        [
            pair("right-wrong", " Blue\n", "red", reference="blue"),
            pair("wrong-right", "red", "blue", reference="blue"),
            pair("both-right", "BLUE", "  blue ", reference="blue"),
            pair("both-wrong", "red", "green", reference="blue"),
            pair("spaces", "dark   blue", "dark\tblue", reference="dark blue"),
        ],
    )
    assert [j.outcome for j in judgements] == [1.0, 0.0, 0.5, 0.5, 0.5]
    assert judgements[0].detail == {"candidate_correct": True, "baseline_correct": False}
    with pytest.raises(EvalInputError, match=r"needs a reference answer; pairs without: 'x'"):
        judge_now(make_judge("exact_match"), [pair("x", "a", "b")])


def test_rouge_l_higher_wins_and_equal_scores_tie():
    judge = make_judge("rouge_l")
    ref = "the cat sat on the mat"
    judgements = judge_now(
        judge,
        [
            pair("closer", "the cat sat on a mat", "a dog ran", reference=ref),
            pair("farther", "a dog ran", "the cat sat on a mat", reference=ref),
            pair("same-words", "the cat sat", "The cat, sat!", reference=ref),  # same tokens
            pair("both-zero", "xyz", "qqq", reference=ref),
        ],
    )
    assert [j.outcome for j in judgements] == [1.0, 0.0, 0.5, 0.5]
    detail = judgements[0].detail
    assert detail["candidate_rouge_l"] == pytest.approx(5 / 6)
    assert detail["baseline_rouge_l"] == 0.0
    # A tolerance turns a small difference into a tie.
    near = [pair("near", "the cat sat on the mat ok", "the cat sat on the mat", reference=ref)]
    assert judge_now(make_judge("rouge_l"), near)[0].outcome == 0.0
    assert judge_now(make_judge("rouge_l", tolerance=0.2), near)[0].outcome == 0.5


# ---------------------------------------------------------------- reward model judge


class TableRewardJudge(RewardModelJudge):
    """The reward judge's logic over a fixed reward table instead of a model."""

    def __init__(self, rewards: dict[str, float], tmp: Path, **options) -> None:
        (tmp / "adapter_config.json").write_text("{}")
        super().__init__(tmp, **options)
        self.rewards = rewards

    def scores(self, prompts, answers):
        return [self.rewards[a] for a in answers]


def test_reward_judge_higher_reward_wins_with_tolerance_and_identical_ties(tmp_path):
    judge = TableRewardJudge({"good": 2.0, "bad": -1.0, "ok": 1.9}, tmp_path, tolerance=0.5)
    pairs = [pair("1", "good", "bad"), pair("2", "bad", "good"), pair("3", "good", "ok")]
    pairs.append(pair("4", "good", "good"))
    judgements = judge_now(judge, pairs)
    assert [j.outcome for j in judgements] == [1.0, 0.0, 0.5, 0.5]
    assert judgements[0].detail == {
        "candidate_reward": 2.0,
        "baseline_reward": -1.0,
        "identical": False,
    }
    assert judgements[3].detail["identical"] is True
    with pytest.raises(EvalInputError, match="neither a reward adapter folder nor a model folder"):
        make_judge("reward_model", path=tmp_path / "nothing")


# ---------------------------------------------------------------- LLM judge


def answers_in(judge_prompt: str) -> tuple[str, str]:
    """Answer A and answer B as the default template shows them."""
    a = judge_prompt.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
    b = judge_prompt.split("Answer B:\n")[1].split("\n\nReply with")[0]
    return a, b


def test_llm_judge_that_always_says_a_makes_every_pair_a_tie():
    fake = FakeGateway(answer=lambda prompt, adapter: " A")
    judge = make_judge("llm_judge", adapter="judge", generate=fake.generate, progress=False)
    pairs = [pair("1", "long answer here", "short"), pair("2", "x", "y z")]
    judgements = judge_now(judge, pairs)
    assert [j.outcome for j in judgements] == [0.5, 0.5]
    detail = judgements[0].detail
    assert detail["candidate_as_a"] == {"reply": " A", "verdict": "A"}
    assert detail["candidate_as_b"] == {"reply": " A", "verdict": "A"}
    assert detail["consistent"] is False and detail["judge_version"] == "j@v1"
    # Both orders were asked, greedily, of the judge reference.
    assert len(fake.calls) == 4
    assert {(adapter, o["temperature"]) for _, adapter, o in fake.calls} == {("judge", 0.0)}
    shown = [answers_in(prompt) for prompt, _, _ in fake.calls[:2]]
    assert shown == [("long answer here", "short"), ("short", "long answer here")]


def test_llm_judge_that_prefers_the_longer_answer_gives_consistent_verdicts():
    def longer(prompt: str, adapter: str) -> str:
        a, b = answers_in(prompt)
        return "B is better" if len(b) > len(a) else "A, clearly"

    fake = FakeGateway(answer=longer)
    judge = LLMJudge(adapter="judge", generate=fake.generate, progress=False)
    pairs = [pair("win", "a long answer", "short"), pair("loss", "tiny", "much longer")]
    judgements = judge_now(judge, pairs)
    assert [j.outcome for j in judgements] == [1.0, 0.0]
    assert judgements[0].detail["candidate_as_a"]["verdict"] == "A"
    assert judgements[0].detail["candidate_as_b"]["verdict"] == "B"
    assert judgements[1].detail["consistent"] is True


def test_llm_judge_parsing_first_token_regex_and_unparseable():
    judge = LLMJudge(generate=FakeGateway().generate)
    assert judge.verdict("A") == "A"
    assert judge.verdict(" B.") == "B"
    assert judge.verdict("Answer B is better than A") == "B"  # the first standalone A/B
    assert judge.verdict("a bad answer, both") is None  # lower-case "a" is not a verdict
    assert judge.verdict("") is None
    custom = LLMJudge(parse=r"Winner:\s*(\w+)", generate=FakeGateway().generate)
    assert custom.verdict("A is long. Winner: b") == "B"
    assert custom.verdict("Winner: neither") is None
    # A few unparseable replies are ties; a judge that mostly cannot answer is an error (else
    # every pair would tie and a win rate of 0.5 would look like evidence).
    replies = iter(["I cannot decide", "B", "A", "A", "A", "B"])
    fake = FakeGateway(answer=lambda prompt, adapter: next(replies))
    judge = LLMJudge(adapter="judge", generate=fake.generate, progress=False, concurrency=1,
                     max_unparseable=0.2)  # fmt: skip
    judgements = judge_now(judge, [pair("1", "x", "y"), pair("2", "x", "z"), pair("3", "w", "y")])
    assert (
        judgements[0].outcome == 0.5 and judgements[0].detail["candidate_as_a"]["verdict"] is None
    )
    mute = FakeGateway(answer=lambda prompt, adapter: "I cannot decide")
    broken = LLMJudge(adapter="judge", generate=mute.generate, progress=False)
    with pytest.raises(EvalError, match="gave no A/B verdict in 2 of 2 replies"):
        judge_now(broken, [pair("1", "x", "y")])
    with pytest.raises(EvalInputError, match="parse is not a valid regex"):
        LLMJudge(parse="(unclosed")


def test_llm_judge_does_not_ask_about_identical_answers():
    fake = FakeGateway(answer=lambda prompt, adapter: "A")
    judge = LLMJudge(adapter="judge", generate=fake.generate, progress=False)
    assert judge_now(judge, [pair("1", "same", "same")])[0].detail == {"identical": True}
    assert fake.calls == []


def test_llm_judge_templates_are_checked_up_front():
    with pytest.raises(EvalInputError, match=r"unknown template field\(s\) \['answer_c'\]"):
        LLMJudge(template="{prompt} {answer_a} {answer_c}")
    with pytest.raises(EvalInputError, match="must show both"):
        LLMJudge(template="{prompt} {answer_a}")
    with pytest.raises(EvalInputError, match="bad Jinja2 template"):
        LLMJudge(template="{{ answer_a ", template_format="jinja")
    jinja = LLMJudge(
        template="Q: {{ prompt }}\n1) {{ answer_a }}\n2) {{ answer_b }}\nRef: {{ reference }}",
        template_format="jinja",
    )
    assert jinja.needs_reference and not LLMJudge().needs_reference
    rendered = jinja.render(pair("1", "cand", "base", reference="R"), candidate_first=False)
    assert rendered == "Q: prompt 1\n1) base\n2) cand\nRef: R"
    plain = LLMJudge(template="{prompt}|{answer_a}|{answer_b}")
    assert plain.render(pair("1", "c {x}", "b"), candidate_first=True) == "prompt 1|c {x}|b"


# ---------------------------------------------------------------- the registry


def test_registry_names_import_lazily_and_errors_list_what_exists():
    assert {"exact_match", "rouge_l", "reward_model", "llm_judge"} <= set(JUDGES)
    for name in JUDGES:
        cls = judge_class(name)
        assert issubclass(cls, Judge) and cls.name == name
    with pytest.raises(EvalInputError, match="unknown judge 'bleu'; known judges: exact_match, "):
        make_judge("bleu")
    with pytest.raises(EvalInputError, match=r"'rouge_l': .*'tolrance'.*takes: tolerance=1e-06"):
        make_judge("rouge_l", tolrance=0.1)
    with pytest.raises(EvalInputError, match=r"'reward_model': .*'path'.*takes: path, base=None"):
        make_judge("reward_model")
    # An import string names a judge outside the registry.
    judge = make_judge("evalsuite.judges.reference:RougeLJudge", tolerance=0.1)
    assert judge.name == "rouge_l" and judge.config()["tolerance"] == 0.1
    with pytest.raises(EvalInputError, match="cannot import it"):
        make_judge("evalsuite.nowhere:Judge")
    with pytest.raises(EvalInputError, match="not a subclass"):
        make_judge("evalsuite.compare:Pair")


# ---------------------------------------------------------------- deadlines


@pytest.fixture
async def slow_gateway(tiny_model, tmp_path):
    """An in-process gateway (real gRPC, fake engine) whose every generation takes 10 s."""
    server = await start_registry_server(tiny_model.base, tmp_path / "data")
    generate = server.engine.generate

    async def slow_generate(request, stream):
        await asyncio.sleep(10)
        async for chunk in generate(request, stream):
            yield chunk

    server.engine.generate = slow_generate
    yield server
    await server.stop()


async def test_generations_and_judge_requests_through_the_gateway_have_a_deadline(slow_gateway):
    target, started = slow_gateway.target, time.monotonic()
    message = r"gateway 127\.0\.0\.1:\d+: a generation with 'base' got no answer within its 0\.2 s"
    with pytest.raises(DeadlineExceeded, match=message):
        await generate_pairs(
            target, "", "", items(2), {"max_tokens": 2}, timeout=0.2, progress=False
        )
    judge = make_judge("llm_judge", gateway=target, deadline=0.2, template="{answer_a}|{answer_b}",
                       progress=False)  # fmt: skip
    with pytest.raises(DeadlineExceeded, match=message):
        await judge.judge([pair("1", "x", "y")])
    assert time.monotonic() - started < 5  # neither waited for the slow engine


def test_judges_that_ask_the_gateway_always_have_a_deadline():
    assert LLMJudge().timeout == DEFAULT_TIMEOUT_S
    assert make_judge("llm_judge", deadline=5).timeout == 5
    assert make_judge("llm_judge", deadline=5, timeout=7).timeout == 7  # its own option wins
    assert make_judge("rouge_l", deadline=5).config() == make_judge("rouge_l").config()
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(EvalInputError, match="llm_judge: timeout must be a positive number"):
            LLMJudge(timeout=bad)


# ---------------------------------------------------------------- human ratings


def exported(tmp_path: Path, n: int = 12, seed: int = 0):
    pairs = [pair(f"q{i}", f"cand answer {i}", f"base answer {i}", "ref") for i in range(n)]
    return pairs, export_for_rating(pairs, tmp_path / "raters", tmp_path / "key.json", seed=seed)


def test_human_export_is_blinded_and_seeded(tmp_path):
    pairs, export = exported(tmp_path)
    for path in (export.jsonl, export.csv):
        text = path.read_text()
        assert "acme" not in text and "v3" not in text and "candidate" not in text
        assert "baseline" not in text
    rows = [json.loads(line) for line in export.jsonl.open()]
    assert list(rows[0]) == ["id", "export", "prompt", "reference", "answer_a", "answer_b", "vote"]
    assert all(r["vote"] == "" and r["export"] == export.export_id for r in rows)
    key = load_key(export.key)
    sides = key["candidate_side"]
    assert set(sides.values()) == {"A", "B"}  # a per-pair order, not one fixed side
    for row in rows:
        answer = row["answer_a"] if sides[row["id"]] == "A" else row["answer_b"]
        assert answer.startswith("cand answer")
    assert key["candidate_versions"] == ["acme@v3"] and key["baseline_versions"] == ["acme@v2"]
    with export.csv.open(newline="") as f:
        assert [r["answer_a"] for r in csv.DictReader(f)] == [r["answer_a"] for r in rows]
    _, again = exported(tmp_path / "again")
    assert load_key(again.key)["candidate_side"] == sides
    _, other = exported(tmp_path / "other", seed=1)
    assert load_key(other.key)["candidate_side"] != sides
    with pytest.raises(EvalInputError, match="keep the key outside"):
        export_for_rating(pairs, tmp_path / "raters", tmp_path / "raters" / "key.json")


def test_human_votes_round_trip_through_the_key_to_outcomes(tmp_path):
    _, export = exported(tmp_path, n=6)
    sides = load_key(export.key)["candidate_side"]
    flip = {"A": "B", "B": "A"}
    # Filled-in JSONL: candidate preferred on q0-q2, baseline on q3, tie on q4, q5 unrated.
    wanted = {"q0": "cand", "q1": "cand", "q2": "cand", "q3": "base", "q4": "tie", "q5": ""}
    rows = [json.loads(line) for line in export.jsonl.open()]
    for row in rows:
        choice, side = wanted[row["id"]], sides[row["id"]]
        row["vote"] = {"cand": side, "base": flip[side], "tie": "TIE", "": ""}[choice].lower()
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = score_votes(votes, export.key, resamples=100)
    assert result.ids == ["q0", "q1", "q2", "q3", "q4"] and result.unrated == ["q5"]
    assert result.outcomes == [1.0, 1.0, 1.0, 0.0, 0.5]
    assert (result.summary.wins, result.summary.losses, result.summary.ties) == (3, 1, 1)
    assert json.loads(json.dumps(result.to_dict()))["pairs"][3]["votes"] == {
        "candidate": 0,
        "baseline": 1,
        "tie": 0,
    }


def test_several_raters_reduce_to_a_strict_majority_per_pair(tmp_path):
    _, export = exported(tmp_path, n=4)
    sides = load_key(export.key)["candidate_side"]
    cand = {i: s for i, s in sides.items()}
    base = {i: {"A": "B", "B": "A"}[s] for i, s in sides.items()}
    ballots = {  # three raters per pair
        "q0": [cand["q0"], cand["q0"], base["q0"]],  # 2 of 3 for the candidate: win
        "q1": [cand["q1"], "tie", "tie"],  # no majority for a side: tie
        "q2": [base["q2"], base["q2"], "tie"],  # loss
        "q3": [cand["q3"], base["q3"], "tie"],  # tie
    }
    votes = tmp_path / "votes.csv"
    with votes.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rater", "id", "vote"])
        for id_, marks in ballots.items():
            writer.writerows([f"r{k}", id_, mark] for k, mark in enumerate(marks))
    result = score_votes(votes, export.key, resamples=100)
    assert result.outcomes == [1.0, 0.5, 0.0, 0.5]
    assert result.summary.n == 4  # the pair is the unit, not the 12 votes
    # The same votes split into one file per rater give the same outcomes.
    per_rater = []
    for k in range(3):
        path = tmp_path / f"rater{k}.jsonl"
        lines = [json.dumps({"id": i, "vote": marks[k]}) for i, marks in ballots.items()]
        path.write_text("\n".join(lines) + "\n")
        per_rater.append(path)
    assert score_votes(per_rater, export.key, resamples=100).outcomes == result.outcomes


def test_bad_votes_are_reported_with_file_and_line(tmp_path):
    _, export = exported(tmp_path, n=3)
    votes = tmp_path / "votes.csv"
    votes.write_text(
        "id,rater,vote,comment\n"
        'q0,ann,A,"spans\ntwo lines"\n'
        "q1,ann,C,\n"
        "q0,ann,B,\n"
        ",bob,A,\n"
        "q2,bob,,not rated yet\n"
    )
    with pytest.raises(EvalInputError) as e:
        load_votes(votes)
    assert str(e.value).splitlines() == [
        f"{votes}:4: vote must be A, B or tie, got 'C'",
        f"{votes}:5: 'ann' already voted on 'q0' at {votes}:2",
        f"{votes}:6: missing 'id'",
    ]
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"id": "q0", "vote": "a"}\n{"id": "q9", "vote": "b"}\n')
    with pytest.raises(EvalInputError, match=rf"{unknown}:2: unknown pair id 'q9'"):
        score_votes(unknown, export.key)
    with pytest.raises(EvalInputError, match=r"nokey\.json: key file not found"):
        score_votes(unknown, tmp_path / "nokey.json")
    (tmp_path / "nocol.csv").write_text("id,choice\nq0,A\n")
    with pytest.raises(EvalInputError, match=r"nocol.csv:1: missing column\(s\) \['vote'\]"):
        load_votes(tmp_path / "nocol.csv")
    with pytest.raises(EvalInputError, match=r"votes.txt: votes must be a \.csv or \.jsonl"):
        load_votes(tmp_path / "votes.txt")


def test_votes_from_another_export_are_refused(tmp_path):
    _, first = exported(tmp_path / "one", n=3)
    _, second = exported(tmp_path / "two", n=3, seed=5)
    rows = [json.loads(line) | {"vote": "A"} for line in first.jsonl.open()]
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvalInputError, match=rf"{votes}:1: rated export '{first.export_id}'"):
        score_votes(votes, second.key)


def test_csv_export_defuses_spreadsheet_formulas(tmp_path):
    pairs = [pair("f", '=HYPERLINK("http://x")', "-1 is fine")]
    export = export_for_rating(pairs, tmp_path / "raters", tmp_path / "key.json")
    with export.csv.open(newline="") as f:
        row = next(csv.DictReader(f))
    assert {row["answer_a"], row["answer_b"]} == {'\'=HYPERLINK("http://x")', "'-1 is fine"}
    jsonl = json.loads(export.jsonl.read_text())
    assert {jsonl["answer_a"], jsonl["answer_b"]} == {pairs[0].candidate, pairs[0].baseline}
