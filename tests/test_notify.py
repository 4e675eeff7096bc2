"""NOTIFY from enqueue: nothing before the enqueuing transaction commits, then one small
notification per queue per transaction on ``pgjobs_<schema>``; none for delayed jobs, none
for rolled-back work.

A listener cannot prove a negative by waiting, so every check ends with a sentinel: a
NOTIFY committed after the work under test. PostgreSQL delivers notifications in commit
order, so once the sentinel arrives every earlier notification has arrived too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgjobs
from pgjobs.enqueue import Options, make_spec

CHANNEL = "pgjobs_pgjobs"
SENTINEL = "sentinel"


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


@pytest.fixture
def listener(direct_db_url: str) -> Iterator[psycopg.Connection[Any]]:
    # LISTEN only works on a direct connection.
    with psycopg.connect(direct_db_url, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        yield conn


def received(listener: psycopg.Connection[Any], sender: psycopg.Connection[Any]) -> list[str]:
    """The payloads that reached ``listener`` before a sentinel sent now by ``sender``."""
    sender.execute("SELECT pg_notify(%s, %s)", (CHANNEL, SENTINEL))
    payloads = []
    for notify in listener.notifies(timeout=10):
        assert notify.channel == CHANNEL
        if notify.payload == SENTINEL:
            return payloads
        payloads.append(notify.payload)
    raise AssertionError(f"the sentinel did not arrive within 10 s (got {payloads})")


def by_queue(payloads: list[str]) -> set[str]:
    """The queues notified, checking that each was notified once with the bare payload."""
    decoded = [json.loads(p) for p in payloads]
    assert all(set(d) == {"queue"} for d in decoded), decoded
    queues = [d["queue"] for d in decoded]
    assert len(queues) == len(set(queues)), f"more than one notification per queue: {decoded}"
    return set(queues)


def register(app: pgjobs.App) -> pgjobs.Task[Any, Any]:
    @app.task(name="ping")
    def ping(n: int) -> None: ...

    return ping


def test_one_notification_per_queue_after_commit_only(
    app: pgjobs.App,
    db_url: str,
    listener: psycopg.Connection[Any],
    conn: psycopg.Connection[Any],
) -> None:
    ping = register(app)
    with psycopg.connect(db_url) as caller:
        for queue, count in (("a", 400), ("b", 350), ("c", 250)):
            ping.enqueue_many([{"n": i} for i in range(count)], conn=caller, queue=queue)
        assert received(listener, conn) == []
        caller.commit()
        assert by_queue(received(listener, conn)) == {"a", "b", "c"}


def test_one_statement_into_many_queues_notifies_once_per_queue(
    app: pgjobs.App, db_url: str, listener: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    # enqueue_many puts a batch in one queue; the writer below it takes mixed batches.
    specs = [
        make_spec("ping", {"n": i}, Options(queue=f"q{i % 3}"), {"priority": 0, "max_attempts": 3})
        for i in range(1000)
    ]
    with psycopg.connect(db_url) as caller:
        ids = app.writer.insert(caller, specs, "existing")
    assert len(ids) == 1000
    assert by_queue(received(listener, conn)) == {"q0", "q1", "q2"}


def test_rollback_and_rolled_back_savepoint_notify_nothing(
    app: pgjobs.App, db_url: str, listener: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    ping = register(app)
    with psycopg.connect(db_url) as caller:
        ping.enqueue(n=1, conn=caller, queue="gone")
        caller.rollback()
        with caller.transaction():
            ping.enqueue(n=2, conn=caller, queue="kept")
            with caller.transaction():
                ping.enqueue(n=3, conn=caller, queue="dropped")
                raise psycopg.Rollback()
    assert by_queue(received(listener, conn)) == {"kept"}


def test_delayed_jobs_do_not_notify(
    app: pgjobs.App, listener: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    from datetime import UTC, datetime, timedelta

    ping = register(app)
    ping.enqueue(n=1, delay=60, queue="later")
    ping.enqueue(n=2, run_at=datetime.now(UTC) + timedelta(hours=1), queue="later")
    ping.enqueue_many([{"n": 3}, {"n": 4}], delay=timedelta(minutes=5), queue="later")
    # A run_at in the past is runnable at once, so it does notify.
    ping.enqueue(n=5, run_at=datetime.now(UTC) - timedelta(hours=1), queue="now")
    assert by_queue(received(listener, conn)) == {"now"}
    states = conn.execute("SELECT state::text, count(*) FROM pgjobs.jobs GROUP BY 1 ORDER BY 1")
    assert states.fetchall() == [("available", 1), ("scheduled", 4)]


def test_payload_is_small_json_without_args(
    app: pgjobs.App, listener: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    @app.task(name="secretive")
    def secretive(token: str) -> None: ...

    secretive.enqueue(token="s3cr3t-" + "x" * 10_000, queue="private")
    [payload] = received(listener, conn)
    assert len(payload) < 100
    assert "s3cr3t" not in payload
    assert json.loads(payload) == {"queue": "private"}


def test_duplicates_that_insert_nothing_do_not_notify(
    app: pgjobs.App, listener: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    ping = register(app)
    first = ping.enqueue(n=1, unique_key="once", queue="u")
    assert by_queue(received(listener, conn)) == {"u"}
    assert ping.enqueue(n=1, unique_key="once", queue="u") == first
    assert received(listener, conn) == []


def test_notify_off(
    db_url: str, listener: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    with pgjobs.App(db_url, notify=False) as quiet:
        register(quiet).enqueue(n=1)
    assert received(listener, conn) == []
    assert conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone() == (1,)


def test_no_notification_while_the_notification_queue_is_over_the_limit(
    app: pgjobs.App,
    listener: psycopg.Connection[Any],
    conn: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A limit of 0 means "always over it": both the single-job statement and the bulk one
    # must then skip the NOTIFY and still insert.
    ping = register(app)
    monkeypatch.setattr("pgjobs.enqueue._NOTIFY_QUEUE_LIMIT", 0.0)
    ping.enqueue(n=1, queue="full")
    ping.enqueue_many([{"n": 2}, {"n": 3}], queue="full")
    assert received(listener, conn) == []
    monkeypatch.setattr("pgjobs.enqueue._NOTIFY_QUEUE_LIMIT", 0.5)
    ping.enqueue(n=4, queue="full")
    assert by_queue(received(listener, conn)) == {"full"}
    assert conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone() == (4,)


def test_single_enqueue_in_the_callers_transaction_notifies_at_commit_only(
    app: pgjobs.App,
    db_url: str,
    listener: psycopg.Connection[Any],
    conn: psycopg.Connection[Any],
) -> None:
    ping = register(app)
    with psycopg.connect(db_url) as caller:
        job_id = ping.enqueue(n=1, conn=caller, queue="tx")
        assert ping.enqueue(n=1, conn=caller, queue="tx", delay=30) != job_id
        assert received(listener, conn) == []
        assert conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone() == (0,)
        caller.commit()
    assert by_queue(received(listener, conn)) == {"tx"}


def test_many_statements_in_one_transaction_notify_once_per_queue(
    app: pgjobs.App, db_url: str, listener: psycopg.Connection[Any], conn: psycopg.Connection[Any]
) -> None:
    # PostgreSQL folds identical payloads of one transaction, so the payload names the
    # queue only: however many enqueue statements run, each queue is woken once.
    ping = register(app)
    with psycopg.connect(db_url) as caller:
        ping.enqueue(n=0, conn=caller, queue="busy")
        ping.enqueue_many([{"n": i} for i in range(3)], conn=caller, queue="busy")
        ping.enqueue_many([{"n": i} for i in range(7)], conn=caller, queue="busy")
        ping.enqueue(n=9, conn=caller, queue="other")
        caller.commit()
    payloads = received(listener, conn)
    assert len(payloads) == 2, payloads
    assert by_queue(payloads) == {"busy", "other"}
