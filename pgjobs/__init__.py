"""pgjobs: a job queue for Python that keeps its jobs in PostgreSQL.

Jobs are enqueued inside the application's own transaction, claimed by ``pgjobs work``
processes with ``FOR UPDATE SKIP LOCKED``, and woken by LISTEN/NOTIFY.
"""

from pgjobs.app import App
from pgjobs.context import JobContext
from pgjobs.cron import InvalidScheduleError
from pgjobs.enqueue import JobId, MissingParentError
from pgjobs.errors import (
    ConfigurationError,
    DatabaseError,
    InvalidJobError,
    InvalidNameError,
    JobFailedError,
    JobNotFoundError,
    PayloadError,
    PgJobsError,
    SchemaNotReadyError,
    UniqueConflictError,
    UnknownTaskError,
)
from pgjobs.events import EventStream, JobEvent
from pgjobs.flow import JobCall
from pgjobs.job import Job, JobState
from pgjobs.outcomes import Cancel, Retry, Snooze
from pgjobs.task import Task
from pgjobs.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "App",
    "Cancel",
    "ConfigurationError",
    "DatabaseError",
    "EventStream",
    "InvalidJobError",
    "InvalidNameError",
    "InvalidScheduleError",
    "Job",
    "JobCall",
    "JobContext",
    "JobEvent",
    "JobFailedError",
    "JobId",
    "JobNotFoundError",
    "JobState",
    "MissingParentError",
    "PayloadError",
    "PgJobsError",
    "Retry",
    "SchemaNotReadyError",
    "Snooze",
    "Task",
    "UniqueConflictError",
    "UnknownTaskError",
    "Worker",
    "__version__",
]
