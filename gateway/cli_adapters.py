"""`loraplex adapters ...`: manage the adapter registry of a running gateway (AdapterService)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf.json_format import MessageToDict

from gateway.console import (
    DEFAULT_TARGET,
    Target,
    connect,
    fail,
    format_aliases,
    format_size,
    format_time,
    format_verdicts,
    print_json,
    print_registered,
    print_table,
)
from gateway.contract import PRODUCTION, VERDICTS
from loraplex.v1 import adapters_pb2 as pb

adapters_app = typer.Typer(
    help="""Manage the adapter registry of a running gateway: versions, aliases, evaluations.

    Exit codes:
    0 ok, 1 other error,
    2 invalid argument (bad input, adapter refused by validation),
    3 not found (adapter or version),
    4 failed precondition (alias moved meanwhile, no passing evaluation, version aliased),
    5 gateway unreachable or engine unavailable,
    6 no valid API key ($LORAPLEX_API_KEY) or the key may not do this.
    """,
    no_args_is_help=True,
)

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Actor = Annotated[
    str | None,
    typer.Option(
        envvar="LORAPLEX_ACTOR", help="Who to record the change as (default: $USER@hostname)."
    ),
]
Name = Annotated[str, typer.Argument(help="Adapter name.")]
Alias = Annotated[str, typer.Option(help="Alias to move.")]
Reason = Annotated[str, typer.Option(help="Why (kept in the history and audit log).")]
Description = Annotated[str, typer.Option(help="What the adapter is for.")]
Owner = Annotated[str, typer.Option(help="Team or person responsible.")]
NewAlias = Annotated[str, typer.Option("--alias", help="Alias to point at it, e.g. candidate.")]
Metadata = Annotated[str | None, typer.Option(help="JSON object, or @file.")]


def _parse_version(value: str) -> int:
    digits = value[1:] if value[:1] in ("v", "V") else value
    if not digits.isdigit() or int(digits) < 1:
        raise typer.BadParameter(f"{value!r} is not a version (e.g. 2 or v2)")
    return int(digits)


Version = Annotated[int, typer.Argument(parser=_parse_version, help="Version: 2 or v2.")]


# ---------------------------------------------------------------- plumbing


def _json_object(value: str | None, option: str) -> dict | None:
    """A JSON object from an option: inline JSON, or @file."""
    if value is None:
        return None
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        parsed = json.loads(text)
    except (OSError, ValueError) as exc:
        fail(f"{option}: {exc}", 2)
    if not isinstance(parsed, dict):
        fail(f"{option}: expected a JSON object", 2)
    return parsed


def _residency(value: int) -> str:
    name = pb.Residency.Name(value).removeprefix("RESIDENCY_").lower()
    return "-" if name == "unspecified" else name.replace("_cached", "")


def _version_rows(versions: Iterable[pb.AdapterVersion]) -> Iterator[list[str]]:
    for v in versions:
        yield [
            f"v{v.version}",
            str(v.rank),
            f"{v.alpha:g}",
            format_size(v.size_bytes),
            v.sha256[:12],
            ", ".join(v.aliases) or "-",
            _residency(v.residency),
            format_verdicts(v),
            format_time(v.create_time),
            v.actor,
        ]


VERSION_COLUMNS = (
    "version", "rank", "alpha", "size", "sha256", "aliases", "residency", "evaluations",
    "created", "by",
)  # fmt: skip


def _details(details: dict[str, Any]) -> str:
    """`key=value` pairs; Struct numbers are floats, so whole ones are shown as ints."""
    return ", ".join(
        f"{k}={int(v) if isinstance(v, float) and v.is_integer() else v}"
        for k, v in sorted(details.items())
    )


def _print_move(move: pb.AliasMove) -> None:
    before = f"v{move.from_version}" if move.from_version else "(new)"
    forced = ", forced" if move.forced else ""
    typer.echo(
        f"{move.adapter}@{move.alias}: {before} -> v{move.to_version} (by {move.actor}{forced})"
    )


# ---------------------------------------------------------------- commands


@adapters_app.command()
def register(
    name: Name,
    path: Annotated[str, typer.Argument(help="Adapter folder on the gateway host.")],
    description: Description = "",
    owner: Owner = "",
    alias: NewAlias = "",
    metadata: Metadata = None,
    source: Annotated[str, typer.Option(help="Where it comes from (default: the path).")] = "",
    target: Target = DEFAULT_TARGET,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Register a folder on the gateway host as the adapter's next version.

    A relative PATH that exists here is sent as an absolute path (for same-host use).
    """
    local = Path(path)
    if not local.is_absolute() and local.exists():
        path = str(local.resolve())
    extra = _json_object(metadata, "--metadata")
    with connect(target, actor) as client:
        version = client.register(name, path, description, owner, extra, source, alias)
    if as_json:
        print_json(version)
    else:
        print_registered(version)


@adapters_app.command()
def upload(
    name: Name,
    path: Annotated[Path, typer.Argument(help="Local adapter folder or .tar(.gz)/.zip archive.")],
    description: Description = "",
    owner: Owner = "",
    alias: NewAlias = "",
    metadata: Metadata = None,
    source: Annotated[str, typer.Option(help="Where it comes from (default: upload).")] = "",
    target: Target = DEFAULT_TARGET,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Upload a local adapter (a folder is tarred first) as the adapter's next version."""
    if not path.exists():
        fail(f"{path} does not exist", 2)
    extra = _json_object(metadata, "--metadata")
    with connect(target, actor) as client:
        try:
            version = client.upload(name, path, description, owner, extra, source, alias)
        except (OSError, ValueError) as exc:
            fail(str(exc), 2)
    if as_json:
        print_json(version)
    else:
        print_registered(version)


@adapters_app.command("list")
def list_adapters(target: Target = DEFAULT_TARGET, as_json: AsJson = False) -> None:
    """List adapters: owner, aliases, versions and where their weights are."""
    with connect(target) as client:
        adapters = [*client.list()]
    if as_json:
        print_json(adapters)
        return

    def residency(a: pb.Adapter) -> str:
        counts = Counter(_residency(v.residency) for v in a.versions)
        return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "-"

    print_table(
        None,
        ("name", "owner", "aliases", "versions", "residency"),
        (
            [a.name, a.owner or "-", format_aliases(a.aliases), str(len(a.versions)), residency(a)]
            for a in adapters
        ),
    )


@adapters_app.command()
def show(name: Name, target: Target = DEFAULT_TARGET, as_json: AsJson = False) -> None:
    """Show one adapter with its versions, aliases and evaluations."""
    with connect(target) as client:
        adapter = client.get(name)
    if as_json:
        print_json(adapter)
        return
    typer.echo(f"{adapter.name}: {adapter.description or '(no description)'}")
    typer.echo(f"owner: {adapter.owner or '-'}   created: {format_time(adapter.create_time)}")
    typer.echo(f"aliases: {format_aliases(adapter.aliases)}")
    print_table(None, VERSION_COLUMNS, _version_rows(adapter.versions))


@adapters_app.command()
def versions(name: Name, target: Target = DEFAULT_TARGET, as_json: AsJson = False) -> None:
    """List the live versions of an adapter, oldest first."""
    with connect(target) as client:
        found = client.versions(name)
    if as_json:
        print_json(found)
        return
    print_table(f"{name} versions", VERSION_COLUMNS, _version_rows(found))


@adapters_app.command()
def promote(
    name: Name,
    version: Version,
    alias: Alias = PRODUCTION,
    expect: Annotated[
        int | None,
        typer.Option(help="Version the alias must hold now, 0 for none (default: read it)."),
    ] = None,
    reason: Reason = "",
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Move production without a passing evaluation (needs --reason)."
        ),
    ] = False,
    target: Target = DEFAULT_TARGET,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Point an alias (production by default) at a version, compare-and-swap.

    Without --expect the alias's current version is read first; a concurrent move exits 4.
    """
    with connect(target, actor) as client:
        if expect is None:
            expect = client.get(name).aliases.get(alias, 0)
        move = client.set_alias(name, alias, version, expect, reason, force)
    if as_json:
        print_json(move)
    else:
        _print_move(move)


@adapters_app.command()
def rollback(
    name: Name,
    alias: Alias = PRODUCTION,
    reason: Reason = "",
    force: Annotated[
        bool, typer.Option("--force", help="Needed when that version has no passing evaluation.")
    ] = False,
    target: Target = DEFAULT_TARGET,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Move an alias back to the version it held before its latest move (compare-and-swap).

    Rolling back twice returns to where you started.
    """
    with connect(target, actor) as client:
        latest = client.history(name, alias, limit=1)
        if not latest or not latest[0].from_version:
            fail(f"{name}@{alias} held no version before its latest move; nothing to roll back", 1)
        current, previous = latest[0].to_version, latest[0].from_version
        move = client.set_alias(
            name, alias, previous, current, reason or f"rollback from v{current}", force
        )
    if as_json:
        print_json(move)
    else:
        _print_move(move)


@adapters_app.command()
def delete(
    name: Name,
    version: Version,
    reason: Reason = "",
    target: Target = DEFAULT_TARGET,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Delete a version (refused while an alias points to it); its number is never reused."""
    with connect(target, actor) as client:
        removed = client.delete(name, version, reason)
    if as_json:
        print_json({"adapter": name, "version": version, "artifact_removed": removed})
        return
    files = "artifact removed" if removed else "artifact kept: another version shares it"
    typer.echo(f"deleted {name}@v{version} ({files})")


@adapters_app.command()
def history(
    name: Name,
    alias: Annotated[str, typer.Option(help="Only this alias (default: all).")] = "",
    limit: Annotated[int, typer.Option(help="Most moves to show.")] = 20,
    target: Target = DEFAULT_TARGET,
    as_json: AsJson = False,
) -> None:
    """Show alias moves, newest first."""
    with connect(target) as client:
        moves = client.history(name, alias, limit)
    if as_json:
        print_json(moves)
        return
    print_table(
        f"{name} alias history",
        ("time", "alias", "from", "to", "by", "forced", "reason"),
        (
            [
                format_time(m.create_time),
                m.alias,
                f"v{m.from_version}" if m.from_version else "-",
                f"v{m.to_version}",
                m.actor,
                "yes" if m.forced else "",
                m.reason,
            ]
            for m in moves
        ),
    )


@adapters_app.command()
def evaluate(
    name: Name,
    version: Version,
    suite: Annotated[str, typer.Option(help="Evaluation suite or gate, e.g. gate:arc_easy.")],
    verdict: Annotated[
        str, typer.Option(help="The verdict: pass, fail or error (the evaluation did not finish).")
    ],
    report: Annotated[str | None, typer.Option(help="Report: JSON object, or @file.")] = None,
    target: Target = DEFAULT_TARGET,
    actor: Actor = None,
    as_json: AsJson = False,
) -> None:
    """Record an evaluation verdict (and its report) for a version."""
    if verdict not in VERDICTS:
        fail(f"--verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}", 2)
    body = _json_object(report, "--report") or {}
    with connect(target, actor) as client:
        evaluation = client.record_evaluation(name, version, suite, verdict, body)
    if as_json:
        print_json(evaluation)
        return
    typer.echo(f"recorded {suite}={verdict} for {name}@v{version} (evaluation {evaluation.id})")


@adapters_app.command()
def audit(
    adapter: Annotated[str, typer.Argument(help="Only this adapter (default: all).")] = "",
    limit: Annotated[int, typer.Option(help="Most events to show.")] = 20,
    target: Target = DEFAULT_TARGET,
    as_json: AsJson = False,
) -> None:
    """Show registry changes (register, set_alias, delete_version, ...), newest first."""
    with connect(target) as client:
        events = client.audit(adapter, limit)
    if as_json:
        print_json(events)
        return
    print_table(
        "audit log",
        ("time", "by", "action", "adapter", "version", "details"),
        (
            [
                format_time(e.create_time),
                e.actor,
                e.action,
                e.adapter,
                f"v{e.version}" if e.version else "-",
                _details(MessageToDict(e.details)),
            ]
            for e in events
        ),
    )
