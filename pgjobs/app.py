"""The App: task registry, database settings, and the calls an application makes."""

from __future__ import annotations

import asyncio
import contextlib
import select
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar, Unpack, overload

import psycopg
from psycopg.pq import ConnStatus
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from pgjobs.connections import async_connection, sync_connection
from pgjobs.cron import Missed, PeriodicTask, declare, parse_schedule
from pgjobs.database import (
    behind_pooler,
    behind_pooler_async,
    connection_defaults,
    resolve_database_url,
    resolve_listen_url,
)
from pgjobs.enqueue import (
    ArgsFunction,
    EnqueueOptions,
    JobId,
    JobSpec,
    OnParentFailure,
    Options,
    Writer,
    check_max_attempts,
    check_priority,
    make_spec,
    now,
    resolve_unique,
    schema_errors,
)
from pgjobs.errors import (
    TRANSIENT_ATTEMPTS,
    ConfigurationError,
    DatabaseError,
    JobFailedError,
    JobNotFoundError,
    UnknownTaskError,
    transient_pause,
)
from pgjobs.events import EventStream
from pgjobs.flow import (
    JobCall,
    chain_writer,
    chain_writer_async,
    check_calls,
    fan_in_writer,
    fan_in_writer_async,
    in_transaction,
    in_transaction_async,
)
from pgjobs.job import Job, JobState
from pgjobs.limits import QueueLimits
from pgjobs.queries import Queries
from pgjobs.settings import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    channel_for,
    events_channel_for,
    schema_from_env,
    validate_queue,
    validate_schema,
    validate_task_name,
)
from pgjobs.task import Task, TaskConfig, flow_config

F = TypeVar("F", bound=Callable[..., Any])


def _pool_kwargs(url: str, pooled: bool) -> dict[str, Any]:
    """How pgjobs' pools connect: every statement commits unless pgjobs opens a transaction
    itself; through a transaction pooler, nothing is prepared (the next statement may run
    on another server session, where the prepared one does not exist). With TCP keepalives,
    ``tcp_user_timeout`` and ``connect_timeout`` unless the URL sets them (see
    :data:`pgjobs.database.TCP_SETTINGS`): a server that vanished (a failover whose old
    primary's host is gone) must not hold an enqueue for TCP's ~15 min."""
    kwargs: dict[str, Any] = {"autocommit": True, **connection_defaults(url)}
    if pooled:
        kwargs["prepare_threshold"] = None
    return kwargs


DeadAlertHook = Callable[[str, int, int], Any]
# App.wait re-reads the job at least this often (seconds), events or not.
WAIT_POLL = 0.5


class App:
    """A pgjobs application: where jobs live and which tasks exist.

    ``database_url`` defaults to ``PGJOBS_DATABASE_URL``, then to the embedded server.
    ``schema`` defaults to ``PGJOBS_SCHEMA``, then ``pgjobs``. With ``strict_tasks`` (the
    default) enqueueing by name accepts only registered tasks; a producer that enqueues tasks
    living in another code base sets it to False. ``enqueue_events`` publishes an
    ``enqueued`` event for every job this App enqueues (a NOTIFY in the caller's
    transaction, so off by default).

    ``listen_url`` (default ``PGJOBS_LISTEN_URL``) is a direct URL of the same database for
    LISTEN (workers' wake-ups, job events, :meth:`wait`), for when ``database_url`` goes
    through PgBouncer in transaction mode, where LISTEN does not work.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        schema: str | None = None,
        strict_tasks: bool = True,
        notify: bool = True,
        enqueue_events: bool = False,
        pool_size: int = 10,
        listen_url: str | None = None,
    ) -> None:
        self.schema = validate_schema(schema) if schema is not None else schema_from_env()
        self._database_url = database_url
        self._resolved_url: str | None = None
        self._listen_url = listen_url
        self.strict_tasks = strict_tasks
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.queries = Queries(self.schema)
        self.channel = channel_for(self.schema)
        self.writer = Writer(
            self.queries,
            self.channel,
            notify,
            events=enqueue_events,
            events_channel=events_channel_for(self.schema),
        )
        self.pool_size = pool_size
        self._pool: ConnectionPool | None = None
        self._async_pool: AsyncConnectionPool | None = None
        self._lock = threading.Lock()
        self._dead_alert_hooks: list[DeadAlertHook] = []
        # Periodic (cron) declarations by name; every worker of this app schedules them.
        self.periodics: dict[str, PeriodicTask] = {}
        self.queue_limits: dict[str, QueueLimits] = {}

    # -- configuration -------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        """The libpq URL of the database (resolving it, and starting the embedded server,
        on first use)."""
        with self._lock:
            if self._resolved_url is None:
                self._resolved_url = resolve_database_url(self._database_url)
        return self._resolved_url

    @property
    def listen_url(self) -> str:
        """The URL pgjobs LISTENs on: ``listen_url``, ``PGJOBS_LISTEN_URL``, or else the
        database URL."""
        return resolve_listen_url(self._listen_url) or self.database_url

    def listens_directly(self) -> bool:
        """Whether :attr:`listen_url` reaches the server without a transaction pooler, so
        that LISTEN works on it (connects once per process to learn it)."""
        return not behind_pooler(self.listen_url)

    @overload
    def task(self, fn: F, /) -> Task[Any, Any]: ...
    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float | None = None,
        retry_on: Sequence[type[BaseException]] = (Exception,),
        discard_on: Sequence[type[BaseException]] = (),
        backoff: Callable[[int], float] | None = None,
        unique: bool = False,
        unique_by: Sequence[str] | ArgsFunction | None = None,
        unique_for: float | timedelta | None = None,
        limit_by: Sequence[str] | ArgsFunction | None = None,
        on_parent_failure: OnParentFailure = "dead",
    ) -> Callable[[F], Task[Any, Any]]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float | None = None,
        retry_on: Sequence[type[BaseException]] = (Exception,),
        discard_on: Sequence[type[BaseException]] = (),
        backoff: Callable[[int], float] | None = None,
        unique: bool = False,
        unique_by: Sequence[str] | ArgsFunction | None = None,
        unique_for: float | timedelta | None = None,
        limit_by: Sequence[str] | ArgsFunction | None = None,
        on_parent_failure: OnParentFailure = "dead",
    ) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(queue=..., ...)``.

        ``timeout`` is in seconds; ``retry_on`` lists the exception types that retry
        (others go straight to ``dead``), ``discard_on`` those that never retry;
        ``backoff(attempt)`` returns the seconds to wait before the next attempt.
        ``unique=True`` gives every job a unique key derived from the task and all its
        arguments, ``unique_by`` from the named arguments (or a function of them);
        ``unique_for`` holds the key for a period instead of while the job is live.
        ``limit_by`` derives the job's ``limit_key`` likewise; ``on_parent_failure`` is
        the default of jobs with ``depends_on`` (see :meth:`Task.enqueue`).
        """
        flow = flow_config(
            unique=unique,
            unique_by=unique_by,
            unique_for=unique_for,
            limit_by=limit_by,
            on_parent_failure=on_parent_failure,
        )

        def register(fn: Callable[..., Any]) -> Task[Any, Any]:
            task_name = validate_task_name(name or f"{fn.__module__}.{fn.__qualname__}")
            if task_name in self.tasks:
                raise ConfigurationError(f"a task named {task_name!r} is already registered")
            if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
                raise ConfigurationError(
                    f"timeout must be a positive number of seconds, not {timeout!r}"
                )
            config = TaskConfig(
                name=task_name,
                queue=validate_queue(queue),
                priority=check_priority(priority),
                max_attempts=check_max_attempts(max_attempts),
                timeout=timeout,
                retry_on=tuple(retry_on),
                discard_on=tuple(discard_on),
                backoff=backoff,
                **flow,
            )
            task: Task[Any, Any] = Task(self, fn, config)
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else register

    def periodic(
        self,
        schedule: str | None = None,
        *,
        every: float | timedelta | None = None,
        timezone: str = "UTC",
        args: dict[str, Any] | None = None,
        name: str | None = None,
        missed: Missed = "skip",
        grace: float | timedelta | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
    ) -> Callable[[Any], Task[Any, Any]]:
        """Enqueue a task once per slot of a schedule, whichever workers run:
        ``@app.periodic("*/5 * * * *", timezone="Europe/Paris", args={...})`` above a
        task (or above a plain function, which is then registered as a task).

        ``schedule`` is a cron expression (5 fields, 6 with seconds first, or an alias
        such as ``@hourly``) read in ``timezone``; ``every`` (seconds or a timedelta) is
        an interval instead. ``missed="skip"`` drops slots no worker got to within
        ``grace`` (default: a minute, or the period if shorter), ``"backfill"`` enqueues
        them all. ``name`` (default: the task's name) identifies the schedule. A bad
        expression, time zone, option or argument raises at declaration.
        """
        parsed = parse_schedule(schedule, every=every, timezone=timezone)

        def register(target: Any) -> Task[Any, Any]:
            task = target if isinstance(target, Task) else self.task(target)
            try:
                declare(
                    self.tasks,
                    self.periodics,
                    task,
                    parsed,
                    args=args,
                    name=name,
                    missed=missed,
                    grace=grace,
                    queue=queue,
                    priority=priority,
                    max_attempts=max_attempts,
                )
            except Exception:
                if task is not target:  # registered just now: leave no half declaration
                    del self.tasks[task.name]
                raise
            return task

        return register

    # -- enqueue by name -----------------------------------------------------------------

    def enqueue(
        self,
        task: str,
        args: dict[str, Any] | None = None,
        *,
        conn: Any = None,
        **options: Unpack[EnqueueOptions],
    ) -> JobId | None:
        """Enqueue a job of the task called ``task`` with ``args``; see :meth:`Task.enqueue`."""
        opts = Options.of_call(options)
        return self._enqueue_specs([self._spec_by_name(task, args or {}, opts)], opts, conn)[0]

    async def enqueue_async(
        self,
        task: str,
        args: dict[str, Any] | None = None,
        *,
        conn: Any = None,
        **options: Unpack[EnqueueOptions],
    ) -> JobId | None:
        """The async twin of :meth:`enqueue`."""
        opts = Options.of_call(options)
        spec = self._spec_by_name(task, args or {}, opts)
        return (await self._enqueue_specs_async([spec], opts, conn))[0]

    def enqueue_many(
        self, task: str, items: Iterable[dict[str, Any]], *, conn: Any = None, **options: Any
    ) -> list[JobId | None]:
        """Enqueue many jobs of the task called ``task``; see :meth:`Task.enqueue_many`."""
        registered = self.tasks.get(task)
        if registered is not None:
            return registered.enqueue_many(items, conn=conn, **options)
        opts, key = self._by_name_batch(task, options)
        clock = now()
        return self._enqueue_specs(
            [self._spec_by_name(task, a, opts, key, clock) for a in items], opts, conn
        )

    async def enqueue_many_async(
        self, task: str, items: Iterable[dict[str, Any]], *, conn: Any = None, **options: Any
    ) -> list[JobId | None]:
        """The async twin of :meth:`enqueue_many`."""
        registered = self.tasks.get(task)
        if registered is not None:
            return await registered.enqueue_many_async(items, conn=conn, **options)
        opts, key = self._by_name_batch(task, options)
        clock = now()
        specs = [self._spec_by_name(task, a, opts, key, clock) for a in items]
        return await self._enqueue_specs_async(specs, opts, conn)

    def _by_name_batch(self, task: str, options: dict[str, Any]) -> tuple[Options, Any]:
        from pgjobs.task import _batch_options

        self._check_task_name(task)
        key = options.pop("unique_key", None)
        return _batch_options(options, key), key

    def _check_task_name(self, task: str) -> None:
        validate_task_name(task)
        if self.strict_tasks and task not in self.tasks:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise UnknownTaskError(
                f"no task named {task!r} is registered with this App (registered: {known}); "
                "pass strict_tasks=False to App to enqueue tasks defined in another code base"
            )

    def _spec_by_name(
        self,
        task: str,
        args: dict[str, Any],
        options: Options,
        unique_key: Any = None,
        clock: float | None = None,
    ) -> JobSpec:
        registered = self.tasks.get(task)
        if registered is not None:
            return registered._spec(args, options, unique_key, clock)
        self._check_task_name(task)
        if unique_key is not None:
            options = options.with_unique_key(unique_key(args))
        defaults = {"queue": DEFAULT_QUEUE, "priority": 0, "max_attempts": DEFAULT_MAX_ATTEMPTS}
        if options.plain or not isinstance(args, dict):
            return make_spec(task, args, options, defaults)
        # A task of another code base: its parameters' defaults are unknown here.
        unique = resolve_unique(task, args, options, None, {}, now() if clock is None else clock)
        return make_spec(task, args, options, defaults, unique)

    # -- dependencies: chains and fan-ins ------------------------------------------------

    def chain(self, *calls: JobCall, conn: Any = None) -> list[JobId]:
        """Enqueue ``calls`` (``task.job(...)``) so that each runs after the one before it
        succeeded: ``app.chain(a.job(x=1), b.job(), c.job(), conn=session)``. One
        transaction (the caller's with ``conn``): all of them or none. Returns their ids.
        A failed step ends the rest per their ``on_parent_failure`` (default: dead)."""
        return in_transaction(self, conn, chain_writer(check_calls(self, calls, "chain")))

    async def chain_async(self, *calls: JobCall, conn: Any = None) -> list[JobId]:
        """The async twin of :meth:`chain`."""
        write = chain_writer_async(check_calls(self, calls, "chain"))
        return await in_transaction_async(self, conn, write)

    def fan_in(self, parents: Sequence[JobCall], *, then: JobCall, conn: Any = None) -> list[JobId]:
        """Enqueue ``parents`` (``task.job(...)``, free to run in parallel) and ``then``,
        which runs once all of them succeeded: ``*ids, child = app.fan_in([a.job(),
        b.job()], then=d.job(), conn=session)``. One transaction; returns the parents'
        ids followed by the child's."""
        write = fan_in_writer(check_calls(self, parents, "fan_in"), _then(self, then))
        return in_transaction(self, conn, write)

    async def fan_in_async(
        self, parents: Sequence[JobCall], *, then: JobCall, conn: Any = None
    ) -> list[JobId]:
        """The async twin of :meth:`fan_in`."""
        write = fan_in_writer_async(check_calls(self, parents, "fan_in"), _then(self, then))
        return await in_transaction_async(self, conn, write)

    def _enqueue_specs(
        self, specs: list[JobSpec], options: Options, conn: Any
    ) -> list[JobId | None]:
        if not specs:
            return []
        if conn is not None:
            return self.writer.insert(sync_connection(conn), specs, options.on_duplicate)
        # Pool connections are autocommit: one job is one statement and one round trip
        # (no BEGIN, no COMMIT); several are written in one transaction, all or nothing.
        # pgjobs owns that transaction, so one that lost a race (a deadlock, a
        # serialization failure) is simply run again.
        for attempt in range(TRANSIENT_ATTEMPTS):
            try:
                with self.pool.connection() as own:
                    if len(specs) == 1:
                        return self.writer.insert(own, specs, options.on_duplicate)
                    with own.transaction():
                        return self.writer.insert(own, specs, options.on_duplicate)
            except DatabaseError as exc:
                if not exc.retry_transaction or attempt + 1 == TRANSIENT_ATTEMPTS:
                    raise
                time.sleep(transient_pause(attempt))
        raise AssertionError("unreachable")

    async def _enqueue_specs_async(
        self, specs: list[JobSpec], options: Options, conn: Any
    ) -> list[JobId | None]:
        if not specs:
            return []
        if conn is not None:
            return await self.writer.insert_async(
                await async_connection(conn), specs, options.on_duplicate
            )
        pool = await self.async_pool()
        for attempt in range(TRANSIENT_ATTEMPTS):
            try:
                async with pool.connection() as own:
                    if len(specs) == 1:
                        return await self.writer.insert_async(own, specs, options.on_duplicate)
                    async with own.transaction():
                        return await self.writer.insert_async(own, specs, options.on_duplicate)
            except DatabaseError as exc:
                if not exc.retry_transaction or attempt + 1 == TRANSIENT_ATTEMPTS:
                    raise
                await asyncio.sleep(transient_pause(attempt))
        raise AssertionError("unreachable")

    # -- reading -------------------------------------------------------------------------

    def get_job(self, job_id: int, *, conn: Any = None) -> Job:
        """The job with id ``job_id``; JobNotFoundError if there is none."""
        if conn is not None:
            return self._read_job(sync_connection(conn), job_id)
        with self.pool.connection() as own:
            return self._read_job(own, job_id)

    async def get_job_async(self, job_id: int, *, conn: Any = None) -> Job:
        """The async twin of :meth:`get_job`."""
        if conn is not None:
            return await self._read_job_async(await async_connection(conn), job_id)
        pool = await self.async_pool()
        async with pool.connection() as own:
            return await self._read_job_async(own, job_id)

    def _read_job(self, conn: psycopg.Connection[Any], job_id: int) -> Job:
        with schema_errors(self.queries.schema), conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(self.queries.get_job, {"id": job_id}).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return Job.from_row(row)

    async def _read_job_async(self, conn: psycopg.AsyncConnection[Any], job_id: int) -> Job:
        with schema_errors(self.queries.schema):
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(self.queries.get_job, {"id": job_id})
                row = await cur.fetchone()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return Job.from_row(row)

    def limit_queue(
        self,
        queue: str,
        *,
        concurrency: int | None = None,
        rate: str | tuple[int, float | timedelta] | None = None,
        per_key: bool = False,
    ) -> QueueLimits:
        """Declare global limits for ``queue``, over every worker and host: at most
        ``concurrency`` jobs running, at most ``rate`` starts per period (``"20/s"``,
        ``"100/m"``, ``(5, 30.0)``); with ``per_key``, per ``limit_key`` of the queue.
        Workers of this app write them to the database when they start; operators can
        change them at any time with ``pgjobs queues limit``."""
        limits = QueueLimits.build(concurrency=concurrency, rate=rate, per_key=per_key)
        if not limits.limited:
            raise ConfigurationError("give a concurrency and/or a rate limit")
        self.queue_limits[validate_queue(queue)] = limits
        return limits

    def cancel(self, job_id: int) -> Job:
        """Cancel a job: one waiting to run ends ``cancelled`` at once; for a running one
        the database records ``cancelled`` and the worker holding it is told at once (an
        ``async`` task is cancelled, a plain function sees ``ctx.cancelled``; whatever it
        returns afterwards is not recorded). JobNotFoundError for an unknown id,
        JobStateError for a job that already finished."""
        from pgjobs.admin import Admin

        return Admin(self).cancel_job(job_id)

    async def cancel_async(self, job_id: int) -> Job:
        """:meth:`cancel` for async code (runs it in a thread)."""
        return await asyncio.to_thread(self.cancel, job_id)

    def on_dead_alert(self, hook: DeadAlertHook) -> DeadAlertHook:
        """Register ``hook(queue, dead_count, threshold)``, called by a worker (on its
        maintenance thread) once each time a queue's dead count reaches its threshold
        (``pgjobs queues alert NAME --threshold N``). Use as a decorator."""
        self._dead_alert_hooks.append(hook)
        return hook

    def _dead_alert(self, queue: str, dead: int, threshold: int) -> None:
        for hook in self._dead_alert_hooks:
            hook(queue, dead, threshold)

    # -- events and waiting --------------------------------------------------------------

    def events(self, job_id: int | None = None, queue: str | None = None) -> EventStream:
        """Job events (:class:`~pgjobs.events.JobEvent`), optionally of one job or queue:
        ``for ev in app.events(...)`` or ``async for ev in app.events(...)``. Opt-in:
        workers publish events only while a subscriber is connected (see pgjobs.events)."""
        return EventStream(self, job_id=job_id, queue=queue)

    def wait(self, job_id: int, timeout: float) -> Any:
        """Wait for job ``job_id`` to finish and return its result; JobFailedError if it
        ended dead or cancelled, TimeoutError after ``timeout`` seconds. The row is re-read
        on every event and at least every ``WAIT_POLL`` seconds, so a lost notification
        only costs latency."""
        deadline = time.monotonic() + timeout
        stream = EventStream(self, job_id=job_id)
        conn: psycopg.Connection[Any] | None = None
        try:
            # No direct URL for LISTEN (a pooler in between): re-reading alone will do.
            with contextlib.suppress(DatabaseError, ConfigurationError, psycopg.Error):
                conn = stream.connect()
            while True:
                # Read on the listening connection itself (no pool needed).
                try:
                    job = self.get_job(job_id) if conn is None else self._read_job(conn, job_id)
                except psycopg.OperationalError:
                    assert conn is not None
                    conn.close()
                    conn = None
                    continue
                done, value, step = _wait_step(job, deadline, timeout)
                if done:
                    return value
                if conn is None:
                    time.sleep(step)
                    continue
                try:
                    for _ in conn.notifies(timeout=step, stop_after=1):
                        pass
                except psycopg.Error:
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    async def wait_async(self, job_id: int, timeout: float) -> Any:
        """The async twin of :meth:`wait`."""
        deadline = time.monotonic() + timeout
        stream = EventStream(self, job_id=job_id)
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            with contextlib.suppress(DatabaseError, ConfigurationError, psycopg.Error):
                conn = await stream.connect_async()
            while True:
                if conn is None:
                    job = await self.get_job_async(job_id)
                else:
                    try:
                        job = await self._read_job_async(conn, job_id)
                    except psycopg.OperationalError:
                        await conn.close()
                        conn = None
                        continue
                done, value, step = _wait_step(job, deadline, timeout)
                if done:
                    return value
                if conn is None:
                    await asyncio.sleep(step)
                    continue
                try:
                    async for _ in conn.notifies(timeout=step, stop_after=1):
                        pass
                except psycopg.Error:
                    await conn.close()
                    conn = None
        finally:
            if conn is not None:
                await conn.close()

    # -- connections ---------------------------------------------------------------------

    @property
    def pool(self) -> ConnectionPool:
        """pgjobs' own connection pool, opened on first use. Its connections are in
        autocommit mode (a single enqueue is one round trip); wrap work that must be atomic
        in ``conn.transaction()``."""
        if self._pool is None:
            url = self.database_url
            with self._lock:
                if self._pool is None:
                    # A pool retries a failing server until its timeout and then reports only
                    # the timeout; learning the route first fails fast, with libpq's reason.
                    self._pool = _open(
                        _CheckedPool(
                            url,
                            min_size=1,
                            max_size=self.pool_size,
                            kwargs=_pool_kwargs(url, behind_pooler(url)),
                            open=False,
                        )
                    )
        return self._pool

    async def async_pool(self) -> AsyncConnectionPool:
        """pgjobs' own async connection pool, opened on first use (autocommit, like
        :attr:`pool`)."""
        if self._async_pool is None:
            # Fail fast with libpq's reason, as the sync pool does.
            url = await asyncio.to_thread(lambda: self.database_url)
            pooled = await behind_pooler_async(url)
            pool = _CheckedAsyncPool(
                url,
                min_size=1,
                max_size=self.pool_size,
                kwargs=_pool_kwargs(url, pooled),
                open=False,
            )
            try:
                await pool.open(wait=True, timeout=10)
            except Exception as exc:
                await pool.close()
                raise DatabaseError(f"cannot connect to the database: {exc}") from exc
            self._async_pool = pool
        return self._async_pool

    def close(self) -> None:
        """Close pgjobs' own connections."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def aclose(self) -> None:
        """Close pgjobs' own connections, async pool included."""
        if self._async_pool is not None:
            await self._async_pool.close()
            self._async_pool = None
        self.close()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _then(app: App, then: JobCall) -> JobCall:
    return check_calls(app, [then], "fan_in(then=...)")[0]


def _wait_step(job: Job, deadline: float, timeout: float) -> tuple[bool, Any, float]:
    """One look of wait/wait_async: (finished, its result, seconds until the next look).
    Raises the job's failure when it ended badly, TimeoutError past the deadline."""
    done, value = _outcome(job)
    if done:
        return True, value, 0.0
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"job {job.id} did not finish within {timeout} s")
    return False, None, min(WAIT_POLL, remaining)


def _outcome(job: Job) -> tuple[bool, Any]:
    """(finished, result) of a job being waited for; raises for dead and cancelled."""
    if job.state == JobState.SUCCEEDED:
        return True, job.result
    if job.state in (JobState.DEAD, JobState.CANCELLED):
        raise JobFailedError(job, job.errors[-1] if job.errors else None)
    return False, None


def _open(pool: ConnectionPool) -> ConnectionPool:
    try:
        pool.open(wait=True, timeout=10)
    except Exception as exc:
        pool.close()
        raise DatabaseError(f"cannot connect to the database: {exc}") from exc
    return pool


# -- pooled connections that died -------------------------------------------------------
# The server may end an idle pooled connection at any time (pg_terminate_backend, an idle
# session timeout, a restart): its goodbye, a FATAL error and the end of the stream, waits
# unread in the socket, and the statement sent next would fail with it. The pools below
# look at the socket before handing a connection out: nothing to read (the hot path) costs
# one poll() and no round trip. psycopg_pool's own ``check`` callback is not used: after a
# second failed check in one request it sleeps 1 s, 2 s, 4 s, … before the next, so a pool
# full of dead connections (after a server restart) would make an enqueue wait past the
# pool's timeout.


def _readable(fd: int) -> bool:
    """Whether the socket ``fd`` has input (or an error, or its end) waiting, at once."""
    if _HAS_POLL:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # no poll() on Windows


_HAS_POLL = hasattr(select, "poll")


def _known_dead(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool | None:
    """Of an idle pooled connection, without a round trip: True when it is dead, False
    when nothing arrived on it since its last use (as alive as can be told), None when the
    server sent something unasked that did not end it: a notification, a notice, or a
    goodbye whose end of stream has not arrived yet, which only a round trip tells apart."""
    if conn.closed or conn.broken:
        return True
    pgconn = conn.pgconn
    try:
        if not _readable(pgconn.socket):
            return False
        # libpq reads the FATAL error first and sees the end of the stream only on a
        # later read; what it reads stays in its buffers for the next statement.
        for _ in range(2):
            pgconn.consume_input()
            if pgconn.status != ConnStatus.OK:
                return True
            if not _readable(pgconn.socket):
                break
    except (psycopg.OperationalError, OSError):
        return True
    return None


class _CheckedPool(ConnectionPool[psycopg.Connection[Any]]):
    """A ConnectionPool that never hands out a connection known to be dead."""

    def getconn(self, timeout: float | None = None) -> psycopg.Connection[Any]:
        """A connection of the pool, checked (see the comment above :func:`_readable`)."""
        # Every dead connection found leaves the pool, so max_size tries get past them all.
        for _ in range(self.max_size):
            conn = super().getconn(timeout)
            dead = _known_dead(conn)
            if dead is None:
                try:
                    ConnectionPool.check_connection(conn)
                    dead = False
                except psycopg.Error:
                    dead = True
            if not dead:
                return conn
            # Closed, it is dropped by the pool, which opens another in its place.
            conn.close()
            self.putconn(conn)
        return super().getconn(timeout)


class _CheckedAsyncPool(AsyncConnectionPool[psycopg.AsyncConnection[Any]]):
    """The async twin of :class:`_CheckedPool`."""

    async def getconn(self, timeout: float | None = None) -> psycopg.AsyncConnection[Any]:
        """A connection of the pool, checked (see the comment above :func:`_readable`)."""
        for _ in range(self.max_size):
            conn = await super().getconn(timeout)
            dead = _known_dead(conn)
            if dead is None:
                try:
                    await AsyncConnectionPool.check_connection(conn)
                    dead = False
                except psycopg.Error:
                    dead = True
            if not dead:
                return conn
            await conn.close()
            await self.putconn(conn)
        return await super().getconn(timeout)
