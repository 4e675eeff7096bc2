"""Write job outcomes in batches, fenced by lease token.

Outcomes queue up in memory and one task writes them with ``finish_jobs``: everything that
arrived while the previous statement ran goes into the next one, so an idle worker writes
an outcome as soon as it has it and a busy one writes hundreds per statement. A row whose
lease the worker no longer holds is not written (and is logged): that attempt lost the job
to a rescue, and the job's newer attempt stays as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from operator import attrgetter
from typing import Any

import psycopg

from pgjobs.errors import DatabaseError
from pgjobs.execution import Finish
from pgjobs.queries import Queries
from pgjobs.settings import events_channel_for

log = logging.getLogger("pgjobs.worker")

BATCH_LIMIT = 500
GATHER_SECONDS = 0.002
Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]


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
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.written = 0
        self.batches = 0
        self.stale = 0
        # Called after each written batch with the queues of the jobs it finished and how
        # many dependent jobs it made runnable (finish_jobs settles the children of
        # finished jobs): the worker claims again at once where that made room or work,
        # since workers never NOTIFY.
        self.on_written: Callable[[set[str], int], None] | None = None

    def add(self, finish: Finish) -> None:
        """Queue one outcome for the next batch."""
        self._pending.append(finish)
        self._idle.clear()
        self._arrived.set()

    async def flush(self) -> None:
        """Wait until everything queued so far is written (or given up on)."""
        while self._pending or not self._idle.is_set():
            self._arrived.set()
            await self._idle.wait()

    async def run(self) -> None:
        """Write batches until :meth:`close`; survives lost connections."""
        while not (self._closing and not self._pending):
            await self._arrived.wait()
            self._arrived.clear()
            if len(self._pending) < BATCH_LIMIT and not self._closing:
                # Jobs finishing one after another: gather a few ms' worth per statement.
                await asyncio.sleep(GATHER_SECONDS)
            while self._pending:
                batch, self._pending = self._pending[:BATCH_LIMIT], self._pending[BATCH_LIMIT:]
                await self._write_with_retry(batch)
            self._idle.set()

    async def close(self) -> None:
        """Write what is queued, then stop :meth:`run` and close the connection."""
        self._closing = True
        self._arrived.set()
        await self.flush()
        if self._conn is not None:
            await self._conn.close()

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

    async def _write_with_retry(self, batch: list[Finish]) -> None:
        delay = 0.05
        while True:
            try:
                await self._write(batch)
                return
            except (psycopg.OperationalError, DatabaseError) as exc:
                # Outcomes are fenced, so writing a batch twice is harmless; losing one
                # would leave jobs running until rescued.
                log.warning("cannot write %d job outcome(s), retrying: %s", len(batch), exc)
                await self._drop_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except psycopg.Error as exc:
                await self._write_one_by_one(batch, exc)
                return

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

    async def _write_one_by_one(self, batch: list[Finish], first: psycopg.Error) -> None:
        # A statement error (not a connection error) names no row: find the bad one, and
        # record a storable failure in its place.
        log.error(
            "writing %d job outcome(s) failed (%s); writing them one by one", len(batch), first
        )
        for finish in batch:
            try:
                await self._write([finish])
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                log.error("cannot store the outcome of job %s: %s", finish.job_id, exc)
                await self._write([_unstorable(finish, exc)])

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


def _unstorable(finish: Finish, exc: psycopg.Error) -> Finish:
    import json

    message = f"the job's outcome ({finish.state}) could not be stored: {exc}"
    error = json.dumps({"type": "pgjobs.OutcomeNotStored", "message": message[:2000]})
    return Finish(finish.job_id, finish.lease_token, "dead", error=error)
