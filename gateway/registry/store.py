"""The registry's queries: adapters, versions, aliases, evaluations and the audit log.

Every mutation is one transaction that also appends to the audit log and bumps
`registry_state.generation`, which gateways poll to refresh their in-memory view. Versions are
never updated; deleting one marks it deleted so its number is never reused. Alias moves are
compare-and-swap: on PostgreSQL the alias row is locked (`SELECT ... FOR UPDATE`), on SQLite
write transactions are `BEGIN IMMEDIATE`, so concurrent moves are serialized either way.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.contract import PRODUCTION, VERDICTS, Verdict
from gateway.errors import AdapterNotFound, InvalidRequest, PreconditionFailed
from gateway.registry.database import make_db_engine, read_transaction, write_transaction
from gateway.registry.names import check_alias_move, check_registration
from gateway.registry.records import (
    AdapterRecord,
    AliasMove,
    AuditEvent,
    EvaluationRecord,
    NewVersion,
    Snapshot,
    VersionRecord,
)
from gateway.registry.schema import (
    AdapterRow,
    AliasMoveRow,
    AliasRow,
    AuditRow,
    EvaluationRow,
    StateRow,
    VersionRow,
    migrate,
)

T = TypeVar("T")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


class RegistryStore:
    """Adapters, versions, aliases, evaluations and the audit log in one SQL database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_db_engine(url)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions

    def _read(self) -> AbstractContextManager[Session]:
        return read_transaction(self.engine)

    def _write(self, work: Callable[[Session], T]) -> T:
        """A write transaction that bumps the generation; retried on conflicts."""
        return write_transaction(self.engine, work)

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
