"""``JobContext``: what a running job knows about itself, and how it talks to its worker.

A task receives it by declaring a parameter annotated ``pgjobs.JobContext`` (or named
``ctx``)::

    @app.task
    def import_file(path: str, ctx: pgjobs.JobContext) -> int:
        for i, chunk in enumerate(chunks(path)):
            if ctx.shutting_down:
                raise pgjobs.Snooze(0)   # hand the job back; it resumes on another worker
            ctx.progress(i / total)

A job enqueued with ``depends_on`` reads what its parents returned with
``ctx.parent_results()`` (``await ctx.parent_results_async()`` in an ``async def`` task).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from pgjobs.enqueue import to_json

ProgressWriter = Callable[[int, uuid.UUID, str], Awaitable[bool]]
# Reads {parent id: result} of the succeeded parents of a job.
ParentReader = Callable[[int], Awaitable[dict[int, Any]]]

# How long a sync task waits for its progress write before giving up on it.
_PROGRESS_TIMEOUT = 10.0


class JobContext:
    """The running attempt of one job.

    ``id`` is stable across attempts (use it, or :attr:`idempotency_key`, to make side
    effects idempotent: execution is at least once); ``lease_token`` is unique to this
    attempt. ``shutting_down`` becomes true when the worker was asked to stop (finish soon,
    or hand the job back); ``cancelled`` becomes true when the worker gave up on this
    attempt (timeout, lost lease): its outcome will not be recorded.
    """

    def __init__(
        self,
        *,
        id: int,
        attempt: int,
        max_attempts: int,
        queue: str,
        task: str,
        lease_token: uuid.UUID,
        worker: str,
        loop: asyncio.AbstractEventLoop,
        write_progress: ProgressWriter,
        shutdown: threading.Event,
        read_parents: ParentReader | None = None,
    ) -> None:
        self.id = id
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.queue = queue
        self.task = task
        self.lease_token = lease_token
        self.worker = worker
        self._loop = loop
        self._write_progress = write_progress
        self._shutdown = shutdown
        self._read_parents = read_parents
        self._parent_results: dict[int, Any] | None = None
        # A plain flag: set on the loop thread, read from the task's thread; an Event per
        # job costs more than the rest of the context.
        self._cancelled = False

    def __repr__(self) -> str:
        return f"<JobContext job={self.id} task={self.task} attempt={self.attempt}>"

    @property
    def idempotency_key(self) -> str:
        """A key that is the same for every attempt of this job."""
        return f"pgjobs-job-{self.id}"

    @property
    def is_last_attempt(self) -> bool:
        """True when a failure of this attempt sends the job to ``dead``."""
        return self.attempt >= self.max_attempts

    @property
    def shutting_down(self) -> bool:
        """True once the worker is shutting down (SIGTERM/SIGINT)."""
        return self._shutdown.is_set()

    @property
    def cancelled(self) -> bool:
        """True once the worker abandoned this attempt (timeout or lost lease)."""
        return self._cancelled

    def progress(self, value: float | int | str | None, data: Any = None) -> None:
        """Record progress: a number (or short text) and optional JSON ``data``.

        From a sync task (a worker thread) this waits until the row is written; from an
        async task it schedules the write and returns at once (``await
        ctx.progress_async(...)`` to wait). A write is fenced by the lease: after the worker
        lost the job, it changes nothing.
        """
        payload = _payload(value, data)
        if _on_loop(self._loop):
            self._loop.create_task(self._write(payload))
            return
        future = asyncio.run_coroutine_threadsafe(self._write(payload), self._loop)
        future.result(timeout=_PROGRESS_TIMEOUT)

    def parent_results(self) -> dict[int, Any]:
        """``{parent job id: result}`` of the jobs this one was enqueued to wait for
        (``depends_on``, chains, fan-ins). Only parents that succeeded are in it: with
        ``on_parent_failure="run"`` a failed parent is missing. Read from the database
        once per attempt. From a sync task; ``async def`` tasks await
        :meth:`parent_results_async`.
        """
        if self._parent_results is None:
            if _on_loop(self._loop):
                raise RuntimeError(
                    "ctx.parent_results() would block the event loop: in an async task, "
                    "use await ctx.parent_results_async()"
                )
            future = asyncio.run_coroutine_threadsafe(self._load_parents(), self._loop)
            future.result(timeout=_PROGRESS_TIMEOUT)
        assert self._parent_results is not None
        return dict(self._parent_results)

    async def parent_results_async(self) -> dict[int, Any]:
        """The async twin of :meth:`parent_results`."""
        if self._parent_results is None:
            await self._load_parents()
        assert self._parent_results is not None
        return dict(self._parent_results)

    async def _load_parents(self) -> None:
        if self._read_parents is None:
            raise RuntimeError("this JobContext cannot read parent results (no worker)")
        self._parent_results = await self._read_parents(self.id)

    async def progress_async(self, value: float | int | str | None, data: Any = None) -> bool:
        """Record progress from an async task; True if this attempt still holds the job."""
        return await self._write(_payload(value, data))

    async def _write(self, payload: str) -> bool:
        return await self._write_progress(self.id, self.lease_token, payload)

    def _cancel(self) -> None:
        self._cancelled = True


def _payload(value: float | int | str | None, data: Any) -> str:
    document: dict[str, Any] = {"value": value}
    if data is not None:
        document["data"] = data
    return to_json(document, "progress values")


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
