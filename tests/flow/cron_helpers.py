"""Helpers of the cron tests: the app they run in real ``pgjobs work`` processes, and
reading the periodic jobs back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from worker_processes import Workers, scalar, wait_until

APP = "tests.flow.cron_app:app"

__all__ = ["APP", "Workers", "scalar", "slots_of", "wait_until"]


def slots_of(conn: psycopg.Connection[Any], name: str) -> list[tuple[datetime, int]]:
    """(slot, jobs) per slot of periodic ``name``, earliest first. The slot is read from
    the job's meta, not its run_at: a job rescued from a killed worker runs again at once
    (its run_at moves), and is still its slot's job."""
    rows = conn.execute(
        "SELECT (meta->>'slot')::timestamptz AS slot, count(*) FROM pgjobs.jobs "
        "WHERE meta->>'periodic' = %s GROUP BY 1 ORDER BY 1",
        (name,),
    ).fetchall()
    return [(r[0], int(r[1])) for r in rows]
