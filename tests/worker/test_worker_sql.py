"""The worker's statements, driven step by step from the test: claim limits under a
hostile plan, fencing of every write by lease token, rescue rules."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import psycopg
import pytest

import pgjobs
from pgjobs.queries import Queries

Q = Queries("pgjobs")
# Events off (no subscriber): the worker statements publish nothing.
NO_EVENTS = {"events": False, "events_channel": "pgjobs_pgjobs_events"}


def _claim(
    conn: psycopg.Connection[Any], limit: int, queues: list[str], worker: str = "w1"
) -> list[Any]:
    rows = conn.execute(
        Q.claim_jobs,
        {"queues": queues, "limit": limit, "start": limit, "worker": worker, **NO_EVENTS},
    ).fetchall()
    # A short claim ends with a row of its own (NULL id) saying when the next job is due.
    if rows and rows[-1][0] is None:
        rows.pop()
    return [row[:9] for row in rows]


def test_a_short_claim_says_when_the_next_waiting_job_is_due(
    conn: psycopg.Connection[Any], jobs: pgjobs.Task[Any, Any]
) -> None:
    def claim() -> list[Any]:
        return conn.execute(
            Q.claim_jobs, {"queues": ["q"], "limit": 5, "start": 5, "worker": "w1", **NO_EVENTS}
        ).fetchall()

    assert claim() == [(None,) * 10 + (None,)]  # nothing runnable, nothing waiting
    jobs.enqueue(i=1, delay=60)
    jobs.enqueue(i=2)
    *claimed, (sentinel_id, *_, next_due) = claim()
    assert len(claimed) == 1 and sentinel_id is None and 55 < next_due <= 60
    params = {"queues": ["q"], "limit": 1, "start": 1, "worker": "w1", **NO_EVENTS}
    full = conn.execute(Q.claim_jobs, params)
    assert full.fetchall() == [(None,) * 10 + (pytest.approx(next_due, abs=5),)]


def _finish(conn: psycopg.Connection[Any], job_id: int, token: uuid.UUID, state: str = "succeeded",
            result: str | None = '"ok"', worker: str = "w1") -> int:  # fmt: skip
    params = {"id": [job_id], "lease_token": [token], "state": [state], "result": [result],
              "delay": [None], "error": [None], "refund": [0], "worker": worker,
              **NO_EVENTS}  # fmt: skip
    return len(conn.execute(Q.finish_jobs, params).fetchall())


def _register(conn: psycopg.Connection[Any], worker: str, age: float = 0.0) -> None:
    conn.execute(
        "INSERT INTO pgjobs.workers (id, host, pid, queues, concurrency, last_heartbeat) "
        "VALUES (%s, 'h', 1, '{q}', 1, now() - make_interval(secs => %s))",
        (worker, age),
    )


@pytest.fixture
def jobs(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    @app.task(name="s.noop", queue="q", max_attempts=2)
    def noop(i: int = 0) -> None: ...

    return noop


def test_claim_never_exceeds_its_limit_under_a_nested_loop_plan(
    db_url: str, conn: psycopg.Connection[Any], jobs: pgjobs.Task[Any, Any]
) -> None:
    jobs.enqueue(i=0)
    conn.execute("ANALYZE pgjobs.jobs")  # statistics say: one row
    jobs.enqueue_many([{"i": i} for i in range(3000)])
    claimed: list[list[int]] = []
    errors: list[BaseException] = []

    def claimer(limit: int) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as own:
                own.execute("SET enable_hashjoin = off")
                own.execute("SET enable_mergejoin = off")
                while rows := _claim(own, limit, ["q", "other"]):
                    assert len(rows) <= limit
                    claimed.append([r[0] for r in rows])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in (1, 5, 50, 50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    ids = [i for batch in claimed for i in batch]
    assert len(ids) == len(set(ids)) == 3001
    assert conn.execute(
        "SELECT count(*) FROM pgjobs.jobs WHERE attempts = 1 AND state = 'running'"
    ).fetchone() == (3001,)


def test_claim_takes_the_best_jobs_across_queues(
    conn: psycopg.Connection[Any], app: pgjobs.App
) -> None:
    @app.task(name="s.a", queue="a")
    def a(i: int) -> None: ...

    low = a.enqueue_many([{"i": i} for i in range(3)], priority=5)
    urgent_b = app.enqueue("s.a", {"i": 9}, queue="b", priority=-5)
    urgent_a = a.enqueue(i=10, priority=-1)
    later = a.enqueue(i=11, priority=-10, delay=60)
    rows = _claim(conn, 3, ["a", "b"])
    assert sorted(r[0] for r in rows) == sorted([urgent_b, urgent_a, low[0]])
    assert later not in [r[0] for r in rows]


def test_a_stale_lease_changes_nothing(
    conn: psycopg.Connection[Any], jobs: pgjobs.Task[Any, Any]
) -> None:
    job_id = jobs.enqueue()
    _register(conn, "zombie", age=60)
    _register(conn, "healthy")
    (old,) = _claim(conn, 1, ["q"], worker="zombie")
    old_token = old[-1]
    # The zombie's heartbeat expired: its job is rescued, then claimed again by another.
    assert conn.execute(Q.rescue_jobs, {"timeout": 30, "worker": None, "held": []}).fetchone() == (
        1,
        0,
        1,
    )
    (new,) = _claim(conn, 1, ["q"], worker="healthy")
    assert new[0] == job_id and new[-1] != old_token and new[6] == 2
    # Every write of the zombie is fenced: progress, success, failure.
    assert (
        conn.execute(
            Q.set_progress, {"id": job_id, "lease_token": old_token, "progress": "1", **NO_EVENTS}
        ).fetchall()
        == []
    )
    assert _finish(conn, job_id, old_token, worker="zombie") == 0
    assert _finish(conn, job_id, old_token, state="dead", result=None, worker="zombie") == 0
    assert (
        conn.execute(Q.held_leases, {"id": [job_id], "lease_token": [old_token]}).fetchall() == []
    )
    assert _finish(conn, job_id, new[-1], result='"attempt 2"', worker="healthy") == 1
    # And after the job finished, a late zombie write still changes nothing.
    assert _finish(conn, job_id, old_token, state="retryable", result=None, worker="zombie") == 0
    row = conn.execute(
        "SELECT state, attempts, result, lease_token FROM pgjobs.jobs WHERE id = %s", (job_id,)
    ).fetchone()
    assert row == ("succeeded", 2, "attempt 2", None)
    assert conn.execute(
        "SELECT jobs_succeeded FROM pgjobs.workers WHERE id = 'healthy'"
    ).fetchone() == (1,)


def test_rescue_spares_live_workers_and_buries_jobs_out_of_attempts(
    conn: psycopg.Connection[Any], jobs: pgjobs.Task[Any, Any]
) -> None:
    live_job, dead_job, last_chance = jobs.enqueue(), jobs.enqueue(), jobs.enqueue(max_attempts=1)
    _register(conn, "alive")
    _register(conn, "gone", age=10)
    assert _claim(conn, 1, ["q"], worker="alive")[0][0] == live_job
    assert {r[0] for r in _claim(conn, 2, ["q"], worker="gone")} == {dead_job, last_chance}
    assert conn.execute(Q.rescue_jobs, {"timeout": 5, "worker": None, "held": []}).fetchone() == (
        1,
        1,
        1,
    )
    states = dict(conn.execute("SELECT id, state FROM pgjobs.jobs").fetchall())
    assert states == {live_job: "running", dead_job: "available", last_chance: "dead"}
    errors = conn.execute(
        "SELECT errors FROM pgjobs.jobs WHERE id = %s", (last_chance,)
    ).fetchone()[0]
    assert errors[0]["type"] == "WorkerDied" and "gone" in errors[0]["message"]
    # A running job whose worker row vanished is rescued too.
    conn.execute("DELETE FROM pgjobs.workers WHERE id = 'alive'")
    assert conn.execute(Q.rescue_jobs, {"timeout": 5, "worker": None, "held": []}).fetchone() == (
        1,
        0,
        0,
    )


async def test_one_batch_writes_every_kind_of_outcome_to_its_own_row(
    db_url: str, conn: psycopg.Connection[Any], jobs: pgjobs.Task[Any, Any]
) -> None:
    """Completions leave off trailing empty columns of a batch (finish_jobs pads them):
    mixed batches, with the extra columns on any row, still land on the right rows."""
    from pgjobs.completions import Completions
    from pgjobs.execution import Finish
    from pgjobs.worker_db import connect_async

    _register(conn, "w1")
    jobs.enqueue_many([{"i": i} for i in range(6)])
    claimed = _claim(conn, 6, ["q"])
    ids = sorted(row[0] for row in claimed)
    token = {row[0]: row[8] for row in claimed}
    completions = Completions(Q, "w1", lambda: connect_async(db_url, "test"))
    outcomes = [
        Finish(ids[0], token[ids[0]], "retryable", delay=30.0, error='{"type": "E"}'),
        Finish(ids[1], token[ids[1]], "succeeded"),
        Finish(ids[2], token[ids[2]], "succeeded", result='{"n": 2}'),
        Finish(ids[3], token[ids[3]], "succeeded"),
        Finish(ids[4], token[ids[4]], "scheduled", delay=60.0, refund=1),
        Finish(ids[5], token[ids[5]], "succeeded"),
    ]
    writer = asyncio.create_task(completions.run())
    for finish in reversed(outcomes):  # out of id order: the batch is sorted before writing
        completions.add(finish)
    await asyncio.wait_for(completions.close(), 10)
    await asyncio.wait_for(writer, 10)
    assert completions.batches == 1
    assert completions.written == 6
    rows = conn.execute(
        "SELECT id, state::text, result, attempts, jsonb_array_length(errors), "
        "run_at > now() + interval '20 s' FROM pgjobs.jobs ORDER BY id"
    ).fetchall()
    assert rows == [
        (ids[0], "retryable", None, 1, 1, True),
        (ids[1], "succeeded", None, 1, 0, False),
        (ids[2], "succeeded", {"n": 2}, 1, 0, False),
        (ids[3], "succeeded", None, 1, 0, False),
        (ids[4], "scheduled", None, 0, 0, True),
        (ids[5], "succeeded", None, 1, 0, False),
    ]


def test_a_live_worker_gives_back_the_running_jobs_it_does_not_hold(
    conn: psycopg.Connection[Any], jobs: pgjobs.Task[Any, Any]
) -> None:
    # After a failover to a standby that had its claims but not all its outcomes, a live
    # worker's finished jobs are running again under its id: it names the leases it holds,
    # and every other job of its own goes back (and nobody else's).
    ids = [jobs.enqueue() for _ in range(4)]
    _register(conn, "w1")
    _register(conn, "w2")
    mine = _claim(conn, 3, ["q"], worker="w1")
    (theirs,) = _claim(conn, 1, ["q"], worker="w2")
    held = [mine[0][-1]]
    params = {"timeout": 30, "worker": "w1", "held": held}
    assert conn.execute(Q.rescue_jobs, params).fetchone() == (2, 0, 0)
    states = dict(conn.execute("SELECT id, state::text FROM pgjobs.jobs").fetchall())
    assert states == {mine[0][0]: "running", mine[1][0]: "available",
                      mine[2][0]: "available", theirs[0]: "running"}  # fmt: skip
    assert sorted(states) == sorted(ids)
    errors = conn.execute("SELECT errors FROM pgjobs.jobs WHERE id = %s", (mine[1][0],))
    (history,) = errors.fetchone() or ([],)
    assert [e["type"] for e in history] == ["WorkerDied"]
    assert "no longer holds the job: its outcome was lost" in history[0]["message"]
    # Nothing held: every running job of w1 goes back; w2's stays.
    assert conn.execute(Q.rescue_jobs, {**params, "held": []}).fetchone() == (1, 0, 0)
    running = conn.execute("SELECT id FROM pgjobs.jobs WHERE state = 'running'").fetchall()
    assert running == [(theirs[0],)]
