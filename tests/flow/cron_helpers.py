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
    """(slot, jobs) per slot of periodic ``name``, earliest first."""
    rows = conn.execute(
        "SELECT run_at, count(*) FROM pgjobs.jobs WHERE meta->>'periodic' = %s "
        "GROUP BY run_at ORDER BY run_at",
        (name,),
    ).fetchall()
    return [(r[0], int(r[1])) for r in rows]
