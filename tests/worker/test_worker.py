"""The worker runtime: execution, outcomes, retries, timeouts, wake-up, against real processes.

Workers are real ``pgjobs work`` processes running ``tests/worker_app.py``; every task
writes a ledger row per execution. Waits are deadlines polled every few tens of ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from typing import Any

import psycopg
import pytest
from worker_processes import Workers, scalar, wait_until

import pgjobs
from pgjobs.listener import Listener


def _state(conn: psycopg.Connection[Any], job_id: int) -> str:
    return str(scalar(conn, "SELECT state FROM pgjobs.jobs WHERE id = %s", (job_id,)))


def _wait_state(
    conn: psycopg.Connection[Any], job_id: int, state: str, timeout: float = 15.0
) -> None:
    wait_until(lambda: _state(conn, job_id) == state, timeout, f"job {job_id} {state}")


def _ledger(conn: psycopg.Connection[Any], job_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT attempt, phase, at, pid FROM ledger WHERE job_id = %s ORDER BY id", (job_id,)
    ).fetchall()


def test_sync_and_async_tasks_run_and_store_results(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import record_async, record_sync

    worker = workers.start(concurrency=4)
    async_ids = record_async.enqueue_many([{"n": i} for i in range(10)], conn=None)
    sync_ids = [record_sync.enqueue(n=i) for i in range(10)]
    ids = [*async_ids, *sync_ids]
    wait_until(
        lambda: scalar(ledger, "SELECT count(*) FROM pgjobs.jobs WHERE state = 'succeeded'") == 20,
        15,
        "20 jobs succeeded",
    )
    for job_id in ids:
        job = app.get_job(job_id)
        assert job.attempts == 1 and job.finished_at is not None and job.lease_token is None
        assert job.result["attempt"] == 1
    assert app.get_job(sync_ids[0]).result["thread"].startswith("pgjobs-task")
    assert scalar(ledger, "SELECT count(*) FROM ledger") == 20
    assert scalar(ledger, "SELECT count(DISTINCT job_id) FROM ledger") == 20
    # Completion counters travel with the batched completions.
    row = ledger.execute(
        "SELECT jobs_succeeded, jobs_failed, concurrency FROM pgjobs.workers WHERE pid = %s",
        (worker.pid,),
    ).fetchone()
    assert row == (20, 0, 4)


def test_burst_exits_when_the_queues_are_done(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import record_async

    record_async.enqueue_many([{"n": i} for i in range(200)])
    worker = workers.start("--burst", concurrency=8, wait_ready=False)
    assert worker.wait(timeout=30) == 0, worker.log()
    assert scalar(ledger, "SELECT count(*) FROM pgjobs.jobs WHERE state = 'succeeded'") == 200
    assert scalar(ledger, "SELECT count(*) FROM ledger") == 200
    # A clean exit removes the worker's row.
    assert scalar(ledger, "SELECT count(*) FROM pgjobs.workers") == 0


def test_idle_worker_starts_a_new_job_within_milliseconds(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import record_async

    # A 60 s poll: only the notification can explain a fast start.
    workers.start(concurrency=2, poll_interval=60)
    latencies = []
    for i in range(20):
        job_id = record_async.enqueue(n=i)
        _wait_state(ledger, job_id, "succeeded", timeout=5)
        latencies.append(
            scalar(
                ledger,
                "SELECT extract(epoch FROM started_at - created_at) FROM pgjobs.jobs WHERE id = %s",
                (job_id,),
            )
        )
    ms = sorted(float(s) * 1000 for s in latencies)
    print(f"\nenqueue-to-start latency: p50 {statistics.median(ms):.2f} ms, max {ms[-1]:.2f} ms")
    assert ms[-1] < 1000
    # The claims went out on the listener's own connection (its backend had just woken).
    last_statement = scalar(
        ledger,
        "SELECT query FROM pg_stat_activity WHERE application_name = 'pgjobs-listener' "
        "AND datname = current_database()",
    )
    assert "FOR NO KEY UPDATE OF j SKIP LOCKED" in str(last_statement)


def test_failures_retry_with_backoff_then_go_dead(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import fail

    # A 60 s poll: retries must start at their run_at by the worker's own timer.
    workers.start(poll_interval=60)
    job_id = fail.enqueue()
    _wait_state(ledger, job_id, "dead")
    job = app.get_job(job_id)
    assert job.attempts == 3 and job.finished_at is not None
    assert [e["attempt"] for e in job.errors] == [1, 2, 3]
    assert all(e["type"] == "ValueError" for e in job.errors)
    assert [e["message"] for e in job.errors] == [f"failure number {n}" for n in (1, 2, 3)]
    assert "raise ValueError" in job.errors[0]["traceback"]
    assert all(e["worker"] and e["at"] for e in job.errors)
    runs = _ledger(ledger, job_id)
    assert [r[0] for r in runs] == [1, 2, 3]
    # backoff=0.4 * attempt: 0.4 s then 0.8 s, and not much later than that.
    gaps = [(runs[i + 1][2] - runs[i][2]).total_seconds() for i in range(2)]
    print(f"\nretry gaps: {gaps[0]:.3f} s, {gaps[1]:.3f} s (backoff 0.4 s, 0.8 s)")
    assert 0.4 <= gaps[0] < 0.4 + 0.5
    assert 0.8 <= gaps[1] < 0.8 + 0.5


def test_a_retry_can_succeed_and_discard_on_goes_dead_at_once(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import discard, fail

    workers.start()
    recovers = fail.enqueue(times=1)
    discarded = discard.enqueue()
    _wait_state(ledger, recovers, "succeeded")
    _wait_state(ledger, discarded, "dead")
    job = app.get_job(recovers)
    assert (job.attempts, job.result, len(job.errors)) == (2, "recovered", 1)
    dead = app.get_job(discarded)
    assert dead.attempts == 1 and dead.errors[0]["type"] == "KeyError"


def test_retry_snooze_and_cancel_raised_or_returned(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import outcome

    workers.start(concurrency=6)
    ids = {
        (kind, raise_it): outcome.enqueue(
            kind=kind, raise_it=raise_it, times=2 if kind == "snooze" else 1
        )
        for kind in ("retry", "snooze", "cancel")
        for raise_it in (False, True)
    }
    for (kind, _), job_id in ids.items():
        final = "cancelled" if kind == "cancel" else "succeeded"
        _wait_state(ledger, job_id, final)
        job = app.get_job(job_id)
        runs = _ledger(ledger, job_id)
        if kind == "retry":
            # Retry uses an attempt and records why.
            assert (job.attempts, len(runs), job.result) == (2, 2, "done after 2 executions")
            assert job.errors[0]["message"] == "asked to retry"
            assert (runs[1][2] - runs[0][2]).total_seconds() >= 0.3
        elif kind == "snooze":
            # Snooze does not: three executions, one attempt, no error.
            assert (job.attempts, len(runs), job.errors) == (1, 3, [])
            assert (runs[1][2] - runs[0][2]).total_seconds() >= 0.3
        else:
            assert (job.attempts, len(runs), job.finished_at is not None) == (1, 1, True)
            assert job.errors[-1]["message"] == "no longer wanted"


def test_unknown_task_goes_dead_and_the_worker_keeps_going(
    db_url: str, app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import record_async

    worker = workers.start()
    producer = pgjobs.App(db_url, strict_tasks=False)
    try:
        unknown = producer.enqueue("no.such.task", {"x": 1}, queue="q")
    finally:
        producer.close()
    assert unknown is not None
    _wait_state(ledger, unknown, "dead")
    job = app.get_job(unknown)
    assert job.attempts == 1
    assert "no task named 'no.such.task'" in job.errors[0]["message"]
    assert job.errors[0]["type"] == "pgjobs.errors.UnknownTaskError"
    after = record_async.enqueue(n=1)
    _wait_state(ledger, after, "succeeded")
    assert worker.popen.poll() is None


def test_timeouts_fail_sync_and_async_tasks_and_free_the_slot(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import hang_async, hang_sync, record_async

    # One slot: the second job can only run if the timed-out first one gave its slot back.
    workers.start(concurrency=1)
    for task in (hang_sync, hang_async):
        job_id = task.enqueue(seconds=30)
        follower = record_async.enqueue(n=1)
        _wait_state(ledger, job_id, "dead", timeout=10)
        _wait_state(ledger, follower, "succeeded", timeout=5)
        job = app.get_job(job_id)
        assert job.attempts == 2
        assert [e["type"] for e in job.errors] == ["pgjobs.outcomes.JobTimeoutError"] * 2
        assert "exceeded its timeout of 0.5 s" in job.errors[0]["message"]
        runs = _ledger(ledger, job_id)
        assert len(runs) == 2


def test_progress_is_recorded(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import aprogress, progress

    workers.start()
    sync_id, async_id = progress.enqueue(), aprogress.enqueue()
    _wait_state(ledger, sync_id, "succeeded")
    _wait_state(ledger, async_id, "succeeded")
    assert app.get_job(sync_id).progress == {"value": 0.5, "data": {"step": "half"}}
    assert app.get_job(async_id).progress == {"value": 0.75, "data": {"step": "most"}}
    assert app.get_job(async_id).result == "held=True"


def test_listener_heals_after_its_backend_is_terminated(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import record_async

    worker = workers.start(poll_interval=60)
    listener_pid = scalar(
        ledger,
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgjobs-listener' "
        "AND datname = current_database()",
    )
    assert listener_pid
    ledger.execute("SELECT pg_terminate_backend(%s)", (listener_pid,))
    # Enqueued while the listener is down: found by the poll that follows every reconnect.
    during = record_async.enqueue(n=1)
    _wait_state(ledger, during, "succeeded", timeout=5)

    def new_listener() -> Any:
        return scalar(
            ledger,
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgjobs-listener' "
            "AND datname = current_database() AND pid <> %s",
            (listener_pid,),
        )

    wait_until(new_listener, 5, "a new listener backend")
    wait_until(lambda: "listening again" in worker.log(), 5, "listener reconnect logged")
    # Push works again (a 60 s poll cannot explain a start within a second).
    after = record_async.enqueue(n=2)
    _wait_state(ledger, after, "succeeded", timeout=5)
    latency = scalar(
        ledger,
        "SELECT extract(epoch FROM started_at - created_at) FROM pgjobs.jobs WHERE id = %s",
        (after,),
    )
    print(f"\nafter reconnect, enqueue-to-start: {float(latency) * 1000:.2f} ms")
    assert float(latency) < 1.0


async def test_the_listener_lends_its_connection_and_loses_no_notification_meanwhile(
    direct_db_url: str,
) -> None:
    # The worker claims on the listener's connection after a notification (on_notified).
    # One that arrives while that claim runs is read by psycopg along with the claim's
    # result; it must still reach on_jobs and call for a claim of its own.
    woken: list[str] = []
    lent: list[int] = []
    async with await psycopg.AsyncConnection.connect(direct_db_url, autocommit=True) as sender:

        async def notify(queue: str) -> None:
            payload = json.dumps({"queue": queue, "jobs": 1})
            await sender.execute("SELECT pg_notify('pgjobs_test', %s)", (payload,))

        async def on_notified(connection: psycopg.AsyncConnection[Any]) -> None:
            lent.append(connection.info.backend_pid)
            if len(lent) == 1:
                await notify("b")
                await connection.execute("SELECT pg_sleep(0.2)")

        listener = Listener(
            direct_db_url,
            "pgjobs_test",
            ["a", "b"],
            on_jobs=lambda queue, n: woken.append(queue),
            on_connect=lambda: None,
            on_notified=on_notified,
        )
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.connected.wait(), 10)
            await notify("a")
            async with asyncio.timeout(5):
                while len(lent) < 2:
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert woken == ["a", "b"]
    # Both times on the one connection, which never had to be replaced.
    assert len(lent) == 2 and lent[0] == lent[1]
    assert listener.connects == 1


async def test_worker_embeds_in_an_application(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    @app.task(queue="embedded")
    async def double(x: int) -> int:
        return 2 * x

    @app.task(queue="embedded")
    def triple(x: int, ctx: pgjobs.JobContext) -> dict[str, int]:
        return {"value": 3 * x, "attempt": ctx.attempt}

    ids = [double.enqueue(x=i) for i in range(5)] + [triple.enqueue(x=i) for i in range(5)]
    worker = pgjobs.Worker(
        app, concurrency=4, burst=True, heartbeat_interval=0.5, heartbeat_timeout=3
    )
    assert worker.queues == ("embedded",)
    await worker.run_async()
    results = [(await app.get_job_async(i)).result for i in ids]
    assert results == [0, 2, 4, 6, 8] + [{"value": 3 * i, "attempt": 1} for i in range(5)]
    assert worker.stats.started == 10


async def test_the_listener_survives_a_failing_callback(
    direct_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    woken: list[str] = []

    def on_jobs(queue: str, n: int) -> None:
        woken.append(queue)
        if len(woken) == 1:
            raise RuntimeError("a bug in the worker")

    listener = Listener(direct_db_url, "pgjobs_test", ["a"], on_jobs, on_connect=lambda: None)
    task = asyncio.create_task(listener.run())
    payload = json.dumps({"queue": "a", "jobs": 1})
    try:
        async with await psycopg.AsyncConnection.connect(direct_db_url, autocommit=True) as sender:
            async with asyncio.timeout(10):
                while len(woken) < 2:
                    # Until a notification reaches the listener that came back.
                    await sender.execute("SELECT pg_notify('pgjobs_test', %s)", (payload,))
                    await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert listener.connects == 2
    assert "listener failed, reconnecting" in caplog.text
    assert "a bug in the worker" in caplog.text


async def test_job_arguments_arrive_exactly_as_enqueued(app: pgjobs.App) -> None:
    # The worker parses arguments with orjson, which would turn integers beyond 64 bits
    # into floats; those documents must take the exact path.
    @app.task(queue="arguments")
    async def echo(doc: Any) -> str:
        return repr(doc)

    docs: list[Any] = [
        {"i": 7, "f": 0.1, "e": 1e300, "neg": -(2**63), "u64": 2**64 - 1, "s": "é ✓ \\n"},
        {"big": 2**70, "small": -(2**63) - 1, "nested": [1, {"x": None, "y": True}]},
        {"not_a_number": "1234567890123456789012", "list": [[], {}, [2.5, -0.0]]},
    ]
    ids = [echo.enqueue(doc=doc) for doc in docs]
    worker = pgjobs.Worker(app, burst=True, heartbeat_interval=0.5, heartbeat_timeout=3)
    await worker.run_async()
    async with await psycopg.AsyncConnection.connect(app.database_url) as conn:
        for job_id in ids:
            cur = await conn.execute("SELECT args::text FROM pgjobs.jobs WHERE id = %s", [job_id])
            row = await cur.fetchone()
            assert row is not None
            # What the json module makes of the stored text (jsonb keeps numbers as
            # numeric, so 1e300 comes back as an integer, and keys in its own order).
            expected = json.loads(row[0])["doc"]
            assert (await app.get_job_async(job_id)).result == repr(expected)
    beyond_64_bits = (await app.get_job_async(ids[1])).result
    assert f"'big': {2**70}," in beyond_64_bits and f"'small': {-(2**63) - 1}" in beyond_64_bits


def test_stored_arguments_that_do_not_fit_go_dead_but_a_tasks_own_typeerror_retries(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import typeerror

    # A row written by hand (or before the task's signature changed) with arguments the
    # task does not take: enqueue would refuse them, so write it directly.
    misfit = scalar(
        ledger,
        "INSERT INTO pgjobs.jobs (queue, task, args) VALUES ('q', 't.typeerror', %s) RETURNING id",
        ('{"wrong": 1}',),
    )
    own = typeerror.enqueue(count=1)
    workers.start(concurrency=2)
    _wait_state(ledger, misfit, "dead")
    _wait_state(ledger, own, "dead")
    misfit_job, own_job = app.get_job(misfit), app.get_job(own)
    assert misfit_job.attempts == 1, "arguments that cannot bind are not retried"
    assert misfit_job.errors[-1]["type"] == "pgjobs.errors.InvalidJobError"
    assert "bad arguments for task 't.typeerror'" in misfit_job.errors[-1]["message"]
    assert own_job.attempts == 2, "the task's own TypeError is retried by policy"
    assert [e["type"] for e in own_job.errors] == ["TypeError", "TypeError"]
    assert "the task's own TypeError" in own_job.errors[-1]["message"]


def test_paused_queue_is_not_claimed_and_resume_wakes_the_worker(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import record_async

    from pgjobs.admin import Admin

    admin = Admin(app)
    admin.pause_queue("q")
    ids = record_async.enqueue_many([{"n": i} for i in range(5)])
    # A 60 s fallback poll: after the resume, only its notification explains a fast start.
    worker = workers.start(concurrency=4, poll_interval=60)
    # The worker claims at start-up and on the enqueue's notification; give it the time
    # of many claim cycles and check that it never took a job of the paused queue.
    claimed = None
    with contextlib.suppress(AssertionError):  # wait_until's "not within the time"
        claimed = wait_until(
            lambda: scalar(ledger, "SELECT count(*) FROM pgjobs.jobs WHERE state <> 'available'"),
            1.0,
        )
    assert claimed is None, f"{claimed} job(s) of the paused queue claimed\n{worker.log()}"
    assert scalar(ledger, "SELECT count(*) FROM ledger") == 0

    admin.resume_queue("q")
    resumed = time.monotonic()
    for job_id in ids:
        _wait_state(ledger, job_id, "succeeded", timeout=5)
    assert time.monotonic() - resumed < 5, "resume did not wake the idle worker"


def test_burst_worker_does_not_wait_for_a_paused_queue(
    app: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import record_async

    from pgjobs.admin import Admin

    Admin(app).pause_queue("q")
    record_async.enqueue_many([{"n": i} for i in range(3)])
    worker = workers.start("--burst", concurrency=2, wait_ready=False)
    assert worker.wait(timeout=20) == 0, worker.log()
    assert scalar(ledger, "SELECT count(*) FROM pgjobs.jobs WHERE state = 'available'") == 3
