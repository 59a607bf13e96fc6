"""Data formats users bring (alpaca, ShareGPT, raw text): checked with file and line like trl's
own formats, then turned into the trl format they train as."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import DatasetFile, DataSettings
from trainer.data import (
    ALPACA,
    ALPACA_PROMPT,
    MESSAGES,
    PROMPT_COMPLETION,
    SHAREGPT,
    TEXT,
    DataError,
    example_length,
    prepare_data,
    validate_files,
)
from trainer.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def settings(*paths: Path) -> DataSettings:
    return DataSettings(train=[DatasetFile(path=p) for p in paths])


def problems_of(data: DataSettings, method: str = "sft") -> list[str]:
    with pytest.raises(DataError) as info:
        validate_files(data, method)
    return [str(p) for p in info.value.problems]


def problems(path: Path, method: str = "sft") -> list[str]:
    return problems_of(settings(path), method)


def alpaca(i: int, **extra) -> dict:
    return {"instruction": f"Name color {i}.", "output": "blue", **extra}


def sharegpt(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


# ---------------------------------------------------------------- alpaca


def test_alpaca_becomes_prompt_completion_with_the_alpaca_template(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "a.jsonl", [alpaca(1), alpaca(2, input="The sky."), alpaca(3, input="")]
    )
    train, _ = validate_files(settings(path), "sft")
    fmt, records = train[0][1:]
    assert fmt == ALPACA
    assert records[0] == {
        "prompt": ALPACA_PROMPT.format(instruction="Name color 1."),
        "completion": "blue",
    }
    assert "### Input:\nThe sky.\n\n### Response:\n" in records[1]["prompt"]
    assert "### Input:" not in records[2]["prompt"]  # an empty input is no input
    assert example_length(records[0], fmt, tok) == len(
        tok(records[0]["prompt"] + "blue")["input_ids"]
    )
    prepared = prepare_data(settings(path), "sft", tok, seed=0)
    assert prepared.report.files[0].format == ALPACA
    assert prepared.train.column_names == ["prompt", "completion"]
    assert "(alpaca as prompt/completion)" in prepared.report.summary()[0]


def test_alpaca_mixes_with_prompt_completion_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [alpaca(1)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Q:", "completion": " x"}])
    train, _ = validate_files(settings(a, b), "sft")
    assert [t[1] for t in train] == [ALPACA, PROMPT_COMPLETION]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "Do it."}, "line 1: missing key 'output'"),
        ({"output": "blue"}, "line 1: missing key 'instruction'"),
        ({"instruction": " ", "output": "blue"}, "line 1: 'instruction' is empty"),
        ({"instruction": "x", "output": 3}, "line 1: 'output' must be a string, got int"),
        ({"instruction": "x", "output": "y", "input": ["z"]}, "line 1: 'input' must be a string"),
        ({"instruction": "x", "output": "y", "history": []}, "line 1: unexpected key 'history'"),
    ],
)
def test_bad_alpaca_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "a.jsonl", [record])
    assert any(f"{path}: {message}" in p for p in problems(path))


# ---------------------------------------------------------------- sharegpt


def test_sharegpt_becomes_chat_messages(tmp_path, tok):
    rows = [
        {"id": "c1", **sharegpt(("system", "Be short."), ("human", "Sky?"), ("gpt", "blue"))},
        sharegpt(("user", "Grass?"), ("assistant", "green")),
    ]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    train, _ = validate_files(settings(path), "sft")
    fmt, records = train[0][1:]
    assert fmt == SHAREGPT
    assert records[0] == {
        "messages": [
            {"role": "system", "content": "Be short."},
            {"role": "user", "content": "Sky?"},
            {"role": "assistant", "content": "blue"},
        ]
    }
    assert records[1]["messages"][1] == {"role": "assistant", "content": "green"}
    # Mixes with trl's own chat format: the same format once converted.
    chat = write_jsonl(tmp_path / "m.jsonl", records)
    assert [t[1] for t in validate_files(settings(path, chat), "sft")[0]] == [SHAREGPT, MESSAGES]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (sharegpt(("human", "Sky?"), ("bot", "blue")), "unknown role 'bot'"),
        (sharegpt(("human", "Sky?")), "must end with an assistant (gpt) turn"),
        (sharegpt(("gpt", "blue"), ("human", "Sky?")), "must end with an assistant (gpt) turn"),
        ({"conversations": []}, "'conversations' is empty"),
        ({"conversations": "hi"}, "'conversations' must be a list of turns, got str"),
        ({"conversations": [{"from": "gpt"}]}, "conversations[0]: missing key 'value'"),
        ({"conversations": [{"from": "gpt", "value": "x", "w": 1}]}, "unexpected key 'w'"),
        (sharegpt(("human", "Sky?"), ("gpt", "")), "conversations[1]: 'value' is empty"),
        ({**sharegpt(("human", "a"), ("gpt", "b")), "id": [1]}, "'id' must be a string"),
    ],
)
def test_bad_sharegpt_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "s.jsonl", [sharegpt(("human", "ok"), ("gpt", "ok")), record])
    assert any(f"{path}: line 2: " in p and message in p for p in problems(path)), problems(path)


def test_every_problem_of_every_line_at_once(tmp_path):
    rows = [sharegpt(("bot", "a"), ("human", "b")), sharegpt(("human", "ok"), ("gpt", "ok")), {}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    found = problems(path)
    assert sum("line 1:" in p for p in found) == 2 and any("line 3:" in p for p in found)


# ---------------------------------------------------------------- raw text


def test_raw_text_is_trls_language_modeling_format(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The sky is blue."}, {"text": "Grass."}])
    prepared = prepare_data(settings(path), "sft", tok, seed=0)
    assert prepared.report.files[0].format == TEXT
    assert prepared.train.column_names == ["text"]
    assert example_length({"text": "The sky is blue."}, TEXT, tok) == len(
        tok("The sky is blue.")["input_ids"]
    )


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": ""}, "'text' is empty"),
        ({"text": 1}, "'text' must be a string, got int"),
        ({"text": "x", "meta": 1}, "unexpected key 'meta'"),
    ],
)
def test_bad_text_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, record])
    assert any(f"{path}: line 2: {message}" in p for p in problems(path))


@pytest.mark.parametrize("method", ["dpo", "reward", "rl"])
def test_raw_text_is_refused_for_other_methods(tmp_path, method):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The sky is blue."}])
    (found,) = problems(path, method)
    assert "raw text (continued pre-training) trains with sft only" in found
    assert found.startswith(f"{path}:")


def test_text_does_not_mix_with_prompt_completion(tmp_path):
    a = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    b = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q:", "completion": " x"}])
    (found,) = problems_of(settings(a, b))
    assert "training files must share one format" in found


@pytest.mark.parametrize("record", [alpaca(1), sharegpt(("human", "a"), ("gpt", "b"))])
def test_sft_only_formats_are_refused_for_dpo(tmp_path, record):
    path = write_jsonl(tmp_path / "x.jsonl", [record])
    (found,) = problems(path, "dpo")
    assert "dpo needs preference data" in found
