"""The operator's API: inspect and act on jobs, the dead-letter queue, queues and workers.

``Admin(app)`` runs the statements of ``operations.sql`` over the App's own pool; the CLI
(``pgjobs jobs|dead|stats|workers|queues|prune``) is a thin layer over it. Every write
that can touch many rows goes in bounded batches (``batch_size`` rows per statement,
each statement its own transaction), so a purge of millions of rows never holds locks
for long or bloats one transaction. A running job is never changed: its worker holds
the lease.

Retrying a job keeps its attempt count and error history (they are what happened) and
gives it one more attempt when it has used all of its own (``max_attempts`` is raised to
``attempts + 1``), so a retried job always runs again at least once.
"""

from __future__ import annotations

import contextlib
import getpass
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row

from pgjobs.enqueue import schema_errors
from pgjobs.errors import (
    TRANSIENT_ATTEMPTS,
    ConfigurationError,
    DatabaseError,
    JobNotFoundError,
    PgJobsError,
    database_errors,
    transient_pause,
)
from pgjobs.job import FINAL_STATES, Job, JobState
from pgjobs.limits import QueueLimits
from pgjobs.settings import control_channel_for, events_channel_for, validate_queue

if TYPE_CHECKING:
    from pgjobs.app import App

DEFAULT_BATCH_SIZE = 10_000
# enqueue's threshold: above it, NOTIFY is skipped and workers find jobs by polling.
NOTIFY_QUEUE_LIMIT = 0.5
# Live-scope keyed jobs per retry statement: each takes a subtransaction, and PostgreSQL
# caches 64 per backend before every snapshot in the cluster gets slower.
_KEYED_RETRY_BATCH = 32
# States `jobs retry` accepts: stopped (dead, cancelled) or waiting (retryable, scheduled).
RETRYABLE_STATES = ("dead", "cancelled", "retryable", "scheduled")
# States `jobs cancel` accepts: every state but the final ones.
CANCELLABLE_STATES = ("scheduled", "available", "retryable", "pending", "running")


class OperationError(PgJobsError):
    """An operator action that cannot be carried out as asked."""


class JobStateError(OperationError):
    """The job is in a state that does not allow the action (e.g. cancelling a running
    job, retrying a succeeded one)."""


class InvalidStateError(OperationError, ValueError):
    """A state name that is not one of pgjobs' job states."""


def parse_state(name: str) -> JobState:
    """``name`` as a JobState, or InvalidStateError listing the valid names."""
    try:
        return JobState(name.strip().lower())
    except (ValueError, AttributeError):
        valid = ", ".join(state.value for state in JobState)
        raise InvalidStateError(f"unknown job state {name!r}: use one of {valid}") from None


@dataclass(frozen=True, slots=True)
class Retention:
    """How long finished jobs are kept, per final state; None keeps them forever.

    Defaults: succeeded 1 day, cancelled 7 days, dead until handled (never pruned).
    """

    succeeded: timedelta | None = timedelta(days=1)
    cancelled: timedelta | None = timedelta(days=7)
    dead: timedelta | None = None

    def periods(self) -> dict[str, timedelta | None]:
        """Retention by state name."""
        return {"succeeded": self.succeeded, "cancelled": self.cancelled, "dead": self.dead}


@dataclass(slots=True)
class BatchResult:
    """What a multi-job action did: the ids it changed, and why the others were left."""

    done: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)


def _default_operator() -> str:
    # Recorded in the error history of jobs an operator cancels or retries.
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _chunks(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


class Admin:
    """Operator actions on one App's database and schema."""

    def __init__(
        self,
        app: App,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        operator: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise OperationError(f"batch_size must be at least 1, not {batch_size}")
        self.app = app
        self.queries = app.queries
        self.batch_size = batch_size
        self.operator = operator or _default_operator()

    # -- plumbing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor[dict[str, Any]]]:
        """A dict cursor on a pool connection (autocommit: each statement commits)."""
        with (
            self.app.pool.connection() as conn,
            schema_errors(self.app.schema),
            database_errors(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            yield cur

    def _rows(self, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._cursor() as cur:
            return cur.execute(getattr(self.queries, query), params or {}).fetchall()

    # -- jobs ----------------------------------------------------------------------------

    def list_jobs(
        self,
        *,
        state: str | JobState | None = None,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Jobs, newest first, filtered by state, queue and task."""
        if limit < 1:
            raise OperationError(f"limit must be at least 1, not {limit}")
        return self._rows(
            "list_jobs",
            {
                "state": parse_state(state).value if state is not None else None,
                "queue": queue,
                "task": task,
                "limit": limit,
            },
        )

    def get_job(self, job_id: int) -> Job:
        """One job, with args, errors, progress, result; JobNotFoundError if none."""
        with self._cursor() as cur:
            row = cur.execute(self.queries.get_job, {"id": job_id}).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return Job.from_row(row)

    def cancel_job(self, job_id: int) -> Job:
        """Cancel a job that has not finished. A running one ends ``cancelled`` at once
        and its worker is told to stop it (see :meth:`pgjobs.App.cancel`).

        Raises JobNotFoundError for an unknown id and JobStateError for a job that already
        finished.
        """
        with self._cursor() as cur:
            row = cur.execute(
                self.queries.cancel_job,
                {
                    "id": job_id,
                    "message": f"cancelled by an operator ({self.operator})",
                    "operator": self.operator,
                    "control_channel": control_channel_for(self.app.schema),
                    "events_channel": events_channel_for(self.app.schema),
                },
            ).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        if not row["cancelled"]:
            previous = row["previous_state"]
            raise JobStateError(f"job {job_id} is already {previous}: nothing to cancel")
        return self.get_job(job_id)

    def retry_job(self, job_id: int) -> Job:
        """Make a dead, cancelled, retryable or scheduled job runnable now (see the module
        docstring for attempts). Raises JobNotFoundError or JobStateError."""
        result = self._retry([job_id], RETRYABLE_STATES)
        if job_id in result.skipped:
            reason = result.skipped[job_id]
            if reason == "not found":
                raise JobNotFoundError(f"no job with id {job_id}")
            raise JobStateError(f"job {job_id} not retried: {reason}")
        return self.get_job(job_id)

    def _retry(self, ids: Sequence[int], states: Sequence[str]) -> BatchResult:
        result = BatchResult()
        for chunk in _chunks(sorted(set(ids)), self.batch_size):
            keyed = {row["id"] for row in self._rows("keyed_jobs", {"ids": chunk})}
            done = self._retry_statement([i for i in chunk if i not in keyed], states)
            for few in _chunks(sorted(keyed), _KEYED_RETRY_BATCH):
                done |= self._retry_statement(few, states)
            result.done.extend(sorted(done))
            left = [job_id for job_id in chunk if job_id not in done]
            if left:
                result.skipped.update(self._reasons(left, states))
        return result

    def _retry_statement(self, ids: list[int], states: Sequence[str]) -> set[int]:
        if not ids:
            return set()
        params = {
            "ids": ids,
            "states": list(states),
            "operator": self.operator,
            "channel": self.app.channel,
            "notify_queue_limit": NOTIFY_QUEUE_LIMIT,
        }
        # The statement is its own transaction: one that lost a race with a producer
        # (which takes keys in the same order, so this is rare) is run again.
        for attempt in range(TRANSIENT_ATTEMPTS):
            try:
                with self._cursor() as cur:
                    rows = cur.execute(self.queries.retry_jobs, params).fetchall()
                return {row["id"] for row in rows}
            except DatabaseError as exc:
                if not exc.retry_transaction or attempt + 1 == TRANSIENT_ATTEMPTS:
                    raise
                time.sleep(transient_pause(attempt))
        raise AssertionError("unreachable")

    def _reasons(self, ids: list[int], states: Sequence[str]) -> dict[int, str]:
        """Why each of these jobs was not changed."""
        rows = {row["id"]: row for row in self._rows("job_states", {"ids": ids})}
        reasons: dict[int, str] = {}
        for job_id in ids:
            row = rows.get(job_id)
            if row is None:
                reasons[job_id] = "not found"
            elif row["state"] not in states:
                reasons[job_id] = f"it is {row['state']} (expected {' or '.join(states)})"
            else:
                reasons[job_id] = (
                    f"its unique key {row['unique_key']!r} is held by another live job"
                )
        return reasons

    # -- dead-letter queue ---------------------------------------------------------------

    def dead_jobs(
        self, *, queue: str | None = None, task: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The dead-letter queue, newest death first."""
        if limit < 1:
            raise OperationError(f"limit must be at least 1, not {limit}")
        return self._rows("list_dead", {"queue": queue, "task": task, "limit": limit})

    def get_dead_job(self, job_id: int) -> Job:
        """One dead job; JobNotFoundError if there is no dead job with that id."""
        job = self.get_job(job_id)
        if job.state != JobState.DEAD:
            raise JobNotFoundError(f"job {job_id} is {job.state}, not dead")
        return job

    def retry_dead(
        self,
        ids: Iterable[int] = (),
        *,
        all_jobs: bool = False,
        task: str | None = None,
    ) -> BatchResult:
        """Retry dead jobs: these ids, or every dead job (``all_jobs``), or every dead job
        of ``task``. Whole-queue retries walk the dead jobs in id order, one bounded batch
        per statement."""
        id_list = list(ids)
        if id_list and (all_jobs or task):
            raise OperationError("give job ids, or --all, or --task; not several")
        if id_list:
            return self._retry(id_list, ("dead",))
        if not (all_jobs or task):
            raise OperationError("name the dead jobs to retry: ids, --all or --task TASK")
        result = BatchResult()
        after = 0
        while True:
            batch = [
                row["id"]
                for row in self._rows(
                    "dead_ids_batch", {"after": after, "task": task, "limit": self.batch_size}
                )
            ]
            if not batch:
                return result
            done = self._retry(batch, ("dead",))
            result.done.extend(done.done)
            result.skipped.update(done.skipped)
            after = batch[-1]

    def delete_dead(self, ids: Iterable[int]) -> BatchResult:
        """Delete these dead jobs; others (unknown, not dead) are skipped with a reason."""
        id_list = sorted(set(ids))
        if not id_list:
            raise OperationError("name the dead jobs to delete by id")
        result = BatchResult()
        for chunk in _chunks(id_list, self.batch_size):
            deleted = {row["id"] for row in self._rows("delete_dead", {"ids": chunk})}
            result.done.extend(sorted(deleted))
            left = [job_id for job_id in chunk if job_id not in deleted]
            if left:
                result.skipped.update(self._reasons(left, ("dead",)))
        return result

    def purge_dead(self, older_than: timedelta) -> int:
        """Delete dead jobs that died more than ``older_than`` ago; returns how many."""
        return self._prune_state("dead", older_than)

    # -- retention -----------------------------------------------------------------------

    def prune(self, retention: Retention | None = None) -> dict[str, int]:
        """Delete finished jobs past their state's retention, in bounded batches; returns
        the number deleted per state. Live jobs are never touched. On a partitioned jobs
        table, also archive the others into day partitions and drop the partitions past
        their day (``archived`` and ``dropped_partitions`` in the result)."""
        retention = retention or Retention()
        deleted = {
            state: self._prune_state(state, period) if period is not None else 0
            for state, period in retention.periods().items()
        }
        archived = self._archive(retention)
        return deleted if archived is None else {**deleted, **archived}

    def _archive(self, retention: Retention) -> dict[str, int] | None:
        """On a partitioned jobs table: archive finished jobs into day partitions until
        none is left to archive, and drop the partitions whose day is over (None on a
        plain table)."""
        from pgjobs import partitioning

        total = {"archived": 0, "dropped_partitions": 0}
        while True:
            with self.app.pool.connection() as conn, database_errors(), conn.transaction():
                if not partitioning.is_partitioned(conn, self.app.schema):
                    return None
                done = partitioning.archive_and_drop(
                    conn, self.queries, retention.periods(), self.batch_size
                )
            total["archived"] += done.archived
            total["dropped_partitions"] += done.dropped
            if not done.full:
                return total

    def _prune_state(self, state: str, older_than: timedelta) -> int:
        if JobState(state) not in FINAL_STATES:  # pragma: no cover - a programming error
            raise OperationError(f"only finished jobs are pruned, not {state}")
        if older_than < timedelta(0):
            raise OperationError("a retention period cannot be negative")
        total = 0
        while True:
            deleted = len(
                self._rows(
                    "prune_batch",
                    {
                        "state": state,
                        "older_than": older_than.total_seconds(),
                        "limit": self.batch_size,
                    },
                )
            )
            total += deleted
            if deleted < self.batch_size:
                return total

    # -- queues, stats, workers ----------------------------------------------------------

    def stats(self) -> list[dict[str, Any]]:
        """Per queue: depth by state, oldest waiting age, rates, failure rate, paused."""
        return self._rows("queue_stats")

    def workers(self, *, heartbeat_timeout: float = 30.0) -> list[dict[str, Any]]:
        """Per worker: host, pid, queues, uptime, counters, current jobs, heartbeat age,
        and whether it is alive (heard from within ``heartbeat_timeout`` seconds)."""
        return self._rows("worker_stats", {"timeout": heartbeat_timeout})

    def throughput(self) -> list[dict[str, Any]]:
        """Succeeded jobs and failed attempts per minute and queue over the last hour."""
        return self._rows("throughput")

    def pause_queue(self, name: str) -> dict[str, Any]:
        """Mark a queue paused (kept in the database for every worker to read)."""
        return self._set_paused(name, True)

    def resume_queue(self, name: str) -> dict[str, Any]:
        """Mark a queue not paused."""
        return self._set_paused(name, False)

    def set_dead_alert(self, name: str, threshold: int | None) -> dict[str, Any]:
        """Set a queue's dead-letter alert threshold (None: no alert); re-arms it."""
        if threshold is not None and (not isinstance(threshold, int) or threshold < 1):
            raise ConfigurationError(f"the threshold must be a positive integer, not {threshold!r}")
        rows = self._rows("set_dead_alert", {"name": validate_queue(name), "threshold": threshold})
        return rows[0]

    def set_queue_limits(self, name: str, limits: QueueLimits) -> dict[str, Any]:
        """Set a queue's global concurrency and rate limits (``QueueLimits()``: none).
        Running workers apply them from their next claim."""
        if not isinstance(limits, QueueLimits):
            raise ConfigurationError(f"expected QueueLimits, not {type(limits).__name__}")
        rows = self._rows("set_queue_limits", limits.params(validate_queue(name)))
        return rows[0]

    def _set_paused(self, name: str, paused: bool) -> dict[str, Any]:
        rows = self._rows("set_paused", {"name": validate_queue(name), "paused": paused})
        if not paused:
            # Idle workers sleep until a notification or their fallback poll: wake them.
            params = {
                "name": name,
                "channel": self.app.channel,
                "notify_queue_limit": NOTIFY_QUEUE_LIMIT,
            }
            self._rows("wake_queue", params)
        return rows[0]

    def queues(self) -> list[dict[str, Any]]:
        """Every queue with jobs or settings: paused flag, waiting, running and dead."""
        return self._rows("list_queues")
