"""Cancelling running jobs from anywhere: the worker holding the job is told on the
control channel (or finds out by its lease check) and stops it; the job ends cancelled."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from flow_helpers import Workers, scalar, wait_until

import pgjobs
from pgjobs.admin import JobStateError
from pgjobs.worker import Worker


def phase_at(conn: psycopg.Connection[Any], job_id: int, phase: str) -> Any:
    query = "SELECT min(at) FROM flow_log WHERE job_id = %s AND phase = %s"
    return scalar(conn, query, (job_id, phase))


def started(conn: psycopg.Connection[Any], job_id: int) -> None:
    wait_until(lambda: phase_at(conn, job_id, "start"), 30, f"job {job_id} started")


def now(conn: psycopg.Connection[Any]) -> Any:
    return scalar(conn, "SELECT clock_timestamp()")


def test_cancel_a_running_sync_job(
    flow: pgjobs.App, flow_workers: Workers, flow_log: psycopg.Connection[Any]
) -> None:
    flow_workers.start(queues="cancel", concurrency=2)
    job_id = flow.enqueue("f.until_cancelled")
    assert job_id is not None
    started(flow_log, job_id)
    before = now(flow_log)
    job = flow.cancel(job_id)
    assert (job.state, job.lease_token) == ("cancelled", None)
    assert job.errors[-1]["type"] == "Cancelled"
    seen = wait_until(lambda: phase_at(flow_log, job_id, "saw-cancel"), 5, "ctx.cancelled seen")
    assert seen - before < timedelta(seconds=1), "the worker was told within a second"
    # What the task returned afterwards ("stopped") is not recorded: the job stays cancelled.
    quick = flow.enqueue("f.quick")
    assert quick is not None and flow.wait(quick, timeout=10) == "quick"
    final = flow.get_job(job_id)
    assert (final.state, final.result) == ("cancelled", None)


def test_cancel_a_running_async_job_from_the_cli(
    db_url: str, flow: pgjobs.App, flow_workers: Workers, flow_log: psycopg.Connection[Any]
) -> None:
    proc = flow_workers.start(queues="cancel", concurrency=2)
    job_id = flow.enqueue("f.aforever")
    assert job_id is not None
    started(flow_log, job_id)
    before = now(flow_log)
    out = subprocess.run(
        [sys.executable, "-m", "pgjobs", "--database-url", db_url, "jobs", "cancel", str(job_id)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and f"job {job_id} cancelled" in out.stdout, out.stderr
    seen = wait_until(
        lambda: phase_at(flow_log, job_id, "cancelled-error"), 5, "the async task cancelled"
    )
    assert seen - before < timedelta(seconds=1)
    assert flow.get_job(job_id).state == "cancelled"
    assert phase_at(flow_log, job_id, "end") is None
    assert "stopping them" in proc.log()
    with pytest.raises(JobStateError, match="already cancelled"):
        flow.cancel(job_id)


def test_a_worker_without_listener_finds_the_cancellation_by_polling(
    flow: pgjobs.App, flow_log: psycopg.Connection[Any]
) -> None:
    """The poll fallback: no control message reaches this worker (it does not LISTEN), its
    lease check every poll interval stops the job all the same."""
    worker = Worker(
        flow,
        ["cancel"],
        2,
        listen=False,
        poll_interval=0.3,
        heartbeat_interval=0.5,
        heartbeat_timeout=3.0,
        retention=None,
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        job_id = flow.enqueue("f.until_cancelled")
        assert job_id is not None
        started(flow_log, job_id)
        before = now(flow_log)
        flow.cancel(job_id)
        seen = wait_until(lambda: phase_at(flow_log, job_id, "saw-cancel"), 5, "seen by polling")
        assert seen - before < timedelta(seconds=1)
        wait_until(lambda: not worker.running_jobs, 5, "the slot is free again")
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert flow.get_job(job_id).state == "cancelled"


def test_cancel_waiting_and_finished_jobs(flow: pgjobs.App) -> None:
    waiting = flow.enqueue("f.quick", delay=60)
    assert waiting is not None
    assert flow.cancel(waiting).state == "cancelled"
    with pytest.raises(JobStateError, match="already cancelled"):
        flow.cancel(waiting)
    with pytest.raises(pgjobs.JobNotFoundError):
        flow.cancel(10**9)
