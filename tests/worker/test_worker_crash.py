"""Crash safety of the worker runtime with real processes and real signals.

SIGKILL, SIGSTOP/SIGCONT and SIGTERM are sent to real ``pgjobs work`` processes; the
ledger counts executions, the jobs table completions. Heartbeats in these tests: every
0.5 s, dead after 3 s.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psycopg
from worker_processes import HEARTBEAT_TIMEOUT, Workers, scalar, wait_until

import pgjobs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _count(conn: psycopg.Connection[Any], where: str, params: Any = None) -> int:
    return int(scalar(conn, f"SELECT count(*) FROM pgjobs.jobs WHERE {where}", params))


def test_four_processes_drain_20000_jobs_exactly_once(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import record_async

    n = 20_000
    record_async.enqueue_many([{"n": i} for i in range(n)])
    procs = [workers.start(concurrency=16, wait_ready=False) for _ in range(4)]
    for proc in procs:
        workers.wait_ready(proc)
    started = time.monotonic()
    wait_until(lambda: _count(ledger, "state = 'succeeded'") == n, 180, f"{n} jobs succeeded", 0.2)
    elapsed = time.monotonic() - started
    first, last = ledger.execute(
        "SELECT min(started_at), max(finished_at) FROM pgjobs.jobs"
    ).fetchone()
    print(f"\ndrained {n} jobs with 4 processes: {n / (last - first).total_seconds():,.0f} jobs/s "
          f"(first start to last finish), {elapsed:.1f} s wall")  # fmt: skip
    # Executed once each (the ledger), completed once each (attempts, state).
    assert scalar(ledger, "SELECT count(*) FROM ledger") == n
    assert scalar(ledger, "SELECT count(DISTINCT job_id) FROM ledger") == n
    assert _count(ledger, "attempts = 1 AND state = 'succeeded' AND errors = '[]'") == n
    # All four took part, and their counters add up.
    assert scalar(ledger, "SELECT count(DISTINCT pid) FROM ledger") == 4
    assert scalar(ledger, "SELECT sum(jobs_succeeded) FROM pgjobs.workers") == n


def test_sigkill_worker_holding_50_jobs_all_finish_after_heartbeat_timeout(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import sleep_sync

    # 20 running and 30 claimed ahead (prefetched) by the victim.
    victim = workers.start("--prefetch", "30", queues="slow", concurrency=20)
    # The prefetched 30 spend no attempt with the victim: their first attempt is quick.
    ids = sleep_sync.enqueue_many(
        [{"seconds": 60, "first_attempt_only": True}] * 20 + [{"seconds": 0}] * 30
    )
    wait_until(lambda: _count(ledger, "state = 'running'") == 50, 10, "50 jobs held")
    wait_until(lambda: scalar(ledger, "SELECT count(*) FROM ledger") == 20, 10, "20 running")
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait(5)
    workers.start(queues="slow", concurrency=50, wait_ready=False)
    wait_until(
        lambda: _count(ledger, "state = 'succeeded'") == 50, HEARTBEAT_TIMEOUT + 10, "rescued"
    )
    took = time.monotonic() - killed_at
    print(f"\n50 jobs of a SIGKILLed worker finished {took:.2f} s after the kill "
          f"(heartbeat timeout {HEARTBEAT_TIMEOUT} s)")  # fmt: skip
    assert took <= HEARTBEAT_TIMEOUT + 5
    starts = dict(
        ledger.execute(
            "SELECT job_id, count(*) FROM ledger WHERE phase = 'start' GROUP BY job_id"
        ).fetchall()
    )
    # The 20 that had started ran twice; the 30 prefetched ran once. All completed once.
    assert sorted(starts.values()) == [1] * 30 + [2] * 20
    assert set(starts) == set(ids)
    # Only the started ones spent an attempt with the dead worker.
    for job_id in ids:
        job = wapp.get_job(job_id)
        assert job.state == "succeeded"
        if starts[job_id] == 2:
            assert job.attempts == 2 and [e["type"] for e in job.errors] == ["WorkerDied"]
        else:
            assert job.attempts == 1 and job.errors == []
    # The dead worker's row is gone.
    assert scalar(ledger, "SELECT count(*) FROM pgjobs.workers WHERE pid = %s", (victim.pid,)) == 0


def test_prefetched_jobs_of_a_sigkilled_worker_spend_no_attempt(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import sleep_sync

    victim = workers.start("--prefetch", "5", queues="slow", concurrency=1)
    running = sleep_sync.enqueue(seconds=60, first_attempt_only=True)
    wait_until(lambda: scalar(ledger, "SELECT count(*) FROM ledger") == 1, 10, "1 running")
    waiting = sleep_sync.enqueue_many([{"seconds": 0}] * 5, max_attempts=1)
    wait_until(lambda: _count(ledger, "state = 'running'") == 6, 10, "5 prefetched")
    # Prefetched: claimed by the worker, not started, no attempt spent yet.
    assert _count(ledger, "id = ANY(%s) AND started_at IS NULL AND attempts = 0", (waiting,)) == 5
    victim.signal(signal.SIGKILL)
    victim.wait(5)
    workers.start(queues="slow", concurrency=6, wait_ready=False)
    wait_until(lambda: _count(ledger, "state = 'succeeded'") == 6, HEARTBEAT_TIMEOUT + 10, "done")
    for job_id in waiting:
        job = wapp.get_job(job_id)
        # max_attempts=1, and yet it ran: the dead worker never started it.
        assert (job.state, job.attempts, job.errors) == ("succeeded", 1, [])
    assert (
        scalar(
            ledger,
            "SELECT count(*) FROM ledger WHERE phase = 'start' AND job_id = ANY(%s)",
            (waiting,),
        )
        == 5
    )
    assert wapp.get_job(running).attempts == 2


def test_a_job_that_kills_its_worker_from_the_prefetch_buffer_still_ends_dead(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import sleep_sync, suicide

    # The poison job waits in the buffer behind a running one; when it starts, its attempt
    # is spent before its handler kills the process, so it cannot loop forever.
    victim = workers.start("--prefetch", "2", queues="slow", concurrency=1)
    sleep_sync.enqueue(seconds=1.0)
    wait_until(lambda: scalar(ledger, "SELECT count(*) FROM ledger") == 1, 10, "1 running")
    poison = suicide.enqueue(max_attempts=1, queue="slow")
    wait_until(lambda: _count(ledger, "state = 'running'") == 2, 10, "poison prefetched")
    assert victim.wait(15) == -signal.SIGKILL
    workers.start(queues="slow", concurrency=1, wait_ready=False)
    wait_until(
        lambda: _count(ledger, "id = %s AND state = 'dead'", (poison,)),
        HEARTBEAT_TIMEOUT + 20,
        "poison job dead",
    )
    job = wapp.get_job(poison)
    assert job.attempts == 1 and [e["type"] for e in job.errors] == ["WorkerDied"]


def test_sigstopped_zombie_cannot_overwrite_the_newer_attempt(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import sleep_sync

    zombie = workers.start(queues="slow", concurrency=1)
    job_id = sleep_sync.enqueue(seconds=1.0)
    wait_until(
        lambda: scalar(ledger, "SELECT count(*) FROM ledger WHERE job_id = %s", (job_id,)), 10
    )
    zombie.signal(signal.SIGSTOP)
    try:
        healthy = workers.start(queues="slow", concurrency=1)
        wait_until(
            lambda: _count(ledger, "id = %s AND state = 'succeeded'", (job_id,)), 20, "attempt 2"
        )
        done = wapp.get_job(job_id)
        assert done.attempts == 2 and done.result == {"attempt": 2, "pid": healthy.pid}
    finally:
        zombie.signal(signal.SIGCONT)
    # The zombie wakes up, finishes attempt 1 and tries to record it: nothing changes.
    wait_until(
        lambda: scalar(
            ledger,
            "SELECT count(*) FROM ledger WHERE job_id = %s AND attempt = 1 AND phase = 'end'",
            (job_id,),
        ),
        10,
        "zombie finished its attempt",
    )
    wait_until(lambda: "lease lost" in zombie.log(), 10, "zombie noticed it lost the lease")
    wait_until(lambda: "registering again" in zombie.log(), 10, "zombie re-registered")
    after = wapp.get_job(job_id)
    assert (after.state, after.attempts, after.result) == ("succeeded", 2, done.result)
    assert after.finished_at == done.finished_at and after.errors == done.errors
    assert zombie.popen.poll() is None  # and it lives on as a healthy worker


def test_sigterm_hands_back_prefetched_jobs_and_lets_running_ones_finish(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import sleep_sync

    worker = workers.start("--prefetch", "5", "--grace", "20", queues="slow", concurrency=2)
    ids = sleep_sync.enqueue_many([{"seconds": 1.5}] * 7)
    wait_until(lambda: _count(ledger, "state = 'running'") == 7, 10, "7 held")
    wait_until(lambda: scalar(ledger, "SELECT count(*) FROM ledger") == 2, 10, "2 started")
    worker.signal(signal.SIGTERM)
    signalled = time.monotonic()
    # Prefetched jobs are runnable again at once, with their attempt refunded.
    wait_until(
        lambda: _count(ledger, "state = 'available' AND attempts = 0") == 5, 1.0, "handed back"
    )
    handed_back_after = time.monotonic() - signalled
    # The two running jobs finish, and the worker exits cleanly well within its grace.
    assert worker.wait(timeout=10) == 0, worker.log()
    exited_after = time.monotonic() - signalled
    print(f"\nSIGTERM: 5 prefetched jobs handed back after {handed_back_after * 1000:.0f} ms, "
          f"exit after {exited_after:.2f} s")  # fmt: skip
    assert _count(ledger, "state = 'succeeded' AND attempts = 1") == 2
    assert scalar(ledger, "SELECT count(*) FROM ledger WHERE phase = 'end'") == 2
    assert scalar(ledger, "SELECT count(*) FROM pgjobs.workers") == 0
    # Another worker takes the handed-back jobs; each of the 7 ran exactly once.
    workers.start(queues="slow", concurrency=5, wait_ready=False)
    wait_until(lambda: _count(ledger, "state = 'succeeded'") == 7, 15, "all done")
    assert scalar(ledger, "SELECT count(*) FROM ledger WHERE phase = 'start'") == 7
    assert {wapp.get_job(i).attempts for i in ids} == {1}


def test_grace_expiry_hands_back_running_jobs(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import sleep_async, sleep_sync

    worker = workers.start("--grace", "0.5", queues="slow", concurrency=2)
    ids = [sleep_sync.enqueue(seconds=30), sleep_async.enqueue(seconds=30)]
    wait_until(lambda: scalar(ledger, "SELECT count(*) FROM ledger") == 2, 10, "both started")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=5) == 0, worker.log()
    for job_id in ids:
        job = wapp.get_job(job_id)
        assert (job.state, job.attempts, job.lease_token) == ("available", 0, None)
        assert job.errors[-1]["type"] == "pgjobs.WorkerShutdown"


def test_second_sigterm_exits_at_once_and_the_job_is_rescued(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import sleep_sync

    worker = workers.start("--grace", "60", queues="slow", concurrency=1)
    job_id = sleep_sync.enqueue(seconds=60, first_attempt_only=True)
    wait_until(lambda: scalar(ledger, "SELECT count(*) FROM ledger"), 10, "started")
    worker.signal(signal.SIGTERM)
    wait_until(lambda: "signal again to exit at once" in worker.log(), 5, "first signal seen")
    worker.signal(signal.SIGTERM)
    forced = time.monotonic()
    assert worker.wait(timeout=1.0) == 128 + signal.SIGTERM
    print(f"\nsecond SIGTERM: exit after {(time.monotonic() - forced) * 1000:.0f} ms")
    assert _count(ledger, "id = %s AND state = 'running'", (job_id,)) == 1
    workers.start(queues="slow", concurrency=1, wait_ready=False)
    wait_until(
        lambda: _count(ledger, "id = %s AND state = 'succeeded'", (job_id,)), HEARTBEAT_TIMEOUT + 8
    )
    assert wapp.get_job(job_id).attempts == 2


def test_supervisor_restarts_a_killed_child_and_a_poison_job_ends_dead(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import suicide

    supervisor = workers.start("--processes", "2", queues="crash", concurrency=1, wait_ready=False)

    def children() -> list[int]:
        rows = ledger.execute("SELECT pid FROM pgjobs.workers ORDER BY pid").fetchall()
        return [r[0] for r in rows]

    first = wait_until(lambda: len(children()) == 2 and children(), 30, "2 children registered")
    # The job kills whichever child runs it; each death is rescued, the attempt counted.
    job_id = suicide.enqueue()
    wait_until(
        lambda: _count(ledger, "id = %s AND state = 'dead'", (job_id,)), 30, "poison job dead"
    )
    job = wapp.get_job(job_id)
    assert job.attempts == 2
    assert job.errors[-1]["type"] == "WorkerDied"
    assert scalar(ledger, "SELECT count(*) FROM ledger WHERE job_id = %s", (job_id,)) == 2
    # The supervisor replaced each dead child: two restarts, two live children again.
    wait_until(lambda: supervisor.log().count("restarting") >= 2, 15, "two restarts")
    wait_until(lambda: len(children()) == 2 and all(_alive(p) for p in children()), 30, "2 live")
    assert set(children()) != set(first)
    assert supervisor.popen.poll() is None
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(timeout=15) == 0, supervisor.log()
    wait_until(lambda: not children(), 5, "children deregistered")


def test_a_gil_bound_task_keeps_its_worker_alive(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import spin

    workers.start(queues="slow", concurrency=1)
    # A second worker watches (it would rescue the job if the heartbeat stopped).
    workers.start(queues="slow", concurrency=1)
    job_id = spin.enqueue(seconds=HEARTBEAT_TIMEOUT + 1.5)
    wait_until(lambda: _count(ledger, "id = %s AND state = 'succeeded'", (job_id,)), 20, "spun")
    job = wapp.get_job(job_id)
    assert (job.attempts, job.errors) == (1, [])
    assert scalar(ledger, "SELECT count(*) FROM ledger WHERE job_id = %s", (job_id,)) == 1
