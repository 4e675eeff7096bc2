"""One LISTEN connection per dashboard process, fanned out to every browser.

The hub is an events subscriber (:mod:`pgjobs.events`): while it is connected, workers
publish job events, and it also listens to the enqueue wake-up channel (which names a queue,
not jobs). Every browser gets a :class:`Subscription`, a bounded queue: a browser too slow
to keep up loses events and is told to resync, it never holds the others back.

Pages that show aggregates (queues, workers) are refreshed by ONE server-side snapshot,
taken at most once per ``debounce`` seconds after something happened (and every
``refresh_every`` seconds while someone watches, for what changes without an event: ages,
heartbeats, jobs becoming due), then sent to every watching browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgjobs.app import App
from pgjobs.errors import PgJobsError
from pgjobs.events import EventStream, JobEvent, parse_payload
from pgjobs.metrics import EventMetrics

log = logging.getLogger("pgjobs.dashboard")

Snapshot = Callable[[], Awaitable[dict[str, str]]]
# What a job's state is after an event (None: the event does not change it).
STATE_AFTER = {
    "enqueued": "available",
    "started": "running",
    "progress": "running",
    "succeeded": "succeeded",
    "retried": "retryable",
    "snoozed": "scheduled",
    "dead": "dead",
    "cancelled": "cancelled",
}
FINAL_KINDS = frozenset({"succeeded", "dead", "cancelled"})
_QUEUE_SIZE = 500
_HEALTH_INTERVAL = 10.0
_RECONNECT_DELAY = 1.0


@dataclass(frozen=True, slots=True)
class Message:
    """One server-sent event: its name and its data (a string, sent as is)."""

    name: str
    data: str


RESYNC = Message("resync", "{}")
CLOSED = Message("closed", "{}")


@dataclass(eq=False)
class Subscription:
    """One browser's feed: events of the jobs in ``job_ids`` (None: of every job), and
    page snapshots if it asked for them."""

    job_ids: frozenset[int] | None = None
    snapshots: bool = False
    queue: asyncio.Queue[Message] = field(default_factory=lambda: asyncio.Queue(_QUEUE_SIZE))
    lost: bool = False

    def put(self, message: Message) -> None:
        """Queue a message; when full, drop it and remember to send a resync."""
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.lost = True

    async def get(self, timeout: float) -> Message | None:
        """The next message, RESYNC after losses, None after ``timeout`` seconds."""
        if self.lost:
            self.lost = False
            with contextlib.suppress(asyncio.QueueEmpty):
                while True:
                    self.queue.get_nowait()
            return RESYNC
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None


def event_json(event: JobEvent) -> str:
    """A job event as the browsers receive it."""
    return json.dumps(
        {
            "id": event.job_id,
            "queue": event.queue,
            "task": event.task,
            "kind": event.kind,
            "state": STATE_AFTER.get(event.kind),
            "attempt": event.attempt,
            "progress": event.progress,
            "progress_data": event.progress_data,
            "at": event.at.isoformat(),
            "detail": event.detail,
        },
        default=str,
    )


class Hub:
    """The dashboard's event subscriber and fan-out (see the module docstring).

    Started on first use from the event loop that serves the dashboard; ``connected`` is
    set while its LISTEN connection is up.
    """

    def __init__(
        self,
        app: App,
        *,
        metrics: EventMetrics | None = None,
        snapshot: Snapshot | None = None,
        debounce: float = 1.0,
        refresh_every: float = 10.0,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.snapshot = snapshot
        self.debounce = debounce
        self.refresh_every = refresh_every
        self.subscribers: set[Subscription] = set()
        self.connected = asyncio.Event()
        self._stream = EventStream(app)
        self._wake_channel = app.channel
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start listening (once per event loop); call from the serving loop."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and all(not t.done() for t in self._tasks):
            return
        self._loop = loop
        self.connected = asyncio.Event()
        self._dirty = asyncio.Event()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._refresh())]

    async def aclose(self) -> None:
        """Stop listening and end every browser's stream."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for sub in list(self.subscribers):
            sub.put(CLOSED)

    def subscribe(
        self, job_ids: frozenset[int] | None = None, *, snapshots: bool = False
    ) -> Subscription:
        """A new browser feed; pair with :meth:`unsubscribe`."""
        self.ensure_started()
        sub = Subscription(job_ids=job_ids, snapshots=snapshots)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget a browser feed."""
        self.subscribers.discard(sub)

    # -- listening -----------------------------------------------------------------------

    async def _listen(self) -> None:
        reconnecting = False
        while True:
            try:
                conn = await self._connect()
            except (PgJobsError, psycopg.Error) as exc:
                log.warning("dashboard: cannot listen for events (retrying): %s", exc)
                await asyncio.sleep(_RECONNECT_DELAY)
                continue
            try:
                self.connected.set()
                if reconnecting:
                    self._broadcast_resync()
                await self._receive(conn)
            except psycopg.OperationalError as exc:
                log.warning("dashboard: event connection lost, reconnecting: %s", exc)
                reconnecting = True
            finally:
                self.connected.clear()
                with contextlib.suppress(psycopg.Error):
                    await conn.close()
            await asyncio.sleep(_RECONNECT_DELAY)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await self._stream.connect_async()
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._wake_channel)))
        return conn

    async def _receive(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async for notify in conn.notifies(timeout=_HEALTH_INTERVAL):
                if notify.channel == self._wake_channel:
                    self._dirty.set()  # jobs were enqueued (or retried, or a queue resumed)
                    continue
                for event in parse_payload(notify.payload):
                    self._dispatch(event)
            await conn.execute("SELECT 1")

    def _dispatch(self, event: JobEvent) -> None:
        self._dirty.set()
        if event.kind == "resync":
            self._broadcast_resync()
            return
        if self.metrics is not None:
            self.metrics.event(event)
        name = "job" if event.job_id is not None else event.kind
        message = Message(name, event_json(event))
        for sub in self.subscribers:
            # Events of no job (a dead-letter alert) go to every page that shows aggregates.
            wanted = sub.job_ids is None or event.job_id in sub.job_ids
            if wanted or (event.job_id is None and sub.snapshots):
                sub.put(message)

    def _broadcast_resync(self) -> None:
        self._dirty.set()
        for sub in self.subscribers:
            sub.put(RESYNC)

    # -- snapshots -----------------------------------------------------------------------

    async def _refresh(self) -> None:
        last = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.refresh_every)
            self._dirty.clear()
            if self.snapshot is None or not any(s.snapshots for s in self.subscribers):
                continue
            wait = last + self.debounce - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                self._dirty.clear()
            last = time.monotonic()
            await self._send_snapshot()

    async def _send_snapshot(self) -> None:
        assert self.snapshot is not None
        try:
            parts = await self.snapshot()
        except PgJobsError as exc:
            log.warning("dashboard: cannot refresh: %s", exc)
            return
        for name, html in parts.items():
            message = Message(name, html)
            for sub in self.subscribers:
                if sub.snapshots:
                    sub.put(message)
