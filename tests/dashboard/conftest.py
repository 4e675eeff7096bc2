"""Fixtures of the dashboard tests: the dashboard on this test's database (in-process
through Starlette's TestClient, or served by uvicorn on a loopback port), real worker
processes, and a headless Chromium (Debian's package, installed here when missing)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
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
import pytest
import uvicorn
from starlette.testclient import TestClient

import pgjobs
from pgjobs.dashboard import create_app
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


@pytest.fixture
def dapp(db_url: str) -> Iterator[pgjobs.App]:
    """The dashboard tests' application, on this test's database."""
    import dash_app

    dash_app.app.close()
    dash_app.app._database_url = db_url
    dash_app.app._resolved_url = None
    yield dash_app.app
    dash_app.app.close()


@pytest.fixture
def client(dapp: pgjobs.App) -> Iterator[TestClient]:
    """The dashboard in-process, with its lifespan (and so its event hub) running."""
    with TestClient(create_app(dapp)) as test_client:
        yield test_client


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


@pytest.fixture
def serve() -> Iterator[Callable[[Any], LiveServer]]:
    """Serve ASGI applications on loopback ports; all stopped at teardown."""
    servers: list[LiveServer] = []

    def start(asgi: Any) -> LiveServer:
        server = LiveServer(asgi).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


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


@pytest.fixture
def workers(db_url: str, tmp_path: Path) -> Iterator[WorkerProcesses]:
    """Start worker processes; all killed at teardown."""
    started = WorkerProcesses(db_url, tmp_path)
    try:
        yield started
    finally:
        started.stop()


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


def _install_chromium() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=900, check=False)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium"], env=env, timeout=1800, check=False
    )


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium; installed with apt-get when missing and running as root.
    Skips (saying why) only where no browser can be installed."""
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_chromium()
        path = shutil.which("chromium")
    if path is None:
        pytest.skip(
            "no Chromium and it cannot be installed here (needs root and apt-get): "
            "install Debian's chromium package to run the browser test"
        )
    return path


@pytest.fixture
def browser(chromium_path: str) -> Iterator[Any]:
    """A headless Chromium driven by Playwright (the system browser, none downloaded).
    Per test: Playwright's sync API runs an event loop of its own on this thread, which
    must not outlive the test (other tests run their own loops)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path, headless=True)
        yield chromium
        chromium.close()
