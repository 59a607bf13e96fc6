"""Training data: read local files, check every record, deduplicate, hold out, mix by weight.

Validation runs before any model is loaded and reports every problem with its file and line
(JSON Lines), record (JSON array) or row (Parquet), so one run shows everything to fix. Only
the over-length check needs the tokenizer, which is cheap to load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, interleave_datasets

from trainer.config import DataSettings, Method

PROMPT_COMPLETION = "prompt/completion"
MESSAGES = "messages"
PREFERENCE = "preference"
PROMPT_ONLY = "prompt-only"
ALPACA = "alpaca"
SHAREGPT = "sharegpt"
TEXT = "text"
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    PROMPT_COMPLETION: ("prompt", "completion"),
    MESSAGES: ("messages",),
    PREFERENCE: ("prompt", "chosen", "rejected"),
    PROMPT_ONLY: ("prompt",),
    ALPACA: ("instruction", "input", "output"),
    SHAREGPT: ("conversations", "id"),
    TEXT: ("text",),
}
OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {ALPACA: ("input",), SHAREGPT: ("id",)}
CONVERTED: dict[str, str] = {ALPACA: PROMPT_COMPLETION, SHAREGPT: MESSAGES}
"""Formats users bring that are turned into one of trl's before training (TEXT is trl's own
language-modeling format)."""
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": (PROMPT_COMPLETION, MESSAGES, ALPACA, SHAREGPT, TEXT),
    "dpo": (PREFERENCE,),
    "reward": (PREFERENCE,),
    "rl": (PROMPT_ONLY,),
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
# Stanford Alpaca's prompt templates (train.py), with a newline after "### Response:" so the
# completion starts on its own line.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
MAX_SHOWN_PROBLEMS = 200


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, and where."""

    path: Path
    where: str  # "line 3", "record 3", "row 3", or "" for the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{' ' + self.where + ':' if self.where else ''} {self.message}"


class DataError(ValueError):
    """Invalid training data; `problems` lists every one found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        shown = [str(p) for p in self.problems[:MAX_SHOWN_PROBLEMS]]
        if len(self.problems) > MAX_SHOWN_PROBLEMS:
            shown.append(f"... and {len(self.problems) - MAX_SHOWN_PROBLEMS} more")
        count = len(self.problems)
        super().__init__(
            f"{count} data problem{'s' * (count != 1)}; nothing was trained:\n" + "\n".join(shown)
        )


@dataclass
class FileReport:
    """What happened to one file's examples (kept in the adapter's manifest)."""

    path: str
    sha256: str
    role: str  # "train" or "eval"
    format: str  # as the file holds it (alpaca, sharegpt, ... or one of trl's)
    weight: float | None
    examples: int  # valid records read
    duplicates_removed: int = 0
    over_length: int = 0  # longer than max_length (tokens)
    dropped_over_length: int = 0
    held_out: int = 0  # moved to the evaluation split (eval_fraction)
    used: int = 0  # what remains for this role


@dataclass
class DataReport:
    """The data a run used, file by file, and the mixed totals."""

    files: list[FileReport]
    max_length: int
    over_length_policy: str
    train_examples: int = 0  # after mixing (interleaving may repeat examples)
    eval_examples: int = 0
    mix: dict[str, int] = field(default_factory=dict)  # source file -> examples in the mix
    contamination: dict[str, Any] | None = None  # trainer.contamination's report, when checked

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return asdict(self)

    def summary(self) -> list[str]:
        """Human-readable lines for the console."""
        lines = []
        for f in self.files:
            shown = f"{f.format} as {CONVERTED[f.format]}" if f.format in CONVERTED else f.format
            notes = [f"{f.examples} examples ({shown})"]
            if f.duplicates_removed:
                notes.append(f"{f.duplicates_removed} duplicates removed")
            if f.over_length:
                action = "dropped" if f.dropped_over_length else "truncated"
                notes.append(f"{f.over_length} over {self.max_length} tokens, {action}")
            if f.held_out:
                notes.append(f"{f.held_out} held out for evaluation")
            lines.append(f"{f.role} {f.path}: {', '.join(notes)}; {f.used} used")
        lines.append(f"train mix: {self.train_examples} examples; eval: {self.eval_examples}")
        if self.contamination is not None:
            c = self.contamination
            lines.append(
                f"contamination: {c['contaminated']} of {c['checked']} training examples match "
                f"{c['eval_texts']} eval texts ({c['exact']} exact, {c['near']} near)"
            )
        return lines


@dataclass
class PreparedData:
    """Datasets ready for trl, plus the report of how they were made."""

    train: Dataset
    eval: Dataset | None
    report: DataReport


# ---------------------------------------------------------------- reading


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read(path: Path, problems: list[Problem]) -> list[tuple[str, Any]]:
    """(location, raw record) pairs; unreadable files and bad JSON lines become problems."""
    if not path.is_file():
        problems.append(Problem(path, "", "file not found"))
        return []
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with path.open("rb") as f:  # decoded line by line: a bad byte is one line's problem
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    problems.append(Problem(path, f"line {number}", f"not UTF-8: {exc.reason}"))
                    continue
                if not line.strip():
                    continue
                try:
                    records.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    problems.append(Problem(path, f"line {number}", f"invalid JSON: {exc.msg}"))
        return records
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            problems.append(Problem(path, f"line {exc.lineno}", f"invalid JSON: {exc.msg}"))
            return []
        except UnicodeDecodeError as exc:
            problems.append(Problem(path, "", f"not UTF-8: {exc.reason}"))
            return []
        if not isinstance(data, list):
            problems.append(Problem(path, "", "a .json data file must hold an array of objects"))
            return []
        return [(f"record {i}", r) for i, r in enumerate(data, 1)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # datasets' own dependency

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for bad files
            problems.append(Problem(path, "", f"cannot read Parquet: {exc}"))
            return []
        return [(f"row {i}", r) for i, r in enumerate(rows, 1)]
    problems.append(
        Problem(path, "", f"unsupported file type {suffix!r} (.jsonl, .json, .parquet)")
    )
    return []


# ---------------------------------------------------------------- checking


def detect_format(record: Any) -> str | None:
    """The format a record's keys point to (None when they point nowhere)."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return MESSAGES
    if "conversations" in record:
        return SHAREGPT
    if "chosen" in record or "rejected" in record:
        return PREFERENCE
    if "completion" in record:
        return PROMPT_COMPLETION
    if "prompt" in record:
        return PROMPT_ONLY
    if "instruction" in record or "output" in record:
        return ALPACA
    if "text" in record:
        return TEXT
    return None


def trl_format(fmt: str) -> str:
    """The trl format a file's records are given to trl in (alpaca: prompt/completion, ...)."""
    return CONVERTED.get(fmt, fmt)


def _check_text(value: Any, key: str) -> list[str]:
    if not isinstance(value, str):
        return [f"{key!r} must be a string, got {type(value).__name__}"]
    if not value.strip():
        return [f"{key!r} is empty"]
    return []


def _check_messages(value: Any, key: str, need_assistant: bool) -> list[str]:
    if not isinstance(value, list):
        return [f"{key!r} must be a list of messages, got {type(value).__name__}"]
    if not value:
        return [f"{key!r} is empty"]
    errors = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            errors.append(f"{where} must be an object with role and content")
            continue
        extra = sorted(set(message) - {"role", "content"})
        missing = [k for k in ("role", "content") if k not in message]
        errors += [f"{where}: missing key {k!r}" for k in missing]
        errors += [f"{where}: unexpected key {k!r} (expected role, content)" for k in extra]
        if "role" in message and message["role"] not in ROLES:
            errors.append(
                f"{where}: role must be one of {', '.join(ROLES)}, got {message['role']!r}"
            )
        if "content" in message:
            errors += [f"{where}: {e}" for e in _check_text(message["content"], "content")]
    if need_assistant and not any(
        isinstance(m, dict) and m.get("role") == "assistant" for m in value
    ):
        errors.append(f"{key!r} has no assistant turn to learn from")
    return errors


def _check_record(record: Any, fmt: str) -> list[str]:
    """Every problem with one record of format `fmt` (empty list: valid)."""
    if not isinstance(record, dict):
        return [f"expected a JSON object, got {type(record).__name__}"]
    expected = FORMAT_KEYS[fmt]
    optional = OPTIONAL_KEYS.get(fmt, ())
    errors = [f"missing key {k!r}" for k in expected if k not in record and k not in optional]
    errors += [
        f"unexpected key {k!r} (expected: {', '.join(expected)})"
        for k in record
        if k not in expected and fmt != PROMPT_ONLY  # RL: other keys go to reward functions
    ]
    present = {k: record[k] for k in expected if k in record}
    if fmt == PROMPT_ONLY:
        # The policy writes the answer: a chat prompt must not end with an assistant turn.
        prompt = present.get("prompt")
        if isinstance(prompt, list):
            errors += _check_messages(prompt, "prompt", need_assistant=False)
            if prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
                errors.append("'prompt' ends with an assistant turn; the policy writes that")
        elif "prompt" in present:
            errors += _check_text(prompt, "prompt")
    elif fmt == ALPACA:
        for key in ("instruction", "output"):
            if key in present:
                errors += _check_text(present[key], key)
        if "input" in present and not isinstance(present["input"], str):
            errors.append(f"'input' must be a string, got {type(present['input']).__name__}")
    elif fmt == SHAREGPT:
        if "conversations" in present:
            errors += _check_sharegpt(present["conversations"])
        if "id" in present and not isinstance(present["id"], str | int):
            errors.append(
                f"'id' must be a string or an integer, got {type(present['id']).__name__}"
            )
    elif fmt == TEXT:
        if "text" in present:
            errors += _check_text(present["text"], "text")
    elif fmt == MESSAGES:
        if "messages" in present:
            errors += _check_messages(present["messages"], "messages", need_assistant=True)
    elif fmt == PROMPT_COMPLETION:
        # Conversational prompt/completion (lists of messages) is accepted, as trl does; then
        # both sides must be messages (trl joins them into one conversation).
        conversational = any(isinstance(v, list) for v in present.values())
        for key, value in present.items():
            if conversational:
                errors += _check_messages(value, key, need_assistant=key == "completion")
            else:
                errors += _check_text(value, key)
    else:
        conversational = any(isinstance(v, list) for v in present.values())
        for key, value in present.items():
            if conversational:
                errors += _check_messages(value, key, need_assistant=key != "prompt")
            else:
                errors += _check_text(value, key)
        if (
            "chosen" in present
            and "rejected" in present
            and present["chosen"] == present["rejected"]
        ):
            errors.append("chosen and rejected are identical")
    return errors


def _check_sharegpt(value: Any) -> list[str]:
    """ShareGPT turns: {from, value}; roles as SHAREGPT_ROLES; the last turn is the model's."""
    if not isinstance(value, list):
        return [f"'conversations' must be a list of turns, got {type(value).__name__}"]
    if not value:
        return ["'conversations' is empty"]
    errors = []
    for i, turn in enumerate(value):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            errors.append(f"{where} must be an object with from and value")
            continue
        errors += [f"{where}: missing key {k!r}" for k in ("from", "value") if k not in turn]
        extra = sorted(set(turn) - {"from", "value"})
        errors += [f"{where}: unexpected key {k!r} (expected from, value)" for k in extra]
        if "from" in turn and turn["from"] not in SHAREGPT_ROLES:
            errors.append(
                f"{where}: unknown role {turn['from']!r} (from must be one of "
                f"{', '.join(SHAREGPT_ROLES)})"
            )
        if "value" in turn:
            errors += [f"{where}: {e}" for e in _check_text(turn["value"], "value")]
    last = value[-1]
    if isinstance(last, dict) and SHAREGPT_ROLES.get(last.get("from")) != "assistant":
        errors.append("'conversations' must end with an assistant (gpt) turn to learn from")
    return errors


def convert_record(record: dict, fmt: str) -> dict:
    """A valid record of a user format in the trl format it trains as (others unchanged).

    Alpaca becomes prompt/completion with Stanford Alpaca's template (so it needs no chat
    template in the base tokenizer); ShareGPT becomes chat messages."""
    if fmt == ALPACA:
        template = ALPACA_PROMPT_WITH_INPUT if record.get("input", "").strip() else ALPACA_PROMPT
        prompt = template.format(instruction=record["instruction"], input=record.get("input", ""))
        return {"prompt": prompt, "completion": record["output"]}
    if fmt == SHAREGPT:
        return {
            "messages": [
                {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}
                for turn in record["conversations"]
            ]
        }
    return record


def _is_conversational(record: dict) -> bool:
    return any(isinstance(v, list) for v in record.values())


def check_file(path: Path, method: Method, problems: list[Problem]) -> tuple[str, list[dict]]:
    """Read and check one file; returns its format and valid records, appending problems."""
    raw = _read(path, problems)
    allowed = METHOD_FORMATS[method]
    formats = [f for f in (detect_format(r) for _, r in raw) if f is not None]
    if PROMPT_ONLY not in allowed:  # for SFT a lone prompt is a record missing its completion
        formats = [PROMPT_COMPLETION if f == PROMPT_ONLY else f for f in formats]
    fmt = max(set(formats), key=formats.count) if formats else allowed[0]
    if formats and fmt == TEXT and fmt not in allowed:
        problems.append(
            Problem(
                path,
                "",
                f"raw text (continued pre-training) trains with sft only; {method} needs "
                f"{' or '.join(allowed)} data",
            )
        )
        return fmt, []
    if formats and fmt not in allowed:
        wanted = " or ".join(
            [", ".join(allowed[:-1]), allowed[-1]] if len(allowed) > 1 else allowed
        )
        problems.append(Problem(path, "", f"{method} needs {wanted} data; this file holds {fmt}"))
        return fmt, []
    valid: list[dict] = []
    styles: set[bool] = set()
    for where, record in raw:
        errors = _check_record(record, fmt)
        problems += [Problem(path, where, e) for e in errors]
        if not errors:
            record = convert_record(record, fmt)
            valid.append(record)
            styles.add(_is_conversational(record))
    if len(styles) > 1:
        problems.append(Problem(path, "", "mixes plain-text and conversational records"))
    if not raw and not any(p.path == path for p in problems):
        problems.append(Problem(path, "", "no records"))
    return fmt, valid


def _kind(fmt: str, records: list[dict]) -> str:
    """A file's format as trl tells it apart: plain text or conversational."""
    conversational = records and _is_conversational(records[0])
    return trl_format(fmt) + (" (conversational)" if conversational else "")


def _key(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------- lengths


def example_length(record: dict, fmt: str, tokenizer: Any) -> int:
    """Tokens of the full example as trl will see it (the longer side of a preference pair)."""

    def tokens(prompt: Any, completion: Any) -> int:
        if isinstance(prompt, list) or isinstance(completion, list):
            messages = [*(prompt or []), *(completion or [])]
            return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        return len(tokenizer(prompt + completion)["input_ids"])

    fmt = trl_format(fmt)
    if fmt == MESSAGES:
        return tokens(None, record["messages"])
    if fmt == TEXT:
        return len(tokenizer(record["text"])["input_ids"])
    if fmt == PROMPT_COMPLETION:
        return tokens(record["prompt"], record["completion"])
    if fmt == PROMPT_ONLY:
        return tokens(record["prompt"], [] if isinstance(record["prompt"], list) else "")
    return max(
        tokens(record["prompt"], record["chosen"]), tokens(record["prompt"], record["rejected"])
    )


# ---------------------------------------------------------------- preparing


def validate_files(
    settings: DataSettings, method: Method
) -> tuple[list[tuple[Path, str, list[dict]]], tuple[Path, str, list[dict]] | None]:
    """Check every file; raise DataError listing all problems, before any model is loaded."""
    problems: list[Problem] = []
    train = [(f.path, *check_file(f.path, method, problems)) for f in settings.train]
    evaluation = None
    if settings.eval_file is not None:
        evaluation = (settings.eval_file, *check_file(settings.eval_file, method, problems))
    # Keyed by path, not name: a/train.jsonl and b/train.jsonl are two files.
    kinds = {path: _kind(fmt, records) for path, fmt, records in train}
    if len(set(kinds.values())) > 1 and not problems:
        described = ", ".join(f"{path}: {kind}" for path, kind in kinds.items())
        problems.append(
            Problem(
                settings.train[0].path, "", f"training files must share one format ({described})"
            )
        )
    if evaluation is not None and not problems:
        eval_kind, train_kind = _kind(*evaluation[1:]), next(iter(kinds.values()))
        if eval_kind != train_kind:
            problems.append(
                Problem(
                    evaluation[0],
                    "",
                    f"eval_file holds {eval_kind} data; the training files hold {train_kind}",
                )
            )
    if problems:
        raise DataError(problems)
    return train, evaluation


def prepare_data(
    settings: DataSettings,
    method: Method,
    tokenizer: Any,
    seed: int,
    validated: tuple[list[tuple[Path, str, list[dict]]], tuple[Path, str, list[dict]] | None]
    | None = None,
) -> PreparedData:
    """Validated, deduplicated, length-checked, split and mixed datasets for trl."""
    train_files, eval_file = validated or validate_files(settings, method)
    weights = {f.path: f.weight for f in settings.train}
    reports: list[FileReport] = []
    seen: set[str] = set()
    train_parts: list[tuple[Path, list[dict]]] = []
    for path, fmt, records in train_files:
        report = FileReport(str(path), sha256_of(path), "train", fmt, weights[path], len(records))
        kept = []
        for record in records:
            key = _key(record)
            if settings.deduplicate and key in seen:
                report.duplicates_removed += 1
                continue
            seen.add(key)
            kept.append(record)
        kept = _apply_length_policy(kept, fmt, tokenizer, settings, report)
        reports.append(report)
        train_parts.append((path, kept))
    train_reports = list(reports)

    eval_records: list[dict] = []
    if eval_file is not None:
        path, fmt, records = eval_file
        report = FileReport(str(path), sha256_of(path), "eval", fmt, None, len(records))
        unique = list({_key(r): r for r in records}.values())
        report.duplicates_removed = len(records) - len(unique)
        eval_records = _apply_length_policy(unique, fmt, tokenizer, settings, report)
        report.used = len(eval_records)
        reports.append(report)
    elif settings.eval_fraction > 0:
        for (_, records), report in zip(train_parts, train_reports, strict=True):
            if len(records) < 2:
                continue
            # At least one example on each side, however small the file or large the fraction.
            held = min(len(records) - 1, max(1, round(len(records) * settings.eval_fraction)))
            split = Dataset.from_list(records).train_test_split(test_size=held, seed=seed)
            records[:] = split["train"].to_list()
            eval_records += split["test"].to_list()
            report.held_out = len(split["test"])

    empty = [Problem(path, "", "no examples left to train on") for path, r in train_parts if not r]
    if empty:
        raise DataError(empty)
    for (_, records), report in zip(train_parts, train_reports, strict=True):
        report.used = len(records)

    train = _mix(train_parts, weights, settings, seed)
    data_report = DataReport(reports, settings.max_length, settings.over_length)
    data_report.train_examples = len(train)
    data_report.eval_examples = len(eval_records)
    data_report.mix = _mix_counts(train)
    train = train.remove_columns("source")
    evaluation = Dataset.from_list(eval_records) if eval_records else None
    return PreparedData(train, evaluation, data_report)


def _apply_length_policy(
    records: list[dict], fmt: str, tokenizer: Any, settings: DataSettings, report: FileReport
) -> list[dict]:
    over = [example_length(r, fmt, tokenizer) > settings.max_length for r in records]
    report.over_length = sum(over)
    if settings.over_length == "drop":
        report.dropped_over_length = report.over_length
        return [r for r, too_long in zip(records, over, strict=True) if not too_long]
    return records


def _mix(
    parts: list[tuple[Path, list[dict]]],
    weights: dict[Path, float],
    settings: DataSettings,
    seed: int,
) -> Dataset:
    """Interleave the files by weight (datasets.interleave_datasets); tags each example's source."""
    datasets = [
        Dataset.from_list([{**r, "source": str(path)} for r in records]) for path, records in parts
    ]
    if len(datasets) == 1:
        return datasets[0]
    total = sum(weights[path] for path, _ in parts)
    return interleave_datasets(
        datasets,
        probabilities=[weights[path] / total for path, _ in parts],
        seed=seed,
        stopping_strategy=settings.mix_stopping_strategy,
    )


def _mix_counts(train: Dataset) -> dict[str, int]:
    counts: dict[str, int] = {}
    for source in train["source"]:
        counts[source] = counts.get(source, 0) + 1
    return counts
