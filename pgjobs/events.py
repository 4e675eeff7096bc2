"""Job events: a sync and async stream of what happens to jobs, built on LISTEN.

Workers never send notifications by default (each NOTIFY takes PostgreSQL's cluster-wide
commit lock). Events are opt-in and cost nothing while nobody listens: a subscriber connects
with ``application_name = 'pgjobs-events:<schema>'``, every worker checks at each heartbeat
whether such a session exists, and only while one does do its claim, outcome and progress
statements add ONE ``pg_notify`` each on the channel ``pgjobs_<schema>_events``. So events
start flowing within one heartbeat interval of the first subscriber connecting.

Payloads carry ids, queues, task names, kinds, attempts and progress, never job arguments.
A payload that would not fit in a notification is replaced by a ``resync`` hint (a
:class:`JobEvent` with ``kind == "resync"`` and no job id): events were lost, re-read the
rows you care about. A subscriber that reconnects yields one as well.

Kinds: ``started``, ``progress``, ``succeeded``, ``retried`` (the attempt failed and the job
will run again), ``snoozed``, ``dead``, ``cancelled``. ``enqueued`` events are not
published: enqueue's wake-up notification carries a queue and a count, not job ids.
Filtering by ``job_id`` / ``queue`` happens in the subscriber. A ``dead_alert`` event (no
job id; ``detail`` holds the dead count and threshold) is sent, whether or not anyone
listens (it is rare), when a queue's dead count reaches its alert threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from pgjobs.database import behind_pooler, behind_pooler_async
from pgjobs.errors import ConfigurationError, DatabaseError
from pgjobs.settings import events_application_name, events_channel_for
from pgjobs.worker_db import connect_async, connect_sync

if TYPE_CHECKING:
    from pgjobs.app import App

log = logging.getLogger("pgjobs.events")

KINDS = (
    "enqueued",  # only from producers with App(enqueue_events=True)
    "started",
    "progress",
    "succeeded",
    "failed",  # an attempt failed; followed by "retried" or "dead"
    "retried",
    "snoozed",
    "dead",
    "cancelled",
)
_HEALTH_INTERVAL = 10.0
_RECONNECT_DELAY = 0.5


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One thing that happened to one job (``job_id`` is None for a ``resync`` hint)."""

    job_id: int | None
    queue: str | None
    task: str | None
    kind: str
    attempt: int | None
    at: dt.datetime
    progress: Any = None
    progress_data: Any = None
    detail: dict[str, Any] | None = None
    """For ``dead_alert`` events: ``{"dead": count, "threshold": n}``."""


def parse_payload(payload: str) -> list[JobEvent]:
    """The events of one notification (defensively: anything unexpected is a resync)."""
    try:
        message = json.loads(payload)
        at = dt.datetime.fromtimestamp(float(message.get("at", time.time())), dt.UTC)
        if message.get("kind") == "resync":
            return [_resync(at)]
        if message.get("kind") == "dead_alert":
            detail = {"dead": int(message["dead"]), "threshold": int(message["threshold"])}
            return [JobEvent(None, message["queue"], None, "dead_alert", None, at, detail=detail)]
        events = []
        for entry in message["events"]:
            job_id, queue, task, kind, attempt = entry[:5]
            value = data = None
            if kind == "progress" and len(entry) > 5 and isinstance(entry[5], dict):
                value, data = entry[5].get("value"), entry[5].get("data")
            events.append(JobEvent(int(job_id), queue, task, kind, attempt, at, value, data))
        return events
    except (ValueError, TypeError, KeyError, AttributeError):
        return [_resync(dt.datetime.now(dt.UTC))]


def _resync(at: dt.datetime) -> JobEvent:
    return JobEvent(None, None, None, "resync", None, at)


def _needs_direct_url() -> ConfigurationError:
    return ConfigurationError(
        "job events need LISTEN, which does not work through a transaction pooler: "
        "give the App a direct listen_url (or set PGJOBS_LISTEN_URL / --listen-url)"
    )


class EventStream:
    """``app.events(job_id=None, queue=None)``: iterate with ``for`` or ``async for``.

    Each iteration opens its own dedicated autocommit connection (LISTEN), reconnects when
    it dies (yielding a ``resync`` event), and closes it when the loop ends.
    """

    def __init__(self, app: App, job_id: int | None = None, queue: str | None = None) -> None:
        self.app = app
        self.job_id = job_id
        self.queue = queue
        self.channel = events_channel_for(app.schema)
        self.application_name = events_application_name(app.schema)

    def _wanted(self, event: JobEvent) -> bool:
        if event.kind == "resync":
            return True
        if event.kind == "dead_alert":
            return self.job_id is None and self.queue in (None, event.queue)
        if self.job_id is not None and event.job_id != self.job_id:
            return False
        return self.queue is None or event.queue == self.queue

    def _listen_sql(self) -> sql.Composed:
        return sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))

    # -- sync ----------------------------------------------------------------------------

    def connect(self) -> psycopg.Connection[Any]:
        """A subscriber connection, listening (workers see it at their next heartbeat)."""
        url = self.app.listen_url
        if behind_pooler(url):
            raise _needs_direct_url()
        conn = connect_sync(url, self.application_name)
        conn.execute(self._listen_sql())
        return conn

    def __iter__(self) -> Iterator[JobEvent]:
        reconnecting = False
        while True:
            try:
                conn = self.connect()
            except DatabaseError as exc:
                log.warning("events: cannot connect (retrying): %s", exc)
                time.sleep(_RECONNECT_DELAY)
                continue
            try:
                if reconnecting:
                    yield _resync(dt.datetime.now(dt.UTC))
                while True:
                    for notify in conn.notifies(timeout=_HEALTH_INTERVAL):
                        for event in parse_payload(notify.payload):
                            if self._wanted(event):
                                yield event
                    conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                log.warning("events: connection lost, reconnecting: %s", exc)
                reconnecting = True
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
            time.sleep(_RECONNECT_DELAY)

    # -- async ---------------------------------------------------------------------------

    async def connect_async(self) -> psycopg.AsyncConnection[Any]:
        """The async twin of :meth:`connect`."""
        url = await asyncio.to_thread(lambda: self.app.listen_url)
        if await behind_pooler_async(url):
            raise _needs_direct_url()
        conn = await connect_async(url, self.application_name)
        await conn.execute(self._listen_sql())
        return conn

    def __aiter__(self) -> AsyncIterator[JobEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[JobEvent]:
        reconnecting = False
        while True:
            try:
                conn = await self.connect_async()
            except DatabaseError as exc:
                log.warning("events: cannot connect (retrying): %s", exc)
                await asyncio.sleep(_RECONNECT_DELAY)
                continue
            try:
                if reconnecting:
                    yield _resync(dt.datetime.now(dt.UTC))
                while True:
                    async for notify in conn.notifies(timeout=_HEALTH_INTERVAL):
                        for event in parse_payload(notify.payload):
                            if self._wanted(event):
                                yield event
                    await conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                log.warning("events: connection lost, reconnecting: %s", exc)
                reconnecting = True
            finally:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()
            await asyncio.sleep(_RECONNECT_DELAY)
