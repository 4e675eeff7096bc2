"""The inspection views of migration 0002 (queue_stats, worker_stats, throughput_per_minute):
their numbers against rows whose timestamps are known, and that a read-only role with
SELECT on the views alone can read them."""

from __future__ import annotations

import os
from collections import Counter
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from ops_helpers import add_job, add_worker
from psycopg.rows import dict_row

import pgjobs
from pgjobs.admin import Admin


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


def view(conn: psycopg.Connection[Any], sql: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql).fetchall()


def test_queue_stats_counts_rates_and_failure_rate(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    # Waiting: the oldest due one has waited 120 s; a future scheduled job does not count.
    add_job(conn, queue="q1", run_at_ago=120)
    add_job(conn, queue="q1", run_at_ago=10)
    add_job(conn, queue="q1", state="scheduled", run_at_ago=-3600)
    add_job(conn, queue="q1", state="retryable", run_at_ago=-60, errors_ago=[20])
    add_job(conn, queue="q1", state="running")
    add_job(conn, queue="q1", state="pending")
    # Succeeded: 3 in the last minute (one after a failure 200 s ago), 2 more in 5, 5 more
    # in 15, and 4 outside every window.
    add_job(conn, queue="q1", state="succeeded", finished_ago=30, errors_ago=[200])
    for ago in [30, 40, 180, 200] + [600] * 5 + [1200] * 4:
        add_job(conn, queue="q1", state="succeeded", finished_ago=ago)
    # Dead: failed 400 s and 100 s ago; an old one whose failure is outside the windows.
    add_job(conn, queue="q1", state="dead", finished_ago=90, errors_ago=[400, 100])
    add_job(conn, queue="q1", state="dead", finished_ago=1300, errors_ago=[1300])
    # An operator's cancel adds an error entry that is not a failure.
    Admin(app).cancel_job(add_job(conn, queue="q1"))
    # A queue with settings but no jobs still shows, paused.
    Admin(app).pause_queue("q2")

    rows = {r["queue"]: r for r in view(conn, "SELECT * FROM pgjobs.queue_stats")}
    assert set(rows) == {"q1", "q2"}
    q1 = rows["q1"]
    counts = {
        s: q1[s]
        for s in (
            "scheduled",
            "available",
            "running",
            "retryable",
            "pending",
            "succeeded",
            "dead",
            "cancelled",
        )
    }
    assert counts == {
        "scheduled": 1,
        "available": 2,
        "running": 1,
        "retryable": 1,
        "pending": 1,
        "succeeded": 14,
        "dead": 2,
        "cancelled": 1,
    }
    assert 119 <= q1["oldest_waiting_age"].total_seconds() < 180
    assert q1["paused"] is False
    # Succeeded per minute: 3/1, 5/5, 10/15; failed attempts: 1 (20 s), 3 (+100, 200),
    # 4 (+400) over the windows; failure rate 4 / (10 + 4).
    assert (
        q1["succeeded_per_min_1m"],
        q1["succeeded_per_min_5m"],
        q1["succeeded_per_min_15m"],
    ) == (Decimal("3.00"), Decimal("1.00"), Decimal("0.67"))
    assert (q1["failed_per_min_1m"], q1["failed_per_min_5m"], q1["failed_per_min_15m"]) == (
        Decimal("1.00"),
        Decimal("0.60"),
        Decimal("0.27"),
    )
    assert q1["failure_rate_15m"] == Decimal("0.2857")

    q2 = rows["q2"]
    assert q2["paused"] is True
    assert (q2["available"], q2["oldest_waiting_age"], q2["failure_rate_15m"]) == (0, None, None)


def test_worker_stats(conn: psycopg.Connection[Any]) -> None:
    add_worker(
        conn, "w-live", queues=["a", "b"], heartbeat_ago=2, started_ago=3600, succeeded=7, failed=2
    )
    add_worker(conn, "w-stale", queues=["a"], heartbeat_ago=45)
    jobs = [add_job(conn, state="running", worker="w-live") for _ in range(2)]
    add_job(conn, state="succeeded", worker="w-live")

    rows = {r["worker"]: r for r in view(conn, "SELECT * FROM pgjobs.worker_stats")}
    live, stale = rows["w-live"], rows["w-stale"]
    assert (live["host"], live["pid"], live["queues"]) == ("host-a", 4242, ["a", "b"])
    assert (live["jobs_succeeded"], live["jobs_failed"]) == (7, 2)
    assert live["current_jobs"] == jobs and stale["current_jobs"] == []
    assert 3600 <= live["uptime"].total_seconds() < 3660
    assert 2 <= live["heartbeat_age"].total_seconds() < 60
    # 30 s by default; a session can choose its own timeout.
    assert (live["alive"], stale["alive"]) == (True, False)
    conn.execute("SET pgjobs.heartbeat_timeout = '60'")
    again = {r["worker"]: r["alive"] for r in view(conn, "SELECT * FROM pgjobs.worker_stats")}
    assert again == {"w-live": True, "w-stale": True}


def test_throughput_per_minute(conn: psycopg.Connection[Any]) -> None:
    for ago in (5, 65, 65, 1800, 3000):
        add_job(conn, queue="a", state="succeeded", finished_ago=ago)
    add_job(conn, queue="b", state="succeeded", finished_ago=65)
    add_job(conn, queue="a", state="succeeded", finished_ago=4000)  # over an hour ago
    add_job(conn, queue="a", state="retryable", errors_ago=[65, 4000])
    add_job(conn, queue="b", state="dead", finished_ago=10, errors_ago=[600, 10])

    # The expected buckets, from the stored timestamps themselves.
    expected: Counter[tuple[Any, str, str]] = Counter()
    for minute, queue in conn.execute(
        "SELECT date_trunc('minute', finished_at), queue FROM pgjobs.jobs "
        "WHERE state = 'succeeded' AND finished_at > now() - interval '59 minutes'"
    ):
        expected[(minute, queue, "succeeded")] += 1
    for minute, queue in conn.execute(
        "SELECT date_trunc('minute', (e ->> 'at')::timestamptz), queue FROM pgjobs.jobs, "
        "jsonb_array_elements(errors) AS e "
        "WHERE (e ->> 'at')::timestamptz > now() - interval '59 minutes'"
    ):
        expected[(minute, queue, "failed")] += 1

    rows = view(conn, "SELECT * FROM pgjobs.throughput_per_minute")
    got: Counter[tuple[Any, str, str]] = Counter()
    for row in rows:
        for kind in ("succeeded", "failed"):
            if row[kind]:
                got[(row["minute"], row["queue"], kind)] += row[kind]
    assert got == expected
    assert sum(n for (_, _, k), n in got.items() if k == "succeeded") == 6
    assert sum(n for (_, _, k), n in got.items() if k == "failed") == 3
    assert len({(r["minute"], r["queue"]) for r in rows}) == len(rows)  # one row each


def test_views_are_readable_by_a_read_only_role(db_url: str) -> None:
    role = f"pgjobs_ro_{os.getpid()}"
    views = (
        "pgjobs.queue_stats, pgjobs.worker_stats, pgjobs.throughput_per_minute, "
        "pgjobs.dead_jobs, pgjobs.queue_depths"
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        add_job(conn, state="dead", errors_ago=[5])
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} NOLOGIN")
        try:
            conn.execute(f"GRANT USAGE ON SCHEMA pgjobs TO {role}")
            conn.execute(f"GRANT SELECT ON {views} TO {role}")
            conn.execute(f"SET ROLE {role}")
            for name in views.split(", "):
                conn.execute(f"SELECT * FROM {name}").fetchall()
            assert conn.execute("SELECT dead FROM pgjobs.queue_stats").fetchone() == (1,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM pgjobs.jobs")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM pgjobs.dead_jobs")
        finally:
            conn.execute("RESET ROLE")
            conn.execute(f"REVOKE ALL ON {views} FROM {role}")
            conn.execute(f"REVOKE ALL ON SCHEMA pgjobs FROM {role}")
            conn.execute(f"DROP ROLE {role}")
