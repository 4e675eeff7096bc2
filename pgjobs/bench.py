"""``pgjobs bench``: enqueue, drain and wake-up latency, measured on a real server.

Runs in its own schema (``pgjobs_bench``) of the configured database, which it creates,
empties between workloads and drops at the end, so it never touches an application's jobs.
Workers are real ``pgjobs work`` processes, exactly as in production.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgjobs.app import App
from pgjobs.task import Task

SCHEMA = "pgjobs_bench"
QUEUE = "bench"


def _register(application: App) -> Task[Any, Any]:
    @application.task(name="bench.noop", queue=QUEUE, max_attempts=1)
    async def noop(i: int) -> float:
        """The benchmark job: does nothing but report when it started."""
        return time.time()

    return noop


# The worker processes import this module as their --app; they find the schema in the
# environment, which run() sets for them.
app = App(schema=os.environ.get("PGJOBS_SCHEMA") or SCHEMA)
_register(app)


@dataclass
class Layout:
    """Worker layout and sizes of one benchmark run."""

    single: int = 2_000
    bulk: int = 50_000
    drain: int = 20_000
    latency: int = 500
    rate: float = 50.0
    workers: int = 2
    concurrency: int = 50


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` by linear interpolation."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run(url: str, layout: Layout) -> dict[str, Any]:
    """Run every workload against ``url``; return the measurements."""
    from pgjobs import migrate

    migrate.upgrade(url, SCHEMA)
    bench_app = App(url, schema=SCHEMA)
    task = _register(bench_app)
    try:
        results = {
            "enqueue_single": _enqueue_single(task, url, layout.single),
            "enqueue_bulk": _enqueue_bulk(task, url, layout.bulk),
            "drain": _drain(task, url, layout),
            "latency": _latency(task, url, layout),
        }
    finally:
        bench_app.close()
        migrate.downgrade(url, SCHEMA, "base")
    with psycopg.connect(url) as conn:
        server = conn.info.parameter_status("server_version")
    results["server"] = {"version": server}
    results["layout"] = layout.__dict__
    return results


def _empty(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("TRUNCATE {}.jobs, {}.workers").format(
                sql.Identifier(SCHEMA), sql.Identifier(SCHEMA)
            )
        )


def _enqueue_single(task: Task[Any, Any], url: str, n: int) -> dict[str, float]:
    _empty(url)
    for i in range(20):  # warm the pool and the prepared statement
        task.enqueue(i=-i)
    started = time.perf_counter()
    for i in range(n):
        task.enqueue(i=i)
    seconds = time.perf_counter() - started
    return {"jobs": n, "seconds": seconds, "jobs_per_s": n / seconds}


def _enqueue_bulk(task: Task[Any, Any], url: str, n: int, chunk: int = 10_000) -> dict[str, float]:
    _empty(url)
    task.enqueue_many([{"i": -1}])
    items = [{"i": i} for i in range(n)]
    started = time.perf_counter()
    for k in range(0, n, chunk):
        task.enqueue_many(items[k : k + chunk])
    seconds = time.perf_counter() - started
    return {"jobs": n, "seconds": seconds, "jobs_per_s": n / seconds}


def _drain(task: Task[Any, Any], url: str, layout: Layout) -> dict[str, Any]:
    _empty(url)
    for k in range(0, layout.drain, 10_000):
        task.enqueue_many([{"i": i} for i in range(k, min(k + 10_000, layout.drain))])
    with _workers(url, layout), psycopg.connect(url, autocommit=True) as conn:
        _wait_until_done(conn, layout.drain, timeout=600)
    with psycopg.connect(url) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE state = 'succeeded'), max(attempts),"
                " extract(epoch FROM max(finished_at) - min(started_at)) FROM {}.jobs"
            ).format(sql.Identifier(SCHEMA))
        ).fetchone()
    assert row is not None
    succeeded, max_attempts, span = row[0], row[1], float(row[2])
    return {
        "jobs": layout.drain,
        "succeeded": succeeded,
        "max_attempts_seen": max_attempts,
        "seconds": span,
        "jobs_per_s": succeeded / span,
    }


def _latency(task: Task[Any, Any], url: str, layout: Layout) -> dict[str, Any]:
    _empty(url)
    committed: dict[int, float] = {}
    with _workers(url, layout), psycopg.connect(url, autocommit=True) as conn:
        for i in range(-4, 0):
            task.enqueue(i=i)
        _wait_until_done(conn, 4, timeout=60)
        time.sleep(2.0)  # let every worker go idle: the point is wake-up from idle
        begin = time.time()
        for i in range(layout.latency):
            pause = begin + i / layout.rate - time.time()
            if pause > 0:
                time.sleep(pause)
            job_id = task.enqueue(i=i)
            assert job_id is not None
            committed[job_id] = time.time()
        _wait_until_done(conn, layout.latency + 4, timeout=120)
        rows = conn.execute(
            sql.SQL("SELECT id, result FROM {}.jobs WHERE id = ANY(%s)").format(
                sql.Identifier(SCHEMA)
            ),
            (list(committed),),
        ).fetchall()
    millis = [(float(result) - committed[job_id]) * 1000 for job_id, result in rows]
    return {
        "jobs": layout.latency,
        "rate_per_s": layout.rate,
        "p50_ms": percentile(millis, 0.50),
        "p95_ms": percentile(millis, 0.95),
        "p99_ms": percentile(millis, 0.99),
        "max_ms": max(millis),
    }


def _wait_until_done(conn: psycopg.Connection[Any], n: int, timeout: float) -> None:
    query = sql.SQL("SELECT count(*) FROM {}.jobs WHERE state IN ('succeeded', 'dead')").format(
        sql.Identifier(SCHEMA)
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(query).fetchone()
        if row is not None and row[0] >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the benchmark workers did not finish {n} jobs within {timeout} s")


@contextmanager
def _workers(url: str, layout: Layout) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {**os.environ, "PGJOBS_SCHEMA": SCHEMA, "PGJOBS_DATABASE_URL": url}
    argv = [
        sys.executable,
        "-m",
        "pgjobs",
        "--app",
        "pgjobs.bench:app",
        "work",
        "--queues",
        QUEUE,
        "--concurrency",
        str(layout.concurrency),
        "--log-level",
        "WARNING",
    ]
    procs = [subprocess.Popen(argv, env=env) for _ in range(layout.workers)]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def report(results: dict[str, Any]) -> str:
    """The results as a short table for people."""
    layout = results["layout"]
    lat = results["latency"]
    lines = [
        f"pgjobs bench on PostgreSQL {results['server']['version']}: "
        f"{layout['workers']} worker processes x {layout['concurrency']} slots",
        f"  enqueue, one per transaction  {results['enqueue_single']['jobs_per_s']:>10,.0f} jobs/s",
        f"  enqueue, bulk                 {results['enqueue_bulk']['jobs_per_s']:>10,.0f} jobs/s",
        f"  drain                         {results['drain']['jobs_per_s']:>10,.0f} jobs/s "
        f"({results['drain']['succeeded']:,} jobs)",
        f"  enqueue-to-start latency      p50 {lat['p50_ms']:.2f} ms  "
        f"p95 {lat['p95_ms']:.2f} ms  p99 {lat['p99_ms']:.2f} ms",
        f"                                (idle workers, {lat['jobs']} jobs at "
        f"{lat['rate_per_s']:.0f}/s)",
    ]
    return "\n".join(lines)
