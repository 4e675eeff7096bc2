"""A scheduler that freezes itself (SIGSTOP) in the middle of its transaction, as a process
paused by its host would. Run as
``python -m tests.flow.frozen_scheduler URL PID_FILE IDLE_SECONDS``.

It schedules the cron test app's ``tick.every`` and, once it has enqueued a slot and
advanced the schedule's row, stops before its COMMIT. It writes its server backend's pid
to PID_FILE first, so that the test can watch the server end the frozen session (its
idle_in_transaction_session_timeout is shortened to IDLE_SECONDS).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import psycopg

from pgjobs import worker_db
from pgjobs.cron import PeriodicTask, Plan, Scheduler
from tests.flow.cron_app import app

FROZEN = "tick.every"


class FreezingScheduler(Scheduler):
    """Stops its own process right after the statement that advances ``FROZEN``'s row."""

    pid_file: Path

    def _write(self, conn: psycopg.Connection[Any], periodic: PeriodicTask, plan: Plan) -> None:
        super()._write(conn, periodic, plan)
        if periodic.name == FROZEN and plan.slots:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert backend is not None
            self.pid_file.write_text(str(backend[0]))
            os.kill(os.getpid(), signal.SIGSTOP)


def main(url: str, pid_file: str, idle_seconds: str) -> None:
    worker_db.IDLE_IN_TRANSACTION_TIMEOUT = f"{idle_seconds}s"
    scheduler = FreezingScheduler(url, app.queries, app.channel, [app.periodics[FROZEN]])
    scheduler.pid_file = Path(pid_file)
    while True:
        scheduler._stop.wait(max(scheduler.run_due(), 0.0))


if __name__ == "__main__":
    main(*sys.argv[1:4])
