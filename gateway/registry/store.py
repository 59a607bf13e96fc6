"""The registry's system of record, through SQLAlchemy: SQLite (WAL) or PostgreSQL.

Every mutation is one transaction that also appends to the audit log and bumps
`registry_state.generation`, which gateways poll to refresh their in-memory view. Versions are
never updated; deleting one marks it deleted so its number is never reused. Alias moves are
compare-and-swap: on PostgreSQL the alias row is locked (`SELECT ... FOR UPDATE`), on SQLite
write transactions are `BEGIN IMMEDIATE`, so concurrent moves are serialized either way.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    case,
    column,
    create_engine,
    event,
    func,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from gateway.errors import AdapterNotFound, InvalidRequest, PreconditionFailed
from gateway.registry.validate import AdapterFacts

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # v2: evaluations.verdict (pass / fail / error) replaces evaluations.passed
PRODUCTION = "production"
ADAPTER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
VERSION_REF = re.compile(r"^v(\d+)$")
WRITE_ATTEMPTS = 5

T = TypeVar("T")
Verdict = Literal["pass", "fail", "error"]
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    pass


class AdapterRow(Base):
    __tablename__ = "adapters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    last_version: Mapped[int] = mapped_column(Integer, default=0)


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("adapter_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    base_fingerprint: Mapped[str] = mapped_column(String(128))
    base_rule: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(256), default="")
    extra: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    name: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class AliasMoveRow(Base):
    __tablename__ = "alias_moves"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[int] = mapped_column(Integer)  # 0: the alias was created
    to_version: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text, default="")
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class EvaluationRow(Base):
    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    suite: Mapped[str] = mapped_column(String(256))
    verdict: Mapped[str] = mapped_column(String(8))  # one of VERDICTS
    report: Mapped[dict] = mapped_column(JSON, default=dict)
    actor: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class AuditRow(Base):
    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(64))
    adapter: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    details: Mapped[dict] = mapped_column(JSON, default=dict)


class StateRow(Base):
    """One row: the schema version and a counter bumped by every mutation."""

    __tablename__ = "registry_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schema_version: Mapped[int] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(BigInteger)


# ---------------------------------------------------------------- records returned to callers


@dataclass(frozen=True)
class EvaluationRecord:
    id: int
    suite: str
    verdict: Verdict
    report: dict
    actor: str
    created_at: dt.datetime


@dataclass(frozen=True)
class VersionRecord:
    adapter: str
    number: int
    sha256: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    base_fingerprint: str
    base_rule: str
    source: str
    actor: str
    metadata: dict
    created_at: dt.datetime
    aliases: tuple[str, ...] = ()
    evaluations: tuple[EvaluationRecord, ...] = ()


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    description: str
    owner: str
    created_at: dt.datetime
    aliases: dict[str, int] = field(default_factory=dict)
    versions: tuple[VersionRecord, ...] = ()


@dataclass(frozen=True)
class AliasMove:
    adapter: str
    alias: str
    from_version: int
    to_version: int
    actor: str
    reason: str
    forced: bool
    created_at: dt.datetime


@dataclass(frozen=True)
class AuditEvent:
    id: int
    created_at: dt.datetime
    actor: str
    action: str
    adapter: str
    version: int
    details: dict


@dataclass(frozen=True)
class Snapshot:
    """Everything request resolution needs, read in one transaction."""

    generation: int
    versions: list[tuple[str, int, str, int, tuple[str, ...]]]  # adapter, number, sha, rank, mods
    aliases: list[tuple[str, str, int]]  # adapter, alias, number


@dataclass(frozen=True)
class NewVersion:
    """A validated, stored adapter version about to be recorded."""

    facts: AdapterFacts
    sha256: str
    source: str
    metadata: dict
    description: str = ""
    owner: str = ""
    alias: str = ""


def check_adapter_name(name: str, field_name: str = "name") -> None:
    if not ADAPTER_NAME.match(name):
        raise InvalidRequest(
            field_name, f"{name!r} is not a valid adapter name ([a-z0-9][a-z0-9._-]*, <= 64 chars)"
        )


def check_alias_name(alias: str, field_name: str = "alias") -> None:
    if not ALIAS_NAME.match(alias) or VERSION_REF.match(alias):
        raise InvalidRequest(
            field_name,
            f"{alias!r} is not a valid alias ([a-z][a-z0-9_-]*, <= 64 chars, not of the form vN)",
        )


def check_registration(name: str, alias: str) -> None:
    """The names of a registration, checked before any work is done."""
    check_adapter_name(name)
    if alias:
        check_alias_name(alias)
        if alias == PRODUCTION:
            raise InvalidRequest(
                "alias", "a new version cannot go to production at registration; promote it"
            )


def check_alias_move(alias: str, force: bool, reason: str) -> None:
    """The arguments of an alias move, checked before any work is done."""
    check_alias_name(alias)
    if force and not reason.strip():
        raise InvalidRequest("reason", "a forced move needs a reason")


# ---------------------------------------------------------------- schema upgrades


def _v1_to_v2(conn: Connection) -> None:
    """evaluations.passed (boolean) -> evaluations.verdict: true was a pass; false a fail, or an
    error when its report says so (v1 gates recorded their errors as not passed, with
    `"verdict": "error"` in the report).

    The column default only fills the old rows: PostgreSQL drops it after; SQLite cannot (no
    ALTER COLUMN) and keeps it unused, since every insert names its verdict.
    """
    conn.execute(
        text("ALTER TABLE evaluations ADD COLUMN verdict VARCHAR(8) NOT NULL DEFAULT 'fail'")
    )
    v1 = table("evaluations", column("passed", Boolean), column("report", JSON), column("verdict"))
    said_error = v1.c.report["verdict"].as_string() == "error"
    conn.execute(
        update(v1).values(verdict=case((v1.c.passed, "pass"), (said_error, "error"), else_="fail"))
    )
    conn.execute(text("ALTER TABLE evaluations DROP COLUMN passed"))
    if conn.dialect.name == "postgresql":
        conn.execute(text("ALTER TABLE evaluations ALTER COLUMN verdict DROP DEFAULT"))


# UPGRADES[n] takes a schema from version n to n + 1, inside the migration's transaction.
UPGRADES: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2}


# ---------------------------------------------------------------- the store


def make_db_engine(url: str) -> Engine:
    """A SQLAlchemy engine for the registry database (SQLite: WAL, full sync, IMMEDIATE writes)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event issue BEGIN
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("loraplex_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class RegistryStore:
    """Adapters, versions, aliases, evaluations and the audit log in one SQL database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_db_engine(url)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._migrate()

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine) as session, session.begin():
            yield session

    def _write(self, work: Callable[[Session], T]) -> T:
        """Run `work` in a write transaction that bumps the generation; retried on conflicts.

        Each attempt re-reads what it checks, so a retry after a concurrent insert (two first
        registrations of one name, say) sees the winner's row and decides again.
        """
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with (
                    self.engine.connect().execution_options(loraplex_write=True) as conn,
                    Session(bind=conn) as session,
                    session.begin(),
                ):
                    result = work(session)
                    session.execute(
                        update(StateRow)
                        .where(StateRow.id == 1)
                        .values(generation=StateRow.generation + 1)
                    )
                    return result
            except (IntegrityError, OperationalError) as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.debug("registry write conflict (attempt %d): %s", attempt, exc)
        raise AssertionError("unreachable")

    # -- schema

    def _migrate(self) -> None:
        """Create or upgrade the schema; refuse a database written by a newer loraplex."""
        with (
            self.engine.connect().execution_options(loraplex_write=True) as conn,
            conn.begin(),
        ):
            if self.is_postgres:  # replicas starting together migrate one at a time
                conn.execute(text("SELECT pg_advisory_xact_lock(7261001)"))
            Base.metadata.create_all(conn, checkfirst=True)
            state = conn.execute(select(StateRow.schema_version)).scalar()
            if state is None:
                conn.execute(
                    StateRow.__table__.insert().values(
                        id=1, schema_version=SCHEMA_VERSION, generation=0
                    )
                )
            elif state > SCHEMA_VERSION:
                raise RuntimeError(
                    f"registry schema v{state} is newer than this loraplex (v{SCHEMA_VERSION})"
                )
            elif state < SCHEMA_VERSION:
                for step in range(state, SCHEMA_VERSION):  # one step per version
                    log.info("upgrading the registry schema from v%d to v%d", step, step + 1)
                    UPGRADES[step](conn)
                conn.execute(update(StateRow).values(schema_version=SCHEMA_VERSION))

    # -- helpers

    @staticmethod
    def _adapter(session: Session, name: str, lock: bool = False) -> AdapterRow:
        query = select(AdapterRow).where(AdapterRow.name == name)
        row = session.scalar(query.with_for_update() if lock else query)
        if row is None:
            raise AdapterNotFound(name)
        return row

    @staticmethod
    def _version(session: Session, adapter: AdapterRow, number: int) -> VersionRow:
        row = session.scalar(
            select(VersionRow).where(
                VersionRow.adapter_id == adapter.id,
                VersionRow.number == number,
                VersionRow.deleted_at.is_(None),
            )
        )
        if row is None:
            raise AdapterNotFound(f"{adapter.name}@v{number}")
        return row

    @staticmethod
    def _audit(
        session: Session, actor: str, action: str, adapter: str, version: int, **details: Any
    ) -> None:
        session.add(
            AuditRow(
                created_at=_now(),
                actor=actor,
                action=action,
                adapter=adapter,
                version=version,
                details=details,
            )
        )

    @staticmethod
    def _version_record(
        row: VersionRow,
        adapter: str,
        aliases: tuple[str, ...] = (),
        evaluations: tuple[EvaluationRecord, ...] = (),
        with_metadata: bool = True,
    ) -> VersionRecord:
        return VersionRecord(
            adapter=adapter,
            number=row.number,
            sha256=row.sha256,
            rank=row.rank,
            alpha=row.alpha,
            target_modules=tuple(row.target_modules),
            size_bytes=row.size_bytes,
            base_fingerprint=row.base_fingerprint,
            base_rule=row.base_rule,
            source=row.source,
            actor=row.actor,
            metadata=dict(row.extra or {}) if with_metadata else {},
            created_at=_utc(row.created_at),
            aliases=aliases,
            evaluations=evaluations,
        )

    @staticmethod
    def _evaluation_record(row: EvaluationRow) -> EvaluationRecord:
        return EvaluationRecord(
            row.id,
            row.suite,
            row.verdict,  # type: ignore[arg-type]  # only VERDICTS are ever written
            dict(row.report or {}),
            row.actor,
            _utc(row.created_at),
        )

    @staticmethod
    def _move_record(row: AliasMoveRow, adapter: str) -> AliasMove:
        return AliasMove(
            adapter,
            row.alias,
            row.from_version,
            row.to_version,
            row.actor,
            row.reason,
            row.forced,
            _utc(row.created_at),
        )

    # -- reads

    def generation(self) -> int:
        with self._read() as session:
            return int(session.scalar(select(StateRow.generation).where(StateRow.id == 1)) or 0)

    def snapshot(self) -> Snapshot:
        """One consistent read (REPEATABLE READ on PostgreSQL; a WAL read snapshot on SQLite)."""
        conn = self.engine.connect()
        if self.is_postgres:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn, Session(bind=conn) as session, session.begin():
            generation = session.scalar(select(StateRow.generation).where(StateRow.id == 1))
            versions = session.execute(
                select(
                    AdapterRow.name,
                    VersionRow.number,
                    VersionRow.sha256,
                    VersionRow.rank,
                    VersionRow.target_modules,
                )
                .join(AdapterRow, VersionRow.adapter_id == AdapterRow.id)
                .where(VersionRow.deleted_at.is_(None))
            ).all()
            aliases = session.execute(
                select(AdapterRow.name, AliasRow.name, VersionRow.number)
                .join(AdapterRow, AliasRow.adapter_id == AdapterRow.id)
                .join(VersionRow, AliasRow.version_id == VersionRow.id)
                .where(VersionRow.deleted_at.is_(None))
            ).all()
        return Snapshot(
            int(generation or 0),
            [(a, n, s, r, tuple(m)) for a, n, s, r, m in versions],
            [(a, alias, n) for a, alias, n in aliases],
        )

    def referenced_digests(self) -> set[str]:
        """Artifacts that live versions point to (what the artifact sweep must keep)."""
        with self._read() as session:
            return set(
                session.scalars(
                    select(VersionRow.sha256).where(VersionRow.deleted_at.is_(None)).distinct()
                )
            )

    def _adapter_records(
        self, session: Session, adapters: list[AdapterRow], full: bool
    ) -> list[AdapterRecord]:
        ids = [a.id for a in adapters]
        if not ids:
            return []
        versions = session.scalars(
            select(VersionRow)
            .where(VersionRow.adapter_id.in_(ids), VersionRow.deleted_at.is_(None))
            .order_by(VersionRow.adapter_id, VersionRow.number)
        ).all()
        alias_rows = session.execute(
            select(AliasRow.adapter_id, AliasRow.name, VersionRow.number, AliasRow.version_id)
            .join(VersionRow, AliasRow.version_id == VersionRow.id)
            .where(AliasRow.adapter_id.in_(ids))
            .order_by(AliasRow.name)
        ).all()
        evaluations: dict[int, list[EvaluationRecord]] = {}
        if full:
            for row in session.scalars(
                select(EvaluationRow)
                .where(EvaluationRow.version_id.in_([v.id for v in versions]))
                .order_by(EvaluationRow.id)
            ):
                evaluations.setdefault(row.version_id, []).append(self._evaluation_record(row))
        names_by_version: dict[int, list[str]] = {}
        aliases_by_adapter: dict[int, dict[str, int]] = {}
        for adapter_id, alias, number, version_id in alias_rows:
            names_by_version.setdefault(version_id, []).append(alias)
            aliases_by_adapter.setdefault(adapter_id, {})[alias] = number
        versions_by_adapter: dict[int, list[VersionRecord]] = {}
        names = {a.id: a.name for a in adapters}
        for v in versions:
            versions_by_adapter.setdefault(v.adapter_id, []).append(
                self._version_record(
                    v,
                    names[v.adapter_id],
                    tuple(names_by_version.get(v.id, ())),
                    tuple(evaluations.get(v.id, ())),
                    with_metadata=full,
                )
            )
        return [
            AdapterRecord(
                a.name,
                a.description,
                a.owner,
                _utc(a.created_at),
                aliases_by_adapter.get(a.id, {}),
                tuple(versions_by_adapter.get(a.id, ())),
            )
            for a in adapters
        ]

    def get_adapter(self, name: str) -> AdapterRecord:
        with self._read() as session:
            return self._adapter_records(session, [self._adapter(session, name)], full=True)[0]

    def list_adapters(self, limit: int, after: str = "") -> list[AdapterRecord]:
        """Adapters in name order after `after` (keyset pagination: cost is per page)."""
        with self._read() as session:
            rows = session.scalars(
                select(AdapterRow)
                .where(AdapterRow.name > after)
                .order_by(AdapterRow.name)
                .limit(limit)
            ).all()
            return self._adapter_records(session, list(rows), full=False)

    def alias_history(self, name: str, alias: str = "", limit: int = 100) -> list[AliasMove]:
        with self._read() as session:
            adapter = self._adapter(session, name)
            query = select(AliasMoveRow).where(AliasMoveRow.adapter_id == adapter.id)
            if alias:
                query = query.where(AliasMoveRow.alias == alias)
            rows = session.scalars(query.order_by(AliasMoveRow.id.desc()).limit(limit))
            return [self._move_record(row, name) for row in rows]

    def audit_events(self, adapter: str = "", limit: int = 100) -> list[AuditEvent]:
        with self._read() as session:
            query = select(AuditRow)
            if adapter:
                query = query.where(AuditRow.adapter == adapter)
            rows = session.scalars(query.order_by(AuditRow.id.desc()).limit(limit))
            return [
                AuditEvent(
                    r.id, _utc(r.created_at), r.actor, r.action, r.adapter, r.version, r.details
                )
                for r in rows
            ]

    # -- mutations

    def add_version(self, name: str, new: NewVersion, actor: str) -> VersionRecord:
        """Record a validated version (its artifact is already stored); creates the adapter."""
        check_registration(name, new.alias)

        def work(session: Session) -> VersionRecord:
            adapter = session.scalar(
                select(AdapterRow).where(AdapterRow.name == name).with_for_update()
            )
            now = _now()
            if adapter is None:
                adapter = AdapterRow(
                    name=name,
                    description=new.description,
                    owner=new.owner,
                    created_at=now,
                    last_version=0,
                )
                session.add(adapter)
                session.flush()
            else:
                adapter.description = new.description or adapter.description
                adapter.owner = new.owner or adapter.owner
            adapter.last_version += 1
            facts = new.facts
            row = VersionRow(
                adapter_id=adapter.id,
                number=adapter.last_version,
                sha256=new.sha256,
                rank=facts.rank,
                alpha=facts.alpha,
                target_modules=list(facts.target_modules),
                size_bytes=facts.size_bytes,
                base_fingerprint=facts.base_fingerprint,
                base_rule=facts.base_rule,
                source=new.source,
                actor=actor,
                extra=new.metadata,
                created_at=now,
            )
            session.add(row)
            session.flush()
            self._audit(
                session, actor, "register", name, row.number, sha256=new.sha256, source=new.source
            )
            aliases: tuple[str, ...] = ()
            if new.alias:
                self._move_alias(session, adapter, row, new.alias, None, actor, "registered", False)
                aliases = (new.alias,)
            return self._version_record(row, name, aliases)

        return self._write(work)

    def _move_alias(
        self,
        session: Session,
        adapter: AdapterRow,
        target: VersionRow,
        alias: str,
        expected: int | None,
        actor: str,
        reason: str,
        forced: bool,
        gate: Callable[[], None] | None = None,
    ) -> AliasMove:
        """Compare-and-swap, then `gate` (the production rule), then the move and its records."""
        current = session.scalar(
            select(AliasRow)
            .where(AliasRow.adapter_id == adapter.id, AliasRow.name == alias)
            .with_for_update()
        )
        held = (
            session.scalar(select(VersionRow.number).where(VersionRow.id == current.version_id))
            if current
            else 0
        )
        if expected is not None and held != expected:
            now_holds = f"holds v{held}" if held else "does not exist"
            wanted = f"v{expected}" if expected else "no version"
            raise PreconditionFailed(
                f"{adapter.name}@{alias} {now_holds}, not {wanted} as expected; "
                "re-read it and retry"
            )
        if gate is not None:
            gate()
        now = _now()
        if current is None:
            session.add(
                AliasRow(adapter_id=adapter.id, name=alias, version_id=target.id, updated_at=now)
            )
        else:
            current.version_id = target.id
            current.updated_at = now
        move = AliasMoveRow(
            adapter_id=adapter.id,
            alias=alias,
            from_version=held,
            to_version=target.number,
            actor=actor,
            reason=reason,
            forced=forced,
            created_at=now,
        )
        session.add(move)
        self._audit(
            session,
            actor,
            "set_alias",
            adapter.name,
            target.number,
            alias=alias,
            from_version=held,
            reason=reason,
            forced=forced,
        )
        session.flush()
        return self._move_record(move, adapter.name)

    def _production_gate(self, session: Session, adapter: AdapterRow, target: VersionRow) -> None:
        """Production needs the version's latest evaluation to pass (a rollback too)."""
        latest = session.scalar(
            select(EvaluationRow)
            .where(EvaluationRow.version_id == target.id)
            .order_by(EvaluationRow.id.desc())
            .limit(1)
        )
        if latest is not None and latest.verdict == "pass":
            return
        why = (
            "it has no evaluation"
            if latest is None
            else "its latest evaluation ended in error"
            if latest.verdict == "error"
            else "its latest evaluation failed"
        )
        raise PreconditionFailed(
            f"{adapter.name}@v{target.number} cannot go to production: {why}; record a passing "
            "evaluation, or force with a reason"
        )

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        actor: str,
        expected: int | None = None,
        reason: str = "",
        force: bool = False,
    ) -> AliasMove:
        """Point `alias` at `version`, if it holds `expected` now (compare-and-swap)."""
        check_alias_move(alias, force, reason)

        def work(session: Session) -> AliasMove:
            adapter = self._adapter(session, name, lock=True)  # serializes with delete
            target = self._version(session, adapter, version)
            gate = None
            if alias == PRODUCTION and not force:
                gate = functools.partial(self._production_gate, session, adapter, target)
            return self._move_alias(
                session, adapter, target, alias, expected, actor, reason, force, gate
            )

        return self._write(work)

    def delete_version(
        self, name: str, version: int, actor: str, reason: str, in_flight: Callable[[], int]
    ) -> tuple[str, bool]:
        """Mark a version deleted; returns its sha256 and whether a live version still uses it."""

        def work(session: Session) -> tuple[str, bool]:
            adapter = self._adapter(session, name, lock=True)  # serializes with set_alias
            row = self._version(session, adapter, version)
            aliases = session.scalars(
                select(AliasRow.name).where(AliasRow.version_id == row.id)
            ).all()
            if aliases:
                raise PreconditionFailed(
                    f"{name}@v{version} is what {', '.join(sorted(aliases))} points to; "
                    "move the alias first"
                )
            running = in_flight()
            if running:
                raise PreconditionFailed(f"{name}@v{version} has {running} requests in flight")
            row.deleted_at = _now()
            self._audit(session, actor, "delete_version", name, version, reason=reason)
            session.flush()
            shared = session.scalar(
                select(func.count(VersionRow.id)).where(
                    VersionRow.sha256 == row.sha256, VersionRow.deleted_at.is_(None)
                )
            )
            return row.sha256, bool(shared)

        return self._write(work)

    def record_evaluation(
        self, name: str, version: int, suite: str, verdict: Verdict, report: dict, actor: str
    ) -> EvaluationRecord:
        if not suite:
            raise InvalidRequest("suite", "name the evaluation suite")
        if verdict not in VERDICTS:
            raise InvalidRequest("verdict", f"{verdict!r} is not one of {', '.join(VERDICTS)}")

        def work(session: Session) -> EvaluationRecord:
            adapter = self._adapter(session, name, lock=True)
            target = self._version(session, adapter, version)
            row = EvaluationRow(
                version_id=target.id,
                suite=suite,
                verdict=verdict,
                report=report,
                actor=actor,
                created_at=_now(),
            )
            session.add(row)
            session.flush()
            self._audit(
                session, actor, "record_evaluation", name, version, suite=suite, verdict=verdict
            )
            return self._evaluation_record(row)

        return self._write(work)
