"""Poison outcomes: whatever a handler returns or raises, its outcome is recorded.

A result that cannot be stored, or an exception that cannot be printed or whose traceback
cannot be formatted, must still end the attempt (``retryable`` or ``dead``) with an error in
the job's history, never leave the job ``running`` under a live, heartbeating worker.
"""

from __future__ import annotations

from typing import Any

import psycopg
from worker_processes import Workers, scalar, wait_until

import pgjobs

# Long enough for a few attempts with 0.1 s backoff; a stuck job stays running for ever.
DEADLINE = 20.0


def _final(conn: psycopg.Connection[Any], job_id: int, state: str) -> None:
    def current() -> str:
        return str(scalar(conn, "SELECT state FROM pgjobs.jobs WHERE id = %s", (job_id,)))

    try:
        wait_until(lambda: current() == state, DEADLINE, f"job {job_id} {state}")
    except AssertionError as exc:
        raise AssertionError(f"{exc} (it is {current()})") from None


def _runs(conn: psycopg.Connection[Any], job_id: int) -> int:
    return int(scalar(conn, "SELECT count(*) FROM ledger WHERE job_id = %s", (job_id,)))


def test_a_result_nested_too_deep_to_store_ends_the_job_dead(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import deep_result, record_sync

    worker = workers.start(concurrency=2)
    job_id = deep_result.enqueue(depth=5000)
    _final(ledger, job_id, "dead")
    job = wapp.get_job(job_id)
    # The handler's side effects already happened: running it again would only make the
    # same unstorable value, so it is not retried (as for any result that cannot be stored).
    assert (job.attempts, _runs(ledger, job_id), job.result) == (1, 1, None)
    (error,) = job.errors
    assert error["type"] == "pgjobs.errors.PayloadError"
    assert "the job's result cannot be stored" in error["message"]
    assert "nested deeper than 100 levels" in error["message"]
    # The worker is alive and still runs jobs.
    after = record_sync.enqueue(n=1)
    _final(ledger, after, "succeeded")
    assert worker.popen.poll() is None


def test_an_exception_whose_str_and_repr_raise_is_recorded_and_retried(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import record_sync, unprintable

    worker = workers.start(concurrency=2)
    job_id = unprintable.enqueue()
    _final(ledger, job_id, "dead")
    job = wapp.get_job(job_id)
    assert (job.attempts, _runs(ledger, job_id)) == (2, 2), "retried by policy, then dead"
    assert [e["attempt"] for e in job.errors] == [1, 2]
    for error in job.errors:
        assert error["type"] == "tests.worker.worker_app.UnprintableError"
        assert error["message"] == "<unprintable UnprintableError>"
        assert "raise UnprintableError()" in error["traceback"]
    after = record_sync.enqueue(n=2)
    _final(ledger, after, "succeeded")
    assert worker.popen.poll() is None


def test_an_exception_whose_traceback_cannot_be_formatted_is_recorded(
    wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import record_async, unformattable

    worker = workers.start(concurrency=2)
    job_id = unformattable.enqueue()
    _final(ledger, job_id, "dead")
    job = wapp.get_job(job_id)
    assert (job.attempts, _runs(ledger, job_id)) == (2, 2), "retried by policy, then dead"
    for error in job.errors:
        assert error["type"] == "tests.worker.worker_app.UnformattableError"
        assert error["message"] == "a message that prints"
        # What can be formatted of it is kept: the frames, and why the rest is missing.
        assert 'raise UnformattableError("a message that prints")' in error["traceback"]
        assert "traceback could not be formatted" in error["traceback"]
    after = record_async.enqueue(n=3)
    _final(ledger, after, "succeeded")
    assert worker.popen.poll() is None
