"""`loraplex adapters ...`: manage the adapter registry of a running gateway (AdapterService)."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gateway.client import VERDICTS, AdapterClient
from loraplex.v1 import adapters_pb2 as pb

EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.FAILED_PRECONDITION: 4,
    grpc.StatusCode.ABORTED: 4,
    grpc.StatusCode.UNAVAILABLE: 5,
    grpc.StatusCode.UNAUTHENTICATED: 6,
    grpc.StatusCode.PERMISSION_DENIED: 6,
}
_UNREACHABLE = ("failed to connect", "dns resolution failed", "connection refused")

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

Target = Annotated[str, typer.Option("--target", help="Gateway address host:port.")]
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
DEFAULT_TARGET = "localhost:50051"


def _parse_version(value: str) -> int:
    digits = value[1:] if value[:1] in ("v", "V") else value
    if not digits.isdigit() or int(digits) < 1:
        raise typer.BadParameter(f"{value!r} is not a version (e.g. 2 or v2)")
    return int(digits)


Version = Annotated[int, typer.Argument(parser=_parse_version, help="Version: 2 or v2.")]


# ---------------------------------------------------------------- plumbing


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def rpc_errors(target: str) -> Iterator[None]:
    """RPC errors become `error: CODE: details` on stderr and a documented exit code."""
    try:
        yield
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        details: str = exc.details() or ""  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE and any(
            marker in details.lower() for marker in _UNREACHABLE
        ):
            details = f"cannot reach the gateway at {target} ({details})"
        fail(f"{code.name}: {details}", EXIT_CODES.get(code, 1))


@contextmanager
def _connect(target: str, actor: str | None = None) -> Iterator[AdapterClient]:
    """An AdapterClient whose RPC errors become messages and exit codes (`rpc_errors`)."""
    with rpc_errors(target), AdapterClient(target, actor) as client:
        yield client


def _dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(value: Message | Iterable[Message] | dict) -> None:
    if isinstance(value, Message):
        value = _dict(value)
    elif not isinstance(value, dict):
        value = [_dict(m) for m in value]
    typer.echo(json.dumps(value, indent=2))


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


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    table = Table(*columns, title=title, title_justify="left")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: no markup in user strings
    Console().print(table)


def format_time(stamp: Timestamp) -> str:
    return stamp.ToDatetime(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _residency(value: int) -> str:
    name = pb.Residency.Name(value).removeprefix("RESIDENCY_").lower()
    return "-" if name == "unspecified" else name.replace("_cached", "")


def _aliases(aliases: Mapping[str, int]) -> str:
    return ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items())) or "-"


def _verdicts(version: pb.AdapterVersion) -> str:
    verdict = {pb.VERDICT_PASS: "pass", pb.VERDICT_FAIL: "fail", pb.VERDICT_ERROR: "error"}
    return ", ".join(f"{e.suite}={verdict.get(e.verdict, '?')}" for e in version.evaluations) or "-"


def _version_rows(versions: Iterable[pb.AdapterVersion]) -> Iterator[list[str]]:
    for v in versions:
        yield [
            f"v{v.version}",
            str(v.rank),
            f"{v.alpha:g}",
            _size(v.size_bytes),
            v.sha256[:12],
            ", ".join(v.aliases) or "-",
            _residency(v.residency),
            _verdicts(v),
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


def _print_registered(version: pb.AdapterVersion) -> None:
    aliased = f" as {', '.join(version.aliases)}" if version.aliases else ""
    typer.echo(
        f"registered {version.adapter}@v{version.version}{aliased} "
        f"(rank {version.rank}, {_size(version.size_bytes)}, sha256 {version.sha256[:12]})"
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
    with _connect(target, actor) as client:
        version = client.register(name, path, description, owner, extra, source, alias)
    if as_json:
        print_json(version)
    else:
        _print_registered(version)


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
    with _connect(target, actor) as client:
        try:
            version = client.upload(name, path, description, owner, extra, source, alias)
        except (OSError, ValueError) as exc:
            fail(str(exc), 2)
    if as_json:
        print_json(version)
    else:
        _print_registered(version)


@adapters_app.command("list")
def list_adapters(target: Target = DEFAULT_TARGET, as_json: AsJson = False) -> None:
    """List adapters: owner, aliases, versions and where their weights are."""
    with _connect(target) as client:
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
            [a.name, a.owner or "-", _aliases(a.aliases), str(len(a.versions)), residency(a)]
            for a in adapters
        ),
    )


@adapters_app.command()
def show(name: Name, target: Target = DEFAULT_TARGET, as_json: AsJson = False) -> None:
    """Show one adapter with its versions, aliases and evaluations."""
    with _connect(target) as client:
        adapter = client.get(name)
    if as_json:
        print_json(adapter)
        return
    typer.echo(f"{adapter.name}: {adapter.description or '(no description)'}")
    typer.echo(f"owner: {adapter.owner or '-'}   created: {format_time(adapter.create_time)}")
    typer.echo(f"aliases: {_aliases(adapter.aliases)}")
    print_table(None, VERSION_COLUMNS, _version_rows(adapter.versions))


@adapters_app.command()
def versions(name: Name, target: Target = DEFAULT_TARGET, as_json: AsJson = False) -> None:
    """List the live versions of an adapter, oldest first."""
    with _connect(target) as client:
        found = client.versions(name)
    if as_json:
        print_json(found)
        return
    print_table(f"{name} versions", VERSION_COLUMNS, _version_rows(found))


@adapters_app.command()
def promote(
    name: Name,
    version: Version,
    alias: Alias = "production",
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
    with _connect(target, actor) as client:
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
    alias: Alias = "production",
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
    with _connect(target, actor) as client:
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
    with _connect(target, actor) as client:
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
    with _connect(target) as client:
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
    with _connect(target, actor) as client:
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
    with _connect(target) as client:
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
