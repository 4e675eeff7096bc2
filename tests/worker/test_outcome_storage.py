"""An outcome that failed to store never becomes a lie (issue 15, item 5).

A handler that succeeded must end ``succeeded`` with its result even when the statement
writing that outcome fails for a reason that is not the outcome's own content (a deadlock, a
lock timeout, a trigger's error): the completer keeps the outcome and writes it again. Only
an outcome whose content the database refuses (SQLSTATE class 22 or 54) is replaced by a
``pgjobs.OutcomeNotStored`` failure.

The faults are injected by a BEFORE UPDATE trigger on ``pgjobs.jobs`` that refuses to store
a ``succeeded`` outcome, with the SQLSTATE found in ``refuse_outcomes``, while that table has
a row. It counts its refusals in a sequence (nextval survives the refused statement's
rollback). The workers are real ``pgjobs work`` processes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from worker_processes import Workers, app_on, scalar, wait_until

import pgjobs

REFUSING_TRIGGER = """
CREATE TABLE refuse_outcomes (sqlstate text NOT NULL);
CREATE SEQUENCE refused_outcomes;
CREATE FUNCTION refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    code text;
BEGIN
    IF OLD.state = 'running' AND NEW.state = 'succeeded' THEN
        SELECT r.sqlstate INTO code FROM refuse_outcomes AS r LIMIT 1;
        IF code IS NOT NULL THEN
            PERFORM nextval('refused_outcomes');
            RAISE EXCEPTION 'outcome refused by the test'
                USING ERRCODE = code, DETAIL = 'a second line the error record need not keep';
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER refuse_outcome BEFORE UPDATE ON pgjobs.jobs
    FOR EACH ROW EXECUTE FUNCTION refuse_outcome();
"""


def _refusals(conn: psycopg.Connection[Any]) -> int:
    last, called = conn.execute("SELECT last_value, is_called FROM refused_outcomes").fetchone()
    return int(last) if called else 0


def _state(conn: psycopg.Connection[Any], job_id: int) -> str:
    return str(scalar(conn, "SELECT state FROM pgjobs.jobs WHERE id = %s", (job_id,)))


@pytest.fixture
def refusing(ledger: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """The test database with the refusing trigger installed (refusing nothing yet)."""
    ledger.execute(REFUSING_TRIGGER)
    return ledger


@pytest.mark.parametrize(
    "sqlstate",
    [
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (lock_timeout)
        "23514",  # check_violation: pgjobs puts no constraint on an outcome's content
        "P0001",  # raise_exception: a trigger of the application's
    ],
)
def test_a_succeeded_outcome_refused_by_a_statement_error_is_written_later(
    app: pgjobs.App, refusing: psycopg.Connection[Any], workers: Workers, sqlstate: str
) -> None:
    from worker_app import record_async

    conn = refusing
    conn.execute("INSERT INTO refuse_outcomes VALUES (%s)", (sqlstate,))
    worker = workers.start(concurrency=2)
    job_id = record_async.enqueue(n=7)
    # The handler ran, and writing its outcome failed, then failed again on a retry.
    wait_until(lambda: _refusals(conn) >= 2, 15, "the outcome refused twice")
    assert scalar(conn, "SELECT count(*) FROM ledger WHERE job_id = %s", (job_id,)) == 1
    assert _state(conn, job_id) == "running", worker.log()
    conn.execute("DELETE FROM refuse_outcomes")
    wait_until(lambda: _state(conn, job_id) != "running", 15, f"job {job_id} finished")
    job = app.get_job(job_id)
    assert job.state == "succeeded", (job.errors, worker.log())
    assert job.result == {"n": 7, "attempt": 1}
    assert job.errors == []
    # It ran once: the outcome was kept, not the job handed to another attempt.
    assert scalar(conn, "SELECT count(*) FROM ledger WHERE job_id = %s", (job_id,)) == 1
    # Other jobs are not held up behind the refused one.
    later = record_async.enqueue_many([{"n": i} for i in range(5)])
    wait_until(
        lambda: all(_state(conn, i) == "succeeded" for i in later), 15, "later jobs succeeded"
    )


def test_refused_outcomes_do_not_hold_up_the_others(
    app: pgjobs.App, refusing: psycopg.Connection[Any], workers: Workers
) -> None:
    """A row the database keeps refusing is retried on its own: outcomes that arrive
    meanwhile are written."""
    from worker_app import record_async

    conn = refusing
    workers.start(concurrency=2)
    # Refuse only the first job's outcome: the trigger reads the flag row per job id.
    conn.execute(
        "CREATE OR REPLACE FUNCTION refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN "
        "  IF OLD.state = 'running' AND NEW.state = 'succeeded' "
        "     AND EXISTS (SELECT 1 FROM refuse_outcomes WHERE sqlstate = NEW.id::text) THEN "
        "    PERFORM nextval('refused_outcomes'); "
        "    RAISE EXCEPTION 'outcome of job % refused', NEW.id; "
        "  END IF; "
        "  RETURN NEW; "
        "END $$"
    )
    first = record_async.enqueue(n=0)
    conn.execute("INSERT INTO refuse_outcomes VALUES (%s)", (str(first),))
    wait_until(lambda: _refusals(conn) >= 2, 15, "the first outcome refused twice")
    others = record_async.enqueue_many([{"n": i} for i in range(1, 11)])
    wait_until(
        lambda: all(_state(conn, i) == "succeeded" for i in others), 15, "the others succeeded"
    )
    assert _state(conn, first) == "running"
    conn.execute("DELETE FROM refuse_outcomes")
    wait_until(lambda: _state(conn, first) == "succeeded", 15, f"job {first} succeeded")
    assert app.get_job(first).result == {"n": 0, "attempt": 1}


@pytest.mark.slow
def test_an_outcome_still_refused_when_the_worker_stops_is_left_to_the_rescue(
    app: pgjobs.App, refusing: psycopg.Connection[Any], workers: Workers
) -> None:
    """The completer never turns a refused outcome into a failure: a worker stopping with
    one unwritten leaves the job running, and the job is rescued once its worker is gone."""
    import signal

    from worker_app import record_async

    conn = refusing
    conn.execute("INSERT INTO refuse_outcomes VALUES ('P0001')")
    worker = workers.start(concurrency=2)
    job_id = record_async.enqueue(n=3)
    wait_until(lambda: _refusals(conn) >= 2, 15, "the outcome refused twice")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.log()
    assert "the job stays running until rescued" in worker.log()
    assert _state(conn, job_id) == "running"
    assert scalar(conn, "SELECT count(*) FROM pgjobs.workers") == 0
    conn.execute("DELETE FROM refuse_outcomes")
    workers.start(concurrency=2)
    wait_until(lambda: _state(conn, job_id) == "succeeded", 15, f"job {job_id} succeeded")
    job = app.get_job(job_id)
    assert job.result == {"n": 3, "attempt": 2}
    assert [e["type"] for e in job.errors] == ["WorkerDied"]


@pytest.mark.parametrize(
    "sqlstate",
    [
        "22P05",  # untranslatable_character
        "54000",  # program_limit_exceeded (e.g. a jsonb value too large)
    ],
)
def test_an_outcome_whose_content_is_refused_becomes_outcome_not_stored(
    app: pgjobs.App, refusing: psycopg.Connection[Any], workers: Workers, sqlstate: str
) -> None:
    from worker_app import record_async

    conn = refusing
    conn.execute("INSERT INTO refuse_outcomes VALUES (%s)", (sqlstate,))
    worker = workers.start(concurrency=2)
    job_id = record_async.enqueue(n=1)
    wait_until(lambda: _state(conn, job_id) == "dead", 15, f"job {job_id} dead")
    job = app.get_job(job_id)
    assert job.result is None
    (error,) = job.errors
    assert error["type"] == "pgjobs.OutcomeNotStored", worker.log()
    assert error["message"] == (
        f"the job's outcome (succeeded) could not be stored: outcome refused by the test "
        f"(SQLSTATE {sqlstate})"
    )


@pytest.fixture
def outcome_workers(
    db_url: str, ledger: psycopg.Connection[Any], tmp_path: Path
) -> Iterator[tuple[pgjobs.App, Workers]]:
    """Workers running ``outcome_app``, and that app pointed at this test's database."""
    import outcome_app

    started = Workers(db_url, tmp_path, app="tests.worker.outcome_app:app")
    with app_on(outcome_app.app, db_url) as app:
        try:
            yield app, started
        finally:
            started.cleanup()


def test_an_outcome_the_database_cannot_store_becomes_outcome_not_stored(
    outcome_workers: tuple[pgjobs.App, Workers], conn: psycopg.Connection[Any]
) -> None:
    """A real unstorable outcome (no trigger): a snooze past the last timestamp."""
    import outcome_app

    app, workers = outcome_workers
    worker = workers.start(concurrency=1)
    job_id = outcome_app.snooze_beyond_time.enqueue()
    wait_until(lambda: _state(conn, job_id) == "dead", 15, f"job {job_id} dead")
    (error,) = app.get_job(job_id).errors
    assert error["type"] == "pgjobs.OutcomeNotStored", worker.log()
    # The interval or the timestamp overflows first, depending on the PostgreSQL version.
    assert re.fullmatch(
        r"the job's outcome \(scheduled\) could not be stored: "
        r"(interval|timestamp) out of range \(SQLSTATE 22008\)",
        error["message"],
    ), error
