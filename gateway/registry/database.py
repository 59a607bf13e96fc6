"""The registry's database: a SQLAlchemy engine for SQLite (WAL, full sync, IMMEDIATE write
transactions) or PostgreSQL, and the read and write transactions every query runs in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from gateway.registry.schema import StateRow

log = logging.getLogger(__name__)

WRITE_ATTEMPTS = 5
T = TypeVar("T")


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


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Session]:
    """A session in a read transaction."""
    with Session(engine) as session, session.begin():
        yield session


def write_transaction(engine: Engine, work: Callable[[Session], T]) -> T:
    """Run `work` in a write transaction that bumps the generation; retried on conflicts.

    Each attempt re-reads what it checks, so a retry after a concurrent insert (two first
    registrations of one name, say) sees the winner's row and decides again.
    """
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            with (
                engine.connect().execution_options(loraplex_write=True) as conn,
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
