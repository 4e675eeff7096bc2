"""The worker: claim jobs, run them, record their outcomes.

One asyncio loop per process. ``async def`` tasks are awaited on it, plain functions run in
threads (:mod:`pgjobs.threads`). The loop keeps ``concurrency`` slots (plus an optional
``prefetch`` buffer of claimed-but-not-started jobs) and claims with ONE statement sized to
what is free (``claim_jobs`` in queries.sql), when:

* the listener reports new jobs in a served queue (push: an idle worker starts a job within
  milliseconds of the enqueue's commit), or reconnected; an idle worker claims those on the
  listener's own connection, whose backend has just woken (see :mod:`pgjobs.listener`);
* a slot frees up and the last claim came back full (there may be more);
* the earliest known ``run_at`` of a scheduled or retryable job arrives (sleeping exactly
  until then, so delayed jobs and retries start on time without a poll tick);
* the fallback poll interval passes (about 1 s, jittered), which covers lost notifications.

Outcomes go through :class:`~pgjobs.completions.Completions` in batches, fenced by lease
token. Heartbeats and crash rescue run on their own thread (:mod:`pgjobs.maintenance`).

Shutdown (SIGTERM/SIGINT, or :meth:`Worker.stop`): claiming stops at once, prefetched jobs
are handed back immediately (runnable again, attempt refunded), running jobs get ``grace``
seconds (``ctx.shutting_down`` tells them), then whatever still runs is handed back too. A
second signal exits at once (status 128 + signal); jobs still held are then rescued by the
other workers once this worker's heartbeat expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any

import psycopg

from pgjobs.admin import Retention
from pgjobs.app import App
from pgjobs.completions import Completions
from pgjobs.context import JobContext
from pgjobs.cron import Scheduler
from pgjobs.database import behind_pooler_async
from pgjobs.errors import ConfigurationError, DatabaseError, SchemaNotReadyError, one_line
from pgjobs.execution import ClaimedJob, Executor, error_entry, handed_back
from pgjobs.listener import Listener
from pgjobs.maintenance import DEFAULT_RETENTION, PRUNE_INTERVAL, Maintenance, Registration
from pgjobs.partitioning import is_partitioned_async
from pgjobs.queries import Queries
from pgjobs.settings import control_channel_for, events_channel_for, validate_queue
from pgjobs.worker_db import connect_async, is_pooled, local_settings_async

log = logging.getLogger("pgjobs.worker")

APPLICATION_NAME = "pgjobs-worker"
# Wait at most this long for the first LISTEN before the first claim.
_LISTEN_START_TIMEOUT = 5.0
# At shutdown, wait at most this long for a claim in flight on the listener's connection.
_CLAIM_FINISH_TIMEOUT = 5.0
# Wake a little after a known run_at: the claim compares with the database's now().
_DUE_MARGIN = 0.002
_DUE_FLOOR = 0.005
# Refilling slots that free up one by one: wait this long for more of them (or for a
# quarter of the capacity) so that claims come in batches, not one statement per job.
_REFILL_WINDOW = 0.003
# A limited claim reads this many runnable jobs beyond what it may claim, so that jobs of
# partitions that are full do not hide the jobs of others.
_LIMITED_SCAN_EXTRA = 200
# Claimed rows start in priority, run_at, id order (columns of claim_jobs and claim_limited).
_CLAIM_ORDER = itemgetter(4, 5, 0)
# ...the prefetched ones (column `started` false) after those that start at once.
_STARTED = itemgetter(9)
_NOT_STARTED = lambda row: not row[9]  # noqa: E731
# A worker too busy to sleep re-reads which queues are limited every this many poll
# intervals (an idle one every interval, before it sleeps).
_LIMITS_REFRESH_BUSY = 3.0
# Net container allocations between two young garbage collections (see _tuned_gc).
_GC_YOUNG_THRESHOLD = 50_000
_JOB_ID = attrgetter("id")
# Python 3.12+: a job's task runs at once, up to its first await, instead of on the loop's
# next pass; a job that finishes without awaiting costs no scheduling at all.
_EAGER: dict[str, Any] = {"eager_start": True} if sys.version_info >= (3, 12) else {}


@dataclass(eq=False, slots=True)
class _Running:
    job: ClaimedJob
    # Only for tasks that take one (JobContext parameter).
    ctx: JobContext | None
    task: asyncio.Task[None] | None = None
    is_async: bool = False
    handed_back: bool = False

    def cancel_context(self) -> None:
        """Tell the task, if it can see it (``ctx.cancelled``), that its outcome is void."""
        if self.ctx is not None:
            self.ctx._cancel()


@dataclass(eq=False)
class _Group:
    """Queues that share slots: the worker's ``concurrency`` pool (plus ``prefetch``), or
    one queue given slots of its own (``queue_concurrency``, ``--queues name=N``). Each
    group claims for itself, sized to what it has free."""

    queues: tuple[str, ...]
    slots: int
    prefetch: int = 0
    running: int = 0
    buffer: deque[ClaimedJob] = field(default_factory=deque)
    dirty: bool = True
    more: bool = False
    refill_since: float | None = None

    @property
    def free(self) -> int:
        return self.slots + self.prefetch - self.running - len(self.buffer)

    @property
    def startable(self) -> int:
        """How many of the jobs claimed now can start at once (the others are prefetched)."""
        return max(self.slots - self.running - len(self.buffer), 0)

    def claiming(self) -> None:
        """A claim for this group starts: what called for it is answered by it."""
        self.dirty = False
        self.refill_since = None


@dataclass
class WorkerStats:
    """What one worker did since it started."""

    claimed: int = 0
    claims: int = 0
    started: int = 0
    handed_back: int = 0
    rescued: int = 0


class Worker:
    """Runs the jobs of ``app`` from ``queues`` (default: the queues of its tasks).

    ``concurrency`` jobs of ``queues`` run at once; ``prefetch`` more may be claimed ahead
    and wait in memory. ``queue_concurrency`` serves more queues, each with slots of its
    own (``{"emails": 10, "reports": 2}``). Global limits of a queue (over all workers)
    are the database's (:meth:`pgjobs.App.limit_queue`). ``poll_interval`` is the fallback
    poll; ``heartbeat_interval`` and
    ``heartbeat_timeout`` govern crash detection (a worker silent for ``heartbeat_timeout``
    seconds is dead and its jobs are rescued); ``grace`` is how long running jobs may finish
    after a stop request; ``burst`` exits once the queues have nothing runnable and nothing
    running. Every ``prune_interval`` seconds one worker of the schema deletes a batch of
    finished jobs past ``retention`` (None: never). ``run()`` blocks (and handles
    SIGTERM/SIGINT when on the main thread);
    ``run_async()`` runs on the caller's loop.
    """

    def __init__(
        self,
        app: App,
        queues: Sequence[str] | None = None,
        concurrency: int = 10,
        *,
        queue_concurrency: Mapping[str, int] | None = None,
        prefetch: int = 0,
        poll_interval: float = 1.0,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 30.0,
        grace: float = 30.0,
        burst: bool = False,
        listen: bool = True,
        name: str | None = None,
        retention: Retention | None = DEFAULT_RETENTION,
        prune_interval: float = PRUNE_INTERVAL,
    ) -> None:
        self.app = app
        self.concurrency = _positive_int(concurrency, "concurrency")
        self.prefetch = _non_negative_int(prefetch, "prefetch")
        self._groups = _groups(app, queues, queue_concurrency, self.concurrency, self.prefetch)
        self._group_of = {q: g for g in self._groups for q in g.queues}
        self.queues = tuple(self._group_of)
        self.poll_interval = _positive(poll_interval, "poll_interval")
        self.heartbeat_interval = _positive(heartbeat_interval, "heartbeat_interval")
        self.heartbeat_timeout = _positive(heartbeat_timeout, "heartbeat_timeout")
        if self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ConfigurationError("heartbeat_timeout must exceed twice heartbeat_interval")
        self.grace = _non_negative(grace, "grace")
        self.burst = burst
        self.listen = listen
        self.retention = retention
        self.prune_interval = _positive(prune_interval, "prune_interval")
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.stats = WorkerStats()
        # Told of every attempt's start and outcome (pgjobs.metrics.WorkerMetrics), if set.
        self.observer: Any = None
        self.listener: Listener | None = None
        self._events_channel = events_channel_for(app.schema)
        self._executor = Executor(app.tasks, self.id)
        self._shutdown = threading.Event()
        self._running: dict[int, _Running] = {}
        # Queues with global limits (claimed with claim_limited), re-read every poll interval.
        self._limited: frozenset[str] = frozenset()
        self._limited_checked_at = 0.0
        self._leases_checked_at = 0.0
        self._background: set[asyncio.Task[None]] = set()
        # Writes of start_jobs in flight (prefetched jobs about to start).
        self._starting: set[asyncio.Task[None]] = set()
        # Prefetched jobs between the buffer and their start (start_jobs in flight).
        self._being_started: dict[int, ClaimedJob] = {}
        self._due_at: float | None = None
        self._next_due: float | None = None
        self._next_due_known = False
        self._poll_at = 0.0
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        # Held by whoever claims (the claim loop, or the listener on its connection), so
        # that two claims sized to the same free slots never overlap.
        self._claiming: asyncio.Lock | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._completions: Completions | None = None
        self._maintenance: Maintenance | None = None
        self._completions_task: asyncio.Task[None] | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._scheduler: Scheduler | None = None
        self._debug = False
        # Claims held back: no heartbeat got through for too long (see _counted_alive).
        self._claims_held = False
        # Set (from the heartbeat thread) once the heartbeat connection was made again.
        self._forgotten_check_due = False

    # -- public --------------------------------------------------------------------------

    def run(self) -> None:
        """Run until stopped; SIGTERM/SIGINT stop gracefully when called on the main thread.

        On the main thread the worker owns the process, and tunes its garbage collector
        for it while it runs (see :func:`_tuned_gc`)."""
        on_main = threading.current_thread() is threading.main_thread()
        with _tuned_gc(on_main), asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(self.run_async(handle_signals=on_main))

    async def run_async(self, *, handle_signals: bool = False) -> None:
        """Run on the current event loop until stopped (or, with ``burst``, out of work)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._claiming = asyncio.Lock()
        # Read once per run: a per-job log.debug call costs more than some jobs.
        self._debug = log.isEnabledFor(logging.DEBUG)
        try:
            await self._start()
            if handle_signals:
                self._install_signal_handlers()
            await self._await_listener()
            await self._claim_loop()
        finally:
            await self._stop_everything()

    def stop(self) -> None:
        """Ask the worker to shut down gracefully (safe from any thread)."""
        self._shutdown.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._poke)

    @property
    def running_jobs(self) -> list[int]:
        """Ids of the jobs running now."""
        return list(self._running)

    # -- start and stop ------------------------------------------------------------------

    async def _start(self) -> None:
        url = await asyncio.to_thread(lambda: self.app.database_url)
        listen_url = await asyncio.to_thread(lambda: self.app.listen_url)
        if await self._can_listen(listen_url):
            # Connecting and LISTEN go on while the rest starts (the first claim waits for
            # them, see _await_listener).
            self.listener = Listener(
                listen_url,
                self.app.channel,
                self.queues,
                self._on_jobs,
                self._on_listener_connect,
                control_channel=control_channel_for(self.app.schema),
                on_cancel=self._on_cancel,
                on_notified=self._claim_notified,
            )
            self._listener_task = asyncio.create_task(self.listener.run())
        self._maintenance = Maintenance(
            url,
            self.app.queries,
            self._registration(),
            interval=self.heartbeat_interval,
            timeout=self.heartbeat_timeout,
            on_lost=self._lost_registration,
            on_reconnected=self._reconnected,
            retention=self.retention,
            prune_interval=self.prune_interval,
            on_dead_alert=self.app._dead_alert,
        )
        # The claim connection and the worker's registration, at once.
        conn, registered = await asyncio.gather(
            connect_async(url, APPLICATION_NAME, durable=False, generic_plans=True),
            asyncio.to_thread(self._maintenance.start),
            return_exceptions=True,
        )
        if isinstance(conn, psycopg.AsyncConnection):
            self._conn = conn
        for outcome in (registered, conn):
            if isinstance(outcome, BaseException):
                raise outcome
        if isinstance(conn, psycopg.AsyncConnection) and is_pooled(conn):
            await _check_isolation(conn)
        if isinstance(conn, psycopg.AsyncConnection):
            await self._read_partitioned_table(conn)
        if self.app.periodics and not self.burst:
            # Periodic jobs: every worker schedules them (on a thread; see pgjobs.cron).
            notify = getattr(self.app.writer, "notify", True)
            periodics = list(self.app.periodics.values())
            self._scheduler = Scheduler(
                url, self.app.queries, self.app.channel, periodics, notify=notify
            )
            self._scheduler.start()
        await self._declare_limits()
        maintenance = self._maintenance
        self._completions = Completions(
            self.app.queries,
            self.id,
            lambda: connect_async(url, APPLICATION_NAME),
            events=lambda: maintenance.events,
        )
        # Jobs whose parents just finished became runnable: claim now (workers never NOTIFY).
        self._completions.on_written = self._on_written
        self._completions_task = asyncio.create_task(self._completions.run())
        log.info(
            "worker %s started: queues %s, prefetch %d",
            self.id,
            " ".join(f"{','.join(g.queues)}={g.slots}" for g in self._groups),
            self.prefetch,
        )
        budget = self.connections()
        log.info(
            "worker %s holds %d database connection(s)%s: %s; tasks that use the app's pool "
            "add up to %d",
            self.id,
            sum(budget.values()),
            " through a transaction pooler" if await behind_pooler_async(url) else "",
            ", ".join(f"{name} {n}" for name, n in budget.items()),
            self.app.pool_size,
        )

    async def _read_partitioned_table(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """On a partitioned jobs table, this worker's statements name the partition of the
        jobs not archived, so that they read nothing else (see queries.sql). A table
        partitioned while the worker runs is read whole until it restarts: correct, only
        slower."""
        if self.app.queries.partitioned or not await is_partitioned_async(conn, self.app.schema):
            return
        queries = Queries(self.app.schema, partitioned=True)
        self.app.queries = queries
        assert self._maintenance is not None
        self._maintenance.queries = queries
        log.info("the jobs table is partitioned: this worker reads its partition jobs_current")

    def connections(self) -> dict[str, int]:
        """The database connections this worker holds while it runs, by duty (the app's
        pool, which only tasks use, aside): its connection budget."""
        return {
            "claim": 1,
            "listen": int(self.listener is not None),
            "completion": 1,
            "maintenance": 1,
            "scheduler": int(self._scheduler is not None),
        }

    async def _can_listen(self, listen_url: str) -> bool:
        if not self.listen:
            return False
        if await behind_pooler_async(listen_url):
            log.warning(
                "the database URL goes through a transaction pooler, where LISTEN does not "
                "work: polling every %.1f s (jittered) instead; give a direct URL of the same "
                "database with --listen-url or PGJOBS_LISTEN_URL for wake-ups within "
                "milliseconds",
                self.poll_interval,
            )
            return False
        return True

    async def _declare_limits(self) -> None:
        """Write the app's declared queue limits (App.limit_queue) to the database."""
        if not self.app.queue_limits:
            return
        conn = await self._connection()
        for queue, limits in self.app.queue_limits.items():
            await conn.execute(self.app.queries.set_queue_limits, limits.params(queue))

    def _registration(self) -> Registration:
        return Registration(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=list(self.queues),
            concurrency=sum(g.slots for g in self._groups),
            meta={
                "prefetch": self.prefetch,
                "burst": self.burst,
                "slots": {",".join(g.queues): g.slots for g in self._groups},
            },
        )

    async def _await_listener(self) -> None:
        # LISTEN first, then the first claim: a job committed in between is not missed.
        if self.listener is not None:
            try:
                await asyncio.wait_for(self.listener.first_attempt.wait(), _LISTEN_START_TIMEOUT)
            except TimeoutError:
                log.warning(
                    "listener not ready after %s s; polling meanwhile", _LISTEN_START_TIMEOUT
                )

    def _install_signal_handlers(self) -> None:
        assert self._loop is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal (%s): exiting now", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info(
            "%s: stopping (running jobs get %s s; signal again to exit at once)",
            signal.Signals(signum).name,
            self.grace,
        )
        self.stop()

    async def _stop_everything(self) -> None:
        self._shutdown.set()
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)
        if self._listener_task is not None:
            # A claim in flight on the listener's connection is let finish: cancelled
            # midway, its jobs would be claimed with nobody to run or hand them back.
            await self._claims_done()
            self._listener_task.cancel()
        if self._completions is not None:
            # Outcomes are written before the worker's row goes: a job is never left
            # running under a worker that no longer exists while this one is still alive.
            if self._starting:
                await asyncio.gather(*self._starting, return_exceptions=True)
            await self._hand_back_buffer(self._completions)
            await self._drain(self._completions)
            await self._completions.close()
        for task in (self._listener_task, self._completions_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._maintenance is not None:
            await asyncio.to_thread(self._maintenance.stop)
            self.stats.rescued = self._maintenance.rescued
        if self._conn is not None:
            await self._conn.close()
        written = self._completions.written if self._completions is not None else 0
        log.info(
            "worker %s stopped: %d job(s) started, %d claimed in %d claim(s), %d outcome(s) "
            "written in %d batch(es)",
            self.id,
            self.stats.started,
            self.stats.claimed,
            self.stats.claims,
            written,
            self._completions.batches if self._completions is not None else 0,
        )

    async def _claims_done(self) -> None:
        assert self._claiming is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._claiming.acquire(), _CLAIM_FINISH_TIMEOUT)
            self._claiming.release()

    async def _hand_back_buffer(self, completions: Completions) -> None:
        count = sum(len(g.buffer) for g in self._groups)
        if not count:
            return
        for group in self._groups:
            while group.buffer:
                completions.add(handed_back(group.buffer.popleft()))
        await completions.flush()
        self.stats.handed_back += count
        log.info("handed back %d claimed job(s) that had not started", count)

    async def _drain(self, completions: Completions) -> None:
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks and self.grace > 0:
            log.info("waiting up to %s s for %d running job(s)", self.grace, len(tasks))
            await asyncio.wait(tasks, timeout=self.grace)
        leftover = list(self._running.values())
        if not leftover:
            return
        message = f"the worker shut down before the job finished (grace {self.grace} s)"
        for running in leftover:
            running.handed_back = True
            running.cancel_context()
            error = _interrupted(running, self.id, message)
            completions.add(handed_back(running.job, error))
            if running.is_async and running.task is not None:
                running.task.cancel()
        self.stats.handed_back += len(leftover)
        log.warning("handed back %d job(s) still running after the grace period", len(leftover))

    # -- claiming ------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._shutdown.is_set():
            # A busy worker (it never sleeps) refreshes here, at most every few intervals.
            await self._refresh_limited(_LIMITS_REFRESH_BUSY)
            if not self._counted_alive():
                await self._wait_for_heartbeat()
                continue
            if self._forgotten_check_due:
                await self._release_forgotten()
            claimed = short = 0
            for group in self._groups:
                assert self._claiming is not None
                async with self._claiming:
                    # Judged under the lock: the listener may have claimed for it meanwhile.
                    if not self._claim_due(group):
                        continue
                    want, start = group.free, group.startable
                    group.claiming()
                    jobs = await self._claim(group, want, start)
                    self._accept(group, jobs)
                claimed += 1
                short += len(jobs) < want
            if claimed:
                if short and await self._idle_now():
                    return
                continue
            self._check_leases_due()
            # Idle: refresh before sleeping, so that a wake-up goes straight to its claim.
            await self._refresh_limited(1.0)
            await self._sleep(any(g.free > 0 for g in self._groups))

    def _claim_due(self, group: _Group) -> bool:
        want = group.free
        return want > 0 and (group.dirty or self._refill_due(group, want))

    def _counted_alive(self) -> bool:
        """Whether this worker may claim: not while its peers may count it dead (see
        Maintenance.counted_alive), as after a network cut, until a heartbeat gets through
        again. They rescue what a dead worker holds: what it claimed would run twice."""
        alive = self._maintenance is None or self._maintenance.counted_alive()
        if alive == self._claims_held:
            if alive:
                log.info("a heartbeat got through again: claiming again")
            else:
                log.warning(
                    "no heartbeat got through for %.1f s: claiming nothing until one does",
                    self.heartbeat_timeout - self.heartbeat_interval / 2,
                )
            self._claims_held = not alive
        return alive

    async def _wait_for_heartbeat(self) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._wake.wait(), min(self.heartbeat_interval, self.poll_interval)
            )
        self._wake.clear()
        # Whatever was notified meanwhile is claimed once the heartbeat is back.
        self._all_dirty()

    async def _claim_notified(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Called by the listener after notifications, with its connection: claim for the
        groups they concern right here, unless a claim is in flight already (the claim
        loop then takes them) or the group has limited queues (claim_limited waits for
        locks, which the listener must never do). An error propagates: to the listener
        it means a lost connection, and the claim loop claims instead."""
        assert self._claiming is not None
        if self._claiming.locked() or self._shutdown.is_set() or not self._counted_alive():
            return
        async with self._claiming:
            for group in self._groups:
                want = group.free
                if not (group.dirty and want > 0) or not self._limited.isdisjoint(group.queues):
                    continue
                start = group.startable
                group.claiming()
                try:
                    rows = await self._claim_rows(conn, list(group.queues), want, start)
                except BaseException:
                    group.dirty = True
                    self._poke()
                    raise
                self._accept(group, self._claimed(group, rows, want))
        # A short claim said when the next waiting job is due: the loop's sleep must know.
        self._learn_next_due()
        self._poke()

    def _refill_due(self, group: _Group, want: int) -> bool:
        if group.refill_since is None:
            return False
        return (
            want * 4 >= group.slots + group.prefetch
            or not group.running
            or time.monotonic() >= group.refill_since + _REFILL_WINDOW
        )

    async def _claim(self, group: _Group, limit: int, start: int) -> list[ClaimedJob]:
        limited = [q for q in group.queues if q in self._limited]
        free = [q for q in group.queues if q not in self._limited]
        try:
            conn = await self._connection()
            rows = await self._claim_limited(conn, limited, limit, start) if limited else []
            if free and len(rows) < limit:
                start = max(start - len(rows), 0)
                rows += await self._claim_rows(conn, free, limit - len(rows), start)
        except psycopg.errors.UndefinedTable as exc:
            raise SchemaNotReadyError(
                "pgjobs' tables are missing: run `pgjobs migrate upgrade`"
            ) from exc
        except (psycopg.Error, DatabaseError) as exc:
            group.dirty = True
            await self._claim_failed(exc)
            return []
        return self._claimed(group, rows, limit)

    def _claimed(self, group: _Group, rows: list[tuple[Any, ...]], limit: int) -> list[ClaimedJob]:
        self._poll_at = time.monotonic() + self.poll_interval * random.uniform(0.8, 1.2)
        group.more = len(rows) == limit
        rows.sort(key=_CLAIM_ORDER)
        if not all(map(_STARTED, rows)):
            rows.sort(key=_NOT_STARTED)  # stable: prefetched jobs last, in claim order
        jobs = list(map(ClaimedJob.from_row, rows))
        self.stats.claimed += len(jobs)
        return jobs

    def _claim_params(self, queues: list[str], limit: int, start: int) -> dict[str, Any]:
        return {
            "queues": queues,
            "limit": limit,
            "start": start,
            "scan": limit + _LIMITED_SCAN_EXTRA,
            "worker": self.id,
            "events": self._maintenance is not None and self._maintenance.events,
            "events_channel": self._events_channel,
        }

    async def _claim_rows(
        self, conn: psycopg.AsyncConnection[Any], queues: list[str], limit: int, start: int
    ) -> list[tuple[Any, ...]]:
        params = self._claim_params(queues, limit, start)
        cur = await conn.execute(self.app.queries.claim_jobs, params)
        return self._split_next_due(await cur.fetchall())

    async def _claim_limited(
        self, conn: psycopg.AsyncConnection[Any], queues: list[str], limit: int, start: int
    ) -> list[tuple[Any, ...]]:
        # One transaction: wait for this queue's turn, then count with a fresh snapshot.
        async with conn.transaction():
            await local_settings_async(conn)
            await conn.execute(self.app.queries.lock_limited_queues, {"queues": queues})
            cur = await conn.execute(
                self.app.queries.claim_limited, self._claim_params(queues, limit, start)
            )
            rows = await cur.fetchall()
        return self._split_next_due(rows)

    def _split_next_due(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        self.stats.claims += 1
        if rows and rows[-1][0] is None:
            # A short claim: its last row says when the next waiting job is due.
            seconds = rows.pop()[10]
            if seconds is not None and (self._next_due is None or seconds < self._next_due):
                self._next_due = seconds
            self._next_due_known = True
        return rows

    async def _refresh_limited(self, intervals: float) -> None:
        """Learn which served queues have global limits, if the last answer is older than
        ``intervals`` poll intervals (claim_jobs skips limited queues by itself, so a stale
        answer only delays their jobs)."""
        now = time.monotonic()
        if now < self._limited_checked_at + self.poll_interval * intervals:
            return
        self._limited_checked_at = now
        try:
            conn = await self._connection()
            cur = await conn.execute(self.app.queries.limited_queues, {"queues": list(self.queues)})
            limited = frozenset(row[0] for row in await cur.fetchall())
        except (psycopg.Error, DatabaseError) as exc:
            log.warning("could not read queue limits: %s", " ".join(str(exc).split()))
            return
        if limited != self._limited:
            log.info("queues with global limits: %s", ",".join(sorted(limited)) or "none")
            self._limited = limited

    async def _claim_failed(self, exc: BaseException, what: str = "claim") -> None:
        log.warning("%s failed, retrying: %s", what, one_line(exc))
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
        self._conn = None
        await asyncio.sleep(random.uniform(0.2, 1.0))

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await connect_async(
                self.app.database_url, APPLICATION_NAME, durable=False, generic_plans=True
            )
        return self._conn

    def _accept(self, group: _Group, jobs: Iterable[ClaimedJob]) -> None:
        group.buffer.extend(jobs)
        self._start_buffered()

    async def _idle_now(self) -> bool:
        """After a claim that found less than it asked for: learn when the next waiting
        job is due; in burst mode, say whether it is time to exit."""
        self._learn_next_due()
        if not self.burst or self._running or self._starting or any(g.buffer for g in self._groups):
            return False
        assert self._completions is not None
        await self._completions.flush()
        conn = await self._connection()
        cur = await conn.execute(self.app.queries.queues_busy, {"queues": list(self.queues)})
        row = await cur.fetchone()
        if row is not None and row[0]:
            return False
        log.info("burst: nothing runnable or running in %s; exiting", ",".join(self.queues))
        return True

    def _learn_next_due(self) -> None:
        # The short claim just made said when the next waiting job is due (claim_jobs).
        if not self._next_due_known:
            return
        self._next_due_known = False
        seconds, self._next_due = self._next_due, None
        # Never replace what is known locally: a retry this worker just scheduled may not
        # be flushed yet, so the database cannot know about it.
        if seconds is not None:
            self._note_due(float(seconds))

    def _note_due(self, seconds: float) -> None:
        # The floor keeps a job that is due but was not claimable (locked by a peer's claim
        # in flight) from turning this loop into a busy spin.
        due = time.monotonic() + max(seconds, _DUE_FLOOR) + _DUE_MARGIN
        if self._due_at is None or due < self._due_at:
            self._due_at = due

    async def _sleep(self, can_claim: bool) -> None:
        assert self._wake is not None
        timeout: float | None = None
        if can_claim:
            deadline = self._poll_at if self._due_at is None else min(self._poll_at, self._due_at)
            for group in self._groups:
                if group.refill_since is not None:
                    deadline = min(deadline, group.refill_since + _REFILL_WINDOW)
            timeout = max(deadline - time.monotonic(), 0.0)
        # Waiting on the Event directly (not through wait_for, which wraps the wait in a
        # task of its own) takes one loop iteration off every wake-up.
        if not self._wake.is_set():
            assert self._loop is not None
            timer = self._loop.call_later(timeout, self._wake.set) if timeout is not None else None
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()
        # Poll tick or a known run_at (a refill window is judged by _refill_due).
        now = time.monotonic()
        if self._poll_at <= now:
            self._all_dirty()
        if self._due_at is not None and self._due_at <= now:
            self._all_dirty()
            self._due_at = None
        self._wake.clear()

    def _all_dirty(self) -> None:
        for group in self._groups:
            group.dirty = True

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _on_jobs(self, queue: str, count: int) -> None:
        group = self._group_of.get(queue)
        if group is None:  # a malformed notification: look everywhere
            self._all_dirty()
        else:
            group.dirty = True
        self._poke()

    def _on_listener_connect(self) -> None:
        self._all_dirty()
        self._poke()

    # -- running -------------------------------------------------------------------------

    def _start_buffered(self) -> None:
        if self._shutdown.is_set():
            return
        for group in self._groups:
            finished = False
            prefetched: list[ClaimedJob] = []
            while group.buffer and group.running < group.slots:
                group.running += 1
                job = group.buffer.popleft()
                if job.started:
                    finished |= self._start_job(job)
                else:
                    prefetched.append(job)  # its slot is held while its start is written
            if prefetched:
                self._being_started.update((job.id, job) for job in prefetched)
                task = asyncio.ensure_future(self._start_prefetched(group, prefetched))
                self._starting.add(task)
                task.add_done_callback(self._starting.discard)
            if finished:
                self._slots_freed(group)

    async def _start_prefetched(self, group: _Group, jobs: list[ClaimedJob]) -> None:
        """Spend the attempts of prefetched jobs (start_jobs), then run those this worker
        still holds. Written before any handler runs: a job that kills its worker must
        still use up its attempts."""
        jobs.sort(key=_JOB_ID)
        assert self._claiming is not None
        try:
            # Under the claim lock: never inside claim_limited's transaction on this
            # connection.
            async with self._claiming:
                conn = await self._connection()
                cur = await conn.execute(
                    self.app.queries.start_jobs,
                    {"id": [j.id for j in jobs], "lease_token": [j.lease_token for j in jobs]},
                )
                attempts = dict(await cur.fetchall())
        except (psycopg.Error, DatabaseError) as exc:
            await self._claim_failed(exc)
            attempts = None
        group.running -= len(jobs)
        for job in jobs:
            self._being_started.pop(job.id, None)
        if attempts is None:  # unknown: back to the buffer, to be tried again
            group.buffer.extendleft(reversed(jobs))
        else:
            held = [
                job._replace(attempts=attempts[job.id], started=True)
                for job in jobs
                if job.id in attempts
            ]
            # At shutdown the buffer is handed back; started now, they get their attempt
            # back there.
            group.buffer.extendleft(reversed(held))
        self._start_buffered()
        self._slots_freed(group)

    def _start_job(self, job: ClaimedJob) -> bool:
        """Start ``job``; True when it finished already (on Python 3.12+, a job that never
        awaits runs to its end right here), its slot free again."""
        assert self._loop is not None
        task = self.app.tasks.get(job.task)
        ctx = None
        if task is not None and task.context_parameter is not None:
            ctx = self._context(job)
        running = _Running(job, ctx, is_async=task is not None and task.is_async)
        self._running[job.id] = running
        self.stats.started += 1
        step = asyncio.Task(self._execute(running), loop=self._loop, **_EAGER)
        if step.done():
            # Freed here rather than by a done callback: one loop callback less per job.
            self._release(running)
            return True
        running.task = step
        step.add_done_callback(lambda _: self._slot_freed(running))
        return False

    def _context(self, job: ClaimedJob) -> JobContext:
        assert self._loop is not None and self._completions is not None
        return JobContext(
            id=job.id,
            attempt=job.attempts,
            max_attempts=job.max_attempts,
            queue=job.queue,
            task=job.task,
            lease_token=job.lease_token,
            worker=self.id,
            loop=self._loop,
            write_progress=self._completions.write_progress,
            shutdown=self._shutdown,
            read_parents=self._completions.parent_results,
        )

    async def _execute(self, running: _Running) -> None:
        assert self._completions is not None
        began = time.monotonic()
        if self.observer is not None:
            self.observer.started(running.job)
        try:
            finish = await self._executor.execute(running.job, running.ctx)
        except asyncio.CancelledError:
            return  # handed back at shutdown, or the lease was lost
        if running.handed_back:
            return  # its row was handed back at shutdown already
        # Even when the lease is known to be lost this is written: fencing makes it a no-op.
        self._completions.add(finish)
        if self.observer is not None:
            self.observer.finished(running.job, finish, time.monotonic() - began)
        if finish.delay is not None:
            self._note_due(finish.delay)
        if self._debug:
            log.debug(
                "job %s (%s) attempt %s: %s",
                running.job.id,
                running.job.task,
                running.job.attempts,
                finish.note or finish.state,
            )

    def _slot_freed(self, running: _Running) -> None:
        group = self._release(running)
        self._start_buffered()
        self._slots_freed(group)

    def _release(self, running: _Running) -> _Group:
        if self._running.get(running.job.id) is running:
            del self._running[running.job.id]
        group = self._group_of[running.job.queue]
        group.running -= 1
        return group

    def _slots_freed(self, group: _Group) -> None:
        if group.more and group.refill_since is None:
            group.refill_since = time.monotonic()
        self._poke()

    def _on_written(self, queues: set[str], released: int) -> None:
        """A batch of outcomes is written: children it released are runnable (claim in
        every group), and a finished job of a limited queue left room under its limit."""
        limited = queues & self._limited
        if released:
            self._all_dirty()
        for queue in limited:
            self._group_of[queue].dirty = True
        if released or limited:
            self._poke()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the loop, keeping a reference until it is done (the loop keeps
        only weak ones)."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- reconnected: jobs finished here that the server forgot ---------------------------

    def _reconnected(self) -> None:
        """Called from the heartbeat thread when its connection was lost and made again."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._forgotten_check)

    def _forgotten_check(self) -> None:
        self._forgotten_check_due = True
        if self._wake is not None:
            self._wake.set()

    async def _release_forgotten(self) -> None:
        """After a failover to a standby that had this worker's claims but not all its
        outcomes, jobs it finished are ``running`` under its id again, and no peer rescues
        the jobs of a live worker: give back every running job of this worker whose lease
        it does not hold (rescue_jobs). Between claims, so that every lease claimed so far
        is known; outcomes not yet written count as held."""
        assert self._claiming is not None and self._completions is not None
        async with self._claiming:
            held = [r.job.lease_token for r in self._running.values()]
            held += [j.lease_token for g in self._groups for j in g.buffer]
            held += [j.lease_token for j in self._being_started.values()]
            held += self._completions.unwritten_leases()
            params = {"timeout": self.heartbeat_timeout, "worker": self.id, "held": held}
            try:
                conn = await self._connection()
                cur = await conn.execute(self.app.queries.rescue_jobs, params)
                row = await cur.fetchone()
            except (psycopg.Error, DatabaseError) as exc:
                # The claim connection died with the server too: a new one, and again soon.
                await self._claim_failed(exc, "the check for jobs the server forgot")
                assert self._wake is not None
                self._wake.set()
                return
            self._forgotten_check_due = False
        if row is not None and row[0] + row[1]:
            # Nobody is notified of jobs given back: claim them now, not at the next poll.
            self._all_dirty()
            log.warning(
                "after reconnecting: %d job(s) this worker had finished were running again "
                "on the server (their outcomes were lost, as in a failover): given back",
                row[0] + row[1],
            )

    # -- lost registration ---------------------------------------------------------------

    def _lost_registration(self) -> None:
        """Called from the heartbeat thread when peers declared this worker dead."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: self._spawn(self._check_leases()))

    async def _check_leases(self) -> None:
        try:
            await self._cancel_lost_jobs()
        except (psycopg.Error, DatabaseError) as exc:
            log.warning("could not check this worker's leases: %s", exc)

    def _on_cancel(self, job_ids: list[int]) -> None:
        """An operator cancelled running jobs (control channel): stop those held here."""
        if any(i in self._running for i in job_ids) or any(
            j.id in job_ids for g in self._groups for j in g.buffer
        ):
            self._leases_checked_at = time.monotonic()
            self._spawn(self._check_leases())

    def _check_leases_due(self) -> None:
        """The poll fallback of cancellation: once per poll interval while jobs run, check
        that this worker still holds their leases (a missed control message, or a rescue
        while this worker was frozen)."""
        now = time.monotonic()
        if not self._running or now < self._leases_checked_at + self.poll_interval:
            return
        self._leases_checked_at = now
        self._spawn(self._check_leases())

    async def _cancel_lost_jobs(self) -> None:
        held = list(self._running.values())
        buffered = [j for g in self._groups for j in g.buffer]
        pairs = [(r.job.id, r.job.lease_token) for r in held] + [
            (j.id, j.lease_token) for j in buffered
        ]
        if not pairs:
            return
        conn = await self._connection()
        cur = await conn.execute(
            self.app.queries.held_leases,
            {"id": [p[0] for p in pairs], "lease_token": [p[1] for p in pairs]},
        )
        still = {row[0] for row in await cur.fetchall()}
        lost = [r for r in held if r.job.id not in still]
        for running in lost:
            running.cancel_context()
            if running.is_async and running.task is not None:
                running.task.cancel()
        for job in buffered:
            group = self._group_of[job.queue]
            if job.id not in still and job in group.buffer:
                group.buffer.remove(job)
        if lost:
            log.warning(
                "lease lost on %d running job(s) %s (cancelled, or rescued while this worker "
                "was unresponsive): stopping them; their outcomes will not be recorded",
                len(lost),
                [r.job.id for r in lost][:20],
            )


async def _check_isolation(conn: psycopg.AsyncConnection[Any]) -> None:
    """Through a pooler the worker cannot set its isolation level per session: the role's
    default must already be READ COMMITTED (the claim and the fenced writes re-check rows
    at lock time, which stricter levels answer with serialization errors)."""
    cur = await conn.execute("SHOW default_transaction_isolation")
    row = await cur.fetchone()
    level = row[0] if row else None
    if level != "read committed":
        raise ConfigurationError(
            f"the worker's role defaults to {level} isolation, and through a transaction "
            "pooler pgjobs cannot set READ COMMITTED per session: ALTER ROLE ... SET "
            "default_transaction_isolation = 'read committed' for the workers' role"
        )


def _interrupted(running: _Running, worker: str, message: str) -> str:
    return error_entry(running.job, worker, None, "pgjobs.WorkerShutdown", message)


@contextlib.contextmanager
def _tuned_gc(enabled: bool) -> Iterator[None]:
    """Keep the cyclic garbage collector off the per-job path of a worker process.

    Every job allocates a few container objects (its task, context, outcome) that live for
    one claim batch; with the default gen0 threshold of 700 they are caught alive by
    collections, promoted, and then repeatedly traversed together with everything the
    application imported: a quarter of the worker's CPU per job in a drain. While the
    worker runs, what existed at its start (modules, the app) is frozen out of collection,
    and young collections run after 50,000 net allocations instead of 700; cycles are still
    collected, only in larger batches. Both are undone when it stops.
    """
    if not enabled:
        yield
        return
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (it cuts the event loop's share of every wake-up and
    job), else asyncio's own loop. PGJOBS_UVLOOP=0 turns it off."""
    if os.environ.get("PGJOBS_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _groups(
    app: App,
    queues: Sequence[str] | None,
    queue_concurrency: Mapping[str, int] | None,
    concurrency: int,
    prefetch: int,
) -> list[_Group]:
    own = {
        validate_queue(q): _positive_int(n, f"concurrency of queue {q!r}")
        for q, n in (queue_concurrency or {}).items()
    }
    if queues:
        shared = tuple(dict.fromkeys(validate_queue(q) for q in queues))
    elif own:
        shared = ()
    else:
        shared = tuple(sorted({task.config.queue for task in app.tasks.values()}))
        if not shared:
            raise ConfigurationError("the application registers no tasks; name the queues to work")
    both = set(shared) & set(own)
    if both:
        raise ConfigurationError(
            f"queue(s) {sorted(both)} given both with and without their own concurrency"
        )
    groups = [_Group(shared, concurrency, prefetch)] if shared else []
    return groups + [_Group((q,), n) for q, n in own.items()]


def _positive(value: float, name: str) -> float:
    if not (isinstance(value, int | float) and value > 0):
        raise ConfigurationError(f"{name} must be a positive number, not {value!r}")
    return float(value)


def _non_negative(value: float, name: str) -> float:
    if not (isinstance(value, int | float) and value >= 0):
        raise ConfigurationError(f"{name} must be zero or a positive number, not {value!r}")
    return float(value)


def _positive_int(value: int, name: str) -> int:
    if not (isinstance(value, int) and value >= 1):
        raise ConfigurationError(f"{name} must be a positive integer, not {value!r}")
    return value


def _non_negative_int(value: int, name: str) -> int:
    if not (isinstance(value, int) and value >= 0):
        raise ConfigurationError(f"{name} must be zero or a positive integer, not {value!r}")
    return value
