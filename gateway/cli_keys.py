"""`loraplex keys ...`: create, list and revoke API keys.

Two ways in: `--target HOST:PORT` asks a running gateway (KeyService, with an unrestricted
admin key in $LORAPLEX_API_KEY); `--config`/`--data-dir`/`--registry-url` writes the registry
database directly, which is how the first admin key is made (whoever can write the database
is an admin already).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from gateway.client import KeyClient, default_actor
from gateway.console import EXIT_CODES, fail, format_time, print_json, print_table, rpc_errors
from gateway.errors import LoraplexError
from gateway.key_service import key_to_pb
from gateway.keys import KeyStore
from loraplex.v1 import keys_pb2 as pb

keys_app = typer.Typer(
    help="""Create, list and revoke API keys (roles: infer, admin).

    Exit codes as `loraplex adapters`: 0 ok, 2 invalid argument, 3 not found,
    5 gateway unreachable, 6 no valid admin key.
    """,
    no_args_is_help=True,
)

Target = Annotated[
    str | None,
    typer.Option("--target", help="A running gateway (host:port); needs an admin key."),
]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="Gateway config: use its registry database.")
]
DataDir = Annotated[Path | None, typer.Option(help="Registry database in this data dir.")]
RegistryUrl = Annotated[str | None, typer.Option(help="Registry database URL.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class _Keys:
    """The same three operations over gRPC or on the database, answering proto messages."""

    def __init__(self, client: KeyClient | None, store: KeyStore | None) -> None:
        self.client, self.store = client, store

    def create(
        self, name: str, role: str, adapters: list[str], rpm: int, tpm: int
    ) -> pb.CreateKeyResponse:
        if self.client is not None:
            return self.client.create(name, role, adapters, rpm, tpm)
        assert self.store is not None
        key, secret = self.store.create(
            name, role, f"{default_actor()} (database)", adapters, rpm or None, tpm or None
        )
        return pb.CreateKeyResponse(key=key_to_pb(key), secret=secret)

    def list(self, include_revoked: bool) -> list[pb.ApiKey]:
        if self.client is not None:
            return self.client.list(include_revoked)
        assert self.store is not None
        return [key_to_pb(k) for k in self.store.list(include_revoked)]

    def revoke(self, key_id: str) -> pb.ApiKey:
        if self.client is not None:
            return self.client.revoke(key_id)
        assert self.store is not None
        return key_to_pb(self.store.revoke(key_id, f"{default_actor()} (database)"))


def _database_url(config: Path | None, data_dir: Path | None, registry_url: str | None) -> str:
    from gateway.config import ConfigError, load_config

    if registry_url:
        return registry_url
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{data_dir / 'registry.db'}"
    try:
        settings = load_config(config)
    except ConfigError as exc:
        fail(str(exc), 2)
    if settings.registry_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings.registry_database


@contextlib.contextmanager
def _keys(
    target: str | None, config: Path | None, data_dir: Path | None, registry_url: str | None
) -> Iterator[_Keys]:
    direct = [o for o in (config, data_dir, registry_url) if o is not None]
    if (target is None) == (not direct):
        fail("give either --target (a running gateway) or --config/--data-dir/--registry-url", 2)
    if target is not None:
        with rpc_errors(target), KeyClient(target) as client:
            yield _Keys(client, None)
        return
    store = KeyStore(_database_url(config, data_dir, registry_url))
    try:
        yield _Keys(None, store)
    except LoraplexError as exc:
        fail(f"{exc.code.name}: {exc}", EXIT_CODES.get(exc.code, 1))
    finally:
        store.close()


def _role(value: int) -> str:
    return pb.Role.Name(value).removeprefix("ROLE_").lower()


@keys_app.command()
def create(
    name: Annotated[str, typer.Argument(help="Whose key it is (team, service).")],
    role: Annotated[str, typer.Option(help="infer (generation) or admin (also the registry).")],
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="Limit the key to adapters matching this glob (repeatable)."),
    ] = None,
    requests_per_minute: Annotated[int, typer.Option(help="0: the gateway's default.")] = 0,
    tokens_per_minute: Annotated[int, typer.Option(help="0: the gateway's default.")] = 0,
    target: Target = None,
    config: ConfigFile = None,
    data_dir: DataDir = None,
    registry_url: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """Create a key and print its secret (shown only this once)."""
    if role not in ("infer", "admin"):
        fail(f"--role must be infer or admin, not {role!r}", 2)
    with _keys(target, config, data_dir, registry_url) as keys:
        created = keys.create(name, role, adapter or [], requests_per_minute, tokens_per_minute)
    if as_json:
        print_json(created)
        return
    typer.echo(f"key {created.key.id} ({_role(created.key.role)}) for {created.key.name}")
    typer.echo("store the secret now, it cannot be shown again:", err=True)
    typer.echo(created.secret)


@keys_app.command("list")
def list_keys(
    include_revoked: Annotated[bool, typer.Option(help="Show revoked keys too.")] = False,
    target: Target = None,
    config: ConfigFile = None,
    data_dir: DataDir = None,
    registry_url: RegistryUrl = None,
    as_json: AsJson = False,
) -> None:
    """List keys (never their secrets)."""
    with _keys(target, config, data_dir, registry_url) as keys:
        listed = keys.list(include_revoked)
    if as_json:
        print_json(listed)
        return
    print_table(
        None,
        ["id", "name", "role", "adapters", "req/min", "tok/min", "created", "revoked"],
        [
            [
                k.id,
                k.name,
                _role(k.role),
                ",".join(k.adapters) or "*",
                str(k.requests_per_minute or "-"),
                str(k.tokens_per_minute or "-"),
                format_time(k.create_time),
                format_time(k.revoke_time) if k.HasField("revoke_time") else "",
            ]
            for k in listed
        ],
    )


@keys_app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="Id of the key (from `loraplex keys list`).")],
    target: Target = None,
    config: ConfigFile = None,
    data_dir: DataDir = None,
    registry_url: RegistryUrl = None,
) -> None:
    """Revoke a key: every gateway refuses it within one registry poll interval."""
    with _keys(target, config, data_dir, registry_url) as keys:
        revoked = keys.revoke(key_id)
    typer.echo(f"revoked key {revoked.id} ({revoked.name})")
