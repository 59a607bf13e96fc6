"""What every `loraplex` subcommand shares: the gateway connection, RPC errors as exit codes,
and how versions, sizes and tables are printed. Public, so trainer/ and evalsuite/ commands use
it without reaching into another command's module.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gateway.client import AdapterClient
from gateway.contract import VERDICT_FROM_PB
from loraplex.v1 import adapters_pb2 as pb

DEFAULT_TARGET = "localhost:50051"
Target = Annotated[str, typer.Option("--target", help="Gateway address host:port.")]

EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.FAILED_PRECONDITION: 4,
    grpc.StatusCode.ABORTED: 4,
    grpc.StatusCode.UNAVAILABLE: 5,
    grpc.StatusCode.UNAUTHENTICATED: 6,
    grpc.StatusCode.PERMISSION_DENIED: 6,
}
"""gRPC status -> the exit code of a `loraplex` command (others: 1)."""
_UNREACHABLE = ("failed to connect", "dns resolution failed", "connection refused")


def fail(message: str, code: int) -> NoReturn:
    """`error: message` on stderr, then exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def rpc_errors(target: str) -> Iterator[None]:
    """RPC errors become `error: CODE: details` on stderr and a documented exit code."""
    try:
        yield
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        details: str = exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and any(
            marker in details.lower() for marker in _UNREACHABLE
        ):
            details = f"cannot reach the gateway at {target} ({details})"
        fail(f"{code.name}: {details}", EXIT_CODES.get(code, 1))


@contextmanager
def connect(target: str, actor: str | None = None) -> Iterator[AdapterClient]:
    """An AdapterClient whose RPC errors become messages and exit codes (`rpc_errors`)."""
    with rpc_errors(target), AdapterClient(target, actor) as client:
        yield client


def message_dict(message: Message) -> dict[str, Any]:
    """A proto message as JSON-ready data, with the .proto field names and unset fields."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(value: Message | Iterable[Message] | dict) -> None:
    """A message, a list of messages or a dict, as indented JSON on stdout."""
    if isinstance(value, Message):
        value = message_dict(value)
    elif not isinstance(value, dict):
        value = [message_dict(m) for m in value]
    typer.echo(json.dumps(value, indent=2))


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A rich table; cells are plain text (no markup from user strings)."""
    table = Table(*columns, title=title, title_justify="left")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    Console().print(table)


def format_time(stamp: Timestamp) -> str:
    """A proto timestamp as `YYYY-MM-DD HH:MM:SSZ`."""
    return stamp.ToDatetime(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_size(n: int) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_aliases(aliases: Mapping[str, int]) -> str:
    """`alias=vN, ...` in name order, or `-`."""
    return ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items())) or "-"


def format_verdicts(version: pb.AdapterVersion) -> str:
    """A version's evaluations as `suite=verdict, ...`, or `-`."""
    verdicts = (f"{e.suite}={VERDICT_FROM_PB.get(e.verdict, '?')}" for e in version.evaluations)
    return ", ".join(verdicts) or "-"


def print_registered(version: pb.AdapterVersion) -> None:
    """The one line a registration or upload prints."""
    aliased = f" as {', '.join(version.aliases)}" if version.aliases else ""
    typer.echo(
        f"registered {version.adapter}@v{version.version}{aliased} "
        f"(rank {version.rank}, {format_size(version.size_bytes)}, "
        f"sha256 {version.sha256[:12]})"
    )
