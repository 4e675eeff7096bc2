"""Exceptions raised by pgjobs. All derive from :class:`PgJobsError`."""

from __future__ import annotations

from typing import Any


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
    """The database could not be reached or refused a pgjobs statement."""


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
