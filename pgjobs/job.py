"""The job model: states and the typed view of one row of ``jobs``."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class JobState(enum.StrEnum):
    """Where a job is in its life. The names are the values stored in the database."""

    SCHEDULED = "scheduled"
    """Waiting for its ``run_at`` time."""
    AVAILABLE = "available"
    """Ready to be claimed by a worker."""
    RUNNING = "running"
    """Claimed by a worker, which holds its lease."""
    RETRYABLE = "retryable"
    """Failed an attempt and waits out its backoff before the next one."""
    SUCCEEDED = "succeeded"
    """Finished without error; its result is stored."""
    DEAD = "dead"
    """Out of attempts or discarded: the dead-letter queue."""
    CANCELLED = "cancelled"
    """Cancelled before it could finish."""
    PENDING = "pending"
    """Waiting for the jobs it depends on."""

    @property
    def is_final(self) -> bool:
        """True for states a job never leaves on its own."""
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})


@dataclass(frozen=True, slots=True)
class Job:
    """A snapshot of one job, as read by :meth:`pgjobs.App.get_job`."""

    id: int
    queue: str
    task: str
    args: dict[str, Any]
    state: JobState
    priority: int
    attempts: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str | None = None
    lease_token: uuid.UUID | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None
    progress: Any = None
    unique_key: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    unique_until: datetime | None = None
    """Set when the unique key is held for a period: the key is held until then."""
    limit_key: str | None = None
    """The partition of the queue's limits this job counts against."""
    depends_on: list[int] | None = None
    """The jobs this one waits for, as enqueued."""
    waiting_for: list[int] | None = None
    """Those of them it still waits for (``pending`` while not empty)."""
    dependents: list[int] | None = None
    """The jobs that were enqueued waiting for this one."""
    on_parent_failure: str | None = None
    """What a failed or cancelled parent does to this job: dead, cancel or run."""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        """Build a Job from a row of ``queries.get_job`` (a dict row)."""
        return cls(**{**row, "state": JobState(row["state"])})
