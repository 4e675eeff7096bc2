"""The application the worker tests run in real ``pgjobs work`` processes.

Every task writes a row into the ``ledger`` table (created by the tests) through its own
autocommit connection before it returns: executions (at least one per job) are counted
there, separately from completions (the job's final state, written exactly once).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import psycopg

import pgjobs

app = pgjobs.App()

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS ledger (
    id          bigserial PRIMARY KEY,
    job_id      bigint      NOT NULL,
    attempt     integer     NOT NULL,
    lease_token uuid        NOT NULL,
    pid         integer     NOT NULL,
    phase       text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
_INSERT = (
    "INSERT INTO ledger (job_id, attempt, lease_token, pid, phase) VALUES (%s, %s, %s, %s, %s)"
)

# Ledger rows are committed and visible at once; only their flush to disk is not awaited
# (durability is not under test, and a disk flush per execution would dominate the drain).
# The ledger is the tests' instrument, not pgjobs: it connects directly, on listen_url (the
# direct URL when the suite runs through PgBouncer, the database URL otherwise).
_OPTIONS = "-c synchronous_commit=off"
_local = threading.local()
_async_conn: psycopg.AsyncConnection[Any] | None = None


def record(ctx: pgjobs.JobContext, phase: str = "run") -> None:
    """Ledger entry from a sync task (one connection per worker thread)."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(app.listen_url, autocommit=True, options=_OPTIONS)
    conn.execute(_INSERT, (ctx.id, ctx.attempt, ctx.lease_token, os.getpid(), phase))


async def arecord(ctx: pgjobs.JobContext, phase: str = "run") -> None:
    """Ledger entry from an async task (one connection per worker process)."""
    global _async_conn
    if _async_conn is None:
        _async_conn = await psycopg.AsyncConnection.connect(
            app.listen_url, autocommit=True, options=_OPTIONS
        )
    await _async_conn.execute(_INSERT, (ctx.id, ctx.attempt, ctx.lease_token, os.getpid(), phase))


def executions(ctx: pgjobs.JobContext) -> int:
    """How often this job ran before (ledger rows), for tasks that change behaviour."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(app.listen_url, autocommit=True)
    row = conn.execute("SELECT count(*) FROM ledger WHERE job_id = %s", (ctx.id,)).fetchone()
    return int(row[0]) if row else 0


@app.task(name="t.record", queue="q")
async def record_async(ctx: pgjobs.JobContext, n: int = 0) -> dict[str, Any]:
    """Async: record and return."""
    await arecord(ctx)
    return {"n": n, "attempt": ctx.attempt}


@app.task(name="t.record_sync", queue="q")
def record_sync(ctx: pgjobs.JobContext, n: int = 0) -> dict[str, Any]:
    """Sync (in a thread): record and return."""
    record(ctx)
    return {"n": n, "attempt": ctx.attempt, "thread": threading.current_thread().name}


@app.task(name="t.sleep", queue="slow", max_attempts=5)
def sleep_sync(
    ctx: pgjobs.JobContext, seconds: float, first_attempt_only: bool = False
) -> dict[str, Any]:
    """Sleep (on every attempt, or only on the first), recording start and end."""
    record(ctx, "start")
    if ctx.attempt == 1 or not first_attempt_only:
        time.sleep(seconds)
    record(ctx, "end")
    return {"attempt": ctx.attempt, "pid": os.getpid()}


@app.task(name="t.asleep", queue="slow", max_attempts=5)
async def sleep_async(ctx: pgjobs.JobContext, seconds: float) -> dict[str, Any]:
    """Async sleep, recording start and end."""
    await arecord(ctx, "start")
    await asyncio.sleep(seconds)
    await arecord(ctx, "end")
    return {"attempt": ctx.attempt, "pid": os.getpid()}


@app.task(name="t.fail", queue="q", max_attempts=3, backoff=lambda attempt: 0.4 * attempt)
def fail(ctx: pgjobs.JobContext, times: int = 1000) -> str:
    """Fail the first ``times`` attempts, then succeed."""
    record(ctx)
    if ctx.attempt <= times:
        raise ValueError(f"failure number {ctx.attempt}")
    return "recovered"


@app.task(name="t.discard", queue="q", max_attempts=5, discard_on=(KeyError,))
def discard(ctx: pgjobs.JobContext) -> None:
    """Raise an exception the task discards on: dead at once."""
    record(ctx)
    raise KeyError("not worth retrying")


@app.task(name="t.outcome", queue="q", max_attempts=3)
def outcome(ctx: pgjobs.JobContext, kind: str, raise_it: bool = False, times: int = 1) -> str:
    """Ask for Retry / Snooze / Cancel on the first ``times`` executions."""
    before = executions(ctx)
    record(ctx)
    if before < times:
        result: pgjobs.Retry | pgjobs.Snooze | pgjobs.Cancel
        if kind == "retry":
            result = pgjobs.Retry(0.3, reason="asked to retry")
        elif kind == "snooze":
            result = pgjobs.Snooze(0.3)
        else:
            result = pgjobs.Cancel("no longer wanted")
        if raise_it:
            raise result
        return result  # type: ignore[return-value]
    return f"done after {before + 1} executions"


@app.task(name="t.hang_sync", queue="q", timeout=0.5, max_attempts=2, backoff=lambda a: 0.1)
def hang_sync(ctx: pgjobs.JobContext, seconds: float = 30.0) -> None:
    """A sync task that overruns its timeout (its thread is abandoned)."""
    record(ctx)
    time.sleep(seconds)


@app.task(name="t.hang_async", queue="q", timeout=0.5, max_attempts=2, backoff=lambda a: 0.1)
async def hang_async(ctx: pgjobs.JobContext, seconds: float = 30.0) -> None:
    """An async task that overruns its timeout (it is cancelled)."""
    await arecord(ctx)
    await asyncio.sleep(seconds)


@app.task(name="t.suicide", queue="crash", max_attempts=2)
def suicide(ctx: pgjobs.JobContext) -> None:
    """Kill the worker process running it, every time."""
    record(ctx)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name="t.progress", queue="q")
def progress(ctx: pgjobs.JobContext) -> str:
    """Report progress, then finish."""
    ctx.progress(0.5, {"step": "half"})
    record(ctx)
    return "reported"


@app.task(name="t.aprogress", queue="q")
async def aprogress(ctx: pgjobs.JobContext) -> str:
    """Report progress from an async task."""
    held = await ctx.progress_async(0.75, {"step": "most"})
    await arecord(ctx)
    return f"held={held}"


@app.task(name="t.spin", queue="slow", max_attempts=3)
def spin(ctx: pgjobs.JobContext, seconds: float) -> int:
    """Hold the GIL in a pure-Python busy loop (the heartbeat must still get through)."""
    record(ctx, "start")
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


@app.task(name="t.typeerror", queue="q", max_attempts=2, backoff=lambda attempt: 0.1)
def typeerror(count: int) -> None:
    """Raises a TypeError of its own: an ordinary failure, retried by policy."""
    raise TypeError(f"the task's own TypeError ({count})")


@app.on_dead_alert
def dead_alert(queue: str, dead: int, threshold: int) -> None:
    """Ledger entry per dead-letter alert (job_id: dead count, attempt: threshold)."""
    with psycopg.connect(app.listen_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ledger (job_id, attempt, lease_token, pid, phase) "
            "VALUES (%s, %s, gen_random_uuid(), %s, %s)",
            (dead, threshold, os.getpid(), f"alert:{queue}"),
        )


class UnprintableError(ValueError):
    """An exception that cannot even say what it is: ``str`` and ``repr`` raise."""

    def __str__(self) -> str:
        raise RuntimeError("this exception's __str__ raises")

    def __repr__(self) -> str:
        raise RuntimeError("this exception's __repr__ raises")


class UnformattableError(ValueError):
    """An exception whose traceback cannot be formatted (``__notes__`` raises)."""

    @property
    def __notes__(self) -> list[str]:
        raise RuntimeError("this exception's __notes__ raise")


@app.task(name="t.deep_result", queue="q", max_attempts=3, backoff=lambda attempt: 0.1)
def deep_result(ctx: pgjobs.JobContext, depth: int = 5000) -> list[Any]:
    """Return a list nested ``depth`` levels deep: more than a result may nest."""
    record(ctx)
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@app.task(name="t.unprintable", queue="q", max_attempts=2, backoff=lambda attempt: 0.1)
def unprintable(ctx: pgjobs.JobContext) -> None:
    """Raise an exception whose ``str`` and ``repr`` raise."""
    record(ctx)
    raise UnprintableError()


@app.task(name="t.unformattable", queue="q", max_attempts=2, backoff=lambda attempt: 0.1)
async def unformattable(ctx: pgjobs.JobContext) -> None:
    """Raise (from an async task) an exception whose traceback cannot be formatted."""
    await arecord(ctx)
    raise UnformattableError("a message that prints")
