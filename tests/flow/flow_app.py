"""The application of the flow-control tests (limits, per-queue slots, cancellation), run
in real ``pgjobs work`` processes.

Tasks write to ``flow_log`` (created by the tests) through their own autocommit
connection, stamped with the database clock, so a test can see what ran when and where.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import psycopg

import pgjobs

app = pgjobs.App()
# Written to the database by every worker of this app when it starts.
app.limit_queue("declared", concurrency=2, rate="30/m")

FLOW_LOG_DDL = """
CREATE TABLE IF NOT EXISTS flow_log (
    id      bigserial   PRIMARY KEY,
    job_id  bigint      NOT NULL,
    pid     integer     NOT NULL,
    phase   text        NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
_local = threading.local()
_async_conn: psycopg.AsyncConnection[Any] | None = None
_INSERT = "INSERT INTO flow_log (job_id, pid, phase) VALUES (%s, %s, %s)"


def log(job_id: int, phase: str) -> None:
    """A flow_log row from a sync task (one connection per worker thread)."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(app.listen_url, autocommit=True)
    conn.execute(_INSERT, (job_id, os.getpid(), phase))


async def alog(job_id: int, phase: str) -> None:
    """A flow_log row from an async task (one connection per worker process)."""
    global _async_conn
    if _async_conn is None:
        _async_conn = await psycopg.AsyncConnection.connect(app.listen_url, autocommit=True)
    await _async_conn.execute(_INSERT, (job_id, os.getpid(), phase))


@app.task(name="f.hold", queue="limited")
def hold(ctx: pgjobs.JobContext, seconds: float = 0.2) -> None:
    """Run for a while, logging start and end."""
    log(ctx.id, "start")
    time.sleep(seconds)
    log(ctx.id, "end")


@app.task(name="f.ahold", queue="limited")
async def ahold(ctx: pgjobs.JobContext, seconds: float = 0.2) -> None:
    """hold, async."""
    await alog(ctx.id, "start")
    await asyncio.sleep(seconds)
    await alog(ctx.id, "end")


@app.task(name="f.until_cancelled", queue="cancel")
def until_cancelled(ctx: pgjobs.JobContext, seconds: float = 60.0) -> str:
    """Work in small steps until ``ctx.cancelled`` (or ``seconds`` pass)."""
    log(ctx.id, "start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ctx.cancelled:
            log(ctx.id, "saw-cancel")
            return "stopped"
        time.sleep(0.01)
    log(ctx.id, "end")
    return "finished"


@app.task(name="f.aforever", queue="cancel")
async def aforever(ctx: pgjobs.JobContext, seconds: float = 60.0) -> str:
    """Await until cancelled (asyncio cancellation), logging it."""
    await alog(ctx.id, "start")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await alog(ctx.id, "cancelled-error")
        raise
    await alog(ctx.id, "end")
    return "finished"


@app.task(name="f.quick", queue="cancel")
def quick(ctx: pgjobs.JobContext) -> str:
    """Finish at once (the worker is still serving after a cancellation)."""
    log(ctx.id, "start")
    return "quick"
