"""Exceptions raised by pgjobs. All derive from :class:`PgJobsError`."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import psycopg


class PgJobsError(Exception):
    """Base class of every error pgjobs raises on purpose."""


class ConfigurationError(PgJobsError):
    """pgjobs is set up wrongly: a bad database URL, schema name or option."""


class InvalidNameError(PgJobsError, ValueError):
    """A queue, task or schema name that pgjobs does not accept."""


class InvalidJobError(PgJobsError, ValueError):
    """An enqueue call with options or arguments that cannot make a job."""


class PayloadError(InvalidJobError):
    """Job arguments or metadata that cannot be stored as JSON."""


class UnknownTaskError(PgJobsError, LookupError):
    """A task name that the application has not registered."""


class JobNotFoundError(PgJobsError, LookupError):
    """No job with the given id exists."""


class DatabaseError(PgJobsError):
    """The database could not be reached or refused a pgjobs statement.

    ``sqlstate`` is PostgreSQL's error code when the server gave one, and ``__cause__``
    psycopg's exception. ``40P01`` (a deadlock) and ``40001`` (a serialization failure)
    mean that PostgreSQL rolled the caller's transaction back: run it again
    (:attr:`retry_transaction` says so).
    """

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate

    @property
    def retry_transaction(self) -> bool:
        """Whether running the whole transaction again is the remedy."""
        return self.sqlstate in TRANSIENT_SQLSTATES


# Deadlock detected, serialization failure: the transaction lost a race, and only it.
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})
# How often pgjobs runs a transaction of its own that lost such a race.
TRANSIENT_ATTEMPTS = 5


def transient_pause(attempt: int) -> float:
    """Seconds before running a lost transaction again (``attempt`` counts from 0): short,
    growing, jittered, so that two transactions that deadlocked do not meet again in
    lockstep."""
    return float(random.uniform(0.5, 1.5) * 0.01 * 2**attempt)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line; for a database error its primary message
    (without DETAIL, HINT or CONTEXT)."""
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)
    return " ".join((primary or str(exc)).split()) or type(exc).__name__


class UniqueConflictError(DatabaseError):
    """Under REPEATABLE READ or SERIALIZABLE, a unique key is held by a job that the
    caller's transaction cannot see (it committed after the transaction's snapshot was
    taken), so pgjobs can neither insert the job nor name the one that holds the key.
    Nothing was written and the transaction is still usable; enqueueing again in a new
    transaction returns the existing job."""


class SchemaNotReadyError(DatabaseError):
    """The pgjobs schema is missing or not migrated to the version this code needs."""


class JobFailedError(PgJobsError):
    """The job waited for (``App.wait``) ended dead or cancelled: ``job`` is its row,
    ``error`` its last recorded error (None if it has none, e.g. cancelled while waiting)."""

    def __init__(self, job: Any, error: dict[str, Any] | None) -> None:
        self.job = job
        self.error = error
        reason = f": {error.get('type')}: {error.get('message')}" if error else ""
        super().__init__(f"job {job.id} ended {job.state}{reason}")


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """A failing statement as a one-line DatabaseError (schema errors are turned into
    SchemaNotReadyError first, by enqueue.schema_errors)."""
    try:
        yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        raise
    except psycopg.Error as exc:
        raise DatabaseError(" ".join(str(exc).split()), exc.sqlstate) from exc
