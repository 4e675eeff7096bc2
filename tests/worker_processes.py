"""Real ``pgjobs work`` processes for the tests, waited on with deadlines, and the test
applications pointed at one test's database.

Each test folder's conftest.py builds its fixtures from these (``workers``,
``flow_workers``, …); every process started (and every child of a supervisor) is killed at
teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg

import pgjobs

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.worker.worker_app:app"
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0

T = TypeVar("T")


def wait_until(
    check: Callable[[], T], timeout: float, message: str = "", interval: float = 0.03
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {message or check}")
        time.sleep(interval)


def scalar(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    """The first column of the first row of ``query``."""
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


class WorkerProcess:
    """One ``pgjobs work`` process and its log."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            message = f"worker {self.pid} still running after {timeout} s:\n{self.log()}"
            raise AssertionError(message) from None


class Workers:
    """Starts worker processes against one test database."""

    def __init__(self, url: str, tmp_path: Path, app: str = APP, queues: str = "q") -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.app = app
        self.queues = queues
        self.started: list[WorkerProcess] = []

    def start(
        self,
        *args: str,
        queues: str | None = None,
        concurrency: int = 4,
        processes: int = 1,
        poll_interval: float = 0.2,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        wait_ready: bool = True,
        log_level: str = "INFO",
    ) -> WorkerProcess:
        """Start ``pgjobs work`` with the test app (``processes`` of them under a
        supervisor); wait until it is registered and listening unless ``wait_ready`` is
        false."""
        argv = [
            sys.executable, "-m", "pgjobs", "--database-url", self.url,
            "--app", self.app, "work",
            "--queues", queues or self.queues, "--concurrency", str(concurrency),
            "--processes", str(processes),
            "--poll-interval", str(poll_interval),
            "--heartbeat-interval", str(heartbeat_interval),
            "--heartbeat-timeout", str(heartbeat_timeout),
            "--log-level", log_level, *args,
        ]  # fmt: skip
        log_path = self.tmp_path / f"worker-{len(self.started)}.log"
        # Only this test's settings: the direct URL for LISTEN is one of them when the suite
        # runs through PgBouncer.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PGJOBS_") or k == "PGJOBS_LISTEN_URL"
        }
        with log_path.open("wb") as log:
            popen = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        proc = WorkerProcess(popen, log_path)
        self.started.append(proc)
        if wait_ready:
            self.wait_ready(proc, processes)
        return proc

    def wait_ready(
        self, proc: WorkerProcess, processes: int = 1, timeout: float = 30.0, listens: bool = True
    ) -> None:
        """Until the worker's row exists (a supervisor's: its children's rows) and, unless
        ``listens`` is false (a worker that polls), it listens."""
        # Nothing prepared: the URL may go through PgBouncer.
        with psycopg.connect(self.url, autocommit=True, prepare_threshold=None) as conn:

            def ready() -> bool:
                if proc.popen.poll() is not None:
                    raise AssertionError(
                        f"worker exited with {proc.popen.returncode}:\n{proc.log()}"
                    )
                if processes > 1:
                    registered = scalar(conn, "SELECT count(*) >= %s FROM pgjobs.workers",
                                        (processes,))  # fmt: skip
                else:
                    query = "SELECT count(*) > 0 FROM pgjobs.workers WHERE pid = %s"
                    registered = scalar(conn, query, (proc.pid,))
                return bool(registered) and (not listens or "listening" in proc.log())

            wait_until(ready, timeout, f"worker {proc.pid} ready")

    def cleanup(self) -> None:
        """Kill every process started (and the children of supervisors)."""
        for proc in self.started:
            for child in _children(proc.pid):
                _kill(child)
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.popen.wait(timeout=10)


@contextlib.contextmanager
def app_on(app: pgjobs.App, url: str) -> Iterator[pgjobs.App]:
    """``app`` (the App of a test application module, which workers import afresh)
    pointed at the database ``url`` for one test, its pools closed before and after."""
    app.close()
    app._database_url = url
    app._resolved_url = None
    try:
        yield app
    finally:
        app.close()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
