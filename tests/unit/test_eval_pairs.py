"""`eval pairs`: votes, compare and rank results become the preference data training reads; and
captured gateway traffic as a prompt set. No gateway: a fake `generate` answers."""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

import evalsuite.compare
import evalsuite.judges
from evalsuite.cli import eval_app
from evalsuite.compare import (
    ComparisonResult,
    Pair,
    PromptItem,
    load_prompt_source,
    load_prompts,
)
from evalsuite.errors import EvalInputError
from evalsuite.human import export_for_rating
from evalsuite.judges.base import Judge, Judgement
from evalsuite.pairs import build_pairs, detect_kind, provenance_path, write_pairs
from evalsuite.stats import summarize_pairwise
from loraplex.v1 import generation_pb2 as pb
from trainer.config import DatasetFile, DataSettings
from trainer.data import DataError, validate_files

runner = CliRunner()
VERSIONS = {"acme@candidate": ("acme", 3), "acme@production": ("acme", 2), "": ("", 0)}


def assert_trainable(path: Path) -> list[dict]:
    """trainer/data.py's own validation, for both methods that read preference pairs."""
    for method in ("dpo", "reward"):
        train, _ = validate_files(DataSettings(train=[DatasetFile(path=path)]), method)
        assert train[0][1] == "preference"
    rows = [json.loads(line) for line in path.open()]
    provenance = [json.loads(line) for line in provenance_path(path).open()]
    assert len(provenance) == len(rows)  # line-aligned sidecar
    assert [p["line"] for p in provenance] == list(range(1, len(rows) + 1))
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    return provenance


def comparison(outcomes: Sequence[float], answers: Sequence[tuple[str, str]]) -> dict:
    pairs = [
        Pair(str(i), f"prompt {i}", None, cand, base, "acme@v3", "acme@v2")
        for i, (cand, base) in enumerate(answers)
    ]
    result = ComparisonResult(
        "acme@candidate", "acme@production", {}, "length", pairs, list(outcomes),
        [{"n": i} for i in range(len(pairs))], summarize_pairwise(list(outcomes), resamples=100),
        {"tolerance": 0},
    )  # fmt: skip
    return {**result.to_dict(), "time": "2025-01-02T03:04:05+00:00"}


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


# win, tie, loss, identical answers (a tie), an empty answer
CASES = ([1.0, 0.5, 0.0, 0.5, 1.0], [("good", "bad"), ("x", "y"), ("worse", "better"),
                                     ("same", "same"), ("ok", " ")])  # fmt: skip


def test_compare_result_becomes_pairs_that_training_reads(tmp_path):
    source = write_json(tmp_path / "cmp.json", comparison(*CASES))
    assert detect_kind(source) == "compare"
    result = build_pairs([source])
    counts = result.counts[str(source)]
    assert (counts.judged, counts.written, counts.ties_dropped) == (5, 2, 1)
    assert (counts.identical, counts.empty) == (1, 1)
    assert result.rows == [
        {"prompt": "prompt 0", "chosen": "good", "rejected": "bad"},
        {"prompt": "prompt 2", "chosen": "better", "rejected": "worse"},  # a loss: baseline won
    ]
    out, _ = write_pairs(result, tmp_path / "pairs.jsonl")
    provenance = assert_trainable(out)
    first, second = (p["sources"][0] for p in provenance)
    assert first["kind"] == "compare" and first["judge"] == "length"
    assert first["judge_config"] == {"tolerance": 0} and first["prompt_id"] == "0"
    assert (first["chosen"], first["rejected"]) == ("acme@v3", "acme@v2")
    assert (second["chosen"], second["rejected"]) == ("acme@v2", "acme@v3")
    assert first["time"] == "2025-01-02T03:04:05+00:00" and first["file"] == str(source)
    assert provenance[0]["prompt_id"] == "0" and provenance[0]["tie"] is False


def test_ties_kept_are_written_in_both_orders_and_marked(tmp_path):
    source = write_json(tmp_path / "cmp.json", comparison(*CASES))
    result = build_pairs([source], ties="keep")
    assert result.counts[str(source)].ties_kept == 1
    ties = [(r, p) for r, p in zip(result.rows, result.provenance, strict=True) if p["tie"]]
    assert [(r["chosen"], r["rejected"]) for r, _ in ties] == [("x", "y"), ("y", "x")]
    assert [p["sources"][0]["tie"] for _, p in ties] == ["a>b", "b>a"]
    out, _ = write_pairs(result, tmp_path / "pairs.jsonl")
    assert_trainable(out)


def test_the_same_pair_from_two_inputs_is_written_once_with_both_sources(tmp_path):
    one = write_json(tmp_path / "one.json", comparison(*CASES))
    gate_report = {"started": "2025-02-01T00:00:00+00:00", "verdict": "pass", "policy": {},
                   "preference": comparison(*CASES)}  # fmt: skip
    two = write_json(tmp_path / "report.json", gate_report)
    result = build_pairs([one, two])
    assert len(result.rows) == 2 and result.counts[str(two)].merged == 2
    sources = result.provenance[0]["sources"]
    assert [s["file"] for s in sources] == [str(one), str(two)]
    assert sources[1]["time"] == "2025-02-01T00:00:00+00:00" and sources[1]["gate_verdict"]


def exported(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """An export of four pairs; returns (pairs.jsonl, key, candidate side per id)."""
    pairs = [
        Pair(str(i), f"question {i}", None, f"cand answer {i}", f"base answer {i}",
             "acme@v3", "acme@v2")
        for i in range(4)
    ]  # fmt: skip
    export = export_for_rating(pairs, tmp_path / "raters", tmp_path / "key.json")
    sides = json.loads(export.key.read_text())["candidate_side"]
    return export.jsonl, export.key, sides


def test_votes_unblinded_by_the_key_become_pairs(tmp_path):
    export, key, sides = exported(tmp_path)
    other = {"A": "B", "B": "A"}
    # pair 0: both prefer the candidate; 1: split (a tie); 2: baseline; 3: nobody voted.
    votes = {"0": [sides["0"], sides["0"]], "1": [sides["1"], other[sides["1"]]],
             "2": [other[sides["2"]], other[sides["2"]]]}  # fmt: skip
    files = []
    for n, rater in enumerate(("ann", "bob")):
        path = tmp_path / f"votes-{rater}.jsonl"
        rows = [json.loads(line) for line in export.open()]
        for row in rows:
            if row["id"] in votes:
                row["vote"], row["rater"] = votes[row["id"]][n], rater
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)
    assert detect_kind(files[0]) == "votes"
    result = build_pairs(files, key=key)
    counts = next(iter(result.counts.values()))
    assert (counts.kind, counts.judged, counts.written, counts.ties_dropped) == ("votes", 3, 2, 1)
    assert counts.unrated == 1
    assert result.rows == [
        {"prompt": "question 0", "chosen": "cand answer 0", "rejected": "base answer 0"},
        {"prompt": "question 2", "chosen": "base answer 2", "rejected": "cand answer 2"},
    ]
    out, _ = write_pairs(result, tmp_path / "pairs.jsonl")
    provenance = assert_trainable(out)
    source = provenance[0]["sources"][0]
    assert source["judge"] == "human" and source["texts_verified"] is True
    assert [r["rater"] for r in source["raters"]] == ["ann", "bob"]
    assert {r["vote"] for r in source["raters"]} == {"candidate"}
    assert (source["chosen"], source["rejected"]) == ("acme@v3", "acme@v2")
    assert source["time"] and source["export"] == json.loads(key.read_text())["export"]
    assert provenance[1]["sources"][0]["chosen"] == "acme@v2"


def test_votes_without_texts_take_them_from_the_export_and_edits_are_refused(tmp_path):
    export, key, sides = exported(tmp_path)
    votes = tmp_path / "votes.csv"
    with votes.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "vote"])
        writer.writerows([["0", sides["0"]], ["1", "tie"]])
    assert detect_kind(votes) == "votes"
    with pytest.raises(EvalInputError, match="--export"):
        build_pairs([votes], key=key)
    result = build_pairs([votes], key=key, export=[export])
    assert [r["chosen"] for r in result.rows] == ["cand answer 0"]
    edited = tmp_path / "edited.jsonl"
    edited.write_text(export.read_text().replace("base answer 3", "base answer 3!"))
    with pytest.raises(EvalInputError, match="not the ones export"):
        build_pairs([votes], key=key, export=[edited])


class LengthJudge(Judge):
    """The longer answer wins; equal lengths tie (no reference needed)."""

    name = "length"

    async def judge(self, pairs: Sequence[Pair]) -> list[Judgement]:
        def outcome(p: Pair) -> float:
            c, b = len(p.candidate), len(p.baseline)
            return 0.5 if c == b else 1.0 if c > b else 0.0

        return [Judgement(outcome(p), {"lengths": [len(p.candidate), len(p.baseline)]})
                for p in pairs]  # fmt: skip


@pytest.fixture
def fake_gateway(monkeypatch):
    """`compare` through a fake generate, and the length judge, for the CLI commands."""
    versions = {"acme@candidate": ("acme", 3), "acme@production": ("acme", 2),
                "acme@v1": ("acme", 1), "": ("", 0)}  # fmt: skip
    seen: list[str] = []

    async def generate(prompt: str, adapter: str = "", **options) -> pb.GenerateResponse:
        seen.append(prompt)
        name, version = versions[adapter]
        text = f"{prompt} " + "x" * (version if "tie" not in prompt else 1)
        served = pb.ServedAdapter(name=name, version=version)
        return pb.GenerateResponse(text=text, finish_reason=pb.FINISH_REASON_EOS, adapter=served)

    original = evalsuite.compare.compare
    patched = functools.partial(original, generate=generate, progress=False, resamples=100)
    monkeypatch.setattr(evalsuite.compare, "compare", patched)
    monkeypatch.setattr(evalsuite.judges, "make_judge", lambda name, **kw: LengthJudge())
    return seen


def test_rank_output_holds_the_judged_texts_and_becomes_pairs(tmp_path, fake_gateway):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "say"}\n{"prompt": "tie"}\n')
    ranked = tmp_path / "rank.json"
    args = [
        "rank",
        "acme@candidate",
        "acme@v1",
        "",
        "--prompts",
        str(prompts),
        "--out",
        str(ranked),
    ]
    result = runner.invoke(eval_app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(ranked.read_text())
    assert len(data["comparisons"]) == 3 and data["time"] and data["ratings"]
    assert detect_kind(ranked) == "rank"
    out = tmp_path / "pairs.jsonl"
    result = runner.invoke(eval_app, ["pairs", str(ranked), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "rank" in result.output and "3 identical answers dropped" in result.output
    provenance = assert_trainable(out)
    assert len(provenance) == 3  # "say" in each of the three games; "tie" answers are identical
    versions = {(p["sources"][0]["chosen"], p["sources"][0]["rejected"]) for p in provenance}
    assert versions == {("acme@v3", "acme@v1"), ("acme@v3", "base"), ("acme@v1", "base")}
    assert all(p["sources"][0]["kind"] == "rank" for p in provenance)


def test_pairs_cli_refuses_overwrite_and_bad_input_with_exit_2(tmp_path):
    source = write_json(tmp_path / "cmp.json", comparison(*CASES))
    out = tmp_path / "pairs.jsonl"
    assert runner.invoke(eval_app, ["pairs", str(source), "--out", str(out)]).exit_code == 0
    again = runner.invoke(eval_app, ["pairs", str(source), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(eval_app, ["pairs", str(source), "--out", str(out), "--force"])
    assert forced.exit_code == 0
    bad = comparison(*CASES)
    bad["pairs"][1]["outcome"] = 2
    del bad["pairs"][3]["candidate"]
    write_json(tmp_path / "bad.json", bad)
    result = runner.invoke(eval_app, ["pairs", str(tmp_path / "bad.json"), "--out", "x.jsonl"])
    assert result.exit_code == 2
    assert "bad.json.pairs[1]: outcome must be 1, 0.5 or 0" in result.output
    assert "bad.json.pairs[3]: missing ['candidate']" in result.output
    (tmp_path / "broken.json").write_text('{"pairs": [\n  1,\n')
    result = runner.invoke(eval_app, ["pairs", str(tmp_path / "broken.json"), "--kind",
                                      "compare", "--out", str(tmp_path / "y.jsonl")])  # fmt: skip
    assert result.exit_code == 2 and "broken.json:3: not valid JSON" in result.output


def test_inputs_that_are_not_evidence_are_named(tmp_path):
    _, key, _ = exported(tmp_path)
    with pytest.raises(EvalInputError, match="pass it with --key"):
        detect_kind(key)
    human = write_json(tmp_path / "h.json", {"judge": "human", "pairs": []})
    with pytest.raises(EvalInputError, match="score-votes result"):
        detect_kind(human)
    old_rank = write_json(tmp_path / "r.json", {"judge": "x", "ratings": []})
    with pytest.raises(EvalInputError, match="only ratings"):
        build_pairs([old_rank])
    votes = tmp_path / "v.jsonl"
    votes.write_text('{"id": "0", "vote": "A"}\n')
    with pytest.raises(EvalInputError, match="need --key"):
        build_pairs([votes])
    with pytest.raises(EvalInputError, match=r"must end in \.jsonl"):
        write_pairs(build_pairs([write_json(tmp_path / "c.json", comparison(*CASES))]),
                    tmp_path / "pairs.json")  # fmt: skip


def test_an_all_dropped_input_writes_nothing(tmp_path):
    source = write_json(tmp_path / "cmp.json", comparison([0.5], [("a", "b")]))
    with pytest.raises(EvalInputError, match="no pairs"):
        write_pairs(build_pairs([source]), tmp_path / "pairs.jsonl")
    assert not (tmp_path / "pairs.jsonl").exists()
    with pytest.raises(DataError):  # what training would have said about identical answers
        (tmp_path / "same.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
        validate_files(DataSettings(train=[DatasetFile(path=tmp_path / "same.jsonl")]), "dpo")


# ---------------------------------------------------------------- captured traffic


def capture(id_: str, prompt: str | None, adapter: str = "acme", **extra) -> dict:
    record = {
        "format": "loraplex-capture/1", "id": id_, "time": "2025-03-01T10:00:00Z",
        "adapter": adapter, "version": 3 if adapter else None, "requested": adapter,
        "prompt": prompt, "response": "an answer", "finish_reason": "stop",
        "prompt_tokens": 3, "completion_tokens": 2,
    }  # fmt: skip
    return record | extra


def write_capture(path: Path, records: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_capture_file_is_a_prompt_set(tmp_path):
    path = write_capture(tmp_path / "capture-0001.jsonl", [
        capture("r1", "hello"),
        capture("r2", None, prompt_token_ids=[1, 2, 3]),
        "",
        capture("r3", "hello"),  # the same text again: kept once
        capture("r4", "name: [REDACTED], age?", adapter=""),
    ])  # fmt: skip
    items = load_prompts(path)
    assert items == [
        PromptItem("r1", "hello", None, f"{path}:1"),
        PromptItem("r4", "name: [REDACTED], age?", None, f"{path}:5"),
    ]
    source = load_prompt_source(path)
    assert (source.records, source.token_ids_only, source.duplicates) == (4, 1, 1)
    assert "skipped 1 token ids only, 1 duplicate prompts" in source.describe()
    assert [i.id for i in load_prompts(path, captured_adapter="")] == ["r4"]


def test_a_capture_folder_is_read_in_name_order_and_filtered_by_adapter(tmp_path):
    write_capture(tmp_path / "capture-0002.jsonl", [capture("b1", "later"), capture("b2", "one")])
    write_capture(tmp_path / "capture-0001.jsonl", [capture("a1", "one"),
                                                    capture("a2", "base", adapter="")])  # fmt: skip
    (tmp_path / "notes.jsonl").write_text("not a capture\n")
    source = load_prompt_source(tmp_path, captured_adapter="acme")
    assert [i.id for i in source.items] == ["a1", "b1"]
    assert (source.files, source.other_adapters, source.duplicates) == (2, 1, 1)
    with pytest.raises(EvalInputError, match="no captured request with a text prompt"):
        load_prompts(tmp_path, captured_adapter="other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match=r"must hold capture-\*\.jsonl"):
        load_prompts(tmp_path / "empty")


def test_a_file_mixing_formats_is_an_error_naming_the_line(tmp_path):
    mixed = write_capture(tmp_path / "capture-1.jsonl", [capture("r1", "hi"), {"prompt": "p"}])
    with pytest.raises(EvalInputError, match=r"capture-1\.jsonl:2: a prompt-set line"):
        load_prompts(mixed)
    other = write_capture(tmp_path / "p.jsonl", [{"prompt": "p"}, capture("r1", "hi")])
    with pytest.raises(EvalInputError, match=r"p\.jsonl:2: a capture record in a prompt set"):
        load_prompts(other)
    future = write_capture(tmp_path / "f.jsonl", [capture("r1", "hi", format="loraplex-capture/9")])
    with pytest.raises(EvalInputError, match=r"f\.jsonl:1: unknown format"):
        load_prompts(future)
    bad = write_capture(tmp_path / "b.jsonl", [capture("", "hi"), capture("r2", 7)])
    with pytest.raises(EvalInputError, match=r"b\.jsonl:1: 'id'.*\n.*b\.jsonl:2: 'prompt'"):
        load_prompts(bad)
    plain = write_capture(tmp_path / "plain.jsonl", [{"prompt": "p"}])
    with pytest.raises(EvalInputError, match="not captured traffic"):
        load_prompts(plain, captured_adapter="acme")


def test_compare_runs_on_captured_traffic_and_records_when(tmp_path, fake_gateway):
    write_capture(tmp_path / "capture-1.jsonl", [capture("r1", "say"), capture("r2", None),
                                                 capture("r3", "hey", adapter="zeta")])  # fmt: skip
    out = tmp_path / "cmp.json"
    args = ["compare", "--candidate", "acme@candidate", "--prompts", str(tmp_path),
            "--captured-adapter", "acme", "--out", str(out)]  # fmt: skip
    result = runner.invoke(eval_app, args)
    assert result.exit_code == 0, result.output
    assert "prompts: 1 prompts from 3 captured requests" in result.output
    assert fake_gateway == ["say", "say"]
    data = json.loads(out.read_text())
    assert data["time"] and data["pairs"][0]["id"] == "r1"
    assert build_pairs([out]).rows[0]["chosen"] == "say xxx"
