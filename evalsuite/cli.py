"""`loraplex eval ...`: lm-eval through the gateway, and the promotion gate.

Exit codes of `gate`: 0 pass (and promoted when asked), 1 fail, 2 error (bad policy, gateway
down, adapter missing, a judge failing, a request past its deadline, promotion refused): never
promoted unless 0.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, cast

import typer

from evalsuite.errors import EvalError, EvalInputError, describe_failure
from evalsuite.fanout import DEFAULT_TIMEOUT_S
from evalsuite.policy import DEFAULT_SAMPLING
from gateway.console import DEFAULT_TARGET, fail
from gateway.contract import PRODUCTION

eval_app = typer.Typer(
    help="Evaluate adapters through the gateway (lm-eval, preference comparisons, the gate).",
    no_args_is_help=True,
)
EXIT_ERROR = 2


@eval_app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def lm_eval_cli(ctx: typer.Context) -> None:
    """lm-eval's own command line, with the `loraplex` model registered:

    loraplex eval lm-eval --model loraplex --model_args target=HOST:PORT,adapter=NAME@candidate
    --tasks TASK [--include_path DIR] ...
    """
    from lm_eval.__main__ import cli_evaluate

    import evalsuite  # noqa: F401  (registers the loraplex model)

    sys.argv = ["lm-eval", *ctx.args]
    cli_evaluate()


@eval_app.command()
def gate(
    adapter: Annotated[str, typer.Option(help="Candidate: NAME@candidate, NAME@ALIAS or NAME@vN.")],
    policy: Annotated[Path, typer.Option(help="Gate policy YAML.")],
    target: Annotated[str, typer.Option(help="Gateway address host:port.")] = DEFAULT_TARGET,
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default: gate-reports/NAME-TIME).")
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="Move production to the candidate if it passes.")
    ] = False,
    actor: Annotated[str | None, typer.Option(help="Who runs the gate (audit log).")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="key=value over the policy, e.g. limit=8; repeatable."),
    ] = None,
) -> None:
    """Run the policy's benchmarks and comparison on the candidate, record the verdict, and with
    --promote move `production` to it only on pass (compare-and-swap)."""
    from evalsuite.gate import run_gate
    from evalsuite.policy import load_policy

    try:
        gate_policy = load_policy(policy, overrides)
    except EvalInputError as exc:
        fail(str(exc), EXIT_ERROR)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out or Path("gate-reports") / f"{adapter.replace('@', '-')}-{stamp}"
    try:
        result = run_gate(target, adapter, gate_policy, out, promote=promote, actor=actor)
    except Exception as exc:  # noqa: BLE001  (run_gate maps evaluation failures; the rest: error)
        fail(f"gate failed: {type(exc).__name__}: {exc}", EXIT_ERROR)
    report = result.report
    typer.echo(
        f"verdict: {result.verdict.upper()} for {(report.candidate or {}).get('ref', adapter)}"
    )
    for check in report.checks:
        mark = "ok " if check["passed"] else ("FAIL" if check["required"] else "warn")
        typer.echo(f"  [{mark}] {check['name']}: {check['detail']}")
    if report.error:
        typer.echo(f"error: {report.error}", err=True)
    if promote:
        if result.promoted and report.candidate is not None:
            typer.echo(f"promoted: {report.adapter} production -> v{report.candidate['version']}")
        else:
            why = report.promotion.error or f"verdict {result.verdict}"
            typer.echo(f"not promoted: {why}", err=result.verdict == "pass")
    if result.report_paths:
        typer.echo(f"report: {result.report_paths[1]} (and {result.report_paths[0].name})")
    raise typer.Exit(result.exit_code)


Options = Annotated[
    list[str] | None,
    typer.Option("--judge-option", help="Judge option key=value (YAML value), repeatable."),
]
Timeout = Annotated[
    float,
    typer.Option(
        min=0.001, help="Deadline of each request to the gateway, seconds (generation, LLM judge)."
    ),
]


def _options(items: list[str] | None, what: str) -> dict:
    """key=value pairs with YAML values (temperature=0, stop=['\\n'], path=/models/rm)."""
    import yaml

    parsed = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            fail(f"{what} {item!r}: expected key=value", EXIT_ERROR)
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return parsed


def _write_json(path: Path | None, data: dict) -> None:
    import json

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        typer.echo(f"written: {path}")


def _print_summary(label: str, summary: dict) -> None:
    typer.echo(
        f"{label}: {summary['wins']}W/{summary['ties']}T/{summary['losses']}L of {summary['n']}, "
        f"win rate {summary['win_rate']:.3f}, {summary['confidence']:.0%} CI "
        f"[{summary['ci_low']:.3f}, {summary['ci_high']:.3f}], sign test p "
        f"{summary['sign_test_p']:.3g}"
    )


@eval_app.command()
def compare(
    candidate: Annotated[str, typer.Option(help="Candidate reference (NAME@ALIAS, NAME@vN).")],
    prompts: Annotated[
        Path,
        typer.Option(
            help="JSONL prompts (prompt, id, reference), or captured traffic: a capture-*.jsonl "
            "file or a folder of them."
        ),
    ],
    baseline: Annotated[
        str,
        typer.Option(help="Baseline: production (the candidate's), base, or any reference."),
    ] = PRODUCTION,
    judge: Annotated[str, typer.Option(help="exact_match, rouge_l, reward_model, llm_judge.")] = (
        "exact_match"
    ),
    judge_option: Options = None,
    sampling: Annotated[
        list[str] | None, typer.Option(help="Generation option key=value, repeatable.")
    ] = None,
    target: Annotated[str, typer.Option(help="Gateway address host:port.")] = DEFAULT_TARGET,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    out: Annotated[Path | None, typer.Option(help="Write the comparison as JSON.")] = None,
    export_human: Annotated[
        Path | None, typer.Option(help="Also export the pairs, blinded, for human raters.")
    ] = None,
    key: Annotated[Path | None, typer.Option(help="Where the human export's key goes.")] = None,
    captured_adapter: Annotated[
        str | None,
        typer.Option(help="Captured traffic: only requests served by this adapter ('' = base)."),
    ] = None,
) -> None:
    """Candidate vs baseline on a prompt set, both answered through the gateway, judged pairwise."""
    import asyncio

    import grpc

    from evalsuite.compare import compare as run_compare
    from evalsuite.compare import load_prompt_source
    from evalsuite.human import export_for_rating
    from evalsuite.judges import make_judge

    if export_human is not None and key is None:
        fail("--export-human needs --key (kept away from the raters)", EXIT_ERROR)
    options = _options(judge_option, "--judge-option")
    sampling_options = DEFAULT_SAMPLING | _options(sampling, "--sampling")
    if baseline == PRODUCTION:
        baseline = f"{candidate.partition('@')[0]}@{PRODUCTION}"
    elif baseline == "base":
        baseline = ""
    started = _now()
    try:
        source = load_prompt_source(prompts, captured_adapter=captured_adapter)
        if source.captured:
            typer.echo(f"prompts: {source.describe()}")
        result = asyncio.run(
            run_compare(
                target, candidate, baseline, source.items,
                make_judge(judge, gateway=target, deadline=timeout, **options), sampling_options,
                timeout=timeout,
            )
        )  # fmt: skip
    except EvalError as exc:
        fail(str(exc), EXIT_ERROR)
    except grpc.RpcError as exc:
        fail(describe_failure(exc, target), EXIT_ERROR)
    _print_summary(f"{result.candidate_version} vs {result.baseline_version} ({judge})",
                   result.summary.to_dict())  # fmt: skip
    _write_json(out, {**result.to_dict(), "time": started})
    if export_human is not None and key is not None:
        exported = export_for_rating(result.pairs, export_human, key)
        typer.echo(f"for raters: {exported.csv} / {exported.jsonl}; key (keep): {exported.key}")


@eval_app.command("score-votes")
def score_votes(
    votes: Annotated[list[Path], typer.Argument(help="Votes files (CSV/JSONL), one per rater.")],
    key: Annotated[Path, typer.Option(help="The export's key file.")],
    out: Annotated[Path | None, typer.Option(help="Write the result as JSON.")] = None,
) -> None:
    """Human votes on an exported comparison -> the same statistics as the automatic judges."""
    from evalsuite.human import score_votes as score

    try:
        result = score(votes, key)
    except EvalError as exc:
        fail(str(exc), EXIT_ERROR)
    _print_summary("human votes (candidate)", result.summary.to_dict())
    if result.unrated:
        typer.echo(f"unrated pairs: {len(result.unrated)}")
    _write_json(out, result.to_dict())


@eval_app.command()
def rank(
    systems: Annotated[list[str], typer.Argument(help="Three or more references ('' = base).")],
    prompts: Annotated[Path, typer.Option(help="JSONL prompts (prompt, id, reference).")],
    judge: Annotated[str, typer.Option(help="Judge name.")] = "exact_match",
    judge_option: Options = None,
    sampling: Annotated[list[str] | None, typer.Option(help="Generation option key=value.")] = None,
    target: Annotated[str, typer.Option(help="Gateway address host:port.")] = DEFAULT_TARGET,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    out: Annotated[Path | None, typer.Option(help="Write the ratings as JSON.")] = None,
) -> None:
    """Every pair of systems compared on the prompts; Bradley-Terry ratings with bootstrap CIs."""
    import asyncio
    from itertools import combinations

    import grpc

    from evalsuite.compare import compare as run_compare
    from evalsuite.compare import load_prompts
    from evalsuite.judges import make_judge
    from evalsuite.stats import bradley_terry

    if len(set(systems)) < 2:
        fail("rank needs at least two different systems", EXIT_ERROR)
    options = _options(judge_option, "--judge-option")
    sampling_options = DEFAULT_SAMPLING | _options(sampling, "--sampling")
    games: list[tuple[str, str, float]] = []
    comparisons: list[dict] = []
    started = _now()
    try:
        items = load_prompts(prompts)
        for a, b in combinations(dict.fromkeys(systems), 2):
            result = asyncio.run(
                run_compare(
                    target,
                    a,
                    b,
                    items,
                    make_judge(judge, gateway=target, deadline=timeout, **options),
                    sampling_options,
                    timeout=timeout,
                )
            )
            games += [(a or "base", b or "base", o) for o in result.outcomes]
            comparisons.append(result.to_dict())
            _print_summary(f"{a or 'base'} vs {b or 'base'}", result.summary.to_dict())
        ratings = bradley_terry(games)
    except EvalError as exc:
        fail(str(exc), EXIT_ERROR)
    except grpc.RpcError as exc:
        fail(describe_failure(exc, target), EXIT_ERROR)
    for r in ratings:
        typer.echo(f"{r.system:30s} {r.rating:7.1f}  [{r.ci_low:7.1f}, {r.ci_high:7.1f}]")
    _write_json(
        out,
        {
            "judge": judge,
            "judge_config": comparisons[0]["judge_config"] if comparisons else {},
            "time": started,
            "ratings": [r.to_dict() for r in ratings],
            "comparisons": comparisons,  # the judged texts, for `eval pairs`
        },
    )


@eval_app.command()
def pairs(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Votes files (CSV/JSONL, with --key), compare results or gate report.json "
            "files, rank results."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Pairs JSONL to write (provenance: OUT.provenance.jsonl).")
    ],
    kind: Annotated[
        str | None, typer.Option(help="votes, compare or rank, for every input (default: detect).")
    ] = None,
    key: Annotated[Path | None, typer.Option(help="The human export's key (votes).")] = None,
    export: Annotated[
        list[Path] | None,
        typer.Option(help="The export's pairs.jsonl: exact texts (default: the votes files')."),
    ] = None,
    ties: Annotated[
        str, typer.Option(help="drop, or keep (written in both orders: pulls the two together).")
    ] = "drop",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT and its sidecar.")] = False,
) -> None:
    """Preference evidence (human votes, compare, rank) -> prompt/chosen/rejected JSONL that
    `train dpo` and `train reward` read as is, with a line-aligned provenance sidecar."""
    from evalsuite.pairs import KINDS, Kind, Ties, build_pairs, write_pairs

    if kind is not None and kind not in KINDS:
        fail(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}", EXIT_ERROR)
    if ties not in ("drop", "keep"):
        fail(f"--ties must be drop or keep, got {ties!r}", EXIT_ERROR)
    try:
        result = build_pairs(inputs, kind=cast("Kind | None", kind), key=key,
                             export=export or [], ties=cast("Ties", ties))  # fmt: skip
        for label, counts in result.counts.items():
            typer.echo(f"{counts.kind} {label}: {counts.describe()}")
        written, sidecar = write_pairs(result, out, force=force)
    except EvalError as exc:
        fail(str(exc), EXIT_ERROR)
    ties_note = sum(c.ties_kept for c in result.counts.values())
    typer.echo(
        f"written: {written} ({len(result.rows)} pairs"
        + (f", {ties_note} ties in both orders" if ties_note else "")
        + f"); provenance: {sidecar}"
    )


def _now() -> str:
    """When an evaluation started (ISO 8601, UTC): recorded in its results for provenance."""
    return datetime.now(UTC).isoformat(timespec="seconds")
