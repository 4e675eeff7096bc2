"""Fixtures of the worker tests: the ledger table, the test application pointed at this
test's database, and real worker processes that are always killed at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from worker_app import LEDGER_DDL
from worker_processes import Workers, app_on

import pgjobs


@pytest.fixture
def ledger(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test database, with the ledger table created."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
        yield conn


@pytest.fixture
def wapp(db_url: str) -> Iterator[pgjobs.App]:
    """The worker test application, enqueueing into this test's database."""
    import worker_app

    with app_on(worker_app.app, db_url) as app:
        yield app


@pytest.fixture
def workers(
    db_url: str, ledger: psycopg.Connection[Any], wapp: pgjobs.App, tmp_path: Path
) -> Iterator[Workers]:
    """Start worker processes; all of them are killed at teardown."""
    started = Workers(db_url, tmp_path)
    try:
        yield started
    finally:
        started.cleanup()
