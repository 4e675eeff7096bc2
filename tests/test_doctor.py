"""`pgjobs doctor`: each check's verdict for a healthy database and for the trouble it
looks for, and the exit status of the command."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from ops_helpers import add_job, add_worker, server_pid
from typer.testing import CliRunner

from pgjobs import migrate
from pgjobs.cli import cli
from pgjobs.doctor import Doctor, Thresholds, Verdict, dead_tuples_verdict, worst


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


def run(url: str, **thresholds: Any) -> dict[str, Any]:
    return {c.name: c for c in Doctor(url, "pgjobs", Thresholds(**thresholds)).run()}


def doctor_cli(url: str, *args: str) -> Any:
    return CliRunner().invoke(cli, ["--database-url", url, "doctor", *args])


def test_a_healthy_installation_passes(db_url: str, conn: psycopg.Connection[Any]) -> None:
    add_worker(conn, "w1", queues=["default"])
    add_job(conn)  # runnable, and served by w1
    checks = run(db_url)
    assert list(checks) == [
        "migrations",
        "long transactions",
        "jobs table vacuum",
        "notification queue",
        "orphaned running jobs",
        "queues without workers",
    ]
    assert {name: c.verdict for name, c in checks.items()} == dict.fromkeys(checks, Verdict.OK)
    result = doctor_cli(db_url)
    assert result.exit_code == 0, result.output
    for name in checks:
        assert f"OK {name}:" in result.stdout
    assert "FAIL" not in result.stdout and "WARN" not in result.stdout


def test_an_open_transaction_holding_xmin_warns_then_fails(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(db_url) as holder:
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM pgjobs.jobs").fetchone()  # takes a snapshot
        pid = server_pid(holder)
        # Default thresholds (5 minutes): a fresh transaction is fine.
        assert run(db_url)["long transactions"].verdict is Verdict.OK
        warned = run(db_url, transaction_warn=0.0)["long transactions"]
        assert warned.verdict is Verdict.WARN
        assert f"pid {pid}" in warned.summary and "pg_terminate_backend" in warned.fix
        assert warned.details[0]["xmin_age"] is not None
        failed = run(db_url, transaction_warn=0.0, transaction_fail=0.0)["long transactions"]
        assert failed.verdict is Verdict.FAIL
        holder.rollback()
    assert run(db_url, transaction_warn=0.0)["long transactions"].verdict is Verdict.OK


def test_running_jobs_of_silent_or_missing_workers(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    add_worker(conn, "w-silent", queues=["default"], heartbeat_ago=120)
    silent = add_job(conn, state="running", worker="w-silent")
    missing = add_job(conn, state="running", worker="w-gone")
    check = run(db_url)["orphaned running jobs"]
    # Nobody alive to rescue them: a failure.
    assert check.verdict is Verdict.FAIL
    assert f"({silent}, {missing})" in check.summary
    assert {d["id"]: d["worker_missing"] for d in check.details} == {silent: False, missing: True}
    assert doctor_cli(db_url).exit_code == 1

    # A live worker will rescue them at its next heartbeat: a warning.
    add_worker(conn, "w-live", queues=["default"])
    assert run(db_url)["orphaned running jobs"].verdict is Verdict.WARN
    # A longer timeout makes the silent worker alive again; the missing one stays orphaned.
    assert [
        d["id"] for d in run(db_url, heartbeat_timeout=600)["orphaned running jobs"].details
    ] == [missing]


def test_queues_with_runnable_jobs_and_no_live_worker(
    app: Any, db_url: str, conn: psycopg.Connection[Any]
) -> None:
    from pgjobs.admin import Admin

    add_job(conn, queue="lonely")
    add_job(conn, queue="later", state="scheduled", run_at_ago=-3600)  # not runnable yet
    add_worker(conn, "w-other", queues=["default"])
    add_worker(conn, "w-dead", queues=["lonely"], heartbeat_ago=300)
    check = run(db_url)["queues without workers"]
    assert check.verdict is Verdict.FAIL
    assert [d["queue"] for d in check.details] == ["lonely"]
    assert "--queues lonely" in check.fix
    Admin(app).pause_queue("lonely")  # paused on purpose: not a finding
    assert run(db_url)["queues without workers"].verdict is Verdict.OK


def test_pending_migrations_fail(empty_db_url: str) -> None:
    checks = run(empty_db_url)
    assert checks["migrations"].verdict is Verdict.FAIL
    assert "not installed" in checks["migrations"].summary
    # The table checks cannot run either, and say so rather than crash.
    assert checks["orphaned running jobs"].verdict is Verdict.FAIL
    assert "could not run" in checks["orphaned running jobs"].summary

    migrate.upgrade(empty_db_url, revision="pgjobs_0001")
    behind = run(empty_db_url)["migrations"]
    assert behind.verdict is Verdict.FAIL
    assert "pgjobs_0001" in behind.summary and "pgjobs migrate upgrade" in behind.fix
    result = doctor_cli(empty_db_url, "--json")
    assert result.exit_code == 1
    assert '"verdict": "fail"' in result.stdout


def test_vacuum_check_reports_the_table_and_judges_dead_rows(db_url: str) -> None:
    check = run(db_url)["jobs table vacuum"]
    assert check.verdict is Verdict.OK
    assert "dead" in check.summary and "last vacuum" in check.summary
    t = Thresholds()
    assert dead_tuples_verdict(live=1_000_000, dead=150_000, thresholds=t) is Verdict.OK
    assert dead_tuples_verdict(live=100_000, dead=150_000, thresholds=t) is Verdict.WARN
    assert dead_tuples_verdict(live=100_000, dead=2_000_000, thresholds=t) is Verdict.FAIL
    assert dead_tuples_verdict(live=0, dead=50, thresholds=t) is Verdict.OK


def test_worst_verdict() -> None:
    from pgjobs.doctor import Check

    assert worst([]) is Verdict.OK
    checks = [Check("a", Verdict.OK, ""), Check("b", Verdict.WARN, "")]
    assert worst(checks) is Verdict.WARN
    assert worst([*checks, Check("c", Verdict.FAIL, "")]) is Verdict.FAIL


def test_doctor_rejects_a_bad_duration(db_url: str) -> None:
    result = doctor_cli(db_url, "--long-transaction", "soon")
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    assert "invalid duration 'soon'" in result.stderr
