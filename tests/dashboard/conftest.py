"""Fixtures of the dashboard tests: the dashboard on this test's database (in-process
through Starlette's TestClient, or served by uvicorn on a loopback port), real worker
processes, and a headless Chromium (Debian's package, installed here when missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dash_helpers import APP, LiveServer
from starlette.testclient import TestClient
from worker_processes import Workers, app_on

import pgjobs
from pgjobs.dashboard import create_app


@pytest.fixture
def dapp(db_url: str) -> Iterator[pgjobs.App]:
    """The dashboard tests' application, on this test's database."""
    import dash_app

    with app_on(dash_app.app, db_url) as app:
        yield app


@pytest.fixture
def client(dapp: pgjobs.App) -> Iterator[TestClient]:
    """The dashboard in-process, with its lifespan (and so its event hub) running."""
    with TestClient(create_app(dapp)) as test_client:
        yield test_client


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


@pytest.fixture
def workers(db_url: str, tmp_path: Path) -> Iterator[Workers]:
    """Start worker processes of the dashboard app on queue ``dash``; all killed at
    teardown."""
    started = Workers(db_url, tmp_path, app=APP, queues="dash")
    try:
        yield started
    finally:
        started.cleanup()


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
