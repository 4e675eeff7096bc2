"""The dead-letter alert: once per crossing of a queue's threshold, with a warning, an
event and the application's hook, in real worker processes."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from typer.testing import CliRunner
from worker_processes import Workers, scalar, wait_until

import pgjobs
from pgjobs.cli import cli


def _cli(url: str, *args: str) -> Any:
    return CliRunner().invoke(cli, ["--database-url", url, *args], env={"PGJOBS_APP": None})


def _alerts(ledger: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return ledger.execute(
        "SELECT phase, job_id, attempt FROM ledger WHERE phase LIKE 'alert:%' ORDER BY id"
    ).fetchall()


def test_the_cli_sets_and_checks_the_threshold(db_url: str, wapp: pgjobs.App) -> None:
    result = _cli(db_url, "queues", "alert", "q", "--threshold", "3")
    assert result.exit_code == 0, result.output
    assert "3 dead" in result.output
    with psycopg.connect(db_url) as conn:
        assert scalar(conn, "SELECT dead_alert_threshold FROM pgjobs.queues WHERE name = 'q'") == 3
    assert _cli(db_url, "queues", "alert", "q", "--threshold", "0").exit_code != 0
    assert _cli(db_url, "queues", "alert", "q").exit_code != 0
    assert _cli(db_url, "queues", "alert", "bad name!", "--threshold", "1").exit_code != 0
    assert _cli(db_url, "queues", "alert", "q", "--off").exit_code == 0
    with psycopg.connect(db_url) as conn:
        assert (
            scalar(conn, "SELECT dead_alert_threshold FROM pgjobs.queues WHERE name = 'q'") is None
        )


def _two_ticks(ledger: psycopg.Connection[Any]) -> None:
    """Until the worker's maintenance thread has run two more ticks (heartbeat first,
    then the alert check in the same tick)."""
    query = "SELECT max(last_heartbeat) FROM pgjobs.workers"
    for _ in range(2):
        before = scalar(ledger, query)
        wait_until(lambda b=before: scalar(ledger, query) != b, 10, "a heartbeat")


def test_the_alert_fires_once_per_crossing(
    db_url: str, wapp: pgjobs.App, ledger: psycopg.Connection[Any], workers: Workers
) -> None:
    from worker_app import discard

    assert _cli(db_url, "queues", "alert", "q", "--threshold", "2").exit_code == 0
    alerted = "SELECT dead_alerted_at IS NOT NULL FROM pgjobs.queues WHERE name = 'q'"

    def dead_count() -> int:
        return int(scalar(ledger, "SELECT count(*) FROM pgjobs.jobs WHERE state = 'dead'"))

    async def first_alert() -> pgjobs.JobEvent:
        async with asyncio.timeout(30):
            async for event in wapp.events(queue="q"):
                if event.kind == "dead_alert":
                    return event
        raise AssertionError("no dead_alert event")

    async def main() -> pgjobs.JobEvent:
        task = asyncio.create_task(first_alert())
        await asyncio.to_thread(workers.start)
        discard.enqueue()  # discarded at once: dead
        await asyncio.to_thread(wait_until, lambda: dead_count() == 1, 20, "first dead")
        # Below the threshold: the check runs and does not fire.
        await asyncio.to_thread(_two_ticks, ledger)
        assert _alerts(ledger) == [] and scalar(ledger, alerted) is False
        discard.enqueue()
        return await task

    event = asyncio.run(main())
    assert event.queue == "q" and event.detail == {"dead": 2, "threshold": 2}
    wait_until(lambda: _alerts(ledger), 10, "hook called")
    assert _alerts(ledger) == [("alert:q", 2, 2)]
    assert "dead-letter alert: queue q has 2 dead job(s) (threshold 2)" in workers.started[0].log()
    # Still at or over the threshold: no second alert.
    discard.enqueue()
    wait_until(lambda: dead_count() == 3, 20, "third dead")
    _two_ticks(ledger)
    assert len(_alerts(ledger)) == 1 and scalar(ledger, alerted) is True
    # Below the threshold again: re-armed; the next crossing fires again.
    ledger.execute("DELETE FROM pgjobs.jobs WHERE state = 'dead'")
    wait_until(lambda: scalar(ledger, alerted) is False, 20, "re-armed")
    assert len(_alerts(ledger)) == 1
    discard.enqueue()
    discard.enqueue()
    wait_until(lambda: len(_alerts(ledger)) == 2, 20, "second crossing alerted")
    assert _alerts(ledger)[1] == ("alert:q", 2, 2)
