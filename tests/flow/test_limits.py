"""Global queue limits (concurrency and rate, over every worker process) and per-queue
slots of one worker, with real ``pgjobs work`` processes against a real server."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from flow_helpers import Workers, body_intervals, max_overlap, scalar, wait_until, window_max

import pgjobs
from pgjobs.admin import Admin
from pgjobs.errors import ConfigurationError
from pgjobs.limits import QueueLimits, parse_rate


class Sampler:
    """Samples a query from its own connection every few ms until stopped; keeps the max."""

    def __init__(self, url: str, query: str) -> None:
        self.url, self.query = url, query
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                self.samples.append(int(scalar(conn, self.query)))
                self._stop.wait(0.005)


def succeeded(conn: psycopg.Connection[Any], queue: str) -> int:
    query = "SELECT count(*) FROM pgjobs.jobs WHERE queue = %s AND state = 'succeeded'"
    return int(scalar(conn, query, (queue,)))


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgjobs", "--database-url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "seconds"),
    [("20/s", 20, 1), ("100/m", 100, 60), ("5/30s", 5, 30), ("1000/1h", 1000, 3600),
     ((7, 2.5), 7, 2.5), ((3, timedelta(minutes=1)), 3, 60)],
)  # fmt: skip
def test_rates_parse(text: Any, count: int, seconds: float) -> None:
    assert parse_rate(text) == (count, timedelta(seconds=seconds))


@pytest.mark.parametrize("bad", ["20", "20/", "x/s", "20/parsec", "-1/s", (1,), "1.5/s"])
def test_bad_rates_are_rejected_with_the_accepted_forms(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="use COUNT/PERIOD"):
        parse_rate(bad)


def test_bad_limits_are_rejected(flow: pgjobs.App) -> None:
    with pytest.raises(ConfigurationError, match="positive integer"):
        QueueLimits(concurrency=0)
    with pytest.raises(ConfigurationError, match="positive integer"):
        flow.limit_queue("x", rate="0/s")
    with pytest.raises(ConfigurationError, match="give a concurrency"):
        flow.limit_queue("x")
    with pytest.raises(pgjobs.InvalidNameError):
        flow.limit_queue("bad queue", concurrency=1)


def test_cli_sets_shows_and_removes_limits(db_url: str, conn: psycopg.Connection[Any]) -> None:
    out = cli(db_url, "queues", "limit", "api", "--concurrency", "3", "--rate", "20/s", "--per-key")
    assert out.returncode == 0, out.stderr
    assert "queue api: limits 3 running, 20 per 1s, per key" in out.stdout
    row = conn.execute(
        "SELECT concurrency_limit, rate_limit, rate_period, limit_per_key "
        "FROM pgjobs.queues WHERE name = 'api'"
    ).fetchone()
    assert row == (3, 20, timedelta(seconds=1), True)
    listing = cli(db_url, "queues", "list").stdout
    assert "3 running, 20 per 1s, per key" in listing
    assert cli(db_url, "queues", "limit", "api", "--off").returncode == 0
    assert conn.execute(
        "SELECT concurrency_limit, rate_limit FROM pgjobs.queues WHERE name = 'api'"
    ).fetchone() == (None, None)
    bad = cli(db_url, "queues", "limit", "api", "--rate", "fast")
    assert bad.returncode != 0 and "invalid rate 'fast'" in bad.stderr
    neither = cli(db_url, "queues", "limit", "api")
    assert neither.returncode != 0 and "--concurrency and/or --rate, or --off" in neither.stderr


def test_database_refuses_half_a_rate(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO pgjobs.queues (name, rate_limit) VALUES ('q', 5)")


# -- global concurrency -------------------------------------------------------------------


def test_global_concurrency_limit_holds_over_four_processes(
    db_url: str, flow: pgjobs.App, flow_workers: Workers, flow_log: psycopg.Connection[Any]
) -> None:
    """A limit of 3 with 4 processes x 10 slots: never more than 3 running (sampled from the
    database), and the limit is used (3 at once is reached)."""
    Admin(flow).set_queue_limits("limited", QueueLimits(concurrency=3))
    procs = [flow_workers.start(queues="limited", concurrency=10) for _ in range(4)]
    query = "SELECT count(*) FROM pgjobs.jobs WHERE queue = 'limited' AND state = 'running'"
    with Sampler(db_url, query) as sampler:
        flow.enqueue_many("f.hold", [{"seconds": 0.15}] * 20)
        flow.enqueue_many("f.ahold", [{"seconds": 0.15}] * 20)
        wait_until(lambda: succeeded(flow_log, "limited") == 40, 60, "40 jobs succeeded")
    assert max(sampler.samples) == 3, sampler.samples
    assert max_overlap(body_intervals(flow_log)) <= 3
    assert all(p.popen.poll() is None for p in procs)


def test_per_key_concurrency_limits_each_key_not_the_queue(
    flow: pgjobs.App, flow_workers: Workers, flow_log: psycopg.Connection[Any]
) -> None:
    """One running job per limit_key: jobs of one key never overlap, different keys do."""
    Admin(flow).set_queue_limits("limited", QueueLimits.build(concurrency=1, per_key=True))
    for _ in range(2):
        flow_workers.start(queues="limited", concurrency=10)
    with flow.pool.connection() as conn, conn.transaction():
        for key in ("acme", "globex", "initech"):
            for _ in range(5):
                flow.enqueue("f.hold", {"seconds": 0.1}, limit_key=key, conn=conn)
    wait_until(lambda: succeeded(flow_log, "limited") == 15, 60, "15 jobs succeeded")
    for key in ("acme", "globex", "initech"):
        assert max_overlap(body_intervals(flow_log, f"j.limit_key = '{key}'")) == 1
    assert max_overlap(body_intervals(flow_log)) >= 2, "different keys ran at the same time"


def test_app_declared_limits_are_written_by_workers(
    flow: pgjobs.App, flow_workers: Workers, conn: psycopg.Connection[Any]
) -> None:
    """flow_app declares limits for queue "declared": a worker of it writes them."""
    flow_workers.start("--burst", queues="declared", concurrency=2, wait_ready=False)
    assert flow_workers.started[-1].wait(30) == 0
    row = conn.execute(
        "SELECT concurrency_limit, rate_limit, rate_period, limit_per_key "
        "FROM pgjobs.queues WHERE name = 'declared'"
    ).fetchone()
    assert row == (2, 30, timedelta(minutes=1), False)


# -- rate ----------------------------------------------------------------------------------


def test_rate_limit_of_20_per_second_holds_over_five_seconds(
    flow: pgjobs.App, flow_workers: Workers, flow_log: psycopg.Connection[Any]
) -> None:
    """20 starts/s across 3 processes: no 1-second window ever holds more than 20 starts,
    over 5 s the total stays within 20 x 5 + 20, and the limit is actually reached."""
    Admin(flow).set_queue_limits("rated", QueueLimits.build(rate="20/s"))
    for _ in range(3):
        flow_workers.start(queues="rated", concurrency=10)
    flow.enqueue_many("f.hold", [{"seconds": 0.0}] * 300, queue="rated")
    first = wait_until(
        lambda: scalar(flow_log, "SELECT min(started_at) FROM pgjobs.jobs WHERE queue = 'rated'"),
        30,
        "a first start",
    )
    wait_until(
        lambda: (
            scalar(
                flow_log,
                "SELECT max(started_at) FROM pgjobs.jobs WHERE queue = 'rated'",
            )
            >= first + timedelta(seconds=5)
        ),
        30,
        "5 s of starts",
    )
    starts = [
        r[0]
        for r in flow_log.execute(
            "SELECT started_at FROM pgjobs.jobs WHERE queue = 'rated' AND started_at < %s",
            (first + timedelta(seconds=5),),
        ).fetchall()
    ]
    assert window_max(starts, timedelta(seconds=1)) <= 20
    assert len(starts) <= 20 * 5 + 20
    assert len(starts) >= 20 * 4, f"only {len(starts)} starts in 5 s: the limit throttles too hard"
    remaining = scalar(
        flow_log, "SELECT count(*) FROM pgjobs.jobs WHERE queue = 'rated' AND state = 'available'"
    )
    assert remaining > 0, "jobs over the limit wait (available), they do not fail"
    assert scalar(flow_log, "SELECT count(*) FROM pgjobs.jobs WHERE state = 'dead'") == 0


# -- per-queue slots of one worker ---------------------------------------------------------


def test_per_queue_concurrency_of_one_worker(
    flow: pgjobs.App, flow_workers: Workers, flow_log: psycopg.Connection[Any]
) -> None:
    """--queues a=3,b=1,c --concurrency 2: each queue runs at most its own slots (c shares
    the --concurrency pool), and the queues run side by side. Measured on the job bodies:
    a row stays `running` for the few ms until its outcome is written, so the database may
    briefly show more than the slots."""
    flow_workers.start(queues="a=3,b=1,c", concurrency=2)
    for queue in ("a", "b", "c"):
        flow.enqueue_many("f.hold", [{"seconds": 0.3}] * 6, queue=queue)
    query = "SELECT count(*) = 18 FROM pgjobs.jobs WHERE state = 'succeeded'"
    wait_until(lambda: scalar(flow_log, query), 60, "18 jobs succeeded")
    peaks = {q: max_overlap(body_intervals(flow_log, f"j.queue = '{q}'")) for q in "abc"}
    assert peaks == {"a": 3, "b": 1, "c": 2}
    assert max_overlap(body_intervals(flow_log)) == 6


def test_bad_per_queue_concurrency_is_a_usage_error(db_url: str) -> None:
    from typer.testing import CliRunner

    from pgjobs.cli import cli as pgjobs_cli

    for bad in ("a=0,b", "a=x"):
        args = ["--database-url", db_url, "--app", "tests.flow.flow_app:app", "work"]
        result = CliRunner().invoke(pgjobs_cli, [*args, "--queues", bad, "--burst"])
        assert result.exit_code == 2
        assert "positive integer" in result.output and repr(bad.split(",")[0]) in result.output
