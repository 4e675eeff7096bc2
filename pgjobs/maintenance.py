"""Heartbeats and crash rescue, on a thread of their own.

Every worker process has a row in ``workers`` and refreshes its ``last_heartbeat`` every
``interval`` seconds from this thread, over its own connection, so that neither a busy event
loop nor a CPU-bound sync task can delay it (the GIL is handed over every few ms). After each
heartbeat the same thread runs ``rescue_jobs``: the running jobs of workers silent for more
than ``timeout`` seconds (or whose row is gone) go back to ``available`` with the lost attempt
counted, or to ``dead`` when that was their last attempt; the expired rows are deleted.
Every live worker does this; SKIP LOCKED makes them share the work rather than queue up
behind each other, and the first to notice a dead worker rescues its jobs.

A worker that finds its own row gone was declared dead (paused past ``timeout``, cut off
from the database): it registers again and asks its loop to check which leases it still
holds (``on_lost``), since its jobs may be running elsewhere by now.

Retention runs here too: every ``prune_interval`` seconds one worker (whichever takes the
schema's prune lock, a transaction-level advisory lock, so no leader has to be elected or
lost) deletes one bounded batch of finished jobs past their retention per final state. A
full batch brings the next pass forward, so a large backlog drains in steady small
transactions instead of one long one. On a partitioned jobs table the same pass archives
finished jobs into day partitions and drops the partitions whose day is over
(partitioning.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from pgjobs.admin import Retention
from pgjobs.errors import DatabaseError, SchemaNotReadyError
from pgjobs.partitioning import archive_and_drop, is_partitioned
from pgjobs.queries import Queries
from pgjobs.settings import events_application_name, events_channel_for
from pgjobs.worker_db import connect_sync, local_settings

log = logging.getLogger("pgjobs.maintenance")

APPLICATION_NAME = "pgjobs-heartbeat"
PRUNE_INTERVAL = 60.0
PRUNE_BATCH = 10_000
DEFAULT_RETENTION = Retention()


@dataclass(frozen=True, slots=True)
class Registration:
    """What a worker says about itself in its ``workers`` row."""

    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    meta: dict[str, Any]

    def params(self) -> dict[str, Any]:
        """Parameters of ``register_worker``."""
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "queues": self.queues,
            "concurrency": self.concurrency,
            "meta": json.dumps(self.meta),
        }


class Maintenance:
    """The heartbeat-and-rescue thread of one worker process."""

    def __init__(
        self,
        url: str,
        queries: Queries,
        registration: Registration,
        *,
        interval: float,
        timeout: float,
        on_lost: Callable[[], None],
        on_reconnected: Callable[[], None] = lambda: None,
        retention: Retention | None = DEFAULT_RETENTION,
        prune_interval: float = PRUNE_INTERVAL,
        prune_batch: int = PRUNE_BATCH,
        on_dead_alert: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.url = url
        self.queries = queries
        self.registration = registration
        self.interval = interval
        self.timeout = timeout
        self.on_lost = on_lost
        # Called after the heartbeat connection was lost and made again: the server may be
        # a promoted standby now (see Worker._release_forgotten).
        self.on_reconnected = on_reconnected
        self.rescued = 0
        self.retention = retention
        self.prune_interval = prune_interval
        self.prune_batch = prune_batch
        self.pruned = 0
        self.archived = 0
        self.dropped_partitions = 0
        # Read by the worker's statements: publish job events (pgjobs.events) only while
        # an events subscriber of this schema is connected; checked every heartbeat.
        self.events = False
        self.on_dead_alert = on_dead_alert
        self.dead_alerts = 0
        # Not at once: a fleet restarting together should not all try to prune on start.
        self._prune_at = time.monotonic() + prune_interval * random.uniform(0.5, 1.0)
        self._conn: psycopg.Connection[Any] | None = None
        self._dropped = False
        # When the last heartbeat (or registration) that got through was sent (monotonic).
        self._beat_at = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgjobs-heartbeat", daemon=True)

    def start(self) -> None:
        """Register (synchronously: a worker must never claim before its row exists, or a
        rescuer would take the jobs back), then heartbeat on the thread."""
        self._conn = self._connect()
        sent = time.monotonic()
        try:
            self._conn.execute(self.queries.register_worker, self.registration.params())
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaNotReadyError(
                "pgjobs' tables are missing in this database: run `pgjobs migrate upgrade`"
            ) from exc
        self._beat_at = sent
        self.check_events(self._conn)
        self._thread.start()

    def stop(self, deregister: bool = True) -> None:
        """Stop heartbeating; delete the row when the worker holds no more jobs."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)
        if deregister:
            try:
                self._connection().execute(
                    self.queries.deregister_worker, {"id": self.registration.id}
                )
            except (psycopg.Error, DatabaseError) as exc:
                log.warning("could not remove this worker's row (it will expire): %s", exc)
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval * random.uniform(0.9, 1.1)):
            try:
                self.tick()
            except (psycopg.Error, DatabaseError) as exc:
                log.warning("heartbeat failed (will retry): %s", " ".join(str(exc).split()))
                self._drop()

    def tick(self) -> None:
        """One heartbeat, then one rescue pass, then (when due) one retention pass."""
        conn = self._connection()
        sent = time.monotonic()
        row = conn.execute(self.queries.heartbeat, {"id": self.registration.id}).fetchone()
        if row is None:
            log.warning(
                "this worker (%s) was declared dead by its peers (no heartbeat for %s s); "
                "registering again and checking which jobs it still holds",
                self.registration.id,
                self.timeout,
            )
            sent = time.monotonic()
            conn.execute(self.queries.register_worker, self.registration.params())
            self.on_lost()
        self._beat_at = sent
        self.check_events(conn)
        self.rescue(conn)
        self.check_dead_alerts(conn)
        if self.retention is not None and time.monotonic() >= self._prune_at:
            full = self.prune(conn)
            self._prune_at = time.monotonic() + (self.interval if full else self.prune_interval)

    def counted_alive(self) -> bool:
        """Whether the peers still count this worker alive: its last heartbeat that got
        through is younger than ``timeout`` (less half an interval, for a claim on its
        way). Once it is older they may rescue its running jobs, the ones it claims next
        included, and run them a second time."""
        return time.monotonic() < self._beat_at + self.timeout - self.interval / 2

    def check_events(self, conn: psycopg.Connection[Any]) -> None:
        """Is an events subscriber connected? (sets :attr:`events`)"""
        name = events_application_name(self.queries.schema)
        row = conn.execute(self.queries.events_subscribed, {"application_name": name}).fetchone()
        wanted = bool(row and row[0])
        if wanted != self.events:
            log.info("job events %s", "on: a subscriber is connected" if wanted else "off")
        self.events = wanted

    def check_dead_alerts(self, conn: psycopg.Connection[Any]) -> None:
        """Fire the dead-letter alert of every queue whose dead count reached its
        threshold since the last alert (one worker at a time, once per crossing): a
        warning, a ``dead_alert`` event and the application's hooks."""
        with conn.transaction():
            local_settings(conn)
            lock = {"key": f"pgjobs:{self.queries.schema}:dead_alert"}
            if conn.execute(self.queries.try_dead_alert_lock, lock).fetchone() != (True,):
                return
            params = {"events_channel": events_channel_for(self.queries.schema)}
            fired = conn.execute(self.queries.dead_alerts, params).fetchall()
        for queue, dead, threshold in fired:
            self.dead_alerts += 1
            log.warning(
                "dead-letter alert: queue %s has %d dead job(s) (threshold %d)",
                queue,
                dead,
                threshold,
            )
            if self.on_dead_alert is not None:
                # On a thread of its own: a slow webhook must not delay the heartbeat.
                threading.Thread(
                    target=self._call_dead_alert_hook,
                    args=(queue, dead, threshold),
                    name="pgjobs-dead-alert",
                    daemon=True,
                ).start()

    def _call_dead_alert_hook(self, queue: str, dead: int, threshold: int) -> None:
        assert self.on_dead_alert is not None
        try:
            self.on_dead_alert(queue, dead, threshold)
        except Exception:
            log.exception("the dead-letter alert hook failed (queue %s)", queue)

    def rescue(self, conn: psycopg.Connection[Any]) -> None:
        """Rescue the jobs of dead workers (whichever live worker gets there first)."""
        params: dict[str, Any] = {"timeout": self.timeout, "worker": None, "held": []}
        row = conn.execute(self.queries.rescue_jobs, params).fetchone()
        if row is None:
            return
        available, dead, workers = row
        if available or dead or workers:
            self.rescued += available + dead
            log.warning(
                "rescued %d job(s) of dead workers (%d sent to dead: out of attempts); "
                "removed %d expired worker(s)",
                available + dead,
                dead,
                workers,
            )

    def prune(self, conn: psycopg.Connection[Any]) -> bool:
        """Delete one batch of expired finished jobs per state, if no other worker is
        pruning this schema right now; True when a batch came back full (more to do)."""
        assert self.retention is not None
        full = False
        with conn.transaction():
            local_settings(conn)
            lock = {"key": f"pgjobs:{self.queries.schema}:prune"}
            if conn.execute(self.queries.try_prune_lock, lock).fetchone() != (True,):
                return False
            for state, period in self.retention.periods().items():
                if period is None:
                    continue
                params = {
                    "state": state,
                    "older_than": period.total_seconds(),
                    "limit": self.prune_batch,
                }
                deleted = len(conn.execute(self.queries.prune_batch, params).fetchall())
                self.pruned += deleted
                full = full or deleted == self.prune_batch
                if deleted:
                    log.info("retention: deleted %d %s job(s) past %s", deleted, state, period)
            if is_partitioned(conn, self.queries.schema):
                done = archive_and_drop(
                    conn, self.queries, self.retention.periods(), self.prune_batch
                )
                self.archived += done.archived
                self.dropped_partitions += done.dropped
                full = full or done.full
        return full

    def _connect(self) -> psycopg.Connection[Any]:
        return connect_sync(self.url, APPLICATION_NAME)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            lost = self._dropped or self._conn is not None
            self._conn = self._connect()
            self._dropped = False
            if lost:
                self.on_reconnected()
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
            self._dropped = True
