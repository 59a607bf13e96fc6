"""Preference comparison of two served systems on one prompt set: both answer every prompt through
the gateway with the same sampling options, a judge picks per pair, stats summarise the outcomes.

    prompts = load_prompts("prompts.jsonl")
    result = await compare("localhost:50051", "acme@candidate", "acme@production", prompts,
                           make_judge("rouge_l"), {"temperature": 0.0, "max_tokens": 128})
    json.dumps(result.to_dict())
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalsuite.errors import EvalError, EvalInputError
from evalsuite.fanout import (
    DEFAULT_TIMEOUT_S,
    GenerateFn,
    bounded_gather,
    check_finished,
    check_generation_options,
    gateway_generate,
    served_version,
)

if TYPE_CHECKING:
    from evalsuite.judges import Judge
    from evalsuite.stats import PairwiseSummary

PROMPT_KEYS = ("id", "prompt", "reference")


@dataclass(frozen=True)
class PromptItem:
    """One prompt of the set; `source` ("file:line") lets later errors point at the input."""

    id: str
    prompt: str
    reference: str | None = None
    source: str | None = None


@dataclass
class Pair:
    """Both systems' answers to one prompt, and the exact versions that produced them."""

    id: str
    prompt: str
    reference: str | None
    candidate: str
    baseline: str
    candidate_version: str = ""
    baseline_version: str = ""


CAPTURE_FORMAT = "loraplex-capture/1"
CAPTURE_GLOB = "capture-*.jsonl"


@dataclass
class PromptSource:
    """A loaded prompt set and, for captured traffic, what was left out of it and why."""

    items: list[PromptItem]
    captured: bool = False
    files: int = 1
    records: int = 0  # capture records read
    token_ids_only: int = 0  # no text prompt (the request sent token ids): not replayable here
    duplicates: int = 0  # same prompt text as an earlier record (the first is kept)
    other_adapters: int = 0  # filtered out by `captured_adapter`

    def describe(self) -> str:
        """One line for the console: where the prompts came from and what was skipped."""
        if not self.captured:
            return f"{len(self.items)} prompts"
        skipped = {
            "token ids only": self.token_ids_only,
            "duplicate prompts": self.duplicates,
            "other adapters": self.other_adapters,
        }
        notes = ", ".join(f"{n} {what}" for what, n in skipped.items() if n)
        return (
            f"{len(self.items)} prompts from {self.records} captured requests in {self.files} "
            f"file(s)" + (f"; skipped {notes}" if notes else "")
        )


def load_prompts(path: str | Path, *, captured_adapter: str | None = None) -> list[PromptItem]:
    """A prompt set: JSONL (`prompt` required; optional `id`, default the line number, and
    `reference`), or captured gateway traffic (a capture file, or a folder of capture-*.jsonl):
    see `load_prompt_source`. Every bad line is reported at once as file:line."""
    return load_prompt_source(path, captured_adapter=captured_adapter).items


def load_prompt_source(path: str | Path, *, captured_adapter: str | None = None) -> PromptSource:
    """`load_prompts` with the counts of what captured traffic left out. A folder, or a file
    whose first record has the capture `format` key, is read as captured traffic, which has no
    references (reference judges cannot use it); `captured_adapter` keeps only the requests
    served by that adapter ("" for the base model)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(CAPTURE_GLOB))
        if not files:
            raise EvalInputError(f"{path}: a folder of prompts must hold {CAPTURE_GLOB} files")
        return _load_capture(files, captured_adapter)
    lines = _read_lines(path)
    first = next((line for line in lines if line.strip()), "")
    if _capture_format(first) is not None:
        return _load_capture([path], captured_adapter, {path: lines})
    if captured_adapter is not None:
        raise EvalInputError(f"{path}: not captured traffic, so an adapter filter does not apply")
    return PromptSource(_load_prompt_set(path, lines))


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: cannot read the prompt set: {e}") from None


def _capture_format(line: str) -> Any:
    """The line's `format` (a capture record's marker), None if it has none or is not JSON."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row.get("format") if isinstance(row, dict) else None


def _load_capture(
    files: list[Path], adapter: str | None, read: dict[Path, list[str]] | None = None
) -> PromptSource:
    """Captured requests with a text prompt become prompts (id: the request id; source:
    file:line), first occurrence of a text wins, in file-name then line order."""
    source = PromptSource([], captured=True, files=len(files))
    problems: list[str] = []
    texts: set[str] = set()
    ids: dict[str, str] = {}
    for path in files:
        lines = (read or {}).get(path) or _read_lines(path)
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = _capture_record(line, where)
            except EvalInputError as e:
                problems.append(str(e))
                continue
            source.records += 1
            if adapter is not None and record["adapter"] != adapter:
                source.other_adapters += 1
                continue
            prompt = record["prompt"]
            if prompt is None or not prompt.strip():
                source.token_ids_only += 1
                continue
            if prompt in texts:
                source.duplicates += 1
                continue
            if record["id"] in ids:
                problems.append(f"{where}: duplicate request id {record['id']!r} (first at "
                                f"{ids[record['id']]})")  # fmt: skip
                continue
            texts.add(prompt)
            ids[record["id"]] = where
            source.items.append(PromptItem(id=record["id"], prompt=prompt, source=where))
    if problems:
        raise EvalInputError("\n".join(problems))
    if not source.items:
        shown = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        raise EvalInputError(
            f"{shown}: no captured request with a text prompt ({source.describe()})"
        )
    return source


def _json_object(line: str, where: str) -> dict[str, Any]:
    """One JSONL line that must hold a JSON object; errors name file:line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise EvalInputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _capture_record(line: str, where: str) -> dict[str, Any]:
    """One capture line, checked: a prompt-set line (no `format`) here is a mixed file."""
    row = _json_object(line, where)
    if "format" not in row:
        raise EvalInputError(
            f"{where}: a prompt-set line among capture records: a file holds captured traffic "
            "or a prompt set, not both"
        )
    if row["format"] != CAPTURE_FORMAT:
        raise EvalInputError(f"{where}: unknown format {row['format']!r} (want {CAPTURE_FORMAT})")
    id_, prompt, adapter = row.get("id"), row.get("prompt"), row.get("adapter", "")
    if not isinstance(id_, str) or not id_:
        raise EvalInputError(f"{where}: 'id' must be a non-empty string")
    if prompt is not None and not isinstance(prompt, str):
        raise EvalInputError(f"{where}: 'prompt' must be a string or null")
    if not isinstance(adapter, str):
        raise EvalInputError(f"{where}: 'adapter' must be a string")
    return {"id": id_, "prompt": prompt, "adapter": adapter}


def _load_prompt_set(path: Path, lines: list[str]) -> list[PromptItem]:
    items: list[PromptItem] = []
    problems: list[str] = []
    first_seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if _capture_format(line) is not None:
            problems.append(
                f"{where}: a capture record in a prompt set: a file holds captured traffic or "
                "a prompt set, not both"
            )
            continue
        try:
            item = _prompt_item(line, default_id=str(number), where=where)
        except EvalInputError as e:
            problems.append(str(e))
            continue
        if item.id in first_seen:
            first = first_seen[item.id]
            problems.append(f"{where}: duplicate id {item.id!r} (first on line {first})")
            continue
        first_seen[item.id] = number
        items.append(item)
    if problems:
        raise EvalInputError("\n".join(problems))
    if not items:
        raise EvalInputError(f"{path}: no prompts")
    return items


def _prompt_item(line: str, default_id: str, where: str) -> PromptItem:
    row = _json_object(line, where)
    unknown = sorted(set(row) - set(PROMPT_KEYS))
    if unknown:
        raise EvalInputError(f"{where}: unknown key(s) {unknown}; expected {list(PROMPT_KEYS)}")
    if "prompt" not in row:
        raise EvalInputError(f"{where}: missing key 'prompt'")
    prompt, reference, id_ = row["prompt"], row.get("reference"), row.get("id", default_id)
    if not isinstance(prompt, str) or not prompt.strip():
        raise EvalInputError(f"{where}: 'prompt' must be a non-empty string")
    if reference is not None and not isinstance(reference, str):
        raise EvalInputError(f"{where}: 'reference' must be a string or null")
    if isinstance(id_, bool) or not isinstance(id_, str | int) or str(id_) == "":
        raise EvalInputError(f"{where}: 'id' must be a non-empty string or an integer")
    return PromptItem(id=str(id_), prompt=prompt, reference=reference, source=where)


async def generate_pairs(
    target: str | None,
    candidate: str,
    baseline: str,
    prompts: Sequence[PromptItem],
    sampling: dict,
    concurrency: int = 16,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
    generate: GenerateFn | None = None,
) -> list[Pair]:
    """Both systems answer every prompt with the SAME options, all requests in flight together
    (the engine batches across adapters), each with a `timeout` deadline (seconds). gRPC errors
    propagate; a deadline passing is a DeadlineExceeded; a failed or cancelled completion, or a
    system served by more than one version (an alias moved mid-run), is an EvalError: either way
    the comparison would not be of two fixed systems."""
    options = check_generation_options(sampling)
    prompts = list(prompts)
    jobs = []
    async with gateway_generate(target, generate, timeout) as call:

        def job(item: PromptItem, reference: str):  # a coroutine factory
            async def run() -> Any:
                response = await call(item.prompt, adapter=reference, **options)
                check_finished(response, reference)
                return response

            return run

        for item in prompts:
            jobs += [job(item, candidate), job(item, baseline)]
        responses = await bounded_gather(jobs, concurrency, "generating pairs", progress)
    pairs = [
        Pair(
            id=item.id,
            prompt=item.prompt,
            reference=item.reference,
            candidate=cand.text,
            baseline=base.text,
            candidate_version=served_version(cand.adapter),
            baseline_version=served_version(base.adapter),
        )
        for item, cand, base in zip(prompts, responses[0::2], responses[1::2], strict=True)
    ]
    for side, reference in (("candidate", candidate), ("baseline", baseline)):
        versions = sorted({getattr(p, f"{side}_version") for p in pairs})
        if len(versions) > 1:
            raise EvalError(
                f"{side} {reference!r} was served by several versions {versions}: "
                "an alias moved during the run; run the comparison again"
            )
    return pairs


@dataclass
class ComparisonResult:
    """Everything a report and the gate need: per-pair evidence and the summary."""

    candidate: str
    baseline: str
    sampling: dict
    judge: str
    pairs: list[Pair]
    outcomes: list[float]  # the candidate's: 1 win, 0.5 tie, 0 loss
    details: list[dict]
    summary: PairwiseSummary
    judge_config: dict = field(default_factory=dict)

    @property
    def candidate_version(self) -> str:
        return self.pairs[0].candidate_version if self.pairs else ""

    @property
    def baseline_version(self) -> str:
        return self.pairs[0].baseline_version if self.pairs else ""

    def to_dict(self) -> dict:
        """JSON-ready (json.dumps works on it as is)."""
        return {
            "candidate": self.candidate,
            "candidate_version": self.candidate_version,
            "baseline": self.baseline,
            "baseline_version": self.baseline_version,
            "sampling": dict(self.sampling),
            "judge": self.judge,
            "judge_config": dict(self.judge_config),
            "summary": self.summary.to_dict(),
            "pairs": [
                {**asdict(pair), "outcome": outcome, "judge": detail}
                for pair, outcome, detail in zip(
                    self.pairs, self.outcomes, self.details, strict=True
                )
            ],
        }


async def compare(
    target: str | None,
    candidate: str,
    baseline: str,
    prompts: Sequence[PromptItem],
    judge: Judge,
    sampling: dict,
    concurrency: int = 16,
    *,
    confidence: float = 0.95,
    resamples: int = 10000,
    seed: int = 0,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
    generate: GenerateFn | None = None,
) -> ComparisonResult:
    """generate_pairs (`timeout`: each generation's deadline), then the judge, then
    `summarize_pairwise` over the candidate's outcomes. A judge that needs references is checked
    against the prompts before anything is generated."""
    from evalsuite.stats import summarize_pairwise

    if not prompts:
        raise EvalInputError("no prompts to compare on")
    if judge.needs_reference:
        missing = [p.source or f"id {p.id!r}" for p in prompts if p.reference is None]
        if missing:
            raise EvalInputError(
                f"judge {judge.name!r} needs a 'reference' for every prompt; missing at: "
                + ", ".join(missing[:10])
                + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            )
    pairs = await generate_pairs(
        target,
        candidate,
        baseline,
        prompts,
        sampling,
        concurrency,
        timeout=timeout,
        progress=progress,
        generate=generate,
    )
    judgements = await judge.judge(pairs)
    if len(judgements) != len(pairs):
        raise EvalError(
            f"judge {judge.name!r} returned {len(judgements)} verdicts for {len(pairs)} pairs"
        )
    outcomes = [j.outcome for j in judgements]
    return ComparisonResult(
        candidate=candidate,
        baseline=baseline,
        sampling=dict(sampling),
        judge=judge.name,
        pairs=pairs,
        outcomes=outcomes,
        details=[j.detail for j in judgements],
        summary=summarize_pairwise(outcomes, confidence=confidence, resamples=resamples, seed=seed),
        judge_config=judge.config(),
    )
