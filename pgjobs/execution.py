"""Run one claimed job and decide what becomes of it.

``execute`` calls the task (awaited on the loop when ``async def``, in a thread otherwise),
enforces the task's timeout, and turns whatever happened (a result, ``Retry``/``Snooze``/
``Cancel`` raised or returned, an exception) into a :class:`Finish`: the row the completion
batch writes. Policy:

* an exception in ``discard_on`` → ``dead``; in ``retry_on`` with attempts left →
  ``retryable`` after the task's backoff (default: :func:`pgjobs.outcomes.default_backoff`);
  anything else, or no attempts left → ``dead``;
* a timeout is a :class:`~pgjobs.outcomes.JobTimeoutError` and follows the same policy;
* a job whose task is unknown, or whose arguments do not fit the task, is ``dead`` at once;
  so is one whose result cannot be stored (see :func:`pgjobs.enqueue.to_json`).

Every outcome is recorded, whatever the handler returns or raises: an exception that
cannot print itself is recorded as ``<unprintable TypeName>``, one whose traceback cannot
be formatted with the frames alone.
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
from pgjobs.errors import InvalidJobError, UnknownTaskError
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
    # False while the job waits in the prefetch buffer: its attempt is spent (start_jobs)
    # only when it starts, and ``attempts`` is then one more.
    started: bool = True

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> ClaimedJob:
        """From a row of ``claim_jobs`` (its last column, ``next_due``, is not the job's)."""
        return cls._make(row[:10])


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
    """One element of a job's ``errors`` history, as JSON (``at`` is added by the database).

    Never raises for a bad ``exc`` or ``message``: the history must be written whatever
    the job raised (see :func:`_format_traceback` and :func:`_printable`)."""
    text = "" if exc is None else _format_traceback(exc)[-TRACEBACK_LIMIT:]
    if not isinstance(message, str):  # e.g. Cancel(reason=42)
        message = _printable(message)
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


def _printable(value: object) -> str:
    """``str(value)``, or ``<unprintable TypeName>`` when its ``__str__`` raises (or returns
    something else than a str): a job's exception runs its own code when printed."""
    try:
        text = str(value)
    except Exception:
        text = None
    if not isinstance(text, str):
        return f"<unprintable {_class_name(value)}>"
    return text


def _format_traceback(exc: BaseException) -> str:
    """The traceback as Python prints it; when formatting raises (it runs the exception's
    own code: its ``__notes__``, its causes), the frames alone and why the rest is missing."""
    try:
        return "".join(traceback.format_exception(exc))
    except Exception as failure:
        try:
            frames = "".join(traceback.format_tb(exc.__traceback__))
        except Exception:
            frames = ""
        return (
            f"Traceback (most recent call last):\n{frames}{_type_name(exc)}: "
            f"<traceback could not be formatted: {_class_name(failure)}: {_printable(failure)}>\n"
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
    # jsonb cannot store NUL, and a lone surrogate cannot be encoded at all. str.* methods,
    # not the object's: a str subclass may override them.
    text = str.replace(text, "\x00", "\\0")
    return str.encode(text, "utf-8", "replace").decode("utf-8")


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module, name = getattr(cls, "__module__", None), _class_name(exc)
    return name if module == "builtins" or not isinstance(module, str) else f"{module}.{name}"


def _class_name(value: object) -> str:
    name = getattr(type(value), "__qualname__", None)
    return name if isinstance(name, str) else "object"


class Executor:
    """Runs jobs of one application and classifies their outcomes."""

    def __init__(self, tasks: dict[str, Task[Any, Any]], worker: str) -> None:
        self.tasks = tasks
        self.worker = worker
        self.threads = ElasticThreadPool()

    async def execute(self, job: ClaimedJob, ctx: JobContext | None) -> Finish:
        """Run ``job`` and return its outcome. Never raises except CancelledError: an
        outcome that cannot even be classified ends the job ``dead`` (see
        :meth:`_unclassified`), for a job whose outcome is never recorded would stay
        ``running`` for as long as its worker lives."""
        task = self.tasks.get(job.task)
        if task is None:
            return self._unknown_task(job)
        try:
            try:
                kwargs = self._arguments(task, job, ctx)
                value = await self._call(task, kwargs, ctx)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                return self.classify_exception(job, task, _explain(task, job, exc))
            return self.classify_value(job, task, value)
        except Exception as failure:
            return self._unclassified(job, failure)

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
        except Exception as exc:
            # Mostly PayloadError, but encoding also runs the value's own code (a dict
            # subclass's items()), and whatever that raises cannot be stored either. Not
            # retried: the handler's side effects are done, and it would likely return the
            # same value again.
            return self._dead(job, exc, f"the job's result cannot be stored: {_printable(exc)}")

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
            return self._dead(job, exc, _printable(exc))
        config = task.config
        retry = isinstance(exc, Retry) or (
            isinstance(exc, config.retry_on) and not isinstance(exc, config.discard_on)
        )
        if not retry or job.attempts >= job.max_attempts:
            return self._dead(job, exc, _printable(exc))
        delay = exc.delay if isinstance(exc, Retry) else None
        if delay is None:
            delay = _backoff(config.backoff, job.attempts)
        error = error_entry(job, self.worker, _traceback_of(exc), _type_name(exc), _printable(exc))
        return Finish(job.id, job.lease_token, "retryable", delay=delay, error=error, note="retry")

    def _dead(self, job: ClaimedJob, exc: BaseException, message: str) -> Finish:
        error = error_entry(job, self.worker, _traceback_of(exc), _type_name(exc), message)
        return Finish(job.id, job.lease_token, "dead", error=error, note="dead")

    def _unclassified(self, job: ClaimedJob, failure: Exception) -> Finish:
        # The last resort: the task's policy could not be applied to the outcome (an
        # outcome object whose attributes raise, say), so nothing says a retry would help.
        message = f"the job's outcome could not be classified: {_printable(failure)}"
        return self._dead(job, failure, message)

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
