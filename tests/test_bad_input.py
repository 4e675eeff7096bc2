"""Bad input: each mistake raises its specific pgjobs exception before anything is written,
and leaves the caller's transaction usable. Also: bad schema names, a database that is down,
and a database without pgjobs' schema.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy
from sqlalchemy.orm import Session

import pgjobs
from pgjobs.database import sqlalchemy_url

Call = Callable[[pgjobs.App, pgjobs.Task[Any, Any], Any], object]
GOOD = {"to": "a@b.c", "subject": "hi"}


@pytest.fixture(scope="module")
def shared_app(module_db_url: str) -> Iterator[pgjobs.App]:
    """One App for the module: every case rolls its transaction back, so they can share."""
    with pgjobs.App(module_db_url) as application:

        @application.task(name="send_email", queue="emails")
        def send_email(to: str, subject: str) -> None: ...

        yield application


def send(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    return app.tasks["send_email"]


def with_args(**changes: Any) -> Call:
    return lambda app, task, conn: task.enqueue(conn=conn, **{**GOOD, **changes})


def with_option(**option: Any) -> Call:
    return lambda app, task, conn: task.enqueue(conn=conn, **GOOD, **option)


CASES: dict[str, tuple[Call, type[pgjobs.PgJobsError]]] = {
    # Arguments that JSON or jsonb cannot carry.
    "object arg": (with_args(subject=object()), pgjobs.PayloadError),
    "set arg": (with_args(subject={1, 2}), pgjobs.PayloadError),
    "datetime arg": (with_args(subject=datetime.now(UTC)), pgjobs.PayloadError),
    "bytes arg": (with_args(subject=b"hi"), pgjobs.PayloadError),
    "NaN arg": (with_args(subject=math.nan), pgjobs.PayloadError),
    "infinite arg": (with_args(subject=[1.0, math.inf]), pgjobs.PayloadError),
    "NUL in value": (with_args(subject="a\x00b"), pgjobs.PayloadError),
    "NUL in nested key": (with_args(subject={"k\x00": 1}), pgjobs.PayloadError),
    "lone surrogate": (with_args(subject="\ud800"), pgjobs.PayloadError),
    "non-string arg name": (
        lambda app, task, conn: app.enqueue("send_email", {1: "x"}, conn=conn),
        pgjobs.InvalidJobError,
    ),
    "args not a dict": (
        lambda app, task, conn: app.enqueue("send_email", ["a@b.c", "hi"], conn=conn),  # type: ignore[arg-type]
        pgjobs.InvalidJobError,
    ),
    "meta not JSON": (with_option(meta={"at": datetime.now(UTC)}), pgjobs.PayloadError),
    "meta not a dict": (with_option(meta=["x"]), pgjobs.InvalidJobError),
    # Tasks.
    "unknown task": (
        lambda app, task, conn: app.enqueue("send_emails", GOOD, conn=conn),
        pgjobs.UnknownTaskError,
    ),
    "missing argument": (
        lambda app, task, conn: task.enqueue(to="a@b.c", conn=conn),
        pgjobs.InvalidJobError,
    ),
    "unexpected argument": (with_args(cc="x@y.z"), pgjobs.InvalidJobError),
    "misspelt option": (with_option(qeue="emails"), pgjobs.InvalidJobError),
    "missing argument by name": (
        lambda app, task, conn: app.enqueue("send_email", {"to": "a@b.c"}, conn=conn),
        pgjobs.InvalidJobError,
    ),
    # Queue names: never spliced into SQL, but still refused when odd.
    "queue with spaces": (with_option(queue="my queue"), pgjobs.InvalidNameError),
    "empty queue": (with_option(queue=""), pgjobs.InvalidNameError),
    "200-char queue": (with_option(queue="q" * 200), pgjobs.InvalidNameError),
    "SQL in queue": (with_option(queue="x'; DROP TABLE jobs; --"), pgjobs.InvalidNameError),
    "quote in queue": (with_option(queue='x"y'), pgjobs.InvalidNameError),
    "queue not a str": (with_option(queue=5), pgjobs.InvalidNameError),
    # Timing.
    "negative delay": (with_option(delay=-1), pgjobs.InvalidJobError),
    "negative timedelta": (with_option(delay=timedelta(seconds=-5)), pgjobs.InvalidJobError),
    "NaN delay": (with_option(delay=math.nan), pgjobs.InvalidJobError),
    "delay as text": (with_option(delay="10"), pgjobs.InvalidJobError),
    # Would overflow the timestamp in SQL and abort the caller's transaction.
    "delay beyond range": (with_option(delay=1e300), pgjobs.InvalidJobError),
    "timedelta.max delay": (with_option(delay=timedelta.max), pgjobs.InvalidJobError),
    "naive run_at": (with_option(run_at=datetime(2030, 1, 1)), pgjobs.InvalidJobError),
    "run_at as text": (with_option(run_at="2030-01-01T00:00:00Z"), pgjobs.InvalidJobError),
    "run_at and delay": (
        with_option(run_at=datetime.now(UTC), delay=5),
        pgjobs.InvalidJobError,
    ),
    # Numbers.
    "priority too high": (with_option(priority=101), pgjobs.InvalidJobError),
    "priority too low": (with_option(priority=-101), pgjobs.InvalidJobError),
    "priority float": (with_option(priority=1.5), pgjobs.InvalidJobError),
    "priority text": (with_option(priority="1"), pgjobs.InvalidJobError),
    "priority bool": (with_option(priority=True), pgjobs.InvalidJobError),
    "max_attempts 0": (with_option(max_attempts=0), pgjobs.InvalidJobError),
    "max_attempts negative": (with_option(max_attempts=-3), pgjobs.InvalidJobError),
    "max_attempts float": (with_option(max_attempts=2.0), pgjobs.InvalidJobError),
    "max_attempts beyond int4": (with_option(max_attempts=2**31), pgjobs.InvalidJobError),
    # Unique keys.
    "empty unique_key": (with_option(unique_key=""), pgjobs.InvalidJobError),
    "unique_key not a str": (with_option(unique_key=7), pgjobs.InvalidJobError),
    "NUL in unique_key": (with_option(unique_key="a\x00b"), pgjobs.InvalidJobError),
    "lone surrogate in unique_key": (with_option(unique_key="\udfff"), pgjobs.InvalidJobError),
    # Too long for a btree index entry: would abort the caller's transaction in SQL.
    "10 kB unique_key": (with_option(unique_key="k" * 10_000), pgjobs.InvalidJobError),
    "unknown on_duplicate": (with_option(on_duplicate="ignore"), pgjobs.InvalidJobError),
    # Bulk: one bad item or option stops the whole batch before the statement.
    "bad item in a batch": (
        lambda app, task, conn: task.enqueue_many([GOOD, {**GOOD, "subject": object()}], conn=conn),
        pgjobs.PayloadError,
    ),
    "item not a dict": (
        lambda app, task, conn: task.enqueue_many([GOOD, "x"], conn=conn),
        pgjobs.InvalidJobError,
    ),
    "unknown bulk option": (
        lambda app, task, conn: task.enqueue_many([GOOD], conn=conn, prioriti=1),
        pgjobs.InvalidJobError,
    ),
    "unknown bulk option by name": (
        lambda app, task, conn: app.enqueue_many("send_email", [GOOD], conn=conn, bogus=1),
        pgjobs.InvalidJobError,
    ),
    "unknown option by name": (
        lambda app, task, conn: app.enqueue("send_email", GOOD, conn=conn, prioriti=1),
        pgjobs.InvalidJobError,
    ),
    "bulk unique_key not callable": (
        lambda app, task, conn: task.enqueue_many([GOOD], conn=conn, unique_key="k"),
        pgjobs.InvalidJobError,
    ),
    "bulk unique_key too long": (
        lambda app, task, conn: task.enqueue_many(
            [GOOD], conn=conn, unique_key=lambda a: a["to"] * 1000
        ),
        pgjobs.InvalidJobError,
    ),
    "bulk negative delay": (
        lambda app, task, conn: task.enqueue_many([GOOD], conn=conn, delay=-1),
        pgjobs.InvalidJobError,
    ),
}


def count_jobs(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_before_writing(
    shared_app: pgjobs.App, module_db_url: str, case: str
) -> None:
    call, expected = CASES[case]
    task = send(shared_app)
    with psycopg.connect(module_db_url) as caller:
        before = count_jobs(caller)
        task.enqueue(conn=caller, **GOOD)
        with pytest.raises(expected) as raised:
            call(shared_app, task, caller)
        assert type(raised.value) is expected
        assert str(raised.value)  # a message that says what is wrong
        # The caller's transaction is still usable and holds only the good job.
        assert caller.execute("SELECT 1").fetchone() == (1,)
        assert count_jobs(caller) == before + 1
        caller.rollback()


@pytest.mark.parametrize("case", ["object arg", "unknown task", "SQL in queue", "naive run_at"])
async def test_bad_input_async(shared_app: pgjobs.App, module_db_url: str, case: str) -> None:
    expected = CASES[case][1]
    task = send(shared_app)
    async with await psycopg.AsyncConnection.connect(module_db_url) as caller:
        await task.enqueue_async(conn=caller, **GOOD)
        with pytest.raises(expected):
            if case == "object arg":
                await task.enqueue_async(conn=caller, to="a", subject=object())
            elif case == "unknown task":
                await shared_app.enqueue_async("nope", GOOD, conn=caller)
            elif case == "SQL in queue":
                await task.enqueue_many_async([GOOD], conn=caller, queue="x'; DROP TABLE jobs; --")
            else:
                await task.enqueue_async(conn=caller, run_at=datetime(2030, 1, 1), **GOOD)
        assert await (await caller.execute("SELECT 1")).fetchone() == (1,)
        await caller.rollback()


def test_bad_input_keeps_a_sqlalchemy_session_usable(
    shared_app: pgjobs.App, module_db_url: str
) -> None:
    engine = sqlalchemy.create_engine(sqlalchemy_url(module_db_url))
    try:
        with Session(engine) as session:
            send(shared_app).enqueue(conn=session, **GOOD)
            with pytest.raises(pgjobs.PayloadError):
                send(shared_app).enqueue(conn=session, to="a", subject={1})
            assert session.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
            session.rollback()
    finally:
        engine.dispose()


def test_literal_backslash_u0000_text_is_not_a_nul(
    shared_app: pgjobs.App, module_db_url: str
) -> None:
    # The six characters \u0000 are fine; only a real NUL character is refused.
    with psycopg.connect(module_db_url) as caller:
        job_id = send(shared_app).enqueue(conn=caller, to="a", subject="\\u0000 and \\\\u0000")
        assert job_id is not None
        job = shared_app.get_job(job_id, conn=caller)
        assert job.args["subject"] == "\\u0000 and \\\\u0000"
        caller.rollback()


def test_task_names_are_validated_when_not_strict() -> None:
    # A closed port: validation must fail before any connection is attempted.
    loose = pgjobs.App("postgresql://postgres@127.0.0.1:1/nowhere", strict_tasks=False)
    for name in ("", "has space", "x'; DROP TABLE jobs; --", "t" * 256):
        with pytest.raises(pgjobs.InvalidNameError):
            loose.enqueue(name, {})


def test_bad_task_options_fail_at_registration(offline_app: pgjobs.App) -> None:
    for options, expected in (
        ({"queue": "bad queue"}, pgjobs.InvalidNameError),
        ({"priority": 1000}, pgjobs.InvalidJobError),
        ({"max_attempts": 0}, pgjobs.InvalidJobError),
        ({"timeout": -1}, pgjobs.ConfigurationError),
        ({"name": "bad name"}, pgjobs.InvalidNameError),
    ):
        with pytest.raises(expected):
            offline_app.task(**options)(lambda: None)


@pytest.mark.parametrize(
    "schema",
    ["Pgjobs", "my schema", 'x"; DROP SCHEMA public CASCADE; --', "", "s" * 49, "1jobs", "pg-jobs"],
)
def test_invalid_schema_names(schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(pgjobs.InvalidNameError, match="schema"):
        pgjobs.App("postgresql://localhost/x", schema=schema)
    monkeypatch.setenv("PGJOBS_SCHEMA", schema or " ")
    with pytest.raises(pgjobs.InvalidNameError, match="schema"):
        pgjobs.App("postgresql://localhost/x")


# -- the database itself -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_database_down_fails_fast_with_a_clear_error(offline_app: pgjobs.App) -> None:
    send_email = offline_app.task(name="send_email")(lambda to: None)
    for attempt in (
        lambda: send_email.enqueue(to="a"),
        lambda: offline_app.enqueue("send_email", {"to": "a"}),
        lambda: offline_app.get_job(1),
    ):
        started = time.monotonic()
        with pytest.raises(pgjobs.DatabaseError, match="cannot connect to the database") as raised:
            attempt()
        assert time.monotonic() - started < 15
        assert "127.0.0.1" in str(raised.value) or "refused" in str(raised.value)


@pytest.mark.timeout(60)
async def test_database_down_fails_fast_async(offline_app: pgjobs.App) -> None:
    send_email = offline_app.task(name="send_email")(lambda to: None)
    started = time.monotonic()
    with pytest.raises(pgjobs.DatabaseError, match="cannot connect to the database"):
        await send_email.enqueue_async(to="a")
    assert time.monotonic() - started < 15


def test_unmigrated_database_points_at_pgjobs_migrate(empty_db_url: str) -> None:
    with pgjobs.App(empty_db_url) as app:
        send_email = app.task(name="send_email")(lambda to: None)
        with pytest.raises(pgjobs.SchemaNotReadyError, match="pgjobs migrate"):
            send_email.enqueue(to="a")
        with pytest.raises(pgjobs.SchemaNotReadyError, match="pgjobs migrate"):
            app.get_job(1)
        with (
            psycopg.connect(empty_db_url) as caller,
            pytest.raises(pgjobs.SchemaNotReadyError, match="pgjobs migrate"),
        ):
            send_email.enqueue_many([{"to": "a"}], conn=caller)


async def test_unmigrated_database_async(empty_db_url: str) -> None:
    async with pgjobs.App(empty_db_url) as app:
        send_email = app.task(name="send_email")(lambda to: None)
        with pytest.raises(pgjobs.SchemaNotReadyError, match="pgjobs migrate"):
            await send_email.enqueue_async(to="a")
        with pytest.raises(pgjobs.SchemaNotReadyError, match="pgjobs migrate"):
            await app.get_job_async(1)
