"""What a job can ask of the worker besides "done": ``Retry``, ``Snooze`` and ``Cancel``.

Each can be raised or returned from a task::

    @app.task
    def sync_account(account_id: int) -> None:
        if rate_limited():
            raise pgjobs.Snooze(30)      # try again in 30 s; this attempt does not count
        ...

and :func:`default_backoff` is the delay before the next attempt of a failed job unless the
task sets its own (``@app.task(backoff=lambda attempt: 10.0)``).
"""

from __future__ import annotations

import random
from datetime import timedelta

from pgjobs.errors import PgJobsError

BACKOFF_BASE = 2.0
BACKOFF_CAP = 3600.0
BACKOFF_JITTER = 0.25


def default_backoff(attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    ``min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))``, then ±25 % uniform jitter so
    jobs that failed together do not retry together: about 2 s, 4 s, 8 s, … capped at an hour.
    """
    exponent = min(max(attempt, 1) - 1, 32)  # 2**32 s is far past the cap; avoids huge ints
    delay = min(BACKOFF_CAP, BACKOFF_BASE * 2.0**exponent)
    return delay * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)


def _seconds(delay: float | timedelta | None) -> float | None:
    if delay is None:
        return None
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if not seconds >= 0:  # also rejects NaN
        raise ValueError(f"a delay must be a non-negative number of seconds, not {delay!r}")
    return seconds


class JobOutcome(PgJobsError):
    """Base of the outcomes a job can raise or return instead of a result."""


class Retry(JobOutcome):
    """Fail this attempt and try again after ``delay`` seconds (the task's backoff when
    None). It uses an attempt: when the job is out of attempts it goes to ``dead``."""

    def __init__(self, delay: float | timedelta | None = None, reason: str = "") -> None:
        self.delay = _seconds(delay)
        self.reason = reason
        super().__init__(reason or "retry requested by the job")


class Snooze(JobOutcome):
    """Put the job back to run again after ``delay`` seconds, without using an attempt
    (for "not yet": a rate limit, a resource that is not ready)."""

    def __init__(self, delay: float | timedelta = 0.0) -> None:
        seconds = _seconds(delay)
        self.delay = 0.0 if seconds is None else seconds
        super().__init__(f"snoozed for {self.delay} s")


class Cancel(JobOutcome):
    """Stop the job for good: it becomes ``cancelled`` with ``reason`` in its error history
    and is not retried."""

    def __init__(self, reason: str = "cancelled by the job") -> None:
        self.reason = reason
        super().__init__(reason)


class JobTimeoutError(PgJobsError, TimeoutError):
    """A job ran longer than its task's ``timeout``; it fails and retries by policy."""
