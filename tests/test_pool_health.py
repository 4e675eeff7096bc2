"""A pooled connection that died is never handed to an enqueue (issue 15, item 10).

pgjobs' own pools keep idle connections; the server may end one at any time
(``pg_terminate_backend``, an idle timeout, a restart). The next enqueue must get a live
connection, not fail with ``AdminShutdown`` on the dead one, and must not wait long for it.
"""

from __future__ import annotations

import select
import time
from typing import Any

import pgbouncer
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

import pgjobs

HELD = 5
ENQUEUES = 20


def _terminate(conn: psycopg.Connection[Any], pids: list[int]) -> None:
    """End these backends and wait until the server has let them go (their goodbye, a
    FATAL error and the socket's close, is sent by then)."""
    conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS t(pid)", (pids,))
    deadline = time.monotonic() + 10
    while True:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY (%s)", (pids,)
        ).fetchone()
        if row is not None and row[0] == 0:
            return
        assert time.monotonic() < deadline, f"backends {pids} still there"
        time.sleep(0.02)


def _fill(pool: ConnectionPool) -> list[int]:
    """Make the pool hold ``HELD`` idle connections; their backend pids."""
    held = [pool.getconn() for _ in range(HELD)]
    pids = [c.info.backend_pid for c in held]
    for c in held:
        pool.putconn(c)
    return pids


async def _fill_async(pool: AsyncConnectionPool) -> list[int]:
    held = [await pool.getconn() for _ in range(HELD)]
    pids = [c.info.backend_pid for c in held]
    for c in held:
        await pool.putconn(c)
    return pids


def _jobs(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone()
    return int(row[0]) if row else 0


def test_enqueue_after_the_pooled_connections_were_terminated(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    @app.task(name="pool.ping")
    def ping(n: int) -> None:
        pass

    ping.enqueue(n=-1)  # opens the pool
    pids = _fill(app.pool)
    _terminate(conn, pids)
    began = time.monotonic()
    ids = [ping.enqueue(n=i) for i in range(ENQUEUES)]
    elapsed = time.monotonic() - began
    assert all(isinstance(i, int) for i in ids)
    assert _jobs(conn) == ENQUEUES + 1
    # Each dead connection is dropped at once, not after the pool's reconnection backoff.
    assert elapsed < 3.0, f"{ENQUEUES} enqueues took {elapsed:.1f} s"
    # Other users of the pool get live connections too.
    assert app.get_job(ids[0]).state == "available"


@pytest.mark.asyncio
async def test_enqueue_async_after_the_pooled_connections_were_terminated(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    @app.task(name="pool.aping")
    async def aping(n: int) -> None:
        pass

    # Closed here: the database is dropped after the test, and an open pool would hold it.
    try:
        await aping.enqueue_async(n=-1)  # opens the async pool
        pids = await _fill_async(await app.async_pool())
        _terminate(conn, pids)
        began = time.monotonic()
        ids = [await aping.enqueue_async(n=i) for i in range(ENQUEUES)]
        elapsed = time.monotonic() - began
        assert all(isinstance(i, int) for i in ids)
        assert _jobs(conn) == ENQUEUES + 1
        assert elapsed < 3.0, f"{ENQUEUES} enqueues took {elapsed:.1f} s"
        assert (await app.get_job_async(ids[0])).state == "available"
    finally:
        await app.aclose()


@pytest.mark.skipif(
    pgbouncer.SUITE_THROUGH_PGBOUNCER,
    reason="LISTENs on a pooled connection, which PgBouncer in transaction mode cannot carry",
)
def test_a_connection_in_use_is_not_taken_for_dead(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    """A live connection on which the server sent something unasked (a notification)
    stays in service, and what it sent is not lost."""

    @app.task(name="pool.ping2")
    def ping(n: int) -> None:
        pass

    ping.enqueue(n=0)
    with app.pool.connection() as pooled:
        pooled.execute("LISTEN pool_health")
        pid = pooled.info.backend_pid
        fd = pooled.fileno()
    conn.execute("NOTIFY pool_health, 'hello'")
    # Until the notification has reached the idle connection's socket.
    assert select.select([fd], [], [], 5.0)[0], "no notification arrived"
    with app.pool.connection() as again:
        assert again.info.backend_pid == pid
        notes = list(again.notifies(timeout=1.0, stop_after=1))
        assert [n.payload for n in notes] == ["hello"]
        again.execute("UNLISTEN *")
    ping.enqueue(n=1)
    assert _jobs(conn) == 2
