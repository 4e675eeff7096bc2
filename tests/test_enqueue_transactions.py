"""Transactional enqueue through every kind of ``conn``: a job exists exactly when the
caller's transaction commits, pgjobs never commits for the caller, and a rolled-back
savepoint takes its jobs with it. Without ``conn`` pgjobs commits at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from typing import Any, Protocol

import psycopg
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import pgjobs
from pgjobs.database import sqlalchemy_url


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


def count_jobs(conn: psycopg.Connection[Any]) -> int:
    """Jobs visible to the inspection connection (i.e. committed)."""
    row = conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone()
    assert row is not None
    return int(row[0])


def tasks(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    @app.task(name="send", queue="mail")
    def send(to: str) -> None: ...

    return send


# -- sync callers ------------------------------------------------------------------------


class SyncCaller(Protocol):
    """What the tests need from a caller's transaction, whatever its kind."""

    conn: Any

    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def savepoint(self) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...


class PsycopgCaller:
    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url)

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested ``conn.transaction()`` (a savepoint), rolled back at the end."""
        with self.conn.transaction():
            yield
            raise psycopg.Rollback()

    def close(self) -> None:
        self.conn.close()


class SqlAlchemyCaller:
    """A SQLAlchemy Session or Connection; both have commit/rollback/begin_nested."""

    def __init__(self, conn: Session | sqlalchemy.Connection) -> None:
        self.conn = conn

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """``begin_nested()`` (a savepoint), rolled back at the end."""
        nested = self.conn.begin_nested()
        yield
        nested.rollback()

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def engine(db_url: str) -> Iterator[sqlalchemy.Engine]:
    eng = sqlalchemy.create_engine(sqlalchemy_url(db_url))
    yield eng
    eng.dispose()


@pytest.fixture(params=["psycopg", "sqlalchemy_session", "sqlalchemy_connection"])
def caller(request: pytest.FixtureRequest, db_url: str) -> Iterator[SyncCaller]:
    """A caller with an open (or auto-begun) transaction of each sync kind."""
    made: SyncCaller
    if request.param == "psycopg":
        made = PsycopgCaller(db_url)
    else:
        eng: sqlalchemy.Engine = request.getfixturevalue("engine")
        made = SqlAlchemyCaller(
            Session(eng) if request.param == "sqlalchemy_session" else eng.connect()
        )
    yield made
    made.close()


def test_commit_makes_job_visible_and_pgjobs_never_commits(
    app: pgjobs.App, caller: SyncCaller, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    job_id = send.enqueue(to="a@b.c", conn=caller.conn)
    by_name = app.enqueue("send", {"to": "d@e.f"}, conn=caller.conn)
    many = send.enqueue_many([{"to": "x"}, {"to": "y"}], conn=caller.conn)
    assert isinstance(job_id, int) and isinstance(by_name, int)
    # Written in the caller's transaction, so nobody else sees it yet.
    assert count_jobs(conn) == 0
    caller.commit()
    assert count_jobs(conn) == 4
    rows = conn.execute("SELECT id, args->>'to' FROM pgjobs.jobs ORDER BY id").fetchall()
    assert rows == [(job_id, "a@b.c"), (by_name, "d@e.f"), (many[0], "x"), (many[1], "y")]
    assert app.get_job(job_id).queue == "mail"


def test_rollback_leaves_nothing(
    app: pgjobs.App, caller: SyncCaller, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    send.enqueue(to="a@b.c", conn=caller.conn)
    send.enqueue_many([{"to": "x"}] * 3, conn=caller.conn)
    caller.rollback()
    assert count_jobs(conn) == 0


def test_savepoint_rollback_drops_only_its_jobs(
    app: pgjobs.App, caller: SyncCaller, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    before = send.enqueue(to="before", conn=caller.conn)
    with caller.savepoint():
        send.enqueue(to="inner", conn=caller.conn)
        send.enqueue_many([{"to": "inner"}] * 2, conn=caller.conn)
    after = send.enqueue(to="after", conn=caller.conn)
    caller.commit()
    rows = conn.execute("SELECT id, args->>'to' FROM pgjobs.jobs ORDER BY id").fetchall()
    assert rows == [(before, "before"), (after, "after")]


def test_without_conn_pgjobs_commits_at_once(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    job_id = send.enqueue(to="a@b.c")
    ids = app.enqueue_many("send", [{"to": "x"}, {"to": "y"}])
    assert count_jobs(conn) == 3
    assert [r[0] for r in conn.execute("SELECT id FROM pgjobs.jobs ORDER BY id")] == [job_id, *ids]


def test_sqlalchemy_connection_outside_a_transaction_is_begun_not_committed(
    app: pgjobs.App, engine: sqlalchemy.Engine, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    with engine.connect() as sa_conn:
        assert not sa_conn.in_transaction()
        send.enqueue(to="a", conn=sa_conn)
        # pgjobs began the transaction SQLAlchemy would have auto-begun, and left it open.
        assert sa_conn.in_transaction()
        assert count_jobs(conn) == 0
        sa_conn.execute(sqlalchemy.text("SELECT 1"))
        sa_conn.commit()
    assert count_jobs(conn) == 1


def test_psycopg_transaction_block_commits_with_the_block(
    app: pgjobs.App, db_url: str, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    with psycopg.connect(db_url, autocommit=True) as own:
        with own.transaction():
            send.enqueue(to="a", conn=own)
            assert count_jobs(conn) == 0
        assert count_jobs(conn) == 1
        with own.transaction():
            send.enqueue(to="b", conn=own)
            raise psycopg.Rollback()  # leaves the block, rolled back, without an error
    assert count_jobs(conn) == 1


# -- async callers -----------------------------------------------------------------------


class AsyncCaller(Protocol):
    conn: Any

    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...
    def savepoint(self) -> AbstractAsyncContextManager[None]: ...


class AsyncPsycopgCaller:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def commit(self) -> None:
        await self.conn.commit()

    async def rollback(self) -> None:
        await self.conn.rollback()

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        async with self.conn.transaction():
            yield
            raise psycopg.Rollback()


class AsyncSqlAlchemyCaller:
    def __init__(self, conn: AsyncSession | AsyncConnection) -> None:
        self.conn = conn

    async def commit(self) -> None:
        await self.conn.commit()

    async def rollback(self) -> None:
        await self.conn.rollback()

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        nested = await self.conn.begin_nested()
        yield
        await nested.rollback()


@pytest.fixture
async def async_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(sqlalchemy_url(db_url))
    yield eng
    await eng.dispose()


@pytest.fixture(params=["psycopg", "sqlalchemy_session", "sqlalchemy_connection"])
async def async_caller(
    request: pytest.FixtureRequest, db_url: str, async_engine: AsyncEngine
) -> AsyncIterator[AsyncCaller]:
    """A caller with an open transaction of each async kind."""
    if request.param == "psycopg":
        pg = await psycopg.AsyncConnection.connect(db_url)
        try:
            yield AsyncPsycopgCaller(pg)
        finally:
            await pg.close()
        return
    if request.param == "sqlalchemy_session":
        async with AsyncSession(async_engine) as session:
            yield AsyncSqlAlchemyCaller(session)
    else:
        async with async_engine.connect() as sa_conn:
            yield AsyncSqlAlchemyCaller(sa_conn)


async def test_async_commit_makes_job_visible_and_pgjobs_never_commits(
    app: pgjobs.App, async_caller: AsyncCaller, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    job_id = await send.enqueue_async(to="a@b.c", conn=async_caller.conn)
    by_name = await app.enqueue_async("send", {"to": "d@e.f"}, conn=async_caller.conn)
    many = await send.enqueue_many_async([{"to": "x"}, {"to": "y"}], conn=async_caller.conn)
    assert count_jobs(conn) == 0
    await async_caller.commit()
    rows = conn.execute("SELECT id, args->>'to' FROM pgjobs.jobs ORDER BY id").fetchall()
    assert rows == [(job_id, "a@b.c"), (by_name, "d@e.f"), (many[0], "x"), (many[1], "y")]
    job = await app.get_job_async(job_id, conn=async_caller.conn)
    assert job.args == {"to": "a@b.c"}


async def test_async_rollback_leaves_nothing(
    app: pgjobs.App, async_caller: AsyncCaller, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    await send.enqueue_async(to="a@b.c", conn=async_caller.conn)
    await app.enqueue_many_async("send", [{"to": "x"}] * 3, conn=async_caller.conn)
    await async_caller.rollback()
    assert count_jobs(conn) == 0


async def test_async_savepoint_rollback_drops_only_its_jobs(
    app: pgjobs.App, async_caller: AsyncCaller, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    before = await send.enqueue_async(to="before", conn=async_caller.conn)
    async with async_caller.savepoint():
        await send.enqueue_async(to="inner", conn=async_caller.conn)
        await send.enqueue_many_async([{"to": "inner"}] * 2, conn=async_caller.conn)
    after = await send.enqueue_async(to="after", conn=async_caller.conn)
    await async_caller.commit()
    rows = conn.execute("SELECT id, args->>'to' FROM pgjobs.jobs ORDER BY id").fetchall()
    assert rows == [(before, "before"), (after, "after")]


async def test_async_without_conn_pgjobs_commits_at_once(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    try:
        job_id = await send.enqueue_async(to="a@b.c")
        ids = await app.enqueue_many_async("send", [{"to": "x"}])
        assert [r[0] for r in conn.execute("SELECT id FROM pgjobs.jobs ORDER BY id")] == [
            job_id,
            *ids,
        ]
        assert (await app.get_job_async(job_id)).args == {"to": "a@b.c"}
    finally:
        await app.aclose()


# -- connections pgjobs refuses ----------------------------------------------------------


def test_sqlalchemy_engine_with_another_driver_is_refused(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    # No other PostgreSQL driver is installed; SQLite's is a real non-psycopg driver.
    send = tasks(app)
    sqlite = sqlalchemy.create_engine("sqlite://")
    try:
        with Session(sqlite) as session, pytest.raises(pgjobs.ConfigurationError, match="psycopg"):
            send.enqueue(to="a", conn=session)
        with sqlite.connect() as sa_conn, pytest.raises(pgjobs.ConfigurationError, match="psycopg"):
            send.enqueue(to="a", conn=sa_conn)
    finally:
        sqlite.dispose()
    assert count_jobs(conn) == 0


@pytest.mark.parametrize("wrong", [object(), "postgresql://x", 42])
def test_conn_of_the_wrong_type_is_refused(offline_app: pgjobs.App, wrong: object) -> None:
    send = tasks(offline_app)
    with pytest.raises(pgjobs.ConfigurationError, match="conn must be"):
        send.enqueue(to="a", conn=wrong)


@pytest.mark.parametrize("wrong", [object(), "postgresql://x"])
async def test_async_conn_of_the_wrong_type_is_refused(
    offline_app: pgjobs.App, wrong: object
) -> None:
    send = tasks(offline_app)
    with pytest.raises(pgjobs.ConfigurationError, match="conn must be"):
        await send.enqueue_async(to="a", conn=wrong)


async def test_sync_and_async_connections_are_not_mixed_up(
    app: pgjobs.App, db_url: str, conn: psycopg.Connection[Any]
) -> None:
    send = tasks(app)
    async with await psycopg.AsyncConnection.connect(db_url) as aconn:
        with pytest.raises(pgjobs.ConfigurationError, match="_async"):
            send.enqueue(to="a", conn=aconn)
    with (
        psycopg.connect(db_url) as sconn,
        pytest.raises(pgjobs.ConfigurationError, match="_async"),
    ):
        await send.enqueue_async(to="a", conn=sconn)
    assert count_jobs(conn) == 0
