"""Contamination check: training examples that hold the gate's prompts or a task's documents,
exactly or nearly, are counted and named; fatal when configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import ContaminationSettings, DatasetFile, DataSettings, load_config
from trainer.contamination import check_contamination, load_eval_texts
from trainer.data import DataError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "colors"
QUESTION = "Which of the planets in our solar system has the longest day of all of them?"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check(tmp_path: Path, train: list[dict], fatal: bool = False, **kwargs) -> DataSettings:
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"id": "p1", "prompt": QUESTION, "reference": "Venus"}, {"prompt": "Q: Why is it?\nA:"}],
    )
    data = write_jsonl(tmp_path / "train.jsonl", train)
    return DataSettings(
        train=[DatasetFile(path=data)],
        contamination=ContaminationSettings(against=[prompts], fatal=fatal, **kwargs),
    )


def pc(prompt: str) -> dict:
    return {"prompt": prompt, "completion": " yes"}


def test_exact_duplicate_ignoring_case_and_whitespace(tmp_path):
    text = "Context first.\n" + QUESTION.upper().replace(" ", "  ")
    report = check_contamination(check(tmp_path, [pc("Unrelated."), pc(text)]))
    assert (report.checked, report.contaminated, report.exact, report.near) == (2, 1, 1, 0)
    assert report.matches == [
        {
            "train": "train.jsonl:line 2",
            "eval": "prompts.jsonl:line 1 (id p1)",
            "kind": "exact",
            "overlap": 1.0,
        }
    ]


def test_short_eval_texts_match_as_a_whole_word_run(tmp_path):
    report = check_contamination(check(tmp_path, [pc("Q: why is it?\nA:")]))
    assert report.exact == 1 and report.matches[0]["eval"] == "prompts.jsonl:line 2"
    assert check_contamination(check(tmp_path, [pc("Q: why it is?\nA:")])).contaminated == 0


def test_near_duplicate_with_a_few_words_changed(tmp_path):
    near = QUESTION.replace("longest", "shortest").replace("all of them", "the lot")
    report = check_contamination(check(tmp_path, [pc(near)], ngram=4))
    assert (report.contaminated, report.exact, report.near) == (1, 0, 1)
    match = report.matches[0]
    assert match["kind"] == "near" and 0.5 <= match["overlap"] < 1.0
    # The same text under a stricter threshold is clean.
    assert (
        check_contamination(check(tmp_path, [pc(near)], ngram=4, threshold=0.9)).contaminated == 0
    )


def test_unrelated_text_is_clean(tmp_path):
    rows = [
        pc("The bee is blue and the cat is green."),
        {"prompt": "Which planet?", "completion": " Mars"},
    ]
    report = check_contamination(check(tmp_path, rows))
    assert (report.checked, report.contaminated, report.matches) == (2, 0, [])


def test_every_string_of_a_record_is_checked(tmp_path):
    chat = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": QUESTION}]
    }
    assert check_contamination(check(tmp_path, [chat])).exact == 1


def test_fatal_stops_naming_the_matches(tmp_path):
    with pytest.raises(DataError) as info:
        check_contamination(check(tmp_path, [pc("x"), pc(QUESTION)], fatal=True))
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{tmp_path / 'train.jsonl'}: line 2: contaminated")
    assert "prompts.jsonl:line 1 (id p1) (exact" in str(problem)
    # Clean data passes a fatal check.
    assert check_contamination(check(tmp_path, [pc("x")], fatal=True)).contaminated == 0


def test_not_configured_is_none():
    assert check_contamination(DataSettings(train=[DatasetFile(path=Path("x.jsonl"))])) is None


# ---------------------------------------------------------------- eval sources


def test_json_tasks_are_read_from_local_files(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [{"question": QUESTION, "answer": "Venus"}])
    (tmp_path / "task.yaml").write_text(
        "task: planets\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: docs.jsonl\n"
        "test_split: test\ndoc_to_text: 'Q: {{question}}'\ndoc_to_target: answer\n"
    )
    (text,) = load_eval_texts([tmp_path])
    assert text.source == "task.yaml: doc 0" and text.text == f"Q: {QUESTION}"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("task: t\ndataset_path: gsm8k\ntest_split: test\n", "Hub datasets are not downloaded"),
        ("group: g\ntask: [a, b]\n", "not a single lm-eval task"),
        ("task: t\ninclude: base.yaml\n", "`include:` are not supported"),
        ("task: t\ndataset_path: json\n", "no test_split or validation_split"),
        ("task: t\ncustom_dataset: !function nowhere.f\ntest_split: test\n", "nowhere.py"),
    ],
)
def test_other_task_sources_are_refused_with_the_file(tmp_path, yaml_text, message):
    (tmp_path / "task.yaml").write_text(yaml_text)
    with pytest.raises(DataError) as info:
        load_eval_texts([tmp_path / "task.yaml"])
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{tmp_path / 'task.yaml'}:") and message in str(problem)


def test_bad_prompt_sets_are_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"question": "no prompt"}])
    with pytest.raises(DataError) as info:
        load_eval_texts([path, tmp_path / "missing.jsonl", tmp_path / "x.txt"])
    found = [str(p) for p in info.value.problems]
    assert f"{path}: line 2: expected an object with a 'prompt' string" in found
    assert any("missing.jsonl" in p and "file not found" in p for p in found)
    assert len(found) == 3


def test_the_colors_training_data_is_clean_against_its_gate():
    """The held-out phrasings are different by design: nothing is contaminated."""
    against = '{"against": ["prompts.jsonl", "tasks"]}'
    for method, name in [("sft", "sft"), ("dpo", "dpo"), ("rl", "rl")]:
        config = load_config(method, EXAMPLES / f"{name}.yaml", [f"data.contamination={against}"])
        report = check_contamination(config.data)
        assert report.eval_texts > 36  # 12 prompts, 12 qa and 12 mc documents, text paragraphs
        assert report.checked > 0 and report.contaminated == 0, report.matches
