"""`loraplex eval ...`: lm-eval through the gateway, and the promotion gate.

Exit codes of `gate`: 0 pass (and promoted when asked), 1 fail, 2 error (bad policy, gateway
down, adapter missing, a judge failing, promotion refused): never promoted unless 0.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli_adapters import DEFAULT_TARGET, _fail

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
) -> None:
    """Run the policy's benchmarks and comparison on the candidate, record the verdict, and with
    --promote move `production` to it only on pass (compare-and-swap)."""
    from evalsuite.errors import EvalInputError
    from evalsuite.gate import run_gate
    from evalsuite.policy import load_policy

    try:
        gate_policy = load_policy(policy)
    except EvalInputError as exc:
        _fail(str(exc), EXIT_ERROR)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out or Path("gate-reports") / f"{adapter.replace('@', '-')}-{stamp}"
    result = run_gate(target, adapter, gate_policy, out, promote=promote, actor=actor)
    report = result.report
    typer.echo(
        f"verdict: {result.verdict.upper()} for {(report['candidate'] or {}).get('ref', adapter)}"
    )
    for check in report["checks"]:
        mark = "ok " if check["passed"] else ("FAIL" if check["required"] else "warn")
        typer.echo(f"  [{mark}] {check['name']}: {check['detail']}")
    if report["error"]:
        typer.echo(f"error: {report['error']}", err=True)
    promotion = report["promotion"]
    if promote:
        if result.promoted:
            typer.echo(
                f"promoted: {report['adapter']} production -> v{report['candidate']['version']}"
            )
        else:
            why = promotion.get("error") or f"verdict {result.verdict}"
            typer.echo(f"not promoted: {why}", err=result.verdict == "pass")
    if result.report_paths:
        typer.echo(f"report: {result.report_paths[1]} (and {result.report_paths[0].name})")
    raise typer.Exit(result.exit_code)
