"""Claim latency beside many finished jobs, plain and partitioned, and what retention
costs on each: the figures of the README's "Partitioned jobs table".

    .venv/bin/python tests/scale/partition_bench.py postgresql://postgres@127.0.0.1:5432/postgres

For each layout it creates a database of its own on that server, migrates it, adds
``--finished`` succeeded jobs (finished over the last day) and a backlog of runnable
ones, then times the worker's own claim statement (``claim_jobs``, a batch of 10, then
their outcomes with ``finish_jobs``, each in a prepared statement as the worker runs
them) and, last, removing the finished jobs: ``prune_batch`` deletes on a plain table, one
``DROP TABLE`` per day partition on a partitioned one. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgjobs import migrate, partitioning
from pgjobs.queries import KEPT, Queries
from pgjobs.worker_db import worker_conninfo

QUEUE = "bench"
DAY = timedelta(days=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="a database on the server to measure")
    parser.add_argument("--finished", type=int, default=10_000_000)
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument("--claims", type=int, default=1_000)
    parser.add_argument("--only", choices=["plain", "partitioned"], help="one layout")
    args = parser.parse_args()
    results = []
    runs = [("plain", 0), ("plain", args.finished), ("partitioned", args.finished)]
    for layout, finished in [r for r in runs if args.only in (None, r[0])]:
        results.append(_measure(args.url, layout, finished, args.backlog, args.claims))
        print(json.dumps(results[-1]), flush=True)


def _measure(url: str, layout: str, finished: int, backlog: int, claims: int) -> dict[str, Any]:
    target = _fresh_database(url, f"pgjobs_partition_bench_{layout}_{finished}")
    migrate.upgrade(target)
    if layout == "partitioned":
        partitioning.partition(target, "pgjobs")
    queries = Queries("pgjobs")
    with psycopg.connect(target, autocommit=True) as conn:
        started = time.perf_counter()
        _fill(conn, layout, finished, backlog)
        fill_s = time.perf_counter() - started
        # Measured with nothing of the fill left to write out.
        conn.execute("VACUUM ANALYZE pgjobs.jobs")
        conn.execute("CHECKPOINT")
        latencies = _claim_latencies(target, queries, claims)
        size = conn.execute("SELECT pg_total_relation_size('pgjobs.jobs_current')"
                            if layout == "partitioned" else
                            "SELECT pg_total_relation_size('pgjobs.jobs')").fetchone()  # fmt: skip
        started = time.perf_counter()
        removed = _remove_finished(conn, queries, layout)
        remove_s = time.perf_counter() - started
    _drop_database(url, target)
    return {
        "layout": layout,
        "finished_rows": finished,
        "fill_s": round(fill_s, 1),
        "claim_p50_ms": round(statistics.median(latencies), 3),
        "claim_p99_ms": round(statistics.quantiles(latencies, n=100)[98], 3),
        "hot_table_mb": round((size[0] if size else 0) / 2**20),
        "remove_finished_s": round(remove_s, 2),
        "removed": f"{removed} partitions" if layout == "partitioned" else f"{removed} rows",
    }


def _fill(conn: psycopg.Connection[Any], layout: str, finished: int, backlog: int) -> None:
    # Finished jobs spread over the last day; on a partitioned table they are where
    # retention would have archived them (kept_until = finished_at + 1 day).
    kept = "f + interval '1 day'" if layout == "partitioned" else f"'{KEPT}'"
    if layout == "partitioned":
        # The day partitions such jobs land in, made as the retention pass makes them.
        with conn.transaction():
            partitioning.archive_and_drop(conn, Queries("pgjobs"), {"succeeded": DAY}, 1)
    step = 1_000_000
    for start in range(0, finished, step):
        n = min(step, finished - start)
        conn.execute(
            "INSERT INTO pgjobs.jobs (queue, task, args, state, attempts, run_at, started_at,"
            " finished_at, result, kept_until)"
            " SELECT %s, 'bench.noop', jsonb_build_object('i', g), 'succeeded', 1, f, f, f,"
            f" 'null'::jsonb, {kept}"
            " FROM generate_series(1, %s) AS g,"
            " LATERAL (SELECT now() - (g %% 86000) * interval '1 second' AS f) AS t",
            (QUEUE, n),
        )
    conn.execute(
        "INSERT INTO pgjobs.jobs (queue, task, args)"
        " SELECT %s, 'bench.noop', jsonb_build_object('i', g) FROM generate_series(1, %s) AS g",
        (QUEUE, backlog),
    )


def _claim_latencies(url: str, queries: Queries, claims: int) -> list[float]:
    """Claims as a worker sends them (its claim connection: generic plans, commits not
    waited for), outcomes on a connection of their own."""
    worker = f"bench-{uuid.uuid4()}"
    claiming = worker_conninfo(url, "bench-claim", durable=False, generic_plans=True)
    with (
        psycopg.connect(claiming, autocommit=True) as conn,
        psycopg.connect(worker_conninfo(url, "bench-completion"), autocommit=True) as done,
    ):
        conn.execute(
            "INSERT INTO pgjobs.workers (id, host, pid, queues, concurrency)"
            " VALUES (%s, 'h', 1, %s, 10)",
            (worker, [QUEUE]),
        )
        params = {"queues": [QUEUE], "limit": 10, "start": 10, "scan": 74, "worker": worker,
                  "events": False, "events_channel": "pgjobs_events"}  # fmt: skip
        latencies = []
        for _ in range(claims):
            started = time.perf_counter()
            rows = conn.execute(queries.claim_jobs, params, prepare=True).fetchall()
            latencies.append((time.perf_counter() - started) * 1000)
            claimed = [r for r in rows if r[0] is not None]
            done.execute(
                queries.finish_jobs,
                {"id": [r[0] for r in claimed], "lease_token": [r[8] for r in claimed],
                 "state": ["succeeded"] * len(claimed), "result": [], "delay": [],
                 "error": [], "refund": [], "worker": worker, "events": False,
                 "events_channel": "pgjobs_events"},
                prepare=True,
            )  # fmt: skip
    return latencies


def _remove_finished(conn: psycopg.Connection[Any], queries: Queries, layout: str) -> int:
    if layout == "partitioned":
        names = sorted(partitioning.day_partitions(conn, "pgjobs").values())
        for name in names:
            conn.execute(f'DROP TABLE pgjobs."{name}"')
        return len(names)
    removed = 0
    while True:
        params = {"state": "succeeded", "older_than": 0, "limit": 10_000}
        n = len(conn.execute(queries.prune_batch, params).fetchall())
        removed += n
        if n < 10_000:
            return removed


def _fresh_database(url: str, name: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(url)
    params["dbname"] = name
    return make_conninfo("", **params)


def _drop_database(url: str, target: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        name = conninfo_to_dict(target)["dbname"]
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


if __name__ == "__main__":
    main()
