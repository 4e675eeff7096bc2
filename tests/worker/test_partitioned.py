"""The opt-in partitioned jobs table: `pgjobs migrate partition` converts a plain table in
place (nothing lost, ids, unique keys, views and grants carried over), retention archives
finished jobs into day partitions and drops the partitions whose day is over, and
`--undo` restores the plain table."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from ops_helpers import add_job
from psycopg import sql
from typer.testing import CliRunner
from worker_processes import Workers, wait_until

import pgjobs
from pgjobs import migrate, partitioning
from pgjobs.admin import Admin, Retention
from pgjobs.cli import cli
from pgjobs.queries import Queries

DAY = 86_400


def _cli(url: str, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--database-url", url, *args], env={"PGJOBS_APP": None})
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def _partitions(conn: psycopg.Connection[Any]) -> list[str]:
    return sorted(partitioning.day_partitions(conn, "pgjobs").values())


def _where(conn: psycopg.Connection[Any], job_id: int) -> str:
    row = conn.execute(
        "SELECT tableoid::regclass::text FROM pgjobs.jobs WHERE id = %s", (job_id,)
    ).fetchone()
    assert row is not None, f"job {job_id} is gone"
    return str(row[0]).removeprefix("pgjobs.")


@pytest.fixture
def app(db_url: str) -> Iterator[pgjobs.App]:
    """A producer that enqueues tasks by name (the workers' app defines them)."""
    producer = pgjobs.App(db_url, strict_tasks=False)
    yield producer
    producer.close()


@pytest.fixture
def partitioned(direct_db_url: str, conn: psycopg.Connection[Any]) -> str:
    """This test's database, partitioned; its direct URL (layout changes refuse a
    pooler)."""
    if not partitioning.is_partitioned(conn, "pgjobs"):
        _cli(direct_db_url, "migrate", "partition")
    return direct_db_url


def test_partition_converts_in_place_and_loses_nothing(
    direct_db_url: str, app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    if partitioning.is_partitioned(conn, "pgjobs"):
        pytest.skip("the suite runs on a partitioned table already")
    before = [add_job(conn, state=s) for s in ("available", "running", "succeeded", "dead")]
    keyed = app.enqueue("t.task", {"n": 1}, unique_key="k1")
    if not _role_exists(conn):
        conn.execute("CREATE ROLE pgjobs_reader_test")
    conn.execute("GRANT SELECT ON pgjobs.jobs TO pgjobs_reader_test")
    conn.execute("CREATE VIEW public.app_job_count AS SELECT count(*) AS n FROM pgjobs.jobs")
    rows_before = conn.execute("SELECT * FROM pgjobs.jobs ORDER BY id").fetchall()

    out = _cli(direct_db_url, "migrate", "partition")

    assert "partitioned" in out
    assert partitioning.is_partitioned(conn, "pgjobs")
    assert conn.execute("SELECT * FROM pgjobs.jobs ORDER BY id").fetchall() == rows_before
    assert {_where(conn, i) for i in before} == {"jobs_current"}
    # The application's view reads the partitioned table, and its grants came along.
    app.close()
    new = app.enqueue("t.task", {"n": 2})
    assert new is not None and keyed is not None
    assert new > max([*before, keyed])
    assert conn.execute("SELECT n FROM public.app_job_count").fetchone() == (len(before) + 2,)
    granted = conn.execute(
        "SELECT has_table_privilege('pgjobs_reader_test', 'pgjobs.jobs', 'SELECT')"
    ).fetchone()
    assert granted == (True,)
    # Unique keys still deduplicate, through the partitioned table's index.
    assert app.enqueue("t.task", {"n": 1}, unique_key="k1") == keyed
    # Twice is refused with a clear message, and changes nothing.
    result = CliRunner().invoke(cli, ["--database-url", direct_db_url, "migrate", "partition"])
    assert result.exit_code == 1
    assert "partitioned already" in result.stderr


def _role_exists(conn: psycopg.Connection[Any]) -> bool:
    found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'pgjobs_reader_test'")
    return found.fetchone() is not None


def test_retention_archives_into_day_partitions_and_drops_past_days(
    partitioned: str, app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    recent = add_job(conn, state="succeeded", finished_ago=3600)
    expired = add_job(conn, state="succeeded", finished_ago=2 * DAY)
    cancelled = add_job(conn, state="cancelled", finished_ago=DAY)
    dead = add_job(conn, state="dead", finished_ago=DAY)
    live = add_job(conn, state="available")
    held = add_job(conn, state="succeeded", finished_ago=60, unique_key="period-key")
    conn.execute(
        "UPDATE pgjobs.jobs SET unique_until = now() + interval '1 hour' WHERE id = %s", (held,)
    )
    # A partition whose day is over, with a job archived into it back then.
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    old = add_job(conn, state="succeeded", finished_ago=2 * DAY)
    _make_day(conn, yesterday)
    conn.execute(
        "UPDATE pgjobs.jobs SET kept_until = %s WHERE id = %s",
        (datetime.combine(yesterday, datetime.min.time(), UTC) + timedelta(hours=12), old),
    )
    assert _where(conn, old) == f"jobs_until_{yesterday:%Y%m%d}"

    done = Admin(app).prune(Retention())

    assert done["succeeded"] == 1  # `expired`, past its day already: deleted as before
    assert done["archived"] == 2 and done["dropped_partitions"] == 1
    ids = {r[0] for r in conn.execute("SELECT id FROM pgjobs.jobs").fetchall()}
    assert expired not in ids and old not in ids
    for job, keep in ((recent, "1 day"), (cancelled, "7 days")):
        day = conn.execute(
            "SELECT to_char((finished_at + %s::interval) AT TIME ZONE 'UTC', 'YYYYMMDD')"
            " FROM pgjobs.jobs WHERE id = %s",
            (keep, job),
        ).fetchone()
        assert day is not None
        assert _where(conn, job) == f"jobs_until_{day[0]}"
    for stays in (dead, live, held):
        assert _where(conn, stays) == "jobs_current"
    assert f"jobs_until_{yesterday:%Y%m%d}" not in _partitions(conn)
    # The period key is still held, in jobs_current, while its period lasts.
    assert app.enqueue("t.task", {}, unique_key="period-key") == held


def _make_day(conn: psycopg.Connection[Any], day: Any) -> None:
    # What the retention pass did on that day.
    with conn.transaction():
        partitioning._create_day(conn, "pgjobs", day)


def test_a_retried_archived_job_comes_back_and_runs(
    partitioned: str, app: pgjobs.App, conn: psycopg.Connection[Any], workers: Workers
) -> None:
    dead = add_job(conn, state="dead", task="t.record_sync", queue="q", finished_ago=60)
    Admin(app).prune(Retention(dead=timedelta(days=2)))
    assert _where(conn, dead).startswith("jobs_until_")

    assert Admin(app).retry_job(dead).state == "available"

    assert _where(conn, dead) == "jobs_current"
    workers.start(concurrency=2)
    wait_until(lambda: app.get_job(dead).state == "succeeded", 20, "the retried job ran")


def test_workers_drain_a_partitioned_table_and_retention_archives_what_they_finished(
    partitioned: str, app: pgjobs.App, conn: psycopg.Connection[Any], workers: Workers
) -> None:
    ids = app.enqueue_many("t.record_sync", [{"n": i} for i in range(300)], queue="q")
    proc = workers.start(concurrency=8)
    wait_until(
        lambda: (
            conn.execute("SELECT count(*) FROM pgjobs.jobs WHERE state = 'succeeded'").fetchone()
            == (300,)
        ),
        60,
        "300 jobs succeeded",
    )
    assert "reads its partition jobs_current" in proc.log()
    assert Admin(app).prune()["archived"] == 300
    archived = conn.execute(
        "SELECT count(*) FROM pgjobs.jobs WHERE kept_until < '9999-12-31' AND id = ANY(%s)",
        (ids,),
    ).fetchone()
    assert archived == (300,)
    first = ids[0]
    assert first is not None
    assert app.get_job(first).state == "succeeded"


def test_undo_brings_archived_jobs_back_into_a_plain_table(
    partitioned: str, app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    finished = [add_job(conn, state="succeeded", finished_ago=60) for _ in range(3)]
    Admin(app).prune()
    assert all(_where(conn, i).startswith("jobs_until_") for i in finished)

    out = _cli(partitioned, "migrate", "partition", "--undo")

    assert "3 archived job(s) brought back" in out
    assert not partitioning.is_partitioned(conn, "pgjobs")
    assert {_where(conn, i) for i in finished} == {"jobs"}
    app.close()
    after = app.enqueue("t.task", {})
    assert after is not None and after > max(finished)
    # The plain table is the migrated one again: the schema can be migrated down and up.
    migrate.downgrade(partitioned, revision="pgjobs_0005")
    migrate.upgrade(partitioned)


def test_downgrade_below_0006_of_a_partitioned_table_says_to_undo_first(
    partitioned: str,
) -> None:
    with pytest.raises(Exception, match="migrate partition --undo"):
        migrate.downgrade(partitioned, revision="pgjobs_0005")


def test_the_hot_statements_read_jobs_current_alone(
    partitioned: str, app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    add_job(conn, state="succeeded", finished_ago=60)
    add_job(conn, state="cancelled", finished_ago=60)
    Admin(app).prune()
    assert len(_partitions(conn)) >= 2
    # As a worker reads them once it found the table partitioned.
    queries = Queries("pgjobs", partitioned=True)
    common = {"worker": "w", "events": False, "events_channel": "c"}
    statements = {
        "claim_jobs": {"queues": ["q"], "limit": 10, "start": 10, "scan": 74},
        "start_jobs": {"id": [1], "lease_token": [uuid.uuid4()]},
        "finish_jobs": {"id": [1], "lease_token": [uuid.uuid4()], "state": ["succeeded"],
                        "result": [], "delay": [], "error": [], "refund": []},
        "rescue_jobs": {"timeout": 30, "held": []},
    }  # fmt: skip
    for name, params in statements.items():
        explain = sql.SQL("EXPLAIN (FORMAT JSON) ") + getattr(queries, name)
        plan = json.dumps(conn.execute(explain, {**common, **params}).fetchone())
        assert "jobs_current" in plan and "jobs_until_" not in plan, (name, plan)


def test_a_table_in_use_is_left_plain_with_a_one_line_error_and_converts_later(
    db_url: str, direct_db_url: str, conn: psycopg.Connection[Any]
) -> None:
    if partitioning.is_partitioned(conn, "pgjobs"):
        pytest.skip("the suite runs on a partitioned table already")
    job = add_job(conn, state="available")
    # A transaction that read the table and stays open: the conversion's lock waits for it
    # no longer than its lock timeout, and then gives up, changing nothing.
    with psycopg.connect(direct_db_url) as reader:
        reader.execute("SELECT count(*) FROM pgjobs.jobs").fetchone()
        result = CliRunner().invoke(
            cli, ["--database-url", direct_db_url, "migrate", "partition", "--wait", "1"]
        )
        assert result.exit_code == 1, result.stdout
        assert "in use for more than 1 s" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not partitioning.is_partitioned(conn, "pgjobs")
    _cli(direct_db_url, "migrate", "partition")
    assert _where(conn, job) == "jobs_current"
