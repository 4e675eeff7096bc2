"""Job events (app.events) and waiting (app.wait), against real worker processes."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import psycopg
import pytest
from worker_processes import Workers, wait_until

import pgjobs
from pgjobs.settings import events_application_name, events_channel_for

CHANNEL = events_channel_for("pgjobs")
SUBSCRIBER = events_application_name("pgjobs")


def _subscribed(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND datname = current_database()",
        (SUBSCRIBER,),
    ).fetchone()
    return bool(row and row[0])


def _collect_sync(
    app: pgjobs.App, job_id: int, last: str, out: list[pgjobs.JobEvent]
) -> threading.Thread:
    """Iterate app.events(job_id) on a thread until an event of kind ``last``."""

    def run() -> None:
        for event in app.events(job_id=job_id):
            out.append(event)
            if event.kind == last:
                break

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_channel_fits_the_identifier_limit() -> None:
    assert len(events_channel_for("x" * 48).encode()) <= 63


def test_a_subscriber_sees_started_progress_succeeded_in_order(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import progress

    job_id = progress.enqueue()

    async def collect() -> list[pgjobs.JobEvent]:
        seen: list[pgjobs.JobEvent] = []
        async with asyncio.timeout(30):
            async for event in wapp.events(job_id=job_id):
                seen.append(event)
                if event.kind == "succeeded":
                    return seen
        return seen

    async def main() -> list[pgjobs.JobEvent]:
        task = asyncio.create_task(collect())
        await asyncio.to_thread(wait_until, lambda: _subscribed(ledger), 10, "subscriber")
        # The worker sees the subscriber at start (and at every heartbeat).
        await asyncio.to_thread(workers.start)
        return await task

    seen = asyncio.run(main())
    assert [e.kind for e in seen] == ["started", "progress", "succeeded"]
    assert all(e.job_id == job_id and e.queue == "q" and e.task == "t.progress" for e in seen)
    assert seen[0].attempt == 1 and seen[2].attempt == 1
    assert seen[1].progress == 0.5 and seen[1].progress_data == {"step": "half"}


def test_a_failing_job_yields_failed_then_retried_then_dead(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import fail

    job_id = fail.enqueue(times=1000)
    seen: list[pgjobs.JobEvent] = []
    thread = _collect_sync(wapp, job_id, "dead", seen)
    wait_until(lambda: _subscribed(ledger), 10, "subscriber")
    workers.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), [e.kind for e in seen]
    assert [(e.kind, e.attempt) for e in seen] == [
        ("started", 1),
        ("failed", 1),
        ("retried", 1),
        ("started", 2),
        ("failed", 2),
        ("retried", 2),
        ("started", 3),
        ("failed", 3),
        ("dead", 3),
    ]
    # The iterator closed its connection when the loop ended.
    wait_until(lambda: not _subscribed(ledger), 10, "subscriber gone")


def test_without_subscribers_workers_send_no_events(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers, direct_db_url: str
) -> None:
    from worker_app import progress, record_sync

    # A plain listener (not a subscriber: its application_name is not the events one).
    with psycopg.connect(direct_db_url, autocommit=True) as spy:
        spy.execute(f"LISTEN {CHANNEL}")
        worker = workers.start()
        ids = [record_sync.enqueue(n=i) for i in range(45)] + [progress.enqueue() for _ in range(5)]
        wait_until(
            lambda: (
                ledger.execute(
                    "SELECT count(*) FROM pgjobs.jobs WHERE state = 'succeeded' AND id = ANY(%s)",
                    (ids,),
                ).fetchone()
                == (50,)
            ),
            30,
            "50 jobs succeeded",
        )
        assert list(spy.notifies(timeout=0.5)) == []
        # Control: the same spy does see events once a subscriber is connected.
        subscriber = wapp.events().connect()
        try:
            wait_until(lambda: "job events on" in worker.log(), 10, "worker saw the subscriber")
            job_id = record_sync.enqueue(n=99)
            got = list(spy.notifies(timeout=10, stop_after=1))
            assert got and str(job_id) in got[0].payload
        finally:
            subscriber.close()
        wait_until(lambda: "job events off" in worker.log(), 10, "worker saw it leave")


def test_an_oversized_payload_becomes_a_resync_hint(conn: psycopg.Connection[Any]) -> None:
    from pgjobs.events import parse_payload

    (event,) = parse_payload('{"kind": "resync"}')
    assert event.kind == "resync" and event.job_id is None
    (event,) = parse_payload("not json")
    assert event.kind == "resync"
    # The statements fall back to the hint when the list of events is too long.
    from pgjobs.queries import Queries

    Q = Queries("pgjobs")
    conn.execute(f"LISTEN {CHANNEL}")
    conn.execute(
        "INSERT INTO pgjobs.jobs (queue, task) SELECT repeat('q', 120), 't' "
        "FROM generate_series(1, 100)"
    )
    params = {
        "queues": ["q" * 120],
        "limit": 100,
        "start": 100,
        "worker": "w",
        "events": True,
        "events_channel": CHANNEL,
    }
    claimed = conn.execute(Q.claim_jobs, params).fetchall()
    assert len(claimed) == 100
    (notify,) = list(conn.notifies(timeout=2, stop_after=1))
    assert [e.kind for e in parse_payload(notify.payload)] == ["resync"]


def test_wait_returns_the_result(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import progress

    workers.start()
    assert wapp.wait(progress.enqueue(), timeout=30) == "reported"
    assert asyncio.run(wapp.wait_async(progress.enqueue(), timeout=30)) == "reported"


def test_wait_raises_for_a_dead_job(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import fail

    workers.start()
    job_id = fail.enqueue(times=1000)
    with pytest.raises(pgjobs.JobFailedError) as failure:
        wapp.wait(job_id, timeout=30)
    assert failure.value.job.id == job_id and failure.value.job.state == "dead"
    assert failure.value.error is not None and "failure number 3" in failure.value.error["message"]
    with pytest.raises(pgjobs.JobFailedError):
        asyncio.run(wapp.wait_async(job_id, timeout=5))


def test_wait_times_out(wapp: pgjobs.App, ledger: psycopg.Connection[Any]) -> None:
    from worker_app import progress

    job_id = progress.enqueue()  # no worker: it never runs
    with pytest.raises(TimeoutError):
        wapp.wait(job_id, timeout=0.7)
    with pytest.raises(TimeoutError):
        asyncio.run(wapp.wait_async(job_id, timeout=0.7))
    assert wapp.get_job(job_id).state == "available"


def test_enqueued_events_are_published_only_by_producers_that_opt_in(
    db_url: str, ledger: psycopg.Connection[Any]
) -> None:
    quiet = pgjobs.App(db_url, strict_tasks=False)
    loud = pgjobs.App(db_url, strict_tasks=False, enqueue_events=True)
    seen: list[pgjobs.JobEvent] = []
    stop = threading.Event()

    def run() -> None:
        for event in loud.events():
            seen.append(event)
            if stop.is_set():
                break

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: _subscribed(ledger), 10, "subscriber")
        silent = quiet.enqueue("t.record", {"n": 1}, queue="q")
        single = loud.enqueue("t.record", {"n": 2}, queue="q")
        bulk = loud.enqueue_many("t.record", [{"n": 3}, {"n": 4}], queue="q")
        expected = [single, *bulk]
        wait_until(lambda: [e.job_id for e in seen if e.kind == "enqueued"] == expected, 10)
        assert silent not in {e.job_id for e in seen}
        assert {(e.queue, e.task, e.attempt) for e in seen} == {("q", "t.record", 0)}
    finally:
        stop.set()
        loud.enqueue("t.record", {"n": 5}, queue="q")  # one more event lets the loop end
        thread.join(timeout=10)
        quiet.close()
        loud.close()
