"""The registry's tables and how an older database is upgraded to them.

`registry_state` holds the schema version and the generation counter that every mutation
bumps (gateways poll it to refresh their view). UPGRADES[n] takes a schema from version n to
n + 1 inside the migration's transaction; a database written by a newer loraplex is refused.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

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
    insert,
    select,
    table,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # v2: evaluations.verdict (pass / fail / error) replaces evaluations.passed


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


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema; refuse a database written by a newer loraplex."""
    with (
        engine.connect().execution_options(loraplex_write=True) as conn,
        conn.begin(),
    ):
        if engine.dialect.name == "postgresql":  # replicas starting together migrate one at a time
            conn.execute(text("SELECT pg_advisory_xact_lock(7261001)"))
        Base.metadata.create_all(conn, checkfirst=True)
        state = conn.execute(select(StateRow.schema_version)).scalar()
        if state is None:
            conn.execute(insert(StateRow).values(id=1, schema_version=SCHEMA_VERSION, generation=0))
        elif state > SCHEMA_VERSION:
            raise RuntimeError(
                f"registry schema v{state} is newer than this loraplex (v{SCHEMA_VERSION})"
            )
        elif state < SCHEMA_VERSION:
            for step in range(state, SCHEMA_VERSION):  # one step per version
                log.info("upgrading the registry schema from v%d to v%d", step, step + 1)
                UPGRADES[step](conn)
            conn.execute(update(StateRow).values(schema_version=SCHEMA_VERSION))
