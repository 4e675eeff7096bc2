"""Write job outcomes in batches, fenced by lease token.

Outcomes queue up in memory and one task writes them with ``finish_jobs``: everything that
arrived while the previous statement ran goes into the next one, so an idle worker writes
an outcome as soon as it has it and a busy one writes hundreds per statement. A row whose
lease the worker no longer holds is not written (and is logged): that attempt lost the job
to a rescue, and the job's newer attempt stays as it is.

A statement that fails for a reason other than a lost connection is retried row by row:
only an outcome whose own content the database refuses (SQLSTATE class 22, a data
exception such as a timestamp out of range, or 54, a program limit such as a jsonb value too
large) is replaced by a ``pgjobs.OutcomeNotStored`` failure. Any other error (a deadlock, a
lock timeout, an application's trigger) says nothing about the outcome, so it is kept and
written again later with backoff, without holding up the outcomes that arrive meanwhile;
when the worker stops with such an outcome still unwritten, the job is left running and its
worker's row goes, so the job is rescued by the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from operator import attrgetter
from typing import Any, NamedTuple

import psycopg

from pgjobs.errors import DatabaseError, one_line
from pgjobs.execution import Finish
from pgjobs.queries import Queries
from pgjobs.settings import events_channel_for

log = logging.getLogger("pgjobs.worker")

BATCH_LIMIT = 500
GATHER_SECONDS = 0.002
# Backoff of an outcome refused by a statement error: doubling from the first delay, capped.
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 5.0
# How long a stopping worker keeps retrying refused outcomes before leaving their jobs to
# the rescue.
CLOSE_RETRY_SECONDS = 10.0
# SQLSTATE classes of errors about a value itself (see the module docstring).
CONTENT_ERROR_CLASSES = ("22", "54")
# Finish.note of the failure record that replaced an unstorable outcome.
_NOT_STORED = "outcome not stored"
Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]


class _Deferred(NamedTuple):
    """An outcome refused by a statement error, to be written again at ``due``."""

    due: float
    tries: int
    finish: Finish


class Completions:
    """The outcome writer of one worker process (its own connection)."""

    def __init__(
        self,
        queries: Queries,
        worker: str,
        connect: Connect,
        events: Callable[[], bool] = lambda: False,
    ) -> None:
        self.queries = queries
        self.events = events
        self.events_channel = events_channel_for(queries.schema)
        self.worker = worker
        self._connect = connect
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._connecting = asyncio.Lock()
        self._pending: list[Finish] = []
        # The batch a statement is writing (or retrying after a lost connection) now.
        self._writing: list[Finish] = []
        self._deferred: list[_Deferred] = []
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = asyncio.Event()
        self._closing = False
        self._give_up_at = float("inf")
        self.written = 0
        self.batches = 0
        self.stale = 0
        # Outcomes left unwritten at close (their jobs stay running until rescued).
        self.abandoned = 0
        # Called after each written batch with the queues of the jobs it finished and how
        # many dependent jobs it made runnable (finish_jobs settles the children of
        # finished jobs): the worker claims again at once where that made room or work,
        # since workers never NOTIFY.
        self.on_written: Callable[[set[str], int], None] | None = None

    def unwritten_leases(self) -> list[uuid.UUID]:
        """The leases of every outcome not written yet: queued, being written, or set
        aside for a retry. Their jobs are still held by this worker."""
        unwritten = self._pending + self._writing + [d.finish for d in self._deferred]
        return [f.lease_token for f in unwritten]

    def add(self, finish: Finish) -> None:
        """Queue one outcome for the next batch."""
        self._pending.append(finish)
        self._idle.clear()
        self._arrived.set()

    async def flush(self) -> None:
        """Wait until everything queued so far is written, given up on, or set aside for a
        later retry after a statement error."""
        while self._pending or not self._idle.is_set():
            self._arrived.set()
            await self._idle.wait()

    async def run(self) -> None:
        """Write batches until :meth:`close`; survives lost connections."""
        try:
            while not (self._closing and not self._pending and not self._deferred):
                await self._wait_for_work()
                self._arrived.clear()
                if self._pending and len(self._pending) < BATCH_LIMIT and not self._closing:
                    # Jobs finishing one after another: gather a few ms' worth per statement.
                    await asyncio.sleep(GATHER_SECONDS)
                while self._pending:
                    batch = self._pending[:BATCH_LIMIT]
                    self._pending = self._pending[BATCH_LIMIT:]
                    await self._writing_while(batch, self._write_with_retry(batch))
                if self._deferred:
                    await self._retry_deferred()
                self._idle.set()
        finally:
            self._stopped.set()

    async def close(self) -> None:
        """Write what is queued, then stop :meth:`run` and close the connection.

        Outcomes refused by statement errors are retried for up to ``CLOSE_RETRY_SECONDS``
        more; those still refused then are left unwritten (see the module docstring)."""
        self._closing = True
        self._give_up_at = time.monotonic() + CLOSE_RETRY_SECONDS
        self._arrived.set()
        await self.flush()
        if self._deferred:
            await self._stopped.wait()
        if self._conn is not None:
            await self._conn.close()

    async def _wait_for_work(self) -> None:
        if not self._deferred:
            await self._arrived.wait()
            return
        timeout = min(d.due for d in self._deferred) - time.monotonic()
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)

    async def write_progress(self, job_id: int, lease_token: uuid.UUID, payload: str) -> bool:
        """Store a running job's progress; False when this worker no longer holds the job."""
        conn = await self._connection()
        cur = await conn.execute(
            self.queries.set_progress,
            {
                "id": job_id,
                "lease_token": lease_token,
                "progress": payload,
                "events": self.events(),
                "events_channel": self.events_channel,
            },
        )
        return await cur.fetchone() is not None

    async def parent_results(self, job_id: int) -> dict[int, Any]:
        """``{parent id: result}`` of the succeeded parents of job ``job_id``
        (JobContext.parent_results)."""
        conn = await self._connection()
        cur = await conn.execute(self.queries.parent_results, {"id": job_id})
        return {row[0]: row[2] for row in await cur.fetchall() if row[1] == "succeeded"}

    async def _write_with_retry(self, batch: list[Finish], tries: int = 0) -> None:
        """Write ``batch``: again and again while the connection is lost; row by row after
        a statement error. ``tries``: how often these outcomes were refused before."""
        delay = 0.05
        while True:
            try:
                await self._write(batch)
                return
            except (psycopg.Error, DatabaseError) as exc:
                if not isinstance(exc, psycopg.Error) or self._connection_lost(exc):
                    # Outcomes are fenced, so writing a batch twice is harmless; losing one
                    # would leave jobs running until rescued.
                    reason = _describe(exc) if isinstance(exc, psycopg.Error) else exc
                    log.warning("cannot write %d job outcome(s), retrying: %s", len(batch), reason)
                    await self._drop_connection()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                error = exc
            if len(batch) > 1:
                await self._write_one_by_one(batch, error, tries)
                return
            finish = batch[0]
            if _content_refused(error) and finish.note != _NOT_STORED:
                log.error(
                    "cannot store the outcome (%s) of job %s: %s; recording OutcomeNotStored",
                    finish.state,
                    finish.job_id,
                    _describe(error),
                )
                batch = [_unstorable(finish, error)]
                continue
            self._defer(finish, tries + 1, error)
            return

    async def _write_one_by_one(
        self, batch: list[Finish], first: psycopg.Error, tries: int
    ) -> None:
        # A statement error names no row: find the rows it was about; the others are
        # written at once.
        log.warning(
            "writing %d job outcome(s) failed (%s); writing them one by one",
            len(batch),
            _describe(first),
        )
        for finish in batch:
            await self._write_with_retry([finish], tries)

    def _defer(self, finish: Finish, tries: int, exc: psycopg.Error) -> None:
        """Set aside an outcome refused by a statement error that is not about its
        content: it is kept and written again after a backoff (fenced as always, so a retry
        after the lease was lost writes nothing)."""
        now = time.monotonic()
        delay = min(RETRY_FIRST_SECONDS * 2.0 ** min(tries - 1, 16), RETRY_MAX_SECONDS)
        if self._closing and now + delay > self._give_up_at:
            self.abandoned += 1
            log.error(
                "cannot write the outcome (%s) of job %s (%s) and the worker is stopping: "
                "the job stays running until rescued",
                finish.state,
                finish.job_id,
                _describe(exc),
            )
            return
        # Once at first, then about once a minute: a refusal can last.
        if tries == 1 or tries % 12 == 0:
            log.warning(
                "cannot write the outcome (%s) of job %s (%s); keeping it and retrying "
                "(%d failed tries)",
                finish.state,
                finish.job_id,
                _describe(exc),
                tries,
            )
        self._deferred.append(_Deferred(now + delay, tries, finish))

    async def _retry_deferred(self) -> None:
        now = time.monotonic()
        due = [d for d in self._deferred if d.due <= now]
        if not due:
            return
        self._deferred = [d for d in self._deferred if d.due > now]
        # Together first: once the cause has passed (a lock released, a trigger fixed), one
        # statement writes them all.
        for start in range(0, len(due), BATCH_LIMIT):
            chunk = [d.finish for d in due[start : start + BATCH_LIMIT]]
            tries = max(d.tries for d in due[start : start + BATCH_LIMIT])
            await self._writing_while(chunk, self._write_with_retry(chunk, tries))

    async def _writing_while(self, batch: list[Finish], write: Awaitable[None]) -> None:
        """Await ``write``, with ``batch`` counted among the unwritten outcomes meanwhile
        (they left the queue: see unwritten_leases)."""
        self._writing = batch
        try:
            await write
        finally:
            self._writing = []

    def _connection_lost(self, exc: psycopg.Error) -> bool:
        """Whether ``exc`` is about the connection rather than the statement."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return True
        sqlstate = exc.sqlstate
        if sqlstate is None:
            # Raised by psycopg itself: a parameter it could not send is about the
            # statement; anything else (an interface error) about the connection.
            return not isinstance(exc, psycopg.DataError)
        # 08: connection exception; 57P: the server is shutting down or restarting.
        return sqlstate.startswith(("08", "57P"))

    async def _write(self, batch: list[Finish]) -> None:
        conn = await self._connection()
        cur = await conn.execute(self.queries.finish_jobs, self._params(batch))
        rows = await cur.fetchall()
        written = {row[0] for row in rows}
        if rows and self.on_written is not None:
            self.on_written({row[2] for row in rows}, rows[0][1])
        self.written += len(written)
        self.batches += 1
        lost = [f.job_id for f in batch if f.job_id not in written]
        if lost:
            self.stale += len(lost)
            log.warning(
                "lease lost: %d outcome(s) not written, the job(s) moved on without this "
                "worker (rescued or handed back): %s",
                len(lost),
                lost[:20],
            )

    def _params(self, batch: list[Finish]) -> dict[str, Any]:
        # In id order: finish_jobs then locks its rows in id order (no deadlock between
        # overlapping batches). zip() turns the outcomes into columns without a Python
        # loop per job.
        batch = sorted(batch, key=attrgetter("job_id"))
        columns = map(list, zip(*batch, strict=True))
        ids, tokens, states, results, delays, errors, refunds, _notes = columns
        return {
            "id": ids,
            "lease_token": tokens,
            "state": states,
            "result": _trimmed(results, None),
            "delay": _trimmed(delays, None),
            "error": _trimmed(errors, None),
            "refund": _trimmed(refunds, 0),
            "worker": self.worker,
            "events": self.events(),
            "events_channel": self.events_channel,
        }

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        async with self._connecting:
            if self._conn is None or self._conn.closed:
                self._conn = await self._connect()
            return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None


def _trimmed(values: list[Any], nothing: Any) -> list[Any]:
    """``values`` without its trailing ``nothing`` values (finish_jobs pads the column with
    NULLs, which stand for ``nothing``)."""
    if values.count(nothing) == len(values):  # a batch of plain successes
        return []
    end = len(values)
    while end and values[end - 1] == nothing:
        end -= 1
    return values if end == len(values) else values[:end]


def _content_refused(exc: psycopg.Error) -> bool:
    """Whether the database (or psycopg, before sending) refused a value of the statement
    itself, rather than failing it for a reason of its own."""
    if exc.sqlstate is None:
        return isinstance(exc, psycopg.DataError)
    return exc.sqlstate.startswith(CONTENT_ERROR_CLASSES)


def _describe(exc: psycopg.Error) -> str:
    """The error on one line: its primary message (no DETAIL or CONTEXT) and SQLSTATE."""
    message = one_line(exc)
    return f"{message} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else message


def _unstorable(finish: Finish, exc: psycopg.Error) -> Finish:
    """The failure record that replaces an outcome whose content cannot be stored."""
    message = f"the job's outcome ({finish.state}) could not be stored: {_describe(exc)}"
    error = json.dumps({"type": "pgjobs.OutcomeNotStored", "message": message[:2000]})
    return Finish(finish.job_id, finish.lease_token, "dead", error=error, note=_NOT_STORED)
