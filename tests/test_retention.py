"""Automatic retention: workers prune finished jobs past their retention, one worker at a
time (a transaction-level advisory lock per schema), one bounded batch per pass."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from ops_helpers import add_job

import pgjobs
from pgjobs.admin import Retention
from pgjobs.maintenance import Maintenance, Registration

DAY = 86_400


def _ids(conn: psycopg.Connection[Any]) -> set[int]:
    return {row[0] for row in conn.execute("SELECT id FROM pgjobs.jobs").fetchall()}


@pytest.fixture
def maintenance(app: pgjobs.App, db_url: str) -> Iterator[Maintenance]:
    registration = Registration(
        id="test-maintenance", host="h", pid=1, queues=["default"], concurrency=1, meta={}
    )
    # A long interval: the thread never ticks on its own; the test calls tick()/prune().
    worker = Maintenance(
        db_url,
        app.queries,
        registration,
        interval=3600,
        timeout=7200,
        on_lost=lambda: None,
        prune_interval=0,
    )
    worker.start()
    yield worker
    worker.stop()


def test_a_tick_prunes_by_state_and_keeps_dead_and_live_jobs(
    maintenance: Maintenance, conn: psycopg.Connection[Any]
) -> None:
    expired_ok = {add_job(conn, state="succeeded", finished_ago=2 * DAY) for _ in range(3)}
    fresh_ok = add_job(conn, state="succeeded", finished_ago=DAY - 600)
    expired_cancel = add_job(conn, state="cancelled", finished_ago=8 * DAY)
    fresh_cancel = add_job(conn, state="cancelled", finished_ago=6 * DAY)
    ancient_dead = add_job(conn, state="dead", finished_ago=365 * DAY)
    live = {add_job(conn, state=s, run_at_ago=30 * DAY) for s in ("available", "scheduled")}
    before = _ids(conn)

    maintenance.tick()

    assert _ids(conn) == before - expired_ok - {expired_cancel}
    assert {fresh_ok, fresh_cancel, ancient_dead} | live <= _ids(conn)
    assert maintenance.pruned == 4


def test_only_one_worker_prunes_a_schema_at_a_time(
    maintenance: Maintenance, conn: psycopg.Connection[Any], db_url: str
) -> None:
    expired = {add_job(conn, state="succeeded", finished_ago=2 * DAY) for _ in range(2)}
    with psycopg.connect(db_url) as other, other.transaction():
        # Another worker's retention pass holds the schema's prune lock.
        other.execute("SELECT pg_advisory_xact_lock(hashtext('pgjobs:pgjobs:prune'))")
        assert maintenance.prune(maintenance._connection()) is False
        assert expired <= _ids(conn), "a second worker pruned while the first held the lock"
    assert maintenance.prune(maintenance._connection()) is False  # not full: all done
    assert not expired & _ids(conn)


def test_a_pass_deletes_one_bounded_batch_and_reports_more_to_do(
    maintenance: Maintenance, conn: psycopg.Connection[Any]
) -> None:
    expired = [add_job(conn, state="succeeded", finished_ago=2 * DAY) for _ in range(5)]
    maintenance.prune_batch = 2
    assert maintenance.prune(maintenance._connection()) is True
    assert len(set(expired) & _ids(conn)) == 3
    maintenance.prune(maintenance._connection())
    assert maintenance.prune(maintenance._connection()) is False
    assert not set(expired) & _ids(conn)


def test_retention_can_be_configured_or_switched_off(
    maintenance: Maintenance, conn: psycopg.Connection[Any]
) -> None:
    dead = add_job(conn, state="dead", finished_ago=2 * DAY)
    ok = add_job(conn, state="succeeded", finished_ago=2 * DAY)
    maintenance.retention = Retention(succeeded=None, dead=timedelta(days=1))
    maintenance.prune(maintenance._connection())
    assert dead not in _ids(conn) and ok in _ids(conn)
    maintenance.retention = None
    maintenance._prune_at = 0.0
    maintenance.tick()  # must not prune (nor fail) with retention switched off
    assert ok in _ids(conn)


def test_worker_passes_its_retention_to_the_maintenance_thread(app: pgjobs.App) -> None:
    from pgjobs.worker import Worker

    custom = Retention(succeeded=timedelta(hours=6), cancelled=None, dead=timedelta(days=30))
    assert Worker(app, ["default"], retention=custom, prune_interval=5).retention == custom
    assert Worker(app, ["default"], retention=None).retention is None
    assert Worker(app, ["default"]).retention == Retention()
