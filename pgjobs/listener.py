"""The one LISTEN connection of a worker process.

Enqueue sends ``{"queue": name}`` on the schema's channel when it commits jobs that are
runnable now (no count, so PostgreSQL folds the notifications of one transaction into one
per queue, however many statements enqueued); the listener passes the queues this worker
serves on to the claim loop, which claims at most as many jobs as it has free slots with
one statement (so one notification costs each idle process one claim, never one per slot).

Notifications are hints, never the only way a job is found: the connection is dedicated,
autocommit and never inside a transaction (a listener stuck in a transaction would fill
the server's notification queue); a dead connection (server restart,
``pg_terminate_backend``, a half-open TCP stream caught by keepalives or by the periodic
health check) is replaced with backoff; and after every (re)connect, LISTEN comes first and
an immediate poll second, so nothing committed while the listener was away waits for the
fallback poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import psycopg
from psycopg import sql

from pgjobs.errors import DatabaseError
from pgjobs.worker_db import connect_async

log = logging.getLogger("pgjobs.listener")

APPLICATION_NAME = "pgjobs-listener"


class Listener:
    """LISTEN on ``channel`` and call ``on_jobs(queue, n)`` for the served ``queues``;
    ``on_connect()`` after each successful (re)connect. With a ``control_channel``, also
    call ``on_cancel(job_ids)`` for the jobs an operator cancelled while they ran. After
    each batch of notifications for served queues, ``on_notified(connection)`` is awaited
    (the worker claims on it; an error it raises counts as a lost connection)."""

    def __init__(
        self,
        url: str,
        channel: str,
        queues: Collection[str],
        on_jobs: Callable[[str, int], None],
        on_connect: Callable[[], None],
        *,
        health_interval: float = 10.0,
        health_timeout: float = 5.0,
        max_backoff: float = 5.0,
        control_channel: str | None = None,
        on_cancel: Callable[[list[int]], None] | None = None,
        on_notified: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.url = url
        self.channel = channel
        self.queues = frozenset(queues)
        self.on_jobs = on_jobs
        self.on_connect = on_connect
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.max_backoff = max_backoff
        self.control_channel = control_channel
        self.on_cancel = on_cancel
        self.on_notified = on_notified
        self.backend_pid: int | None = None
        self.connects = 0
        self.connected = asyncio.Event()
        self.first_attempt = asyncio.Event()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting whenever the connection dies."""
        delay = 0.05
        while True:
            try:
                conn = await connect_async(
                    self.url, APPLICATION_NAME, durable=False, generic_plans=True
                )
            except DatabaseError as exc:
                log.warning("listener cannot connect (retrying in %.1f s): %s", delay, exc)
                self.first_attempt.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            try:
                await self._serve(conn)
            except (psycopg.Error, TimeoutError) as exc:
                log.warning("listener connection lost, reconnecting: %s", _one_line(exc))
                delay = 0.05
            except Exception:
                # A failing callback must not end the listener: the worker would go on
                # with its fallback poll alone, and nothing would say so.
                log.exception("listener failed, reconnecting")
            finally:
                self.connected.clear()
                self.backend_pid = None
                await _close_quietly(conn)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        if self.control_channel is not None:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.control_channel)))
        self.backend_pid = conn.info.backend_pid
        self.connects += 1
        again = "listening again" if self.connects > 1 else "listening"
        log.info("%s on channel %s (backend pid %s)", again, self.channel, self.backend_pid)
        self.connected.set()
        self.first_attempt.set()
        self.on_connect()  # LISTEN is in place: now poll, so nothing slips between the two
        while True:
            received = woken = False
            # One batch at a time (stop_after): the generator holds the connection, and
            # on_notified needs it. What arrives meanwhile waits in psycopg's backlog.
            async for notify in conn.notifies(timeout=self.health_interval, stop_after=1):
                received = True
                if notify.channel == self.channel:
                    woken |= self._dispatch(notify.payload)
                else:
                    self._dispatch_control(notify.payload)
            if woken and self.on_notified is not None:
                await self.on_notified(conn)
            elif not received:
                # Quiet for a while: prove the connection is alive (a half-open TCP stream
                # raises nothing by itself).
                await asyncio.wait_for(conn.execute("SELECT 1"), self.health_timeout)

    def _dispatch(self, payload: str) -> bool:
        """Pass a job notification on; True when it concerns a served queue."""
        # Payloads are hints from anyone who may NOTIFY on the channel: parse defensively,
        # and treat anything unexpected as "go and look".
        try:
            message = json.loads(payload)
            queue, jobs = message["queue"], int(message.get("jobs", 1))
        except (ValueError, TypeError, KeyError):
            self.on_jobs("", 1)
            return True
        if queue not in self.queues:
            return False
        self.on_jobs(queue, max(jobs, 1))
        return True

    def _dispatch_control(self, payload: str) -> None:
        try:
            ids = [int(i) for i in json.loads(payload)["cancel"]]
        except (ValueError, TypeError, KeyError):
            log.warning("ignored a malformed control message: %.200s", payload)
            return
        if self.on_cancel is not None and ids:
            self.on_cancel(ids)


async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(psycopg.Error, OSError):
        await conn.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
