"""Fixtures of the flow-control tests: the flow test application pointed at this test's
database, its flow_log table, and real worker processes that are always killed at
teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flow_helpers import FLOW_APP, Workers
from worker_processes import app_on

import pgjobs


@pytest.fixture
def flow_log(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test database, with flow_log created."""
    from flow_app import FLOW_LOG_DDL

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(FLOW_LOG_DDL)
        yield conn


@pytest.fixture
def flow(db_url: str) -> Iterator[pgjobs.App]:
    """The flow test application, pointed at this test's database."""
    import flow_app

    with app_on(flow_app.app, db_url) as app:
        yield app


@pytest.fixture
def flow_workers(
    db_url: str, flow_log: psycopg.Connection[Any], flow: pgjobs.App, tmp_path: Path
) -> Iterator[Workers]:
    """Start worker processes of the flow app; all are killed at teardown."""
    started = Workers(db_url, tmp_path, app=FLOW_APP)
    try:
        yield started
    finally:
        started.cleanup()
