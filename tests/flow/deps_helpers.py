"""Helpers of the unique-job and dependency tests: worker statements driven from the test
(start a job, finish a batch as a worker would), and real ``pgjobs work`` processes
running ``tests/flow/deps_app.py``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from worker_processes import Workers, app_on, scalar, wait_until

import pgjobs
from pgjobs.queries import Queries

__all__ = ["Workers", "scalar", "wait_until"]

Q = Queries("pgjobs")
APP = "tests.flow.deps_app:app"
NO_EVENTS = {"events": False, "events_channel": "pgjobs_pgjobs_events"}
FINAL = ("succeeded", "dead", "cancelled")


def start(conn: psycopg.Connection[Any], ids: Sequence[int], worker: str = "w1") -> list[uuid.UUID]:
    """Put jobs in ``running`` held by ``worker`` (as a claim would); their lease tokens."""
    rows = conn.execute(
        "UPDATE pgjobs.jobs SET state = 'running', attempts = attempts + 1, worker = %s, "
        "lease_token = gen_random_uuid(), started_at = now() "
        "WHERE id = ANY(%s) AND state IN ('available', 'scheduled', 'retryable') "
        "RETURNING id, lease_token",
        (worker, list(ids)),
    ).fetchall()
    tokens = dict(rows)
    assert set(tokens) == set(ids), f"not all of {ids} were runnable"
    return [tokens[i] for i in ids]


def finish(
    conn: psycopg.Connection[Any],
    outcomes: Sequence[tuple[int, uuid.UUID, str]],
    worker: str = "w1",
) -> tuple[list[int], int]:
    """Write a batch of outcomes with finish_jobs, as a worker's completion flush does:
    (ids written, children made runnable)."""
    params = {
        "id": [o[0] for o in outcomes],
        "lease_token": [o[1] for o in outcomes],
        "state": [o[2] for o in outcomes],
        "result": [f'{{"done": {o[0]}}}' if o[2] == "succeeded" else None for o in outcomes],
        "delay": [None for _ in outcomes],
        "error": ['{"type": "Boom", "message": "boom"}' if o[2] == "dead" else None
                  for o in outcomes],
        "refund": [0 for _ in outcomes],
        "worker": worker,
        **NO_EVENTS,
    }  # fmt: skip
    rows = conn.execute(Q.finish_jobs, params).fetchall()
    return [r[0] for r in rows], (rows[0][1] if rows else 0)


def run(conn: psycopg.Connection[Any], job_id: int, state: str = "succeeded") -> int:
    """Start and finish one job in one go; the number of children it made runnable."""
    [token] = start(conn, [job_id])
    written, released = finish(conn, [(job_id, token, state)])
    assert written == [job_id]
    return released


def states(conn: psycopg.Connection[Any], ids: Sequence[int]) -> list[str]:
    """The states of ``ids``, in that order."""
    found = dict(
        conn.execute(
            "SELECT id, state::text FROM pgjobs.jobs WHERE id = ANY(%s)", (list(ids),)
        ).fetchall()
    )
    return [found.get(i, "missing") for i in ids]


def row(conn: psycopg.Connection[Any], job_id: int) -> dict[str, Any]:
    """One job row as a dict."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        found = cur.execute("SELECT * FROM pgjobs.jobs WHERE id = %s", (job_id,)).fetchone()
    assert found is not None
    return found


@pytest.fixture
def deps(db_url: str) -> Iterator[pgjobs.App]:
    """The dependency tests' application (tests/flow/deps_app.py), on this test's database."""
    import deps_app

    with app_on(deps_app.app, db_url) as app:
        yield app


@pytest.fixture
def deps_workers(db_url: str, deps: pgjobs.App, tmp_path: Path) -> Iterator[Workers]:
    """Start ``pgjobs work`` processes of deps_app (``.start(queues="flow", ...)``); all
    of them are killed at teardown."""
    started = Workers(db_url, tmp_path, app=APP)
    try:
        yield started
    finally:
        started.cleanup()
