"""Bulk enqueue: ``enqueue_many`` writes any number of jobs with one statement, returns their
ids in input order, applies the options to every job, and resolves unique keys in bulk
(duplicates within the batch and live jobs that already hold a key).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import pgjobs

N = 10_000


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


def register(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    @app.task(name="index", queue="bulk")
    def index(n: int, label: str) -> None: ...

    return index


def assert_written_by_one_statement(conn: psycopg.Connection[Any], ids: list[int | None]) -> None:
    """Every row came from one statement of one transaction: rows of one statement share
    the inserting transaction id (xmin) and command id (cmin); a loop of INSERTs would
    leave one command id per row. Their args match the input, position by position."""
    rows = conn.execute(
        "SELECT id, (args->>'n')::int, xmin::text, cmin::text FROM pgjobs.jobs ORDER BY id"
    ).fetchall()
    assert len(rows) == N
    assert [r[0] for r in rows] == ids
    assert [r[1] for r in rows] == list(range(N))
    assert len({(r[2], r[3]) for r in rows}) == 1


def test_ten_thousand_jobs_in_one_statement(
    app: pgjobs.App, db_url: str, conn: psycopg.Connection[Any]
) -> None:
    index = register(app)
    with psycopg.connect(db_url) as caller:
        ids = index.enqueue_many([{"n": i, "label": f"item {i}"} for i in range(N)], conn=caller)
        assert conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone() == (0,)
    assert len(ids) == N
    # ids ascend with the input, so position i is the job of item i.
    assert all(isinstance(i, int) for i in ids) and ids == sorted(ids)
    assert_written_by_one_statement(conn, ids)
    assert app.get_job(ids[1234]).args == {"n": 1234, "label": "item 1234"}


async def test_ten_thousand_jobs_async(app: pgjobs.App, conn: psycopg.Connection[Any]) -> None:
    index = register(app)
    try:
        ids = await index.enqueue_many_async(
            ({"n": i, "label": "x"} for i in range(N)), priority=5, queue="other"
        )
    finally:
        await app.aclose()
    assert_written_by_one_statement(conn, ids)
    summary = conn.execute(
        "SELECT queue, priority, state::text, task, count(*) FROM pgjobs.jobs GROUP BY 1, 2, 3, 4"
    ).fetchall()
    assert summary == [("other", 5, "available", "index", N)]


def test_options_apply_to_every_job(app: pgjobs.App, conn: psycopg.Connection[Any]) -> None:
    index = register(app)
    ids = index.enqueue_many(
        [{"n": i, "label": "x"} for i in range(3)],
        delay=3600,
        max_attempts=2,
        meta={"source": "import"},
    )
    rows = conn.execute(
        "SELECT id, state::text, max_attempts, meta, queue, "
        "run_at > now() + interval '59 minutes' FROM pgjobs.jobs ORDER BY id"
    ).fetchall()
    assert rows == [(i, "scheduled", 2, {"source": "import"}, "bulk", True) for i in ids]


def test_by_name_for_a_task_defined_elsewhere(db_url: str, conn: psycopg.Connection[Any]) -> None:
    with pgjobs.App(db_url, strict_tasks=False) as producer:
        ids = producer.enqueue_many(
            "billing.charge", [{"cents": 100}, {"cents": 250}], queue="billing"
        )
    rows = conn.execute("SELECT id, task, queue, args FROM pgjobs.jobs ORDER BY id").fetchall()
    assert rows == [
        (ids[0], "billing.charge", "billing", {"cents": 100}),
        (ids[1], "billing.charge", "billing", {"cents": 250}),
    ]


def test_empty_batch_writes_nothing(offline_app: pgjobs.App) -> None:
    # An empty batch returns before any connection is made (the offline app has none).
    index = register(offline_app)
    assert index.enqueue_many([]) == []
    assert offline_app.enqueue_many("index", []) == []


def test_unique_key_callable_resolves_duplicates_in_bulk(
    app: pgjobs.App, db_url: str, conn: psycopg.Connection[Any]
) -> None:
    @app.task(name="enrol")
    def enrol(user: int, course: str) -> None: ...

    def per_user_course(args: dict[str, Any]) -> str:
        return f"enrol:{args['user']}:{args['course']}"

    existing = enrol.enqueue(user=1, course="sql", unique_key="enrol:1:sql")
    items = [
        {"user": 1, "course": "sql"},  # a live job already holds this key
        {"user": 2, "course": "sql"},  # new
        {"user": 2, "course": "sql"},  # duplicate of the previous item, same batch
        {"user": 3, "course": "go"},  # new
        {"user": 1, "course": "sql"},  # the live job again
    ]
    with psycopg.connect(db_url) as caller:
        ids = enrol.enqueue_many(items, conn=caller, unique_key=per_user_course)
        # The caller's transaction is intact after skipped duplicates.
        assert caller.execute("SELECT 1").fetchone() == (1,)
    assert ids[0] == existing and ids[4] == existing
    assert ids[1] == ids[2] and ids[1] not in (None, existing)
    assert ids[3] not in (None, existing, ids[1])
    rows = conn.execute("SELECT id, unique_key FROM pgjobs.jobs ORDER BY id").fetchall()
    assert rows == [
        (existing, "enrol:1:sql"),
        (ids[1], "enrol:2:sql"),
        (ids[3], "enrol:3:go"),
    ]


def test_unique_key_in_bulk_with_on_duplicate_none(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    index = register(app)
    index.enqueue(n=0, label="a", unique_key="k0")
    ids = index.enqueue_many(
        [{"n": n, "label": "a"} for n in (0, 1, 1, 2)],
        unique_key=lambda a: f"k{a['n']}",
        on_duplicate="none",
    )
    assert ids[0] is None and ids[2] is None
    assert isinstance(ids[1], int) and isinstance(ids[3], int)
    keys = [r[0] for r in conn.execute("SELECT unique_key FROM pgjobs.jobs ORDER BY id")]
    assert keys == ["k0", "k1", "k2"]


def test_finished_job_releases_its_unique_key(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    index = register(app)
    first = index.enqueue(n=0, label="a", unique_key="nightly")
    assert index.enqueue(n=0, label="a", unique_key="nightly") == first
    conn.execute(
        "UPDATE pgjobs.jobs SET state = 'succeeded', finished_at = now() WHERE id = %s", (first,)
    )
    [second] = index.enqueue_many([{"n": 0, "label": "a"}], unique_key=lambda _: "nightly")
    assert second is not None and second != first
    assert index.enqueue(n=0, label="a", unique_key="nightly") == second


@pytest.mark.parametrize("bad_key", [lambda _: "", lambda _: 42, lambda _: None])
def test_unique_key_callable_must_return_a_string(offline_app: pgjobs.App, bad_key: Any) -> None:
    index = register(offline_app)
    with pytest.raises(pgjobs.InvalidJobError, match="unique_key"):
        index.enqueue_many([{"n": 1, "label": "a"}], unique_key=bad_key)
