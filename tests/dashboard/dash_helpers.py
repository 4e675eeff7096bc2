"""Helpers of the dashboard tests: waiting with deadlines, reading pages and event
streams, a dashboard served by a real uvicorn, and real worker processes. The fixtures that
use them are in this folder's conftest.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import uvicorn

from pgjobs.settings import events_application_name

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.dashboard.dash_app:app"
SUBSCRIBER = events_application_name("pgjobs")


def wait_until(check: Callable[[], Any], timeout: float, message: str) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {message}")
        time.sleep(0.03)


def csrf_token(html: str) -> str:
    """The CSRF token a page carries."""
    match = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', html)
    assert match, "the page has no CSRF token"
    return match.group(1)


def subscribed(conn: psycopg.Connection[Any]) -> bool:
    """Whether an events subscriber (the dashboard's hub) is connected to this database."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND datname = current_database()",
        (SUBSCRIBER,),
    ).fetchone()
    return bool(row and row[0])


class LiveServer:
    """An ASGI application served by uvicorn on a loopback port, on a thread."""

    def __init__(self, asgi: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            asgi, log_level="warning", lifespan="on", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 15, "uvicorn started")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


class WorkerProcesses:
    """``pgjobs work`` processes running the dashboard tests' application."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, processes: int = 1) -> subprocess.Popen[bytes]:
        """Start a worker on queue ``dash`` (``processes`` of them under a supervisor);
        return once they are registered."""
        argv = [
            sys.executable, "-m", "pgjobs", "--database-url", self.url, "--app", APP, "work",
            "--queues", "dash", "--poll-interval", "0.2", "--heartbeat-interval", "0.3",
            "--heartbeat-timeout", "3", "--processes", str(processes), *args,
        ]  # fmt: skip
        log_path = self.tmp_path / f"worker-{len(self.started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGJOBS_")}
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started.append(proc)
        with psycopg.connect(self.url, autocommit=True) as conn:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"worker exited:\n{log_path.read_text()}")
                if processes > 1:
                    row = conn.execute("SELECT count(*) FROM pgjobs.workers").fetchone()
                    return bool(row and row[0] >= processes)
                row = conn.execute(
                    "SELECT count(*) FROM pgjobs.workers WHERE pid = %s", (proc.pid,)
                ).fetchone()
                return bool(row and row[0])

            wait_until(ready, 30, "worker registered")
        return proc

    def stop(self) -> None:
        """Kill every worker started."""
        for proc in self.started:
            children = subprocess.run(
                ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(child), signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def read_events(
    lines: Iterator[str], until: Callable[[list[tuple[str, str]]], bool]
) -> list[tuple[str, str]]:
    """Parse a text/event-stream into (event, data) pairs until ``until(events)`` holds or
    the stream ends (the caller's read timeout bounds every wait)."""
    events: list[tuple[str, str]] = []
    name, data = "message", []
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line == "" and data:
            events.append((name, "\n".join(data)))
            name, data = "message", []
            if until(events):
                break
    return events


# -- the browser --------------------------------------------------------------------------
