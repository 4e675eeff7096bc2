"""The table's own guards: direct SQL that breaks the job model is refused by PostgreSQL,
whoever writes it (an operator in psql, a buggy worker). Every statement runs in a
transaction that is rolled back, so the cases share one database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

VALID = "INSERT INTO pgjobs.jobs (task) VALUES ('t') RETURNING id"

CHECK_CASES = {
    "attempts above max_attempts": (
        "INSERT INTO pgjobs.jobs (task, attempts, max_attempts) VALUES ('t', 3, 2)",
        "jobs_attempts_range",
    ),
    "negative attempts": (
        "INSERT INTO pgjobs.jobs (task, attempts) VALUES ('t', -1)",
        "jobs_attempts_range",
    ),
    "max_attempts 0": (
        "INSERT INTO pgjobs.jobs (task, attempts, max_attempts) VALUES ('t', 0, 0)",
        "jobs_attempts_range",
    ),
    "priority 500": (
        "INSERT INTO pgjobs.jobs (task, priority) VALUES ('t', 500)",
        "jobs_priority_range",
    ),
    "running without lease_token": (
        "INSERT INTO pgjobs.jobs (task, state, worker, started_at) "
        "VALUES ('t', 'running', 'w', now())",
        "jobs_lease_only_while_running",
    ),
    "lease_token while available": (
        "INSERT INTO pgjobs.jobs (task, lease_token) VALUES ('t', gen_random_uuid())",
        "jobs_lease_only_while_running",
    ),
    "running without worker": (
        "INSERT INTO pgjobs.jobs (task, state, lease_token, started_at) "
        "VALUES ('t', 'running', gen_random_uuid(), now())",
        "jobs_running_has_worker",
    ),
    "succeeded without finished_at": (
        "INSERT INTO pgjobs.jobs (task, state) VALUES ('t', 'succeeded')",
        "jobs_finished_iff_final",
    ),
    "dead without finished_at": (
        "INSERT INTO pgjobs.jobs (task, state) VALUES ('t', 'dead')",
        "jobs_finished_iff_final",
    ),
    "finished_at on an available job": (
        "INSERT INTO pgjobs.jobs (task, finished_at) VALUES ('t', now())",
        "jobs_finished_iff_final",
    ),
    "bad queue name": (
        "INSERT INTO pgjobs.jobs (task, queue) VALUES ('t', 'bad queue')",
        "jobs_queue_name",
    ),
    "queue name of 129 characters": (
        "INSERT INTO pgjobs.jobs (task, queue) VALUES ('t', repeat('q', 129))",
        "jobs_queue_name",
    ),
    "queue name starting with a dot": (
        "INSERT INTO pgjobs.jobs (task, queue) VALUES ('t', '.q')",
        "jobs_queue_name",
    ),
    "empty queue name": (
        "INSERT INTO pgjobs.jobs (task, queue) VALUES ('t', '')",
        "jobs_queue_name",
    ),
    "non-ASCII queue name": (
        "INSERT INTO pgjobs.jobs (task, queue) VALUES ('t', 'café')",
        "jobs_queue_name",
    ),
    "bad name in queues": (
        "INSERT INTO pgjobs.queues (name) VALUES ('a b')",
        "queues_name",
    ),
    "SQL in queue name": (
        "INSERT INTO pgjobs.jobs (task, queue) VALUES ('t', 'x''; DROP TABLE jobs; --')",
        "jobs_queue_name",
    ),
    "empty task": ("INSERT INTO pgjobs.jobs (task) VALUES ('')", "jobs_task_name"),
    "args not an object": (
        "INSERT INTO pgjobs.jobs (task, args) VALUES ('t', '[1]')",
        "jobs_args_object",
    ),
    "errors not an array": (
        "INSERT INTO pgjobs.jobs (task, errors) VALUES ('t', '{}')",
        "jobs_errors_array",
    ),
    "update past max_attempts": (
        "UPDATE pgjobs.jobs SET attempts = max_attempts + 1",
        "jobs_attempts_range",
    ),
    "worker count below 1": (
        "INSERT INTO pgjobs.workers (id, host, pid, queues, concurrency) "
        "VALUES ('w', 'h', 1, '{default}', 0)",
        "workers_concurrency_check",
    ),
}


@pytest.fixture
def tx(module_db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection in a transaction that is rolled back afterwards, holding one valid job."""
    with psycopg.connect(module_db_url) as conn:
        conn.execute(VALID)
        yield conn
        conn.rollback()


@pytest.mark.parametrize("case", list(CHECK_CASES))
def test_check_constraints_refuse_bad_rows(tx: psycopg.Connection[Any], case: str) -> None:
    statement, constraint = CHECK_CASES[case]
    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        tx.execute(statement)
    assert raised.value.diag.constraint_name == constraint


def test_unknown_state_is_refused(tx: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.InvalidTextRepresentation, match="job_state"):
        tx.execute("INSERT INTO pgjobs.jobs (task, state) VALUES ('t', 'exploded')")


def test_valid_rows_in_every_state_are_accepted(tx: psycopg.Connection[Any]) -> None:
    # The positive control: the constraints admit each state written the right way.
    tx.execute(
        """
        INSERT INTO pgjobs.jobs (task, state, run_at, attempts, worker, started_at,
                                 lease_token, finished_at)
        VALUES ('t', 'scheduled', now() + interval '1 hour', 0, NULL, NULL, NULL, NULL),
               ('t', 'available', now(), 0, NULL, NULL, NULL, NULL),
               ('t', 'running', now(), 1, 'w', now(), gen_random_uuid(), NULL),
               ('t', 'retryable', now(), 1, NULL, now(), NULL, NULL),
               ('t', 'pending', now(), 0, NULL, NULL, NULL, NULL),
               ('t', 'succeeded', now(), 1, 'w', now(), NULL, now()),
               ('t', 'dead', now(), 20, 'w', now(), NULL, now()),
               ('t', 'cancelled', now(), 0, NULL, NULL, NULL, now())
        """
    )
    row = tx.execute("SELECT count(DISTINCT state) FROM pgjobs.jobs").fetchone()
    assert row == (8,)


def test_queue_names_at_the_limits_are_accepted(tx: psycopg.Connection[Any]) -> None:
    tx.execute(
        "INSERT INTO pgjobs.jobs (task, queue) "
        "VALUES ('t', repeat('q', 128)), ('t', '_'), ('t', '0a.b:c-d_E')"
    )
    tx.execute("INSERT INTO pgjobs.queues (name) VALUES (repeat('q', 128))")


def test_one_live_job_per_unique_key(tx: psycopg.Connection[Any]) -> None:
    tx.execute("INSERT INTO pgjobs.jobs (task, unique_key) VALUES ('t', 'k')")
    # A finished job does not hold its key.
    tx.execute(
        "INSERT INTO pgjobs.jobs (task, unique_key, state, finished_at) "
        "VALUES ('t', 'k', 'succeeded', now())"
    )
    with pytest.raises(psycopg.errors.UniqueViolation) as raised:
        tx.execute("INSERT INTO pgjobs.jobs (task, unique_key, state) VALUES ('t', 'k', 'pending')")
    assert raised.value.diag.constraint_name == "jobs_unique_key_idx"
