"""Rows for the operations tests, written with direct SQL that satisfies the CHECK
constraints, so a test controls states, timestamps and error histories exactly; and the
address of a server that is not there, for the checks that must fail to connect."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import psycopg
import pytest

FINAL = {"succeeded", "dead", "cancelled"}
CLOSED_PORT_URL = "postgresql://postgres@127.0.0.1:1/nowhere"


def add_job(
    conn: psycopg.Connection[Any],
    *,
    state: str = "available",
    queue: str = "default",
    task: str = "t.task",
    finished_ago: float | None = None,
    run_at_ago: float = 0.0,
    attempts: int | None = None,
    max_attempts: int = 3,
    worker: str | None = None,
    errors_ago: list[float] | None = None,
    unique_key: str | None = None,
    args: dict[str, Any] | None = None,
) -> int:
    """Insert one job in ``state``; ``finished_ago``/``run_at_ago``/``errors_ago`` are
    seconds before the database's now(). Final states default to finished 1 s ago."""
    if state in FINAL and finished_ago is None:
        finished_ago = 1.0
    if attempts is None:
        attempts = 0 if state in {"available", "scheduled", "pending"} else 1
        if state == "dead":
            attempts = max_attempts
    running = state == "running"
    errors = [
        {
            "attempt": i + 1,
            "type": "Boom",
            "message": f"failure {i + 1}",
            "traceback": None,
            "at_ago": ago,
        }
        for i, ago in enumerate(errors_ago or [])
    ]
    row = conn.execute(
        """
        INSERT INTO pgjobs.jobs (queue, task, args, state, attempts, max_attempts, run_at,
                                 started_at, finished_at, worker, lease_token, errors,
                                 unique_key)
        SELECT %(queue)s, %(task)s, %(args)s::jsonb, %(state)s::pgjobs.job_state,
               %(attempts)s, %(max_attempts)s,
               now() - make_interval(secs => %(run_at_ago)s),
               CASE WHEN %(running)s OR %(finished)s THEN now() - interval '2 seconds' END,
               CASE WHEN %(finished)s THEN now() - make_interval(secs => %(finished_ago)s) END,
               %(worker)s, %(lease)s,
               coalesce((SELECT jsonb_agg((e - 'at_ago') || jsonb_build_object(
                             'at', now() - make_interval(secs => (e ->> 'at_ago')::float8)))
                         FROM jsonb_array_elements(%(errors)s::jsonb) AS e), '[]'),
               %(unique_key)s
        RETURNING id
        """,
        {
            "queue": queue,
            "task": task,
            "args": json.dumps(args or {}),
            "state": state,
            "attempts": attempts,
            "max_attempts": max_attempts,
            "run_at_ago": run_at_ago,
            "running": running,
            "finished": state in FINAL,
            "finished_ago": finished_ago or 0.0,
            "worker": worker or ("w-test" if running else None),
            "lease": uuid.uuid4() if running else None,
            "errors": json.dumps(errors),
            "unique_key": unique_key,
        },
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_worker(
    conn: psycopg.Connection[Any],
    worker_id: str,
    *,
    queues: list[str],
    heartbeat_ago: float = 0.0,
    started_ago: float = 60.0,
    succeeded: int = 0,
    failed: int = 0,
) -> None:
    """Insert a worker row whose last heartbeat was ``heartbeat_ago`` seconds ago."""
    conn.execute(
        """
        INSERT INTO pgjobs.workers (id, host, pid, queues, concurrency, started_at,
                                    last_heartbeat, jobs_succeeded, jobs_failed)
        VALUES (%s, 'host-a', 4242, %s, 4, now() - make_interval(secs => %s),
                now() - make_interval(secs => %s), %s, %s)
        """,
        [worker_id, queues, started_ago, heartbeat_ago, succeeded, failed],
    )


def state_of(conn: psycopg.Connection[Any], job_id: int) -> str | None:
    """The job's state, or None when it no longer exists."""
    row = conn.execute("SELECT state::text FROM pgjobs.jobs WHERE id = %s", [job_id]).fetchone()
    return row[0] if row else None


def server_pid(conn: psycopg.Connection[Any]) -> int:
    """The server's pid of the session running ``conn``'s current transaction (begun here
    if none is open). Through PgBouncer, ``conn.info.backend_pid`` is the pooler's."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def pruned(result: dict[str, Any]) -> dict[str, int]:
    """What a prune deleted per final state (a partitioned table also reports what it
    archived and the partitions it dropped)."""
    return {state: result[state] for state in ("succeeded", "cancelled", "dead")}


# Tests that compare a database with what the migrations make skip when the suite runs on
# partitioned jobs tables (PGJOBS_TEST_PARTITIONED=1, see conftest.py).
plain_table_only = pytest.mark.skipif(
    os.environ.get("PGJOBS_TEST_PARTITIONED", "") not in ("", "0"),
    reason="compares with the plain jobs table the migrations make",
)
