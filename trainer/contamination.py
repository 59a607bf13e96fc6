"""Contamination check: does the training data contain the texts the adapter is judged on?

An adapter trained on its gate's prompts or its benchmark's documents passes the gate by recall,
not by skill. Every eval text (a prompt set's `prompt`, a task document's rendered text) is
indexed by its word n-grams in one dict; each training example is then looked up n-gram by
n-gram, so the check is linear in the data. A training example is contaminated by an eval text
when it contains the text exactly (case and whitespace ignored) or holds at least `threshold` of
the text's n-grams (a near duplicate: a few words changed still leaves most n-grams intact).

Task documents are read the way lm-eval reads the example tasks (examples/colors/tasks): from
local files only, through `custom_dataset: !function module.name` (a function in a module next
to the YAML) or `dataset_path: json` with local `dataset_kwargs.data_files`. Hub datasets are
refused: the check must not download anything.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config import ContaminationSettings, DataSettings
from trainer.data import DataError, Problem, _read

MAX_MATCHES_SHOWN = 10
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class EvalText:
    """One text an adapter is evaluated on, and where it comes from."""

    source: str  # "prompts.jsonl:line 3 (id q2)", "colors_qa.yaml: doc 4"
    text: str


@dataclass(frozen=True)
class Match:
    """A training example that contains (most of) an eval text."""

    train: str  # "colors_train.jsonl:line 7"
    eval: str
    kind: str  # "exact" or "near"
    overlap: float  # share of the eval text's n-grams in the training example


@dataclass
class ContaminationReport:
    """Counts and the first matches, for the manifest and the console."""

    against: list[str]
    ngram: int
    threshold: float
    eval_texts: int = 0
    checked: int = 0  # training examples looked at
    contaminated: int = 0  # training examples with at least one match
    exact: int = 0
    near: int = 0  # contaminated, but no exact match
    matches: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_MATCHES_SHOWN

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return asdict(self)


class _TaskLoader(yaml.SafeLoader):
    """lm-eval task YAMLs tag functions `!function module.name`; kept as _Function."""


@dataclass(frozen=True)
class _Function:
    ref: str


_TaskLoader.add_constructor(
    "!function", lambda loader, node: _Function(loader.construct_scalar(node))
)


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and whitespace only separate them."""
    return _WORD.findall(text.lower())


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _grams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


# ---------------------------------------------------------------- eval texts


def load_eval_texts(paths: list[Path]) -> list[EvalText]:
    """Every eval text of the prompt sets and tasks; raises DataError listing what is unusable."""
    problems: list[Problem] = []
    texts: list[EvalText] = []
    for path in paths:
        if path.is_dir():
            yamls = sorted(p for p in path.rglob("*.yaml") if p.is_file())
            if not yamls:
                problems.append(Problem(path, "", "no task YAML (*.yaml) in this folder"))
            for task in yamls:
                texts += _task_texts(task, problems)
        elif path.suffix.lower() in (".yaml", ".yml"):
            texts += _task_texts(path, problems)
        elif path.suffix.lower() == ".jsonl":
            texts += _prompt_texts(path, problems)
        elif not path.exists():
            problems.append(Problem(path, "", "file not found"))
        else:
            problems.append(
                Problem(path, "", "expected a prompt set (.jsonl), a task YAML or a folder of them")
            )
    if problems:
        raise DataError(problems)
    return texts


def _prompt_texts(path: Path, problems: list[Problem]) -> list[EvalText]:
    """A prompt set (evalsuite's format: `prompt`, optional `id` and `reference`)."""
    texts = []
    for where, row in _read(path, problems):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(Problem(path, where, "expected an object with a 'prompt' string"))
            continue
        named = f" (id {row['id']})" if "id" in row else ""
        texts.append(EvalText(f"{path.name}:{where}{named}", prompt))
    return texts


def _task_texts(path: Path, problems: list[Problem]) -> list[EvalText]:
    """The documents of one lm-eval task, rendered as the model sees them (doc_to_text; the
    target when the text is empty, as in perplexity tasks)."""
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problems.append(Problem(path, "", f"cannot read the task YAML: {exc}"))
        return []
    if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
        problems.append(Problem(path, "", "not a single lm-eval task (no `task:` name)"))
        return []
    if "include" in spec or "group" in spec:
        problems.append(Problem(path, "", "task groups and `include:` are not supported"))
        return []
    try:
        docs = _task_docs(path, spec)
    except _Unsupported as exc:
        problems.append(Problem(path, "", str(exc)))
        return []
    texts = []
    for i, doc in enumerate(docs):
        try:
            text = _render(spec.get("doc_to_text", ""), doc)
            if not text.strip():
                text = _render(spec.get("doc_to_target", ""), doc)
        except _Unsupported as exc:
            problems.append(Problem(path, "", str(exc)))
            return []
        if text.strip():
            texts.append(EvalText(f"{path.name}: doc {i}", text))
    return texts


class _Unsupported(ValueError):
    """A task the check cannot read without downloading or guessing."""


def _task_docs(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    split = spec.get("test_split") or spec.get("validation_split")
    if not split:
        raise _Unsupported("the task names no test_split or validation_split")
    source = spec.get("custom_dataset")
    if isinstance(source, _Function):
        dataset = _call(path.parent, source.ref, spec.get("dataset_kwargs") or {})
    elif spec.get("dataset_path") in ("json", "jsonl"):
        files = (spec.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            files = files.get(split)
        if not isinstance(files, str | list) or not files:
            raise _Unsupported(f"dataset_kwargs.data_files names no file for split {split!r}")
        rows: list[dict[str, Any]] = []
        for name in [files] if isinstance(files, str) else files:
            file = (path.parent / name).resolve()
            if not file.is_file():
                raise _Unsupported(f"data file {file} not found")
            rows += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        return rows
    else:
        raise _Unsupported(
            f"dataset_path {spec.get('dataset_path')!r}: only local documents are read "
            "(custom_dataset: !function module.name, or dataset_path: json with local "
            "dataset_kwargs.data_files); Hub datasets are not downloaded"
        )
    if split not in dataset:
        raise _Unsupported(f"custom_dataset {source.ref} has no split {split!r}")
    return list(dataset[split])


def _call(folder: Path, ref: str, kwargs: dict[str, Any]) -> Any:
    """lm-eval's `!function module.name`: module.py next to the task YAML, called as lm-eval
    calls a custom_dataset (with the task's dataset_kwargs)."""
    module_name, _, function = ref.rpartition(".")
    file = folder / f"{module_name.replace('.', '/')}.py"
    if not module_name or not file.is_file():
        raise _Unsupported(f"custom_dataset: !function {ref}: no {file}")
    spec = importlib.util.spec_from_file_location(f"_loraplex_task_{module_name}", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))  # the loader may import its neighbours, as under lm-eval
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    if not callable(getattr(module, function, None)):
        raise _Unsupported(f"custom_dataset: !function {ref}: {file} has no function {function}")
    return getattr(module, function)(**kwargs)


def _render(template: Any, doc: dict[str, Any]) -> str:
    """doc_to_text / doc_to_target as lm-eval reads them: a column name or a Jinja template."""
    if isinstance(template, _Function):
        raise _Unsupported(f"!function {template.ref} as doc_to_text/doc_to_target")
    if not isinstance(template, str):
        return ""  # e.g. an integer target of a multiple-choice task: nothing to look for
    if template in doc:
        value = doc[template]
        return value if isinstance(value, str) else ""
    import jinja2  # transformers' own dependency (chat templates)

    return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(**doc)


# ---------------------------------------------------------------- matching


def example_text(record: Any) -> str:
    """Every string of a raw training record (prompt, completion, turns, ...), one per line."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return "\n".join(example_text(v) for v in record.values())
    if isinstance(record, list):
        return "\n".join(example_text(v) for v in record)
    return ""


class Index:
    """Eval texts by word n-gram; texts shorter than n words are one gram of their length."""

    def __init__(self, texts: list[EvalText], n: int) -> None:
        self.texts = texts
        self.normal = [_normal(t.text) for t in texts]
        self.sizes: list[int] = []
        self.grams: dict[tuple[str, ...], list[int]] = {}
        self.lengths: set[int] = set()
        for i, text in enumerate(texts):
            tokens = words(text.text)
            length = min(n, len(tokens))
            grams = _grams(tokens, length) if tokens else set()
            self.sizes.append(len(grams))
            if grams:
                self.lengths.add(length)
            for gram in grams:
                self.grams.setdefault(gram, []).append(i)

    def matches(self, text: str, threshold: float) -> list[tuple[int, str, float]]:
        """(eval text index, "exact" or "near", overlap) for every eval text `text` holds."""
        tokens = words(text)
        hits: Counter[int] = Counter()
        for length in self.lengths:
            for gram in _grams(tokens, length):
                hits.update(self.grams.get(gram, ()))
        found = []
        normal = None
        for i, count in hits.items():
            overlap = count / self.sizes[i]
            if overlap < threshold:
                continue
            if overlap == 1.0:  # every n-gram present: worth the substring test
                normal = normal if normal is not None else _normal(text)
                if self.normal[i] in normal:
                    found.append((i, "exact", 1.0))
                    continue
            found.append((i, "near", round(overlap, 4)))
        return sorted(found)


def check_contamination(settings: DataSettings) -> ContaminationReport | None:
    """Check every training file against `settings.contamination` (None when not configured);
    raises DataError for unusable eval sources, and for any match when the check is fatal."""
    check: ContaminationSettings | None = settings.contamination
    if check is None:
        return None
    texts = load_eval_texts(check.against)
    index = Index(texts, check.ngram)
    report = ContaminationReport(
        [str(p) for p in check.against], check.ngram, check.threshold, eval_texts=len(texts)
    )
    found: list[tuple[Path, str, Match]] = []
    for file in settings.train:
        for where, record in _read(file.path, []):  # already validated: no problems left
            report.checked += 1
            hits = index.matches(example_text(record), check.threshold)
            if not hits:
                continue
            report.contaminated += 1
            if any(kind == "exact" for _, kind, _ in hits):
                report.exact += 1
            else:
                report.near += 1
            for i, kind, overlap in hits:
                match = Match(f"{file.path.name}:{where}", texts[i].source, kind, overlap)
                found.append((file.path, where, match))
    report.matches = [asdict(m) for _, _, m in found[:MAX_MATCHES_SHOWN]]
    if check.fatal and found:
        raise DataError(
            [
                Problem(
                    path,
                    where,
                    f"contaminated: holds eval text {m.eval} ({m.kind}, overlap {m.overlap})",
                )
                for path, where, m in found
            ]
        )
    return report
