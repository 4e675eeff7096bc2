"""Failover: a primary and its streaming standby (tests/standby.py), pgjobs on a multi-host
URL (``host=a,b port=p,q target_session_attrs=read-write``), the primary crashed
(``pg_ctl stop -m immediate``) and the standby promoted while workers drain and while a
producer's pool holds idle connections.

Nothing here uses the suite's server (nor its PgBouncer): each test starts a pair of its
own, and tears it down whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import netns
import psycopg
import pytest
import standby
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from worker_processes import Workers, app_on, scalar, wait_until

import pgjobs
from pgjobs import migrate

# Each test starts a primary and standby of its own: CI runs them once, not in its pass
# through PgBouncer in front of another server.
pytestmark = pytest.mark.own_servers

APP = "tests.scale.failover_app:app"
DBNAME = "pgjobs_failover"
PROCESSES = 2
CONCURRENCY = 4
JOBS = 600
JOB_SECONDS = 0.02


StartPair = Callable[..., standby.Pair]


@pytest.fixture
def start_pair() -> Iterator[StartPair]:
    """Start a migrated primary/standby pair (``synchronous``: the standby is a synchronous
    one; ``primary_host``: a network namespace host the primary runs on); every pair
    started is stopped and removed at teardown."""
    pairs: list[standby.Pair] = []

    def start(synchronous: bool, primary_host: netns.Host | None = None) -> standby.Pair:
        pair = standby.start(synchronous=synchronous, primary_host=primary_host)
        pairs.append(pair)
        with psycopg.connect(pair.primary.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DBNAME}")
        migrate.upgrade(pair.primary.url(DBNAME))
        pair.wait_caught_up()
        return pair

    yield start
    for pair in pairs:
        pair.stop()


AppOn = Callable[[str], pgjobs.App]


@pytest.fixture
def app_at() -> Iterator[AppOn]:
    """``app_at(url)``: the failover test application pointed at ``url`` (the pair's URL,
    known once the test has started it); its pools are closed at teardown."""
    import failover_app

    with contextlib.ExitStack() as stack:
        yield lambda url: stack.enter_context(app_on(failover_app.app, url))


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """``pgjobs work`` processes of the failover app (URL set by each test), killed at
    teardown."""
    started = Workers("", tmp_path, app=APP, queues="failover")
    yield started
    started.cleanup()


@dataclass(frozen=True)
class Run:
    """One line of the ledger: one run of a job."""

    job_id: int
    attempt: int
    lease: str
    pid: int
    at: float


def _runs(ledger: Path) -> list[Run]:
    runs = []
    for line in ledger.read_text().splitlines():
        job_id, _n, attempt, lease, pid, at = line.split()
        runs.append(Run(int(job_id), int(attempt), lease, int(pid), float(at)))
    return runs


def _enqueue(n: int, ledger: str = "-", seconds: float = 0) -> int:
    """Enqueue one step of the failover app; its id."""
    import failover_app as fa

    job = fa.step.enqueue(n=n, ledger=ledger, seconds=seconds)
    assert job is not None  # no unique key: never skipped
    return int(job)


async def _enqueue_async(n: int) -> int:
    import failover_app as fa

    job = await fa.step.enqueue_async(n=n, ledger="-", seconds=0)
    assert job is not None
    return int(job)


def _states(url: str) -> dict[str, int]:
    """Jobs by state on whichever server ``url`` reaches for writes; {} when none does."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT state::text, count(*) FROM pgjobs.jobs GROUP BY 1"
            ).fetchall()
    except psycopg.OperationalError:
        return {}
    return {state: int(n) for state, n in rows}


def test_workers_drain_through_a_failover_and_lose_nothing_committed(
    start_pair: StartPair,
    app_at: AppOn,
    workers: Workers,
    tmp_path: Path,
) -> None:
    import failover_app as fa

    # Synchronous replication: every durable commit (enqueues, outcomes) is on the standby
    # before it returns. Claims are not durable (synchronous_commit=off on the claim
    # connection), so a claim may be lost: that job runs again, as at-least-once allows.
    pair = start_pair(True)
    url = pair.url(DBNAME)
    ledger = tmp_path / "ledger"
    workers.url = url
    failover_app = app_at(url)
    ids = fa.step.enqueue_many(
        [{"n": i, "ledger": str(ledger), "seconds": JOB_SECONDS} for i in range(JOBS)]
    )
    assert len(ids) == JOBS
    pair.wait_caught_up()
    # A fallback poll far beyond the test: after the failover, only the listener's
    # reconnect (which polls once it LISTENs again) and its notifications find jobs.
    procs = [
        workers.start(concurrency=CONCURRENCY, poll_interval=60, heartbeat_timeout=10)
        for _ in range(PROCESSES)
    ]
    wait_until(lambda: _states(url).get("succeeded", 0) >= JOBS // 4, 30, "a quarter drained", 0.01)
    crashed_at = time.time()
    pair.primary.stop("immediate")
    # Gone by now: whatever a worker holds was claimed before this moment.
    down_at = time.time()
    pair.standby.pg_ctl("-w", "-t", "60", "promote")
    promoted_at = time.time()
    try:
        wait_until(lambda: _states(url).get("succeeded", 0) == JOBS, 45, "all jobs succeeded", 0.1)
    except AssertionError:
        logs = "\n".join(p.log()[-4000:] for p in procs)
        raise AssertionError(f"states {_states(url)}\n{logs}\n{pair.logs()[-4000:]}") from None

    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.info.port == pair.standby.port
        first_done = scalar(
            conn,
            "SELECT extract(epoch FROM min(finished_at))::float8 FROM pgjobs.jobs "
            "WHERE finished_at >= to_timestamp(%s)",
            (promoted_at,),
        )
        done_before = scalar(
            conn,
            "SELECT count(*) FROM pgjobs.jobs WHERE finished_at < to_timestamp(%s)",
            (crashed_at,),
        )
    # The same processes, never restarted; each listener and heartbeat came back by itself.
    for proc in procs:
        assert proc.popen.poll() is None, proc.log()
        assert "listening again" in proc.log(), proc.log()
    # Every job ran; none more than twice; a second run only for a job whose first run
    # was under way when the primary went (its claim or its outcome went with it).
    runs = _runs(ledger)
    per_job = Counter(r.job_id for r in runs)
    assert set(per_job) == set(ids)
    twice = sorted(j for j, n in per_job.items() if n > 1)
    assert max(per_job.values()) <= 2, per_job.most_common(5)
    for job_id in twice:
        first = min(r.at for r in runs if r.job_id == job_id)
        assert first < down_at, f"job {job_id} ran twice, first after the crash"
    # At most what was in flight: every slot, and as many outcomes on their way.
    assert len(twice) <= 2 * PROCESSES * CONCURRENCY, twice

    # A job enqueued now starts at once: the listeners LISTEN on the new primary.
    began = time.monotonic()
    job = _enqueue(JOBS, str(ledger))
    wait_until(lambda: failover_app.get_job(job).state == "succeeded", 10, "woken job")
    woken_in = time.monotonic() - began
    print(
        f"\nfailover: promote -> first job done on the new primary "
        f"{first_done - promoted_at:.2f} s; crash -> promoted {promoted_at - crashed_at:.2f} s; "
        f"{done_before}/{JOBS} done before the crash; {len(twice)} jobs ran twice; "
        f"a new job ran {woken_in * 1000:.0f} ms after its enqueue"
    )


def _fill(pool: ConnectionPool, n: int) -> list[int]:
    """Make the pool hold ``n`` idle connections; their backend pids."""
    held = [pool.getconn() for _ in range(n)]
    for conn in held:
        pool.putconn(conn)
    return [conn.info.backend_pid for conn in held]


async def _fill_async(pool: AsyncConnectionPool, n: int) -> list[int]:
    held = [await pool.getconn() for _ in range(n)]
    for conn in held:
        await pool.putconn(conn)
    return [conn.info.backend_pid for conn in held]


def test_the_next_enqueue_after_a_failover_reaches_the_new_primary(
    start_pair: StartPair, app_at: AppOn
) -> None:
    import failover_app as fa

    pair = start_pair(False)
    url = pair.url(DBNAME)
    failover_app = app_at(url)
    fa.step.enqueue(n=0, ledger="-", seconds=0)  # opens the pool
    _fill(failover_app.pool, 5)
    pair.wait_caught_up()
    pair.fail_over()
    # Its idle connections died with the old primary: none is handed to these.
    began = time.monotonic()
    ids = [_enqueue(i) for i in range(1, 11)]
    elapsed = time.monotonic() - began
    with failover_app.pool.connection() as conn:
        port = conn.info.port
    _reached_the_new_primary(pair, url, ids, elapsed, port)


def test_the_next_async_enqueue_after_a_failover_reaches_the_new_primary(
    start_pair: StartPair, app_at: AppOn
) -> None:
    import failover_app as fa

    pair = start_pair(False)
    url = pair.url(DBNAME)
    failover_app = app_at(url)

    async def scenario() -> tuple[list[int], float, int]:
        await fa.step.enqueue_async(n=0, ledger="-", seconds=0)  # opens the pool
        pool = await failover_app.async_pool()
        await _fill_async(pool, 5)
        await asyncio.to_thread(pair.wait_caught_up)
        await asyncio.to_thread(pair.fail_over)
        began = time.monotonic()
        ids = [await _enqueue_async(i) for i in range(1, 11)]
        elapsed = time.monotonic() - began
        async with pool.connection() as conn:
            port = conn.info.port
        await failover_app.aclose()
        return ids, elapsed, port

    _reached_the_new_primary(pair, url, *asyncio.run(scenario()))


def _reached_the_new_primary(
    pair: standby.Pair, url: str, ids: list[int], elapsed: float, port: int
) -> None:
    """The pool's connection is to the promoted standby, which has the 10 jobs, enqueued
    without a wait for dead connections."""
    assert port == pair.standby.port
    with psycopg.connect(url, autocommit=True) as conn:
        assert scalar(conn, "SELECT count(*) FROM pgjobs.jobs WHERE id = ANY(%s)", (ids,)) == 10
    assert elapsed < 5, f"10 enqueues after the failover took {elapsed:.1f} s"
    print(f"\nfailover: 10 enqueues right after it took {elapsed * 1000:.0f} ms")


def test_asynchronous_replication_loses_a_job_enqueued_just_before_the_failover(
    start_pair: StartPair, app_at: AppOn
) -> None:

    pair = start_pair(False)
    url = pair.url(DBNAME)
    failover_app = app_at(url)
    kept = _enqueue(0)
    pair.wait_caught_up()
    # The standby falls behind (here: it is down; in life, a lagging network or disk). The
    # primary does not wait for it, so the enqueue returns as usual...
    pair.standby.stop()
    lost = _enqueue(1)
    failover_app.close()
    # ...and the primary crashes before the standby has the job.
    pair.primary.stop("immediate")
    pair.standby.start()
    pair.standby.pg_ctl("-w", "-t", "60", "promote")
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.info.port == pair.standby.port
        found = conn.execute(
            "SELECT id FROM pgjobs.jobs WHERE id = ANY(%s) ORDER BY id", ([kept, lost],)
        ).fetchall()
    assert found == [(kept,)], "the job enqueued after the standby fell behind is gone"


def test_a_job_whose_outcome_was_lost_in_an_asynchronous_failover_runs_again(
    start_pair: StartPair, app_at: AppOn, workers: Workers, tmp_path: Path
) -> None:
    # The standby has the job's claim but not its outcome: on the new primary the job is
    # `running` again, under a worker that is alive (so no peer rescues it) and that no
    # longer holds it. The worker gives it back once it has reconnected.
    pair = start_pair(False)
    url = pair.url(DBNAME)
    ledger = tmp_path / "ledger"
    workers.url = url
    app_at(url)
    proc = workers.start(concurrency=2, poll_interval=60, heartbeat_timeout=10)
    job = _enqueue(0, str(ledger), seconds=3.0)
    wait_until(lambda: ledger.exists() and len(_runs(ledger)) == 1, 20, "the job started")
    # Claims are committed without waiting for their WAL to be flushed: wait until the
    # standby shows the claim itself.
    with psycopg.connect(pair.standby.url(DBNAME), autocommit=True) as replica:
        query = "SELECT state::text FROM pgjobs.jobs WHERE id = %s"
        wait_until(lambda: scalar(replica, query, (job,)) == "running", 20, "claim replayed")
    pair.standby.stop()
    wait_until(lambda: _states(url).get("succeeded") == 1, 20, "the job done on the primary")
    pair.primary.stop("immediate")
    pair.standby.start()
    pair.standby.pg_ctl("-w", "-t", "60", "promote")

    try:
        wait_until(lambda: _states(url).get("succeeded") == 1, 40, "the job done again")
    except AssertionError:
        raise AssertionError(f"states {_states(url)}\n{proc.log()[-6000:]}") from None
    runs = [r for r in _runs(ledger) if r.job_id == job]
    assert len(runs) == 2 and runs[0].lease != runs[1].lease, runs
    assert "were running again on the server" in proc.log(), proc.log()
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.info.port == pair.standby.port
        errors = scalar(conn, "SELECT errors FROM pgjobs.jobs WHERE id = %s", (job,))
    assert [e["type"] for e in errors] == ["WorkerDied"]
    assert "its outcome was lost" in errors[0]["message"]


def test_synchronous_replication_returns_an_enqueue_once_the_standby_has_it(
    start_pair: StartPair, app_at: AppOn
) -> None:
    import failover_app as fa

    pair = start_pair(True)
    url = pair.url(DBNAME)
    failover_app = app_at(url)
    fa.step.enqueue(n=0, ledger="-", seconds=0)  # opens the pool
    pair.standby.stop()
    # With its synchronous standby away, the primary holds the enqueue's commit...
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(_enqueue(1)), daemon=True)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive() and not result, "the enqueue returned without the standby"
    # ...until the standby has it: once the enqueue returns, a failover keeps the job.
    pair.standby.start()
    thread.join(30)
    assert result, "the enqueue did not return once the standby was back"
    failover_app.close()
    pair.fail_over()
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.info.port == pair.standby.port
        assert scalar(conn, "SELECT count(*) FROM pgjobs.jobs WHERE id = %s", result) == 1


def test_the_pool_connects_with_tcp_keepalives_and_a_user_timeout(
    start_pair: StartPair, app_at: AppOn
) -> None:
    import failover_app as fa

    from pgjobs.database import CONNECT_TIMEOUT, TCP_SETTINGS

    pair = start_pair(False)
    # A URL's own figure wins over pgjobs' default.
    failover_app = app_at(pair.url(DBNAME) + " keepalives_idle=7")
    fa.step.enqueue(n=0, ledger="-", seconds=0)
    with failover_app.pool.connection() as conn:
        params = conn.info.get_parameters()
    expected = {**TCP_SETTINGS, "connect_timeout": CONNECT_TIMEOUT, "keepalives_idle": 7}
    assert {k: params.get(k) for k in expected} == {k: str(v) for k, v in expected.items()}


# Shortened for the test (pgjobs' defaults take ~25 s): a silent peer of an idle connection
# is found after 1 s + 2 probes 1 s apart, a statement unacknowledged fails after 2 s, a
# connection attempt to the silent host gives up after 2 s.
QUICK_TCP = (
    " keepalives_idle=1 keepalives_interval=1 keepalives_count=2 tcp_user_timeout=2000"
    " connect_timeout=2"
)


@pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))
def test_a_primary_that_vanished_holds_no_enqueue_and_no_worker(
    start_pair: StartPair, app_at: AppOn, workers: Workers, tmp_path: Path
) -> None:

    netns.remove_leftovers()
    with netns.network(1) as net:
        # The primary on a host of its own, whose cable the test pulls: its connections
        # go silent, nobody is told (unlike a crash, whose sockets close at once).
        pair = start_pair(False, primary_host=net.hosts[0])
        try:
            url = pair.url(DBNAME) + QUICK_TCP
            failover_app = app_at(url)
            workers.url = url
            proc = workers.start(concurrency=2, poll_interval=60, heartbeat_timeout=10)
            ledger = tmp_path / "ledger"
            first = _enqueue(0, str(ledger))
            wait_until(lambda: failover_app.get_job(first).state == "succeeded", 10, "first")
            _fill(failover_app.pool, 3)
            pair.wait_caught_up()
            net.hosts[0].cut()
            pair.standby.pg_ctl("-w", "-t", "60", "promote")
            promoted = time.monotonic()
            # An enqueue may fail (one on a connection whose peer is not known gone yet),
            # never hang; soon one gets through, to the new primary.
            attempts: list[tuple[float, str]] = []

            def enqueued() -> int | None:
                began = time.monotonic()
                try:
                    job = _enqueue(1, str(ledger))
                except pgjobs.DatabaseError as exc:
                    attempts.append((time.monotonic() - began, str(exc)[:80]))
                    return None
                attempts.append((time.monotonic() - began, "ok"))
                return job

            job = wait_until(enqueued, 20, "an enqueue through to the new primary", 0.1)
            assert job is not None
            recovered = time.monotonic() - promoted
            assert max(took for took, _ in attempts) < 6, attempts
            with failover_app.pool.connection() as conn:
                assert conn.info.port == pair.standby.port
            # The worker, never restarted, finds it on the new primary.
            wait_until(lambda: failover_app.get_job(job).state == "succeeded", 30, "ran")
            ran = time.monotonic() - promoted
            assert proc.popen.poll() is None, proc.log()
            assert "listening again" in proc.log(), proc.log()
            print(
                f"\nvanished primary: first enqueue through {recovered:.1f} s after the "
                f"promotion ({len(attempts)} attempts: {attempts}); job run {ran:.1f} s after"
            )
        finally:
            workers.cleanup()
            workers.started.clear()
            pair.stop()
