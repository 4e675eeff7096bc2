"""The operator API (pgjobs.admin): listing, cancel, retry, the dead-letter queue, pause and
resume, retention in bounded batches, and the duration parser. Rows are set up with
direct SQL so every state and timestamp is exactly known."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from ops_helpers import add_job, pruned, state_of

import pgjobs
from pgjobs.admin import Admin, InvalidStateError, JobStateError, OperationError, Retention
from pgjobs.durations import DurationError, parse_duration, parse_retention

DAY = 86_400.0


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


@pytest.fixture
def admin(app: pgjobs.App) -> Admin:
    return Admin(app, operator="tester@here")


# -- listing ------------------------------------------------------------------------------


def test_list_jobs_filters_and_orders_newest_first(
    admin: Admin, conn: psycopg.Connection[Any]
) -> None:
    a = add_job(conn, queue="emails", task="send")
    b = add_job(conn, queue="emails", task="send", state="dead")
    c = add_job(conn, queue="reports", task="build")
    assert [r["id"] for r in admin.list_jobs()] == [c, b, a]
    assert [r["id"] for r in admin.list_jobs(queue="emails")] == [b, a]
    assert [r["id"] for r in admin.list_jobs(state="dead")] == [b]
    assert [r["id"] for r in admin.list_jobs(task="build")] == [c]
    assert [r["id"] for r in admin.list_jobs(limit=1)] == [c]
    assert admin.list_jobs(state="DEAD", queue="reports") == []


def test_list_jobs_rejects_an_unknown_state(admin: Admin) -> None:
    with pytest.raises(InvalidStateError, match=r"unknown job state 'done'.*succeeded"):
        admin.list_jobs(state="done")


# -- cancel -------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["available", "scheduled", "retryable", "pending"])
def test_cancel_a_job_that_has_not_started(
    admin: Admin, conn: psycopg.Connection[Any], state: str
) -> None:
    job_id = add_job(conn, state=state, errors_ago=[5.0] if state == "retryable" else None)
    job = admin.cancel_job(job_id)
    assert job.state == "cancelled"
    assert job.finished_at is not None
    last = job.errors[-1]
    assert last["type"] == "Cancelled" and last["operator"] == "tester@here"
    assert "cancelled by an operator" in last["message"]


def test_cancel_a_running_job_revokes_its_lease(
    admin: Admin, conn: psycopg.Connection[Any]
) -> None:
    running = add_job(conn, state="running")
    job = admin.cancel_job(running)
    assert (job.state, job.lease_token) == ("cancelled", None)
    assert job.errors[-1]["type"] == "Cancelled" and job.errors[-1]["worker"] == job.worker


def test_cancel_refuses_final_and_unknown_jobs(admin: Admin, conn: psycopg.Connection[Any]) -> None:
    done = add_job(conn, state="succeeded")
    with pytest.raises(JobStateError, match="already succeeded"):
        admin.cancel_job(done)
    with pytest.raises(pgjobs.JobNotFoundError, match="no job with id 999999"):
        admin.cancel_job(999_999)
    assert state_of(conn, done) == "succeeded"


# -- retry --------------------------------------------------------------------------------


def test_retry_a_dead_job_gives_it_one_more_attempt(
    admin: Admin, conn: psycopg.Connection[Any]
) -> None:
    job_id = add_job(conn, state="dead", max_attempts=3, errors_ago=[30, 20, 10])
    conn.execute("LISTEN pgjobs_pgjobs")
    job = admin.retry_job(job_id)
    assert (job.state, job.attempts, job.max_attempts) == ("available", 3, 4)
    assert job.finished_at is None
    assert [e["type"] for e in job.errors] == ["Boom", "Boom", "Boom", "Retried"]
    assert job.errors[-1]["operator"] == "tester@here"
    # Workers are woken the way enqueue wakes them: one notification for the queue.
    note = next(conn.notifies(timeout=5, stop_after=1))
    assert json.loads(note.payload) == {"queue": "default"}
    # ...and the claim's own condition now holds: the job is runnable.
    runnable = conn.execute(
        "SELECT state = 'available' AND run_at <= now() AND attempts < max_attempts "
        "FROM pgjobs.jobs WHERE id = %s",
        [job_id],
    ).fetchone()
    assert runnable == (True,)


@pytest.mark.parametrize("state", ["cancelled", "retryable", "scheduled"])
def test_retry_other_waiting_or_stopped_states(
    admin: Admin, conn: psycopg.Connection[Any], state: str
) -> None:
    job_id = add_job(conn, state=state, run_at_ago=-3600, max_attempts=5)
    job = admin.retry_job(job_id)
    assert job.state == "available" and job.max_attempts == 5  # attempts left: unchanged
    row = conn.execute("SELECT run_at <= now() FROM pgjobs.jobs WHERE id = %s", [job_id])
    assert row.fetchone() == (True,)


def test_retry_refuses_succeeded_running_unknown_and_duplicate_keys(
    admin: Admin, conn: psycopg.Connection[Any]
) -> None:
    done = add_job(conn, state="succeeded")
    running = add_job(conn, state="running")
    dead = add_job(conn, state="dead", unique_key="user-1")
    live = add_job(conn, state="available", unique_key="user-1")
    with pytest.raises(JobStateError, match="it is succeeded"):
        admin.retry_job(done)
    with pytest.raises(JobStateError, match="it is running"):
        admin.retry_job(running)
    with pytest.raises(pgjobs.JobNotFoundError):
        admin.retry_job(424_242)
    with pytest.raises(JobStateError, match="unique key 'user-1' is held"):
        admin.retry_job(dead)
    assert (state_of(conn, dead), state_of(conn, live)) == ("dead", "available")


# -- dead-letter queue --------------------------------------------------------------------


def test_dead_list_and_show(admin: Admin, conn: psycopg.Connection[Any]) -> None:
    old = add_job(conn, state="dead", task="a", finished_ago=100, errors_ago=[101])
    new = add_job(conn, state="dead", task="b", finished_ago=10, errors_ago=[11])
    add_job(conn, state="succeeded")
    rows = admin.dead_jobs()
    assert [r["id"] for r in rows] == [new, old]
    assert rows[0]["last_error_type"] == "Boom" and rows[0]["last_error"] == "failure 1"
    assert [r["id"] for r in admin.dead_jobs(task="a")] == [old]
    assert admin.get_dead_job(old).id == old
    alive = add_job(conn)
    with pytest.raises(pgjobs.JobNotFoundError, match="not dead"):
        admin.get_dead_job(alive)


def test_dead_retry_by_ids_all_and_task_in_batches(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    admin = Admin(app, batch_size=2)  # several batches for five jobs
    a = [add_job(conn, state="dead", task="a") for _ in range(3)]
    b = [add_job(conn, state="dead", task="b") for _ in range(2)]
    other = add_job(conn, state="succeeded", task="a")

    by_ids = admin.retry_dead([a[0], other, 777_777])
    assert by_ids.done == [a[0]]
    assert set(by_ids.skipped) == {other, 777_777}
    assert "not found" in by_ids.skipped[777_777]

    by_task = admin.retry_dead(task="a")
    assert by_task.done == a[1:]
    assert [state_of(conn, j) for j in b] == ["dead", "dead"]

    everything = admin.retry_dead(all_jobs=True)
    assert everything.done == b
    assert state_of(conn, other) == "succeeded"
    with pytest.raises(OperationError, match="ids, --all or --task"):
        admin.retry_dead()


def test_dead_retry_of_two_jobs_sharing_a_key_retries_only_the_oldest(
    admin: Admin, conn: psycopg.Connection[Any]
) -> None:
    first = add_job(conn, state="dead", unique_key="k")
    second = add_job(conn, state="dead", unique_key="k")
    result = admin.retry_dead(all_jobs=True)
    assert result.done == [first]
    assert "unique key 'k'" in result.skipped[second]


def test_dead_delete_and_purge(admin: Admin, conn: psycopg.Connection[Any]) -> None:
    dead = add_job(conn, state="dead")
    alive = add_job(conn, state="available")
    result = admin.delete_dead([dead, alive, 55_555])
    assert result.done == [dead]
    assert set(result.skipped) == {alive, 55_555}
    assert (state_of(conn, dead), state_of(conn, alive)) == (None, "available")

    old = add_job(conn, state="dead", finished_ago=8 * DAY)
    recent = add_job(conn, state="dead", finished_ago=6 * DAY)
    old_success = add_job(conn, state="succeeded", finished_ago=8 * DAY)
    assert admin.purge_dead(timedelta(days=7)) == 1
    assert state_of(conn, old) is None
    assert (state_of(conn, recent), state_of(conn, old_success)) == ("dead", "succeeded")


# -- retention ----------------------------------------------------------------------------


def test_prune_deletes_only_what_is_past_retention_per_state_in_batches(
    app: pgjobs.App, conn: psycopg.Connection[Any]
) -> None:
    expired_ok = [add_job(conn, state="succeeded", finished_ago=2 * DAY) for _ in range(7)]
    fresh_ok = add_job(conn, state="succeeded", finished_ago=DAY - 600)
    expired_cancel = add_job(conn, state="cancelled", finished_ago=8 * DAY)
    fresh_cancel = add_job(conn, state="cancelled", finished_ago=6 * DAY)
    ancient_dead = add_job(conn, state="dead", finished_ago=365 * DAY)
    live = [
        add_job(conn, state=s, run_at_ago=30 * DAY)
        for s in ("available", "running", "scheduled", "retryable", "pending")
    ]

    # Count statements: a batch of 3 needs three DELETEs for seven rows (3 + 3 + 1).
    statements: list[str] = []
    admin = Admin(app, batch_size=3)
    original = admin._rows

    def spy(query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        statements.append(f"{query}:{(params or {}).get('state')}")
        return original(query, params)

    admin._rows = spy  # type: ignore[method-assign]
    assert pruned(admin.prune()) == {"succeeded": 7, "cancelled": 1, "dead": 0}
    assert statements.count("prune_batch:succeeded") == 3
    assert "prune_batch:dead" not in statements  # dead: kept until handled

    assert all(state_of(conn, j) is None for j in [*expired_ok, expired_cancel])
    assert state_of(conn, fresh_ok) == "succeeded"
    assert state_of(conn, fresh_cancel) == "cancelled"
    assert state_of(conn, ancient_dead) == "dead"
    assert [state_of(conn, j) for j in live] == [
        "available",
        "running",
        "scheduled",
        "retryable",
        "pending",
    ]

    # Dead jobs go only when a retention is given for them; a zero period prunes all.
    assert pruned(
        Admin(app).prune(Retention(succeeded=None, cancelled=None, dead=timedelta(0)))
    ) == {
        "succeeded": 0,
        "cancelled": 0,
        "dead": 1,
    }
    assert state_of(conn, ancient_dead) is None
    assert state_of(conn, fresh_ok) == "succeeded"


# -- queues -------------------------------------------------------------------------------


def test_pause_and_resume_are_kept_in_the_database(
    admin: Admin, conn: psycopg.Connection[Any]
) -> None:
    paused = admin.pause_queue("emails")
    assert paused["paused"] is True and paused["paused_at"] is not None
    again = admin.pause_queue("emails")
    assert again["paused_at"] == paused["paused_at"]  # paused since the first pause
    row = conn.execute("SELECT paused, paused_at FROM pgjobs.queues WHERE name = 'emails'")
    assert row.fetchone() == (True, paused["paused_at"])
    assert [(q["name"], q["paused"]) for q in admin.queues()] == [("emails", True)]

    resumed = admin.resume_queue("emails")
    assert (resumed["paused"], resumed["paused_at"]) == (False, None)
    assert [(q["name"], q["paused"]) for q in admin.queues()] == [("emails", False)]
    with pytest.raises(pgjobs.InvalidNameError):
        admin.pause_queue("bad name!")


# -- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("30m", 1800),
        ("12h", 43_200),
        ("7d", 604_800),
        ("1d12h", 129_600),
        ("2w", 1_209_600),
        ("1h30m15s", 5415),
        ("90", 90),
        ("1.5h", 5400),
        (" 10M ", 600),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "x", "7x", "d7", "12h1d", "1d1d", "-5m", "1 d", "-3"])
def test_parse_duration_rejects_bad_input(text: str) -> None:
    with pytest.raises(DurationError, match="invalid duration"):
        parse_duration(text)


def test_parse_retention_accepts_never() -> None:
    assert parse_retention("never") is None
    assert parse_retention("1d") == timedelta(days=1)
    with pytest.raises(DurationError):
        parse_retention("sometimes")


def test_dead_retry_racing_an_uncommitted_enqueue_of_the_same_key_skips_only_that_job(
    admin: Admin, conn: psycopg.Connection[Any], db_url: str
) -> None:
    import threading

    keyed = add_job(conn, state="dead", unique_key="race")
    plain = add_job(conn, state="dead")
    with psycopg.connect(db_url) as producer:
        # A producer inserts the same key and has not committed yet: the retry's snapshot
        # cannot see it, only the unique index can.
        producer.execute(
            "INSERT INTO pgjobs.jobs (task, unique_key) VALUES ('t.task', 'race') RETURNING id"
        )
        outcome: dict[str, Any] = {}

        def retry() -> None:
            try:
                outcome["result"] = admin.retry_dead([keyed, plain])
            except Exception as exc:  # the failure under test: reported, not raised
                outcome["error"] = exc

        thread = threading.Thread(target=retry)
        thread.start()
        # The retry waits on the producer's key; once the producer commits, it must skip.
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
        for _ in range(200):
            if conn.execute(waiting).fetchone()[0]:  # type: ignore[index]
                break
            thread.join(0.05)
        producer.commit()
        thread.join(10)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome
    result = outcome["result"]
    assert result.done == [plain]
    assert "unique key 'race'" in result.skipped[keyed]
    assert state_of(conn, keyed) == "dead" and state_of(conn, plain) == "available"
