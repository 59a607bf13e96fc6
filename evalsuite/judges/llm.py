"""A served model as the judge, asked THROUGH THE GATEWAY (any base/adapter reference), greedy.

Models prefer whichever answer comes first (or second) regardless of content, so every pair is
asked twice, the candidate once as A and once as B: only a verdict that survives the swap counts
(the candidate wins or loses); a flip, or a reply with no A/B in it, is a tie."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evalsuite.errors import EvalError, EvalInputError
from evalsuite.fanout import (
    DEFAULT_TIMEOUT_S,
    GenerateFn,
    bounded_gather,
    check_finished,
    check_timeout,
    gateway_generate,
    served_version,
)
from evalsuite.judges.base import LOSS, TIE, WIN, Judge, Judgement

if TYPE_CHECKING:
    from evalsuite.compare import Pair

DEFAULT_TEMPLATE = """\
Two assistants answered the same request. Decide which answer is better: correct, helpful and \
to the point. Ignore the order in which the answers appear and their length.

Request:
{prompt}

Answer A:
{answer_a}

Answer B:
{answer_b}

Reply with one letter, A or B.
Better answer:"""
FIELDS = frozenset({"prompt", "answer_a", "answer_b", "reference"})
FIRST_TOKEN = r"\b([AB])\b"  # parse="first": the first standalone capital A or B


class LLMJudge(Judge):
    """Options: adapter (the judge's reference: "" base, NAME, NAME@alias, NAME@vN), target
    (gateway host:port), template or template_file (str.format, or Jinja2 with
    template_format="jinja"; fields {prompt} {answer_a} {answer_b} and optional {reference}),
    parse ("first", or a regex whose first group, or whole match, is A or B), max_tokens,
    max_unparseable (share of replies without a verdict above which the judge is an error),
    timeout (each request's deadline, seconds)."""

    name = "llm_judge"
    adapter_option = "adapter"

    def __init__(
        self,
        adapter: str = "",
        target: str | None = None,
        template: str | None = None,
        template_file: str | Path | None = None,
        template_format: Literal["format", "jinja"] = "format",
        parse: str = "first",
        max_tokens: int = 8,
        stop: Sequence[str] = (),
        concurrency: int = 16,
        timeout: float = DEFAULT_TIMEOUT_S,
        progress: bool = True,
        generate: GenerateFn | None = None,
        max_unparseable: float = 0.2,
    ) -> None:
        if not 0 <= max_unparseable <= 1:  # 1: never an error (mechanics tests, exploration)
            raise EvalInputError("llm_judge: max_unparseable must be in [0, 1]")
        self.max_unparseable = float(max_unparseable)
        if template is not None and template_file is not None:
            raise EvalInputError("llm_judge: give template or template_file, not both")
        if template_file is not None:
            try:
                template = Path(template_file).read_text(encoding="utf-8")
            except OSError as e:
                raise EvalInputError(f"llm_judge: cannot read template_file: {e}") from None
        self.adapter, self.target = adapter, target
        self.template = DEFAULT_TEMPLATE if template is None else template
        self.template_format = template_format
        self._render, fields = _compile_template(self.template, template_format)
        self.needs_reference = "reference" in fields
        self.parse = parse
        try:
            self._pattern = re.compile(FIRST_TOKEN if parse == "first" else parse)
        except re.error as e:
            raise EvalInputError(f"llm_judge: parse is not a valid regex: {e}") from None
        if max_tokens < 1:
            raise EvalInputError(f"llm_judge: max_tokens must be >= 1, got {max_tokens}")
        self.options = {"temperature": 0.0, "max_tokens": int(max_tokens), "stop": list(stop)}
        self.timeout = check_timeout(timeout, "llm_judge: timeout")
        self.concurrency, self.progress = concurrency, progress
        self._generate = generate

    def render(self, pair: Pair, candidate_first: bool) -> str:
        """The judge prompt with the candidate as answer A (or B)."""
        a, b = pair.candidate, pair.baseline
        if not candidate_first:
            a, b = b, a
        return self._render(
            {"prompt": pair.prompt, "answer_a": a, "answer_b": b, "reference": pair.reference or ""}
        )

    def verdict(self, reply: str) -> str | None:
        """ "A", "B", or None when the reply names neither."""
        match = self._pattern.search(reply)
        if match is None:
            return None
        found = (match.group(1) if self._pattern.groups else match.group(0)).strip().upper()
        return found if found in ("A", "B") else None

    async def judge(self, pairs: Sequence[Pair]) -> list[Judgement]:
        pairs = list(pairs)
        if self.needs_reference:
            missing = [p.id for p in pairs if p.reference is None]
            if missing:
                raise EvalInputError(
                    f"llm_judge: the template uses {{reference}}; pairs without: {missing}"
                )
        asked = [p for p in pairs if p.candidate != p.baseline]  # identical answers: a tie
        async with gateway_generate(self.target, self._generate, self.timeout) as call:

            def job(prompt: str):  # a coroutine factory
                async def run() -> Any:
                    response = await call(prompt, adapter=self.adapter, **self.options)
                    check_finished(response, self.adapter)
                    return response

                return run

            jobs = [job(self.render(p, first)) for p in asked for first in (True, False)]
            replies = await bounded_gather(jobs, self.concurrency, "judging", self.progress)
        versions = sorted({served_version(r.adapter) for r in replies})
        if len(versions) > 1:
            raise EvalError(f"the judge {self.adapter!r} was served by several versions {versions}")
        pairs_of_replies = zip(asked, replies[0::2], replies[1::2], strict=True)
        by_id = {p.id: (first, second) for p, first, second in pairs_of_replies}
        unparseable = sum(self.verdict(r.text) is None for r in replies)
        if replies and unparseable / len(replies) > self.max_unparseable:
            # A judge that cannot answer would turn every pair into a tie (win rate 0.5): that is
            # a broken judge, not evidence.
            raise EvalError(
                f"the judge {self.adapter or 'base'!r} gave no A/B verdict in {unparseable} of "
                f"{len(replies)} replies (allowed: {self.max_unparseable:.0%}); e.g. "
                f"{next(r.text for r in replies if self.verdict(r.text) is None)!r}"
            )
        return [self._judgement(p, by_id.get(p.id)) for p in pairs]

    def _judgement(self, pair: Pair, replies: tuple[Any, Any] | None) -> Judgement:
        if replies is None:
            return Judgement(TIE, {"identical": True})
        as_a, as_b = self.verdict(replies[0].text), self.verdict(replies[1].text)
        candidate_won = (as_a == "A", as_b == "B")
        candidate_lost = (as_a == "B", as_b == "A")
        outcome = WIN if all(candidate_won) else LOSS if all(candidate_lost) else TIE
        return Judgement(
            outcome,
            {
                "candidate_as_a": {"reply": replies[0].text, "verdict": as_a},
                "candidate_as_b": {"reply": replies[1].text, "verdict": as_b},
                "consistent": outcome != TIE,
                "judge_version": served_version(replies[0].adapter),
            },
        )

    def config(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "template": self.template,
            "template_format": self.template_format,
            "parse": self.parse,
            "max_unparseable": self.max_unparseable,
            **self.options,
        }


def _compile_template(template: str, kind: str) -> tuple[Any, set[str]]:
    """(render(fields) -> str, the fields it uses); unknown fields or a template without both
    answers are refused up front, not at the first pair."""
    if kind == "format":
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as e:
            raise EvalInputError(f"llm_judge: bad str.format template: {e}") from None

        def render(values: dict[str, str]) -> str:
            return template.format_map(values)

    elif kind == "jinja":
        import jinja2
        from jinja2 import meta
        from jinja2.sandbox import SandboxedEnvironment

        env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        try:
            fields = meta.find_undeclared_variables(env.parse(template))
            compiled = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise EvalInputError(f"llm_judge: bad Jinja2 template: {e}") from None

        def render(values: dict[str, str]) -> str:
            return compiled.render(**values)

    else:
        raise EvalInputError(
            f"llm_judge: template_format must be 'format' or 'jinja', not {kind!r}"
        )
    unknown = sorted(fields - FIELDS)
    if unknown:
        raise EvalInputError(
            f"llm_judge: unknown template field(s) {unknown}; known: {sorted(FIELDS)}"
        )
    if not {"answer_a", "answer_b"} <= fields:
        raise EvalInputError("llm_judge: the template must show both {answer_a} and {answer_b}")
    return render, fields
