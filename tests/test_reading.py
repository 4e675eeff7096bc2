"""Reading jobs back: ``app.get_job`` returns a typed ``pgjobs.Job`` with every field of the
row, payloads round-trip exactly (large, big integers, any Unicode), and the SQL views
``queue_depths`` and ``dead_jobs`` report what the table holds.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgjobs
from pgjobs import JobState


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


def register(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    @app.task(name="report", queue="reports", priority=3, max_attempts=7)
    def report(payload: Any) -> None: ...

    return report


def test_get_job_returns_a_typed_job(app: pgjobs.App) -> None:
    report = register(app)
    before = datetime.now(UTC)
    job_id = report.enqueue(payload={"n": 1}, unique_key="r-1", meta={"by": "test"})
    assert job_id is not None
    job = app.get_job(job_id)
    assert isinstance(job, pgjobs.Job)
    assert (job.id, job.queue, job.task) == (job_id, "reports", "report")
    assert job.args == {"payload": {"n": 1}}
    assert job.state is JobState.AVAILABLE and not job.state.is_final
    assert (job.priority, job.attempts, job.max_attempts) == (3, 0, 7)
    assert job.unique_key == "r-1" and job.meta == {"by": "test"}
    assert job.errors == [] and job.result is None and job.progress is None
    assert job.started_at is None and job.finished_at is None
    assert job.worker is None and job.lease_token is None
    for stamp in (job.run_at, job.created_at):
        assert isinstance(stamp, datetime) and stamp.tzinfo is not None
        assert before - timedelta(seconds=5) < stamp < datetime.now(UTC) + timedelta(seconds=5)


def test_options_override_task_defaults(app: pgjobs.App) -> None:
    report = register(app)
    run_at = datetime.now(UTC) + timedelta(days=1)
    job_id = report.enqueue(payload=1, queue="urgent", priority=-5, max_attempts=1, run_at=run_at)
    assert job_id is not None
    job = app.get_job(job_id)
    assert (job.queue, job.priority, job.max_attempts) == ("urgent", -5, 1)
    assert job.state is JobState.SCHEDULED
    assert abs(job.run_at - run_at) < timedelta(milliseconds=1)


def test_running_and_finished_jobs_read_back(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    report = register(app)
    running, done = report.enqueue(payload=1), report.enqueue(payload=2)
    token = uuid.uuid4()
    conn.execute(
        "UPDATE pgjobs.jobs SET state = 'running', lease_token = %s, worker = 'w-1', "
        "started_at = now(), attempts = 1, progress = '{\"pct\": 50}' WHERE id = %s",
        (token, running),
    )
    conn.execute(
        "UPDATE pgjobs.jobs SET state = 'succeeded', attempts = 1, finished_at = now(), "
        "result = '[1, \"two\"]' WHERE id = %s",
        (done,),
    )
    job = app.get_job(running)  # type: ignore[arg-type]
    assert job.state is JobState.RUNNING
    assert job.lease_token == token and job.worker == "w-1" and job.progress == {"pct": 50}
    assert isinstance(job.started_at, datetime)
    finished = app.get_job(done)  # type: ignore[arg-type]
    assert finished.state is JobState.SUCCEEDED and finished.state.is_final
    assert finished.result == [1, "two"] and isinstance(finished.finished_at, datetime)


def test_missing_job(app: pgjobs.App) -> None:
    with pytest.raises(pgjobs.JobNotFoundError, match="123456"):
        app.get_job(123456)


async def test_missing_job_async(app: pgjobs.App) -> None:
    try:
        with pytest.raises(pgjobs.JobNotFoundError):
            await app.get_job_async(123456)
    finally:
        await app.aclose()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"blob": "x" * 5_000_000, "tail": [1, 2, 3]}, id="5MB"),
        pytest.param(
            {"big": 2**70, "neg": -(2**65), "edge": 2**63, "max": 2**63 - 1}, id="big-ints"
        ),
        pytest.param({"text": "héllo ✓ 日本 🎉 \u2028 \\u0000 \"q\" 'x'"}, id="unicode"),
        pytest.param(
            {"f": 0.1, "tiny": 5e-324, "neg0": -0.0, "nested": [{"a": [None, True]}]}, id="mixed"
        ),
    ],
)
def test_payload_round_trips(app: pgjobs.App, payload: dict[str, Any]) -> None:
    report = register(app)
    job_id = report.enqueue(payload=payload)
    assert job_id is not None
    assert app.get_job(job_id).args == {"payload": payload}


def test_big_ints_keep_their_type(app: pgjobs.App) -> None:
    report = register(app)
    job_id = report.enqueue(payload=2**64 + 1)
    assert job_id is not None
    value = app.get_job(job_id).args["payload"]
    assert type(value) is int and value == 2**64 + 1


def test_queue_depths_view(app: pgjobs.App, conn: psycopg.Connection[Any]) -> None:
    report = register(app)
    report.enqueue_many([{"payload": i} for i in range(3)], queue="a")
    report.enqueue_many([{"payload": i} for i in range(2)], queue="b", delay=600)
    [dead] = report.enqueue_many([{"payload": 9}], queue="a")
    conn.execute(
        "UPDATE pgjobs.jobs SET state = 'dead', finished_at = now() WHERE id = %s", (dead,)
    )
    rows = conn.execute(
        "SELECT queue, state::text, jobs FROM pgjobs.queue_depths ORDER BY queue, state::text"
    ).fetchall()
    assert rows == [("a", "available", 3), ("a", "dead", 1), ("b", "scheduled", 2)]
    oldest = conn.execute(
        "SELECT oldest_run_at = (SELECT min(run_at) FROM pgjobs.jobs WHERE queue = 'b') "
        "FROM pgjobs.queue_depths WHERE queue = 'b'"
    ).fetchone()
    assert oldest == (True,)


def test_dead_jobs_view(app: pgjobs.App, conn: psycopg.Connection[Any]) -> None:
    report = register(app)
    dead, alive = report.enqueue(payload="d"), report.enqueue(payload="a")
    conn.execute(
        "UPDATE pgjobs.jobs SET state = 'dead', finished_at = now(), attempts = 2, "
        'errors = \'[{"type": "Timeout", "message": "slow"}, '
        '{"type": "X", "message": "boom"}]\' WHERE id = %s',
        (dead,),
    )
    rows = conn.execute(
        "SELECT id, queue, task, args, attempts, max_attempts, last_error_type, last_error "
        "FROM pgjobs.dead_jobs"
    ).fetchall()
    assert rows == [(dead, "reports", "report", {"payload": "d"}, 2, 7, "X", "boom")]
    assert alive not in [r[0] for r in rows]
    job = app.get_job(dead)  # type: ignore[arg-type]
    assert job.state is JobState.DEAD
    assert job.errors == [{"type": "Timeout", "message": "slow"}, {"type": "X", "message": "boom"}]
