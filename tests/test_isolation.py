"""Unique keys in callers' REPEATABLE READ and SERIALIZABLE transactions.

A duplicate of a job that committed after the caller's snapshot cannot be resolved inside
that transaction (PostgreSQL raises a serialization failure rather than show the row): the
enqueue raises ``pgjobs.UniqueConflictError``, writes nothing, and leaves the transaction
usable. A duplicate the snapshot can see resolves as under READ COMMITTED. Whichever way
the isolation level was chosen (psycopg's attribute, SQLAlchemy's option, the role's
default), the same holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pgbouncer
import psycopg
import pytest
import sqlalchemy
from psycopg import IsolationLevel
from sqlalchemy.orm import Session

import pgjobs
from pgjobs.database import sqlalchemy_url


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


@pytest.fixture
def task(db_url: str) -> Iterator[pgjobs.Task[Any, Any]]:
    app = pgjobs.App(db_url)

    @app.task(name="report")
    def report(n: int) -> None: ...

    yield report
    app.close()


def keys(conn: psycopg.Connection[Any]) -> list[str]:
    return [r[0] for r in conn.execute("SELECT unique_key FROM pgjobs.jobs ORDER BY id")]


@contextmanager
def psycopg_attribute(url: str, level: IsolationLevel) -> Iterator[Any]:
    with psycopg.connect(url) as conn:
        conn.isolation_level = level
        yield conn


@contextmanager
def role_default(url: str, level: IsolationLevel) -> Iterator[Any]:
    name = level.name.replace("_", r"\ ").lower()  # libpq's options: escape the space
    # A session setting: no PgBouncer in between.
    options = f"-c default_transaction_isolation={name}"
    with psycopg.connect(pgbouncer.direct(url), options=options) as conn:
        yield conn


@contextmanager
def sqlalchemy_option(url: str, level: IsolationLevel) -> Iterator[Any]:
    engine = sqlalchemy.create_engine(
        sqlalchemy_url(url), isolation_level=level.name.replace("_", " ")
    )
    try:
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()


def execute(caller: Any, sql: str) -> Any:
    if isinstance(caller, Session):
        return caller.execute(sqlalchemy.text(sql)).scalar()
    row = caller.execute(sql).fetchone()
    return row[0] if row else None


CALLERS = [psycopg_attribute, role_default, sqlalchemy_option]
LEVELS = [IsolationLevel.REPEATABLE_READ, IsolationLevel.SERIALIZABLE]


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: lv.name.lower())
@pytest.mark.parametrize("opened", CALLERS, ids=lambda c: c.__name__)
def test_a_duplicate_committed_after_the_snapshot_leaves_the_transaction_usable(
    db_url: str,
    conn: psycopg.Connection[Any],
    task: pgjobs.Task[Any, Any],
    opened: Callable[[str, IsolationLevel], Any],
    level: IsolationLevel,
) -> None:
    visible = task.enqueue(n=0, unique_key="visible")
    with opened(db_url, level) as caller:
        assert execute(caller, "SELECT current_setting('transaction_isolation')") == (
            level.name.replace("_", " ").lower()
        )  # the snapshot is taken: jobs committed from now on are invisible to it
        existing = task.enqueue(n=1, unique_key="late")  # another producer commits
        with pytest.raises(pgjobs.UniqueConflictError, match="new transaction"):
            task.enqueue(n=2, unique_key="late", conn=caller)
        # A batch with that key writes none of its jobs, not even those with new keys.
        batch_keys = {3: "fresh", 4: "late"}
        with pytest.raises(pgjobs.UniqueConflictError):
            task.enqueue_many(
                [{"n": 3}, {"n": 4}], conn=caller, unique_key=lambda a: batch_keys[a["n"]]
            )
        # A duplicate the snapshot sees resolves as ever; new keys insert.
        assert task.enqueue(n=5, unique_key="visible", conn=caller) == visible
        fresh = task.enqueue(n=6, unique_key="fresh", conn=caller)
        assert execute(caller, "SELECT 1") == 1  # the transaction was never aborted
        caller.commit()
    assert keys(conn) == ["visible", "late", "fresh"]
    assert task.enqueue(n=7, unique_key="late") == existing
    assert fresh not in (visible, existing)


def test_a_duplicate_being_inserted_concurrently_is_waited_for_then_reported(
    db_url: str, conn: psycopg.Connection[Any], task: pgjobs.Task[Any, Any]
) -> None:
    import threading

    with (
        psycopg.connect(db_url) as producer,
        psycopg_attribute(db_url, IsolationLevel.REPEATABLE_READ) as caller,
    ):
        caller.execute("SELECT 1")
        task.enqueue(n=1, unique_key="race", conn=producer)  # not committed yet
        outcome: list[Any] = []

        def enqueue() -> None:
            try:
                outcome.append(task.enqueue(n=2, unique_key="race", conn=caller))
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=enqueue)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive()  # it waits for the producer's key
        producer.commit()
        thread.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], pgjobs.UniqueConflictError)
        assert caller.execute("SELECT count(*) FROM pgjobs.jobs").fetchone() == (0,)
        caller.commit()
    assert keys(conn) == ["race"]
