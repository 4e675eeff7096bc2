"""pgjobs through PgBouncer in transaction mode (Debian's ``pgbouncer``), and the connection
budget of a worker.

In transaction mode each transaction of a client may run on another server session: no
statement may be prepared, no setting may be made for the session, LISTEN works only on a
direct connection. These tests run pgjobs' own connections (its pools, real ``pgjobs
work`` processes) through a PgBouncer of their own, so nothing here relies on the
suite-wide ``PGJOBS_TEST_PGBOUNCER`` mode, which makes the tests' own connections prepare
nothing.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pgbouncer
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from worker_processes import Workers, app_on, scalar, wait_until

import pgjobs
from pgjobs.database import behind_pooler
from pgjobs.settings import LISTEN_URL_ENV

APP = "tests.scale.scale_app:app"
POOL_SIZE = 20

pytestmark = pytest.mark.skipif(
    not pgbouncer.available(), reason="Debian's pgbouncer is not installed"
)


@pytest.fixture(scope="module")
def bouncer(pg_server: Any) -> Iterator[pgbouncer.PgBouncer]:
    """A PgBouncer of this module's, ``POOL_SIZE`` server connections per database."""
    running = pgbouncer.start(pg_server.host, pg_server.port, pg_server.user, pool_size=POOL_SIZE)
    yield running
    running.stop()


@pytest.fixture
def pooled_url(bouncer: pgbouncer.PgBouncer, direct_db_url: str) -> str:
    """This test's database through the module's PgBouncer."""
    return bouncer.url(str(conninfo_to_dict(direct_db_url)["dbname"]))


@pytest.fixture
def no_listen_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """No direct URL for LISTEN anywhere (the suite may set one)."""
    monkeypatch.delenv(LISTEN_URL_ENV, raising=False)


@pytest.fixture
def scale_app(pooled_url: str, no_listen_url: None) -> Iterator[pgjobs.App]:
    """The scale test application, enqueueing through PgBouncer."""
    import scale_app

    with app_on(scale_app.app, pooled_url) as app:
        yield app


@pytest.fixture
def workers(pooled_url: str, tmp_path: Path, no_listen_url: None) -> Iterator[Workers]:
    """``pgjobs work`` processes of the scale app through PgBouncer, killed at teardown."""
    started = Workers(pooled_url, tmp_path, app=APP, queues="scale")
    yield started
    started.cleanup()


def _succeeded(conn: psycopg.Connection[Any]) -> int:
    return int(scalar(conn, "SELECT count(*) FROM pgjobs.jobs WHERE state = 'succeeded'"))


def test_a_url_through_pgbouncer_is_told_from_a_direct_one(
    pooled_url: str, direct_db_url: str
) -> None:
    assert behind_pooler(pooled_url) is True
    assert behind_pooler(direct_db_url) is False


def test_enqueue_through_pgbouncer_prepares_nothing_under_concurrency(
    scale_app: pgjobs.App, pooled_url: str, conn: psycopg.Connection[Any]
) -> None:
    from scale_app import where

    # Each thread repeats one statement far past psycopg's prepare threshold, over server
    # sessions that the other threads keep switching.
    def produce(offset: int) -> None:
        for i in range(40):
            where.enqueue(n=offset + i)
        where.enqueue_many([{"n": offset + i} for i in range(40, 60)])
        with psycopg.connect(pooled_url, prepare_threshold=None) as caller:
            for i in range(60, 70):
                where.enqueue(n=offset + i, conn=caller)
                caller.commit()

    threads = [threading.Thread(target=produce, args=(1000 * t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    async def produce_async() -> None:
        await asyncio.gather(*(where.enqueue_async(n=i) for i in range(30)))
        await scale_app.aclose()

    asyncio.run(produce_async())
    assert scalar(conn, "SELECT count(*) FROM pgjobs.jobs") == 8 * 70 + 30
    with scale_app.pool.connection() as pooled:
        assert pooled.prepare_threshold is None


def test_a_worker_through_pgbouncer_polls_says_so_once_and_stops_on_sigterm(
    scale_app: pgjobs.App, workers: Workers, conn: psycopg.Connection[Any]
) -> None:
    from scale_app import where

    where.enqueue_many([{"n": i} for i in range(250)])
    proc = workers.start(concurrency=8, poll_interval=0.2, wait_ready=False)
    workers.wait_ready(proc, listens=False)
    for i in range(250, 500):
        where.enqueue(n=i)
    wait_until(lambda: _succeeded(conn) == 500, 60, "500 jobs succeeded", 0.1)
    # Each ran once, by that worker, and each outcome was written once.
    assert scalar(conn, "SELECT count(*) FROM pgjobs.jobs WHERE attempts = 1") == 500
    assert scalar(conn, "SELECT count(DISTINCT result) FROM pgjobs.jobs") == 1
    log = proc.log()
    assert log.count("where LISTEN does not work: polling every 0.2 s") == 1, log
    assert "through a transaction pooler: claim 1, listen 0, completion 1" in log, log
    # A job enqueued now is found by the poll alone.
    job = where.enqueue(n=500)
    wait_until(lambda: scale_app.get_job(job).state == "succeeded", 10, "polled job ran")
    # SIGTERM while jobs run: a clean stop within the grace.
    from scale_app import nap

    naps = [nap.enqueue(seconds=0.5) for _ in range(4)]
    wait_until(lambda: scale_app.get_job(naps[0]).state == "running", 10, "naps running")
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, proc.log()
    # Not one job is left running behind it.
    assert scalar(conn, "SELECT count(*) FROM pgjobs.jobs WHERE state = 'running'") == 0


def test_with_a_direct_listen_url_a_worker_through_pgbouncer_is_woken(
    scale_app: pgjobs.App,
    workers: Workers,
    conn: psycopg.Connection[Any],
    direct_db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scale_app import where

    monkeypatch.setenv(LISTEN_URL_ENV, direct_db_url)
    # A poll interval far beyond the wait below: only a notification can start the job.
    proc = workers.start(concurrency=4, poll_interval=60)
    job = where.enqueue(n=1)
    wait_until(lambda: scale_app.get_job(job).state == "succeeded", 10, "woken job ran")
    listeners = scalar(
        conn,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = 'pgjobs-listener' AND datname = current_database()",
    )
    assert listeners == 1
    log = proc.log()
    assert "LISTEN does not work" not in log
    assert "through a transaction pooler: claim 1, listen 1, completion 1" in log, log
    # Events and wait() need LISTEN too: they take the direct URL.
    scale_app._listen_url = direct_db_url
    try:
        assert scale_app.wait(where.enqueue(n=2), timeout=10) == proc.pid
    finally:
        scale_app._listen_url = None  # the module's App outlives this test


def test_events_through_pgbouncer_without_a_listen_url_say_what_to_do(
    scale_app: pgjobs.App,
) -> None:
    with pytest.raises(pgjobs.ConfigurationError, match="listen_url"):
        next(iter(scale_app.events()))


def test_a_worker_states_its_connection_budget_and_holds_no_more(
    workers: Workers, db_url: str, direct_db_url: str, conn: psycopg.Connection[Any]
) -> None:
    # Direct this time: the server's own view of the worker's sessions is exact.
    workers.url = direct_db_url
    proc = workers.start(concurrency=4)
    # The budget is logged once the worker has opened what it holds, which may come after
    # the listener says it listens.
    budget = re.compile(r"holds (\d+) database connection\(s\): (.*?);")
    wait_until(lambda: budget.search(proc.log()) is not None, 10, "the budget line")
    match = budget.search(proc.log())
    assert match, proc.log()
    assert match.group(2) == "claim 1, listen 1, completion 1, maintenance 1, scheduler 0"
    stated = int(match.group(1))
    assert stated == 4
    # The completion connection opens with the first outcome: give it one.
    with pgjobs.App(direct_db_url, strict_tasks=False) as producer:
        producer.wait(producer.enqueue("where", {"n": 1}, queue="scale"), 10)
    held = wait_until(lambda: _server_sessions(conn) == stated, 10, "the stated sessions")
    assert held


@pytest.mark.slow
def test_a_fleet_of_64_workers_through_pgbouncer_stays_within_max_connections(
    scale_app: pgjobs.App,
    workers: Workers,
    conn: psycopg.Connection[Any],
    bouncer: pgbouncer.PgBouncer,
) -> None:
    from scale_app import where

    fleet = 64
    supervisor = workers.start("--grace", "5", concurrency=4, processes=fleet, wait_ready=False)
    workers.wait_ready(supervisor, processes=fleet, timeout=120, listens=False)
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        with psycopg.connect(conn.info.dsn, autocommit=True) as watcher:
            while not done.is_set():
                peak = max(peak, _server_sessions(watcher))
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        where.enqueue_many([{"n": i} for i in range(3000)])
        wait_until(lambda: _succeeded(conn) == 3000, 120, "3000 jobs succeeded", 0.2)
    finally:
        done.set()
        watcher.join(10)
    runners = scalar(conn, "SELECT count(DISTINCT result) FROM pgjobs.jobs")
    clients = sum(1 for row in bouncer.admin("SHOW CLIENTS") if row[2] == conn.info.dbname)
    print(
        f"\n{fleet} worker processes ({runners} ran jobs) through PgBouncer: {clients} client "
        f"connections, at most {peak} server sessions (pool size {POOL_SIZE})"
    )
    assert runners > fleet // 2
    assert clients >= 2 * fleet
    # PostgreSQL's default max_connections is 100.
    assert peak <= POOL_SIZE < 100
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0


def _server_sessions(conn: psycopg.Connection[Any]) -> int:
    """Server sessions of pgjobs on this database (PgBouncer's carry the application_name
    of their last client; the tests' own sessions have none of pgjobs')."""
    return int(
        scalar(
            conn,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'pgjobs-%'",
        )
    )


def test_changing_the_table_layout_through_pgbouncer_asks_for_a_direct_url(
    pooled_url: str, conn: psycopg.Connection[Any]
) -> None:
    from typer.testing import CliRunner

    from pgjobs.cli import cli

    partitioned = (
        "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'pgjobs.jobs'::regclass"
    )
    before = scalar(conn, partitioned)  # 1 with PGJOBS_TEST_PARTITIONED
    undo = ["--undo"] if before else []
    result = CliRunner().invoke(cli, ["--database-url", pooled_url, "migrate", "partition", *undo])
    assert result.exit_code == 1
    assert "needs a direct URL" in result.stderr, result.stderr
    assert scalar(conn, partitioned) == before
