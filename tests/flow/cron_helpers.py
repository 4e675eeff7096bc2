"""Helpers of the cron tests: real ``pgjobs work`` processes running tests/flow/cron_app.py
(killed at teardown), and reading the periodic jobs back."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))

from worker_helpers import scalar, wait_until

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.flow.cron_app:app"

__all__ = ["CronWorkers", "scalar", "slots_of", "wait_until"]


class CronWorkers:
    """``pgjobs work`` processes of the cron test app against one database."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        """Start one worker (heartbeat 0.5 s, declared dead after 3 s of silence)."""
        argv = [
            sys.executable, "-m", "pgjobs", "--database-url", self.url, "--app", APP,
            "work", "--concurrency", "4", "--poll-interval", "0.2",
            "--heartbeat-interval", "0.5", "--heartbeat-timeout", "3",
        ]  # fmt: skip
        log_path = self.tmp_path / f"cron-worker-{len(self.started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGJOBS_")}
        with log_path.open("wb") as log:
            popen = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started.append(popen)
        return popen

    def log(self, index: int) -> str:
        """What worker ``index`` printed."""
        return (self.tmp_path / f"cron-worker-{index}.log").read_text(errors="replace")

    def cleanup(self) -> None:
        """Kill every worker still running."""
        for popen in self.started:
            if popen.poll() is None:
                popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)


def slots_of(conn: psycopg.Connection[Any], name: str) -> list[tuple[datetime, int]]:
    """(slot, jobs) per slot of periodic ``name``, earliest first."""
    rows = conn.execute(
        "SELECT run_at, count(*) FROM pgjobs.jobs WHERE meta->>'periodic' = %s "
        "GROUP BY run_at ORDER BY run_at",
        (name,),
    ).fetchall()
    return [(r[0], int(r[1])) for r in rows]
