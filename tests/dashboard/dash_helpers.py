"""Helpers of the dashboard tests: reading pages and event streams, and a dashboard
served by a real uvicorn (worker processes and waiting come from tests/worker_processes.py).
The fixtures that use them are in this folder's conftest.py."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import uvicorn
from worker_processes import wait_until

from pgjobs.settings import events_application_name

APP = "tests.dashboard.dash_app:app"
SUBSCRIBER = events_application_name("pgjobs")

__all__ = ["APP", "LiveServer", "csrf_token", "read_events", "subscribed", "wait_until"]


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
