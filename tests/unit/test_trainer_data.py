"""Training data: every problem reported with file and line, dedup, over-length, split, mixing."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.config import DatasetFile, DataSettings
from trainer.data import (
    MAX_SHOWN_PROBLEMS,
    MESSAGES,
    PREFERENCE,
    PROMPT_COMPLETION,
    PROMPT_ONLY,
    DataError,
    Problem,
    check_file,
    example_length,
    prepare_data,
    validate_files,
)
from trainer.tiny import build_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "colors"

USER = {"role": "user", "content": "What color is the sky?"}
ASSISTANT = {"role": "assistant", "content": "blue"}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def pc(i: int | str, completion: str = " blue") -> dict:
    return {"prompt": f"Q: item {i}?\nA:", "completion": completion}


def pair(i: int | str) -> dict:
    return {"prompt": f"Q: item {i}?\nA:", "chosen": " blue", "rejected": " red"}


def chat(i: int | str) -> dict:
    return {"messages": [{"role": "user", "content": f"item {i}?"}, ASSISTANT]}


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are records (dumped as JSON) or raw lines (str, written as they are)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def settings(*files: Path | tuple[Path, float], **kwargs) -> DataSettings:
    train = [
        DatasetFile(path=f[0], weight=f[1]) if isinstance(f, tuple) else DatasetFile(path=f)
        for f in files
    ]
    return DataSettings(train=train, **kwargs)


def problems_of(data: DataSettings, method: str = "sft") -> list[str]:
    with pytest.raises(DataError) as info:
        validate_files(data, method)
    return [str(p) for p in info.value.problems]


# ---------------------------------------------------------------- validation


def test_the_example_files_are_valid():
    for method, names in {
        "sft": ["colors_train.jsonl", "colors_eval.jsonl", "sounds_train.jsonl"],
        "dpo": ["pairs_train.jsonl", "pairs_eval.jsonl"],
        "reward": ["pairs_train.jsonl"],
    }.items():
        train, evaluation = validate_files(settings(*(EXAMPLES / n for n in names)), method)
        assert evaluation is None
        assert [len(records) for _, _, records in train] == [
            len((EXAMPLES / n).read_text().splitlines()) for n in names
        ]
    problems: list[Problem] = []
    fmt, records = check_file(EXAMPLES / "colors_chat.jsonl", "sft", problems)
    assert (fmt, len(records), problems) == (MESSAGES, 48, [])
    fmt, records = check_file(EXAMPLES / "rl_prompts.jsonl", "rl", problems)
    assert (fmt, len(records), problems) == (PROMPT_ONLY, 48, [])


@pytest.mark.parametrize(
    ("record", "errors"),
    [
        ({"prompt": "Q: ?\nA:", "reference": "kept for reward functions"}, []),
        ({"prompt": [{"role": "user", "content": "Hi"}]}, []),
        ({"prompt": ""}, ["'prompt' is empty"]),
        ({"prompt": 3}, ["'prompt' must be a string, got int"]),
        (
            {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
            ["'prompt' ends with an assistant turn; the policy writes that"],
        ),
    ],
)
def test_rl_prompts_are_checked_with_file_and_line(tmp_path, record, errors):
    chat = isinstance(record["prompt"], list)
    first = {"prompt": [{"role": "user", "content": "ok"}] if chat else "ok"}
    path = write_jsonl(tmp_path / "prompts.jsonl", [first, record])
    if not errors:
        train, _ = validate_files(settings(path), "rl")
        assert train == [(path, PROMPT_ONLY, [first, record])]
        return
    assert problems_of(settings(path), "rl") == [f"{path}: line 2: {e}" for e in errors]


def test_rl_refuses_completions(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [pc(i) for i in range(3)])
    message = "rl needs prompt-only data; this file holds prompt/completion"
    assert problems_of(settings(path), "rl") == [f"{path}: {message}"]


@pytest.mark.parametrize(
    ("method", "bad", "message"),
    [
        (
            "sft",
            '{"prompt": "a", ',
            "invalid JSON: Expecting property name enclosed in double quotes",
        ),
        ("sft", "not json", "invalid JSON: Expecting value"),
        ("sft", '["a", "b"]', "expected a JSON object, got list"),
        ("sft", '"text"', "expected a JSON object, got str"),
        ("sft", '{"prompt": "a"}', "missing key 'completion'"),
        (
            "sft",
            '{"prompt": "a", "completion": "b", "id": 3}',
            "unexpected key 'id' (expected: prompt, completion)",
        ),
        ("sft", '{"prompt": "a", "completion": 3}', "'completion' must be a string, got int"),
        ("sft", '{"prompt": null, "completion": "b"}', "'prompt' must be a string, got NoneType"),
        ("sft", '{"prompt": "a", "completion": "  "}', "'completion' is empty"),
        (
            "sft",
            '{"prompt": [{"role": "user", "content": "a"}], "completion": "b"}',
            "'completion' must be a list of messages, got str",
        ),
        (
            "sft",
            '{"prompt": [{"role": "user", "content": "a"}], '
            '"completion": [{"role": "user", "content": "b"}]}',
            "'completion' has no assistant turn to learn from",
        ),
        (
            "dpo",
            '{"prompt": "a", "chosen": "b", "rejected": "b"}',
            "chosen and rejected are identical",
        ),
        ("dpo", '{"prompt": "a", "chosen": "b"}', "missing key 'rejected'"),
        ("dpo", '{"prompt": "a", "chosen": "", "rejected": "c"}', "'chosen' is empty"),
        (
            "reward",
            '{"prompt": "a", "chosen": "b", "rejected": "c", "score": 1}',
            "unexpected key 'score' (expected: prompt, chosen, rejected)",
        ),
        (
            "dpo",
            '{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", '
            '"rejected": [{"role": "assistant", "content": "c"}]}',
            "'chosen' must be a list of messages, got str",
        ),
        (
            "dpo",
            '{"prompt": [{"role": "user", "content": "a"}], '
            '"chosen": [{"role": "user", "content": "b"}], '
            '"rejected": [{"role": "assistant", "content": "c"}]}',
            "'chosen' has no assistant turn to learn from",
        ),
    ],
)
def test_each_bad_record_is_reported_with_file_and_line(tmp_path, method, bad, message):
    good = pair(1) if method != "sft" else pc(1)
    path = write_jsonl(tmp_path / "data.jsonl", [good, pair(2) if method != "sft" else pc(2), bad])
    assert problems_of(settings(path), method) == [f"{path}: line 3: {message}"]


@pytest.mark.parametrize(
    ("messages", "errors"),
    [
        (
            [{"role": "bot", "content": "hi"}, ASSISTANT],
            ["messages[0]: role must be one of system, user, assistant, got 'bot'"],
        ),
        ([USER, {"role": "assistant"}], ["messages[1]: missing key 'content'"]),
        ([{"content": "hi"}, ASSISTANT], ["messages[0]: missing key 'role'"]),
        ([USER], ["'messages' has no assistant turn to learn from"]),
        ([USER, {"role": "assistant", "content": ""}], ["messages[1]: 'content' is empty"]),
        (
            [USER, {"role": "assistant", "content": 5}],
            ["messages[1]: 'content' must be a string, got int"],
        ),
        (
            [USER, {**ASSISTANT, "name": "x"}],
            ["messages[1]: unexpected key 'name' (expected role, content)"],
        ),
        (
            [USER, "blue"],
            [
                "messages[1] must be an object with role and content",
                "'messages' has no assistant turn to learn from",
            ],
        ),
        ([], ["'messages' is empty"]),
        ("hello", ["'messages' must be a list of messages, got str"]),
    ],
)
def test_bad_messages_are_reported(tmp_path, messages, errors):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(1), {"messages": messages}])
    assert problems_of(settings(path)) == [f"{path}: line 2: {e}" for e in errors]


def test_several_problems_in_one_record_are_all_reported(tmp_path):
    bad = {"messages": [{"role": "bot"}, {"role": "user", "content": " "}], "id": 1}
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(1), bad])
    assert problems_of(settings(path)) == [
        f"{path}: line 2: unexpected key 'id' (expected: messages)",
        f"{path}: line 2: messages[0]: missing key 'content'",
        f"{path}: line 2: messages[0]: role must be one of system, user, assistant, got 'bot'",
        f"{path}: line 2: messages[1]: 'content' is empty",
        f"{path}: line 2: 'messages' has no assistant turn to learn from",
    ]


def test_blank_lines_are_skipped_but_keep_the_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [pc(1), "", "   ", '{"prompt": "a"}'])
    assert problems_of(settings(path)) == [f"{path}: line 4: missing key 'completion'"]


def test_conversational_pairs_are_accepted(tmp_path, tok):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {**USER, "content": f"q {i}"}],
            "chosen": [{"role": "assistant", "content": "blue"}],
            "rejected": [{"role": "assistant", "content": "a much longer wrong answer"}],
        }
        for i in range(4)
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    for method in ("dpo", "reward"):
        train, _ = validate_files(settings(path), method)
        assert train == [(path, PREFERENCE, rows)]
    prepared = prepare_data(settings(path), "dpo", tok, seed=0)
    assert prepared.train.to_list() == rows
    assert prepared.report.files[0].format == PREFERENCE


def test_conversational_prompt_completion_is_accepted(tmp_path):
    row = {"prompt": [USER], "completion": [ASSISTANT]}
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    train, _ = validate_files(settings(path), "sft")
    assert train == [(path, PROMPT_COMPLETION, [row])]


def test_plain_and_conversational_records_in_one_file_are_refused(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl", [pc(1), {"prompt": [USER], "completion": [ASSISTANT]}]
    )
    assert problems_of(settings(path)) == [f"{path}: mixes plain-text and conversational records"]


@pytest.mark.parametrize(
    ("method", "make", "message"),
    [
        (
            "sft",
            pair,
            "sft needs prompt/completion, messages, alpaca, sharegpt or text data; "
            "this file holds preference",
        ),
        ("dpo", pc, "dpo needs preference data; this file holds prompt/completion"),
        ("reward", chat, "reward needs preference data; this file holds messages"),
    ],
)
def test_a_file_of_another_methods_format_is_refused(tmp_path, method, make, message):
    path = write_jsonl(tmp_path / "data.jsonl", [make(i) for i in range(3)])
    assert problems_of(settings(path), method) == [f"{path}: {message}"]


def test_the_format_is_the_one_most_records_have(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [pc(1), pc(2), chat(3)])
    assert problems_of(settings(path)) == [
        f"{path}: line 3: missing key 'prompt'",
        f"{path}: line 3: missing key 'completion'",
        f"{path}: line 3: unexpected key 'messages' (expected: prompt, completion)",
    ]


def test_records_with_no_known_key(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"body": "hello"}])
    assert problems_of(settings(path)) == [
        f"{path}: line 1: missing key 'prompt'",
        f"{path}: line 1: missing key 'completion'",
        f"{path}: line 1: unexpected key 'body' (expected: prompt, completion)",
    ]


def test_unsupported_extension_missing_and_empty_files(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,completion\na,b\n")
    missing = tmp_path / "missing.jsonl"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert problems_of(settings(csv, missing, empty)) == [
        f"{csv}: unsupported file type '.csv' (.jsonl, .json, .parquet)",
        f"{missing}: file not found",
        f"{empty}: no records",
    ]


def test_a_folder_is_not_a_data_file(tmp_path):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    assert problems_of(settings(folder)) == [f"{folder}: file not found"]


def test_non_utf8_lines_are_problems_not_crashes(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        json.dumps(pc(1)).encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "b"}\n'
    )
    assert problems_of(settings(path)) == [f"{path}: line 2: not UTF-8: invalid continuation byte"]
    as_json = tmp_path / "data.json"
    as_json.write_bytes(b'[{"prompt": "caf\xe9", "completion": "b"}]')
    assert problems_of(settings(as_json)) == [f"{as_json}: not UTF-8: invalid continuation byte"]


def test_json_array_files(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([pc(1), pc(2), {"prompt": "a", "completion": 1}, pc(3)]))
    assert problems_of(settings(path)) == [
        f"{path}: record 3: 'completion' must be a string, got int"
    ]
    path.write_text(json.dumps([pc(1), pc(2)], indent=1))
    prepared = prepare_data(settings(path), "sft", tok, seed=0)
    assert prepared.train.to_list() == [pc(1), pc(2)]


def test_json_file_errors(tmp_path):
    not_array = tmp_path / "object.json"
    not_array.write_text(json.dumps(pc(1)))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "a",\n')
    assert problems_of(settings(not_array, broken)) == [
        f"{not_array}: a .json data file must hold an array of objects",
        f"{broken}: line 3: invalid JSON: Expecting property name enclosed in double quotes",
    ]


def test_parquet_files(tmp_path, tok):
    path = tmp_path / "data.parquet"
    rows = [pc(1), pc(2), {"prompt": "a", "completion": " "}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert problems_of(settings(path)) == [f"{path}: row 3: 'completion' is empty"]
    pq.write_table(pa.Table.from_pylist([chat(1), chat(2)]), path)
    prepared = prepare_data(settings(path), "sft", tok, seed=0)
    assert prepared.train.to_list() == [chat(1), chat(2)]
    assert prepared.report.files[0].format == MESSAGES


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"not parquet at all")
    [problem] = problems_of(settings(path))
    assert problem.startswith(f"{path}: cannot read Parquet: ")


def test_all_problems_of_all_files_are_reported_at_once(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", [pc(1), "{oops", {"prompt": "a"}])
    second = write_jsonl(tmp_path / "second.jsonl", [pc(2), {"prompt": "a", "completion": 3}])
    third = write_jsonl(tmp_path / "pairs.jsonl", [pair(1)])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "", "completion": "b"}])
    data = settings(first, second, third, tmp_path / "gone.jsonl", eval_file=eval_file)
    with pytest.raises(DataError) as info:
        validate_files(data, "sft")
    expected = [
        f"{first}: line 2: invalid JSON: Expecting property name enclosed in double quotes",
        f"{first}: line 3: missing key 'completion'",
        f"{second}: line 2: 'completion' must be a string, got int",
        f"{third}: sft needs prompt/completion, messages, alpaca, sharegpt or text data; "
        "this file holds preference",
        f"{tmp_path / 'gone.jsonl'}: file not found",
        f"{eval_file}: line 1: 'prompt' is empty",
    ]
    assert [str(p) for p in info.value.problems] == expected
    assert info.value.problems[1] == Problem(first, "line 3", "missing key 'completion'")
    assert str(info.value) == "6 data problems; nothing was trained:\n" + "\n".join(expected)


def test_a_single_problem_is_singular(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError) as info:
        validate_files(settings(path), "sft")
    assert str(info.value) == (
        f"1 data problem; nothing was trained:\n{path}: line 1: missing key 'completion'"
    )


def test_a_long_list_of_problems_is_cut_short(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [pc(0)] + ["{"] * (MAX_SHOWN_PROBLEMS + 5))
    with pytest.raises(DataError) as info:
        validate_files(settings(path), "sft")
    assert len(info.value.problems) == MAX_SHOWN_PROBLEMS + 5
    lines = str(info.value).splitlines()
    assert lines[0] == f"{MAX_SHOWN_PROBLEMS + 5} data problems; nothing was trained:"
    assert len(lines) == MAX_SHOWN_PROBLEMS + 2
    assert lines[-1] == "... and 5 more"


def test_training_files_of_different_formats_are_refused(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [pc(1)])
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat(1)])
    assert problems_of(settings(plain, chats)) == [
        f"{plain}: training files must share one format "
        f"({plain}: prompt/completion, {chats}: messages (conversational))"
    ]


def test_plain_and_conversational_files_are_different_formats(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [pair(1)])
    conv = {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{**ASSISTANT, "content": "x"}]}
    chats = write_jsonl(tmp_path / "chat.jsonl", [conv])
    assert problems_of(settings(plain, chats), "dpo") == [
        f"{plain}: training files must share one format "
        f"({plain}: preference, {chats}: preference (conversational))"
    ]


def test_files_of_one_name_in_two_folders_are_told_apart(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = write_jsonl(tmp_path / "a" / "train.jsonl", [pc(1)])
    chats = write_jsonl(tmp_path / "b" / "train.jsonl", [chat(1)])
    [problem] = problems_of(settings(plain, chats))
    assert problem.startswith(f"{plain}: training files must share one format")


def test_an_eval_file_of_another_format_is_refused(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [pc(1)])
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat(1)])
    assert problems_of(settings(plain, eval_file=chats)) == [
        f"{chats}: eval_file holds messages (conversational) data; "
        "the training files hold prompt/completion"
    ]


# ---------------------------------------------------------------- lengths


def test_example_length_counts_what_trl_sees(tok):
    record = pc(1, " a fairly long completion")
    assert example_length(record, PROMPT_COMPLETION, tok) == len(
        tok(record["prompt"] + record["completion"])["input_ids"]
    )
    messages = chat(1)["messages"]
    assert example_length(chat(1), MESSAGES, tok) == len(
        tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    )
    short, long = " no", " a much much longer rejected answer than the other"
    preference = {"prompt": "Q:", "chosen": short, "rejected": long}
    assert example_length(preference, PREFERENCE, tok) == len(tok("Q:" + long)["input_ids"])
    swapped = {"prompt": "Q:", "chosen": long, "rejected": short}
    assert example_length(swapped, PREFERENCE, tok) == example_length(preference, PREFERENCE, tok)
    conv = {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{**ASSISTANT, "content": long}]}
    assert example_length(conv, PREFERENCE, tok) == len(
        tok.apply_chat_template([USER, conv["rejected"][0]], tokenize=True, return_dict=False)
    )


LONG = " and then a very long answer that goes on and on for many many tokens" * 3


def _length_data(tmp_path: Path, tok) -> tuple[Path, int]:
    rows = [pc(i) for i in range(6)] + [pc(f"long {i}", LONG) for i in range(2)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    short = max(example_length(r, PROMPT_COMPLETION, tok) for r in rows[:6])
    assert example_length(rows[-1], PROMPT_COMPLETION, tok) > short + 10
    return path, short


def test_over_length_examples_are_counted_and_truncated_by_default(tmp_path, tok):
    path, short = _length_data(tmp_path, tok)
    prepared = prepare_data(settings(path, max_length=short), "sft", tok, seed=0)
    [report] = prepared.report.files
    assert (report.examples, report.over_length, report.dropped_over_length) == (8, 2, 0)
    assert report.used == 8
    assert len(prepared.train) == 8
    assert prepared.report.over_length_policy == "truncate"
    assert prepared.report.summary()[0] == (
        f"train {path}: 8 examples (prompt/completion), 2 over {short} tokens, truncated; 8 used"
    )


def test_over_length_examples_can_be_dropped(tmp_path, tok):
    path, short = _length_data(tmp_path, tok)
    data = settings(path, max_length=short, over_length="drop")
    prepared = prepare_data(data, "sft", tok, seed=0)
    [report] = prepared.report.files
    assert (report.examples, report.over_length, report.dropped_over_length) == (8, 2, 2)
    assert report.used == 6
    assert prepared.train.to_list() == [pc(i) for i in range(6)]
    assert prepared.report.summary()[0] == (
        f"train {path}: 8 examples (prompt/completion), 2 over {short} tokens, dropped; 6 used"
    )


def test_nothing_over_length_with_a_large_limit(tmp_path, tok):
    path, _ = _length_data(tmp_path, tok)
    prepared = prepare_data(settings(path, max_length=1024, over_length="drop"), "sft", tok, 0)
    assert prepared.report.files[0].over_length == 0
    assert len(prepared.train) == 8


def test_dropping_everything_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", [pc(1), pc(2)])
    with pytest.raises(DataError) as info:
        prepare_data(settings(path, max_length=2, over_length="drop"), "sft", tok, seed=0)
    assert [str(p) for p in info.value.problems] == [f"{path}: no examples left to train on"]


def test_eval_file_over_length_is_handled_too(tmp_path, tok):
    path, short = _length_data(tmp_path, tok)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [pc("e"), pc("long e", LONG)])
    data = settings(path, eval_file=eval_file, max_length=short, over_length="drop")
    prepared = prepare_data(data, "sft", tok, seed=0)
    report = prepared.report.files[1]
    assert (report.role, report.over_length, report.dropped_over_length, report.used) == (
        "eval",
        1,
        1,
        1,
    )
    assert prepared.eval is not None
    assert prepared.eval.to_list() == [pc("e")]


# ---------------------------------------------------------------- duplicates


def test_exact_duplicates_are_removed_within_and_across_files(tmp_path, tok):
    first = write_jsonl(tmp_path / "first.jsonl", [pc(1), pc(2), pc(1), pc(1), pc(3)])
    # Same record with its keys in another order is the same record.
    swapped = {"completion": pc(2)["completion"], "prompt": pc(2)["prompt"]}
    second = write_jsonl(tmp_path / "second.jsonl", [swapped, pc(4), pc(3), pc(4)])
    prepared = prepare_data(settings(first, second), "sft", tok, seed=0)
    one, two = prepared.report.files
    assert (one.examples, one.duplicates_removed, one.used) == (5, 2, 3)
    assert (two.examples, two.duplicates_removed, two.used) == (4, 3, 1)
    assert prepared.report.summary()[:2] == [
        f"train {first}: 5 examples (prompt/completion), 2 duplicates removed; 3 used",
        f"train {second}: 4 examples (prompt/completion), 3 duplicates removed; 1 used",
    ]
    assert {r["prompt"] for r in prepared.train.to_list()} == {pc(i)["prompt"] for i in range(1, 5)}


def test_near_duplicates_are_kept(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", [pc(1), pc(1, " blue "), pc(1, " Blue")])
    prepared = prepare_data(settings(path), "sft", tok, seed=0)
    assert prepared.report.files[0].duplicates_removed == 0
    assert len(prepared.train) == 3


def test_deduplication_can_be_turned_off(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", [pc(1), pc(1), pc(2)])
    prepared = prepare_data(settings(path, deduplicate=False), "sft", tok, seed=0)
    [report] = prepared.report.files
    assert (report.duplicates_removed, report.used) == (0, 3)
    assert prepared.train.to_list() == [pc(1), pc(1), pc(2)]


def test_eval_file_duplicates_are_removed(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [pc(1), pc(2)])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [pc(8), pc(9), pc(8)])
    prepared = prepare_data(settings(train, eval_file=eval_file), "sft", tok, seed=0)
    report = prepared.report.files[1]
    assert (report.examples, report.duplicates_removed, report.used) == (3, 1, 2)
    assert prepared.eval is not None
    assert prepared.eval.to_list() == [pc(8), pc(9)]


# ---------------------------------------------------------------- evaluation split


def test_eval_fraction_holds_out_part_of_each_file(tmp_path, tok):
    first = write_jsonl(tmp_path / "first.jsonl", [pc(f"a{i}") for i in range(20)])
    second = write_jsonl(tmp_path / "second.jsonl", [pc(f"b{i}") for i in range(10)])
    single = write_jsonl(tmp_path / "single.jsonl", [pc("c0")])
    data = settings(first, second, single, eval_fraction=0.2)
    prepared = prepare_data(data, "sft", tok, seed=0)
    one, two, three = prepared.report.files
    assert (one.held_out, one.used) == (4, 16)
    assert (two.held_out, two.used) == (2, 8)
    assert (three.held_out, three.used) == (0, 1)  # too small to split
    assert all(r.role == "train" for r in prepared.report.files)
    assert prepared.eval is not None
    held_out = prepared.eval.to_list()
    assert len(held_out) == prepared.report.eval_examples == 6
    assert sum(r["prompt"].startswith("Q: item a") for r in held_out) == 4
    assert sum(r["prompt"].startswith("Q: item b") for r in held_out) == 2
    train_prompts = {r["prompt"] for r in prepared.train.to_list()}
    assert not train_prompts & {r["prompt"] for r in held_out}
    assert len(train_prompts) == 16 + 8 + 1
    assert "4 held out for evaluation; 16 used" in prepared.report.summary()[0]
    again = prepare_data(data, "sft", tok, seed=0)
    assert again.eval is not None
    assert again.eval.to_list() == held_out


def test_eval_file_is_used_as_it_is(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [pc(i) for i in range(5)])
    rows = [pc(f"e{i}", f" answer {i}") for i in range(4)]
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows)
    prepared = prepare_data(settings(train, eval_file=eval_file), "sft", tok, seed=3)
    assert prepared.eval is not None
    assert prepared.eval.to_list() == rows
    train_report, eval_report = prepared.report.files
    assert (train_report.held_out, train_report.used) == (0, 5)
    assert (eval_report.role, eval_report.weight, eval_report.used) == ("eval", None, 4)
    assert eval_report.sha256 == hashlib.sha256(eval_file.read_bytes()).hexdigest()
    assert prepared.report.eval_examples == 4
    assert prepared.report.summary()[-1] == "train mix: 5 examples; eval: 4"


def test_no_eval_data_without_a_source(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", [pc(1), pc(2)])
    prepared = prepare_data(settings(path), "sft", tok, seed=0)
    assert prepared.eval is None
    assert prepared.report.eval_examples == 0


# ---------------------------------------------------------------- mixing


def _two_sources(tmp_path: Path, n_a: int = 30, n_b: int = 30) -> tuple[Path, Path]:
    a = write_jsonl(tmp_path / "a.jsonl", [pc(f"a{i}") for i in range(n_a)])
    b = write_jsonl(tmp_path / "b.jsonl", [pc(f"b{i}") for i in range(n_b)])
    return a, b


def _source(record: dict) -> str:
    return "a" if record["prompt"].startswith("Q: item a") else "b"


def test_files_are_interleaved_by_weight(tmp_path, tok):
    a, b = _two_sources(tmp_path)
    prepared = prepare_data(settings((a, 3.0), (b, 1.0)), "sft", tok, seed=0)
    train = prepared.train
    assert "source" not in train.column_names
    assert set(train.column_names) == {"prompt", "completion"}
    sources = [_source(r) for r in train.to_list()]
    assert set(sources[:12]) == {"a", "b"}  # interleaved, not one file after the other
    switches = sum(x != y for x, y in itertools.pairwise(sources))
    assert switches > 10
    mix = prepared.report.mix
    assert set(mix) == {str(a), str(b)}
    assert sum(mix.values()) == len(train) == prepared.report.train_examples
    assert mix[str(a)] == sources.count("a")
    assert 2.0 <= mix[str(a)] / mix[str(b)] <= 4.5
    # all_exhausted: every example of every file is seen at least once.
    prompts = {r["prompt"] for r in train.to_list()}
    assert len(prompts) == 60
    report_a, report_b = prepared.report.files
    assert (report_a.weight, report_b.weight) == (3.0, 1.0)
    assert report_a.used == report_b.used == 30


def test_first_exhausted_stops_with_the_first_file(tmp_path, tok):
    a, b = _two_sources(tmp_path)
    data = settings((a, 3.0), (b, 1.0), mix_stopping_strategy="first_exhausted")
    prepared = prepare_data(data, "sft", tok, seed=0)
    mix = prepared.report.mix
    assert mix[str(a)] <= 30
    assert mix[str(b)] < 30
    assert mix[str(a)] > mix[str(b)]


def test_mixing_is_deterministic_per_seed(tmp_path, tok):
    a, b = _two_sources(tmp_path)
    data = settings((a, 3.0), (b, 1.0))
    first = prepare_data(data, "sft", tok, seed=7)
    second = prepare_data(data, "sft", tok, seed=7)
    assert first.train.to_list() == second.train.to_list()
    assert first.report.mix == second.report.mix
    other = prepare_data(data, "sft", tok, seed=8)
    assert other.train.to_list() != first.train.to_list()


def test_one_file_keeps_its_order_and_has_no_source_column(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", [pc(i) for i in range(5)])
    prepared = prepare_data(settings(path), "sft", tok, seed=0)
    assert prepared.train.to_list() == [pc(i) for i in range(5)]
    assert prepared.report.mix == {str(path): 5}


def test_report_is_json_ready(tmp_path, tok):
    a, b = _two_sources(tmp_path, 6, 4)
    prepared = prepare_data(settings((a, 2.0), (b, 1.0), max_length=64), "sft", tok, seed=0)
    data = json.loads(json.dumps(prepared.report.as_dict()))
    assert data["max_length"] == 64
    assert data["over_length_policy"] == "truncate"
    assert [f["path"] for f in data["files"]] == [str(a), str(b)]
    assert data["files"][0]["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert data["files"][0]["format"] == PROMPT_COMPLETION
    assert data["mix"] == prepared.report.mix


def test_prepare_uses_already_validated_files(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", [pc(1), pc(2)])
    data = settings(path)
    validated = validate_files(data, "sft")
    path.write_text("broken\n")  # not read again
    prepared = prepare_data(data, "sft", tok, seed=0, validated=validated)
    assert prepared.train.to_list() == [pc(1), pc(2)]
