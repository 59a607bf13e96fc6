"""API keys: created and revoked by admins, stored only as salted hashes, in the registry database.

A key's secret is `lpx_<id>_<random>`: the id finds the row, the random part is checked against
sha256(salt + secret). The random part carries 256 bits, so a slow password hash would add
nothing (there is nothing to guess) and a fast one keeps checking a call to microseconds.

`KeyRing` is what a gateway checks calls against: an in-memory copy of the active keys,
reloaded every poll interval (and at once after this gateway's own changes), so a key revoked
anywhere is refused everywhere within one interval. Each change is one transaction, so a
kill -9 at any point leaves the key either fully created (or revoked) or untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import fnmatch
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from gateway.errors import InvalidRequest, LoraplexError
from gateway.registry.artifacts import failpoint
from gateway.registry.database import make_db_engine

log = logging.getLogger(__name__)

SECRET_PREFIX = "lpx"
SECRET_FORMAT = re.compile(r"^lpx_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MAX_PATTERNS = 64
UNKNOWN_KEY_RELOAD_S = 1.0  # an unknown key id reloads the ring at most this often


class Role(enum.StrEnum):
    """What a key may call (see gateway/auth.py for the methods of each)."""

    INFER = "infer"
    ADMIN = "admin"


class KeyNotFound(LoraplexError):
    """No key has this id."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, key_id: str) -> None:
        super().__init__(f"API key {key_id!r} not found")


@dataclass(frozen=True)
class ApiKey:
    """A key as callers and admins see it (never its secret)."""

    id: str
    name: str
    role: Role
    adapters: tuple[str, ...]
    """Glob patterns of the adapters this key may see and use; empty: all."""
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created_by: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None

    def allows(self, adapter: str) -> bool:
        """Whether this key may see and use the adapter of this name."""
        return not self.adapters or any(fnmatch.fnmatchcase(adapter, p) for p in self.adapters)

    @property
    def unrestricted(self) -> bool:
        return not self.adapters


class _Base(DeclarativeBase):
    pass


class ApiKeyRow(_Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    adapters: Mapped[list] = mapped_column(JSON, default=list)
    salt: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(64))
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, default=None)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_by: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    revoked_by: Mapped[str | None] = mapped_column(String(256), default=None)


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return value if value is None or value.tzinfo else value.replace(tzinfo=dt.UTC)


def _record(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        adapters=tuple(row.adapters or ()),
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
        created_by=row.created_by,
        created_at=_utc(row.created_at),  # type: ignore[arg-type]
        revoked_at=_utc(row.revoked_at),
    )


def check_new_key(
    name: str, role: str, adapters: list[str], rpm: int | None, tpm: int | None
) -> Role:
    """Validate a key to create; returns its role."""
    if not KEY_NAME.match(name):
        raise InvalidRequest("name", "1-64 characters: letters, digits, '.', '_', '@', '-'")
    try:
        parsed = Role(role)
    except ValueError:
        raise InvalidRequest("role", f"must be one of {[r.value for r in Role]}") from None
    if len(adapters) > MAX_PATTERNS:
        raise InvalidRequest("adapters", f"at most {MAX_PATTERNS} patterns")
    if any(not p or len(p) > 128 for p in adapters):
        raise InvalidRequest("adapters", "patterns must have 1 to 128 characters")
    for field, value in (("requests_per_minute", rpm), ("tokens_per_minute", tpm)):
        if value is not None and value < 1:
            raise InvalidRequest(field, f"must be >= 1 (or unset), got {value}")
    return parsed


class KeyStore:
    """The api_keys table of the registry database (created on first use)."""

    def __init__(self, url: str) -> None:
        self.engine = make_db_engine(url)
        with self.engine.connect().execution_options(loraplex_write=True) as conn, conn.begin():
            _Base.metadata.create_all(conn, checkfirst=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        with (
            self.engine.connect().execution_options(loraplex_write=True) as conn,
            Session(bind=conn) as session,
            session.begin(),
        ):
            yield session

    def create(
        self,
        name: str,
        role: str,
        actor: str,
        adapters: list[str] | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (returned only here; the database keeps a salted hash)."""
        adapters = list(adapters or [])
        parsed = check_new_key(name, role, adapters, requests_per_minute, tokens_per_minute)
        key_id, salt = secrets.token_hex(8), secrets.token_hex(16)
        secret = f"{SECRET_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        row = ApiKeyRow(
            id=key_id,
            name=name,
            role=parsed.value,
            adapters=adapters,
            salt=salt,
            secret_hash=_hash(salt, secret),
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            created_by=actor[:256],
            created_at=dt.datetime.now(dt.UTC),
        )
        with self._write() as session:
            session.add(row)
            session.flush()
            record = _record(row)
            failpoint("key_create_before_commit")
        return record, secret

    def list(self, include_revoked: bool = False) -> list[ApiKey]:
        """Keys, newest first."""
        query = select(ApiKeyRow).order_by(ApiKeyRow.created_at.desc(), ApiKeyRow.id)
        if not include_revoked:
            query = query.where(ApiKeyRow.revoked_at.is_(None))
        with Session(self.engine) as session:
            return [_record(row) for row in session.scalars(query)]

    def revoke(self, key_id: str, actor: str) -> ApiKey:
        """Revoke a key (revoking a revoked key changes nothing)."""
        with self._write() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                raise KeyNotFound(key_id)
            if row.revoked_at is None:
                row.revoked_at = dt.datetime.now(dt.UTC)
                row.revoked_by = actor[:256]
            session.flush()
            failpoint("key_revoke_before_commit")
            return _record(row)

    def active(self) -> dict[str, tuple[ApiKey, str, str]]:
        """id -> (key, salt, secret hash) of every key not revoked."""
        query = select(ApiKeyRow).where(ApiKeyRow.revoked_at.is_(None))
        with Session(self.engine) as session:
            return {
                row.id: (_record(row), row.salt, row.secret_hash) for row in session.scalars(query)
            }


class KeyRing:
    """Checks secrets against an in-memory copy of the active keys."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._keys: dict[str, tuple[ApiKey, str, str]] = {}
        self._lock = threading.Lock()
        self._last_unknown_reload = 0.0
        self.reload()

    def reload(self) -> None:
        """Re-read the active keys (revocations take effect here)."""
        keys = self.store.active()
        with self._lock:
            self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key this secret belongs to, or None."""
        match = SECRET_FORMAT.match(secret)
        if match is None:
            return None
        entry = self._keys.get(match.group(1))
        now = time.monotonic()
        if entry is None and now - self._last_unknown_reload >= UNKNOWN_KEY_RELOAD_S:
            # created on another replica since the last poll (bounded: no DB flood from guessing)
            self._last_unknown_reload = now
            try:
                self.reload()
            except Exception as exc:  # noqa: BLE001 - the database is down: the last copy holds
                log.warning("reloading API keys failed (using the last copy): %s", exc)
            entry = self._keys.get(match.group(1))
        if entry is None:
            return None
        key, salt, expected = entry
        return key if hmac.compare_digest(_hash(salt, secret), expected) else None

    async def follow(self, interval_s: float, stop: asyncio.Event) -> None:
        """Reload every interval until `stop` is set (a database hiccup keeps the last copy)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            try:
                await asyncio.to_thread(self.reload)
            except Exception as exc:  # noqa: BLE001 - keep serving with the last copy
                log.warning("reloading API keys failed (using the last copy): %s", exc)
