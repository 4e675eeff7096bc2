"""Fixtures and helpers of the flow-control tests: real worker processes of
tests/flow/flow_app.py (killed at teardown), the flow_log table, and overlap counting."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import psycopg
from worker_processes import Workers, scalar, wait_until

FLOW_APP = "tests.flow.flow_app:app"

__all__ = ["FLOW_APP", "Workers", "body_intervals", "max_overlap", "scalar", "wait_until",
           "window_max"]  # fmt: skip


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The largest number of intervals open at one moment (an end before a start that
    shares its timestamp)."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, step in edges:
        current += step
        best = max(best, current)
    return best


def body_intervals(
    conn: psycopg.Connection[Any], where: str = "true"
) -> list[tuple[datetime, datetime]]:
    """(start, end) of every job body that logged both, from flow_log."""
    rows = conn.execute(
        "SELECT min(l.at) FILTER (WHERE phase = 'start'), max(l.at) FILTER (WHERE phase = 'end') "
        f"FROM flow_log AS l JOIN pgjobs.jobs AS j ON j.id = l.job_id WHERE {where} "
        "GROUP BY l.job_id"
    ).fetchall()
    return [(r[0], r[1]) for r in rows if r[0] is not None and r[1] is not None]


def window_max(times: list[datetime], period: timedelta) -> int:
    """The most ``times`` within any half-open window (t - period, t]."""
    times = sorted(times)
    best, first = 0, 0
    for i, t in enumerate(times):
        while times[first] <= t - period:
            first += 1
        best = max(best, i - first + 1)
    return best
