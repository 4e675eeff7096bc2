"""The harness itself: a migrated database per test."""

from __future__ import annotations

import pgjobs


def test_fresh_migrated_database(app: pgjobs.App, conn) -> None:
    @app.task
    def hello(name: str) -> str:
        return name

    job_id = hello.enqueue(name="x")
    assert app.get_job(job_id).args == {"name": "x"}
    assert conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone() == (1,)


def test_each_test_starts_empty(conn) -> None:
    assert conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone() == (0,)
