"""Exceptions raised by pgjobs. All derive from :class:`PgJobsError`."""

from __future__ import annotations


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
