"""Run one claimed job and decide what becomes of it.

``execute`` calls the task (awaited on the loop when ``async def``, in a thread otherwise),
enforces the task's timeout, and turns whatever happened (a result, ``Retry``/``Snooze``/
``Cancel`` raised or returned, an exception) into a :class:`Finish`: the row the completion
batch writes. Policy:

* an exception in ``discard_on`` → ``dead``; in ``retry_on`` with attempts left →
  ``retryable`` after the task's backoff (default: :func:`pgjobs.outcomes.default_backoff`);
  anything else, or no attempts left → ``dead``;
* a timeout is a :class:`~pgjobs.outcomes.JobTimeoutError` and follows the same policy;
* a job whose task is unknown, or whose arguments do not fit the task, is ``dead`` at once.
"""

from __future__ import annotations

import asyncio
import traceback
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

from pgjobs.context import JobContext
from pgjobs.enqueue import to_json
from pgjobs.errors import InvalidJobError, PayloadError, UnknownTaskError
from pgjobs.outcomes import Cancel, JobTimeoutError, Retry, Snooze, default_backoff
from pgjobs.task import Task
from pgjobs.threads import ElasticThreadPool

MESSAGE_LIMIT = 2_000
TRACEBACK_LIMIT = 8_000
# What a job may return instead of raising.
_OUTCOMES = (Retry, Snooze, Cancel)


class ClaimedJob(NamedTuple):
    """A job as the claim statement hands it to the worker. (Tuples: a worker makes one
    per job, and a tuple costs a third of a frozen dataclass to build.)"""

    id: int
    queue: str
    task: str
    args: dict[str, Any]
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    lease_token: uuid.UUID

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> ClaimedJob:
        """From a row of ``claim_jobs`` (its last column, ``next_due``, is not the job's)."""
        return cls._make(row[:9])


class Finish(NamedTuple):
    """One attempt's outcome, as ``finish_jobs`` writes it (fenced by ``lease_token``).
    ``note`` says, for logs and metrics, why (snoozed, retry, dead, unknown task)."""

    job_id: int
    lease_token: uuid.UUID
    state: str
    result: str | None = None
    delay: float | None = None
    error: str | None = None
    refund: int = 0
    note: str = ""


def succeeded(job: ClaimedJob, result: Any) -> Finish:
    """The job succeeded with ``result`` (stored as JSON; SQL NULL for None)."""
    text = None if result is None else to_json(result, "job results")
    return Finish(job.id, job.lease_token, "succeeded", result=text)


def handed_back(job: ClaimedJob, error: str | None = None) -> Finish:
    """Give the job back to the queue untouched: runnable at once, attempt refunded."""
    return Finish(job.id, job.lease_token, "available", refund=1, error=error)


def error_entry(
    job: ClaimedJob, worker: str, exc: BaseException | None, type_: str, message: str
) -> str:
    """One element of a job's ``errors`` history, as JSON (``at`` is added by the database)."""
    text = ""
    if exc is not None:
        text = "".join(traceback.format_exception(exc))[-TRACEBACK_LIMIT:]
    return to_json(
        {
            "attempt": job.attempts,
            "type": type_,
            "message": _clean(message)[:MESSAGE_LIMIT],
            "traceback": _clean(text) or None,
            "worker": worker,
        },
        "errors",
    )


def _explain(task: Task[Any, Any], job: ClaimedJob, exc: BaseException) -> BaseException:
    """For a TypeError: InvalidJobError if the stored arguments do not fit the task (the
    task changed since the job was enqueued, or the row was written by hand), else ``exc``."""
    if isinstance(exc, TypeError):
        try:
            task.check_args(dict(job.args))
        except InvalidJobError as mismatch:
            return mismatch
    return exc


def _clean(text: str) -> str:
    # jsonb cannot store NUL, and a lone surrogate cannot be encoded at all.
    return text.replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


class Executor:
    """Runs jobs of one application and classifies their outcomes."""

    def __init__(self, tasks: dict[str, Task[Any, Any]], worker: str) -> None:
        self.tasks = tasks
        self.worker = worker
        self.threads = ElasticThreadPool()

    async def execute(self, job: ClaimedJob, ctx: JobContext | None) -> Finish:
        """Run ``job`` and return its outcome. Never raises except CancelledError."""
        task = self.tasks.get(job.task)
        if task is None:
            return self._unknown_task(job)
        try:
            kwargs = self._arguments(task, job, ctx)
            value = await self._call(task, kwargs, ctx)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            return self.classify_exception(job, task, _explain(task, job, exc))
        return self.classify_value(job, task, value)

    def _arguments(
        self, task: Task[Any, Any], job: ClaimedJob, ctx: JobContext | None
    ) -> dict[str, Any]:
        # Enqueue checked the arguments; binding them again for every run costs more than
        # running a small job. _explain() binds them only when the call fails.
        kwargs = dict(job.args)
        if task.context_parameter is not None:
            kwargs[task.context_parameter] = ctx
        return kwargs

    async def _call(
        self, task: Task[Any, Any], kwargs: dict[str, Any], ctx: JobContext | None
    ) -> Any:
        timeout = task.config.timeout
        if task.is_async:
            call = task.fn(**kwargs)
        else:
            # shield: on timeout the thread cannot be stopped, only abandoned.
            call = asyncio.shield(asyncio.wrap_future(self.threads.submit(task.fn, **kwargs)))
        if timeout is None:
            return await call
        try:
            return await asyncio.wait_for(call, timeout)
        except TimeoutError:
            if ctx is not None:
                ctx._cancel()
            kind = "async task was cancelled" if task.is_async else "its thread was abandoned"
            raise JobTimeoutError(
                f"task {task.name!r} exceeded its timeout of {timeout} s ({kind})"
            ) from None

    def classify_value(self, job: ClaimedJob, task: Task[Any, Any], value: Any) -> Finish:
        """The outcome of a job that returned ``value``."""
        if isinstance(value, _OUTCOMES):
            return self.classify_exception(job, task, value)
        try:
            return succeeded(job, value)
        except PayloadError as exc:
            return self._dead(job, exc, f"the job's result cannot be stored: {exc}")

    def classify_exception(
        self, job: ClaimedJob, task: Task[Any, Any], exc: BaseException
    ) -> Finish:
        """The outcome of a job that raised ``exc`` (or returned an outcome object)."""
        if isinstance(exc, Snooze):
            state = "scheduled" if exc.delay > 0 else "available"
            return Finish(job.id, job.lease_token, state, delay=exc.delay, refund=1, note="snoozed")
        if isinstance(exc, Cancel):
            error = error_entry(job, self.worker, None, "Cancel", exc.reason)
            return Finish(job.id, job.lease_token, "cancelled", error=error, note="cancelled")
        if isinstance(exc, InvalidJobError):
            return self._dead(job, exc, str(exc))
        config = task.config
        retry = isinstance(exc, Retry) or (
            isinstance(exc, config.retry_on) and not isinstance(exc, config.discard_on)
        )
        if not retry or job.attempts >= job.max_attempts:
            return self._dead(job, exc, str(exc))
        delay = exc.delay if isinstance(exc, Retry) else None
        if delay is None:
            delay = _backoff(config.backoff, job.attempts)
        error = error_entry(job, self.worker, _traceback_of(exc), _type_name(exc), str(exc))
        return Finish(job.id, job.lease_token, "retryable", delay=delay, error=error, note="retry")

    def _dead(self, job: ClaimedJob, exc: BaseException, message: str) -> Finish:
        error = error_entry(job, self.worker, _traceback_of(exc), _type_name(exc), message)
        return Finish(job.id, job.lease_token, "dead", error=error, note="dead")

    def _unknown_task(self, job: ClaimedJob) -> Finish:
        known = ", ".join(sorted(self.tasks)) or "none"
        message = (
            f"no task named {job.task!r} is registered in this worker's application "
            f"(registered: {known}); is the worker running the right --app and version?"
        )
        error = error_entry(job, self.worker, None, _type_name(UnknownTaskError()), message)
        return Finish(job.id, job.lease_token, "dead", error=error, note="unknown task")


def _traceback_of(exc: BaseException) -> BaseException | None:
    # Outcome objects returned rather than raised have no traceback worth keeping.
    return exc if exc.__traceback__ is not None else None


def _backoff(custom: Callable[[int], float] | None, attempt: int) -> float:
    if custom is None:
        return default_backoff(attempt)
    try:
        delay = float(custom(attempt))
    except Exception:
        return default_backoff(attempt)
    return delay if delay >= 0 else 0.0
