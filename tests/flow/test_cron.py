"""Periodic (cron) jobs: parsing, slots and DST, declarations, the scheduler's rounds on a
real database (first sight, downtime with skip and backfill, a busy peer, a changed
schedule, NOTIFY, a database that is down), ``pgjobs cron list``, and three real worker
processes enqueueing an every-second schedule exactly once per slot while one of them is
killed with SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from cron_helpers import APP, Workers, scalar, slots_of, wait_until
from ops_helpers import CLOSED_PORT_URL
from typer.testing import CliRunner

import pgjobs
from pgjobs.cli import cli
from pgjobs.cron import (
    InvalidScheduleError,
    PeriodicTask,
    Scheduler,
    parse_schedule,
    plan_round,
    schedule_from_text,
    slot_key,
)

PARIS = ZoneInfo("Europe/Paris")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def run(schedule: str, start: datetime, count: int, timezone: str = "UTC") -> list[datetime]:
    """The first ``count`` slots after ``start``, in UTC."""
    parsed = parse_schedule(schedule, timezone=timezone)
    slots, slot = [], start
    for _ in range(count):
        slot = parsed.next_after(slot)
        slots.append(slot)
    return slots


# -- parsing and slots --------------------------------------------------------------------


def test_five_fields_aliases_and_seconds() -> None:
    start = utc(2025, 1, 1, 10, 7, 30)
    assert run("*/5 * * * *", start, 2) == [utc(2025, 1, 1, 10, 10), utc(2025, 1, 1, 10, 15)]
    assert run("@hourly", start, 1) == [utc(2025, 1, 1, 11)]
    assert run("@daily", start, 1) == run("@midnight", start, 1) == [utc(2025, 1, 2)]
    assert run("@weekly", start, 1) == [utc(2025, 1, 5)]  # a Sunday
    assert run("@monthly", start, 1) == [utc(2025, 2, 1)]
    assert run("@yearly", start, 1) == run("@annually", start, 1) == [utc(2026, 1, 1)]
    # Six fields: seconds first.
    assert run("*/20 * * * * *", start, 3) == [
        utc(2025, 1, 1, 10, 7, 40),
        utc(2025, 1, 1, 10, 8, 0),
        utc(2025, 1, 1, 10, 8, 20),
    ]
    assert run("0 30 9 * * MON-FRI", start, 1) == [utc(2025, 1, 2, 9, 30)]
    assert parse_schedule("  0   12 *  * * ").text == "0 12 * * *"


def test_time_zone() -> None:
    # 09:00 in Paris is 08:00 UTC in winter, 07:00 UTC in summer.
    assert run("0 9 * * *", utc(2025, 1, 1), 1, "Europe/Paris") == [utc(2025, 1, 1, 8)]
    assert run("0 9 * * *", utc(2025, 7, 1), 1, "Europe/Paris") == [utc(2025, 7, 1, 7)]


def test_dst_spring_forward_europe_paris() -> None:
    # 2025-03-30: 02:00 local jumps to 03:00. A daily 02:30 job runs once, at the jump.
    slots = run("30 2 * * *", utc(2025, 3, 29, 12), 3, "Europe/Paris")
    assert [s.astimezone(PARIS).isoformat() for s in slots] == [
        "2025-03-30T03:00:00+02:00",
        "2025-03-31T02:30:00+02:00",
        "2025-04-01T02:30:00+02:00",
    ]
    # An hourly job has no 02:00 that day: 01:00 CET, then 03:00 CEST, one hour later.
    hourly = run("0 * * * *", utc(2025, 3, 29, 23, 30), 3, "Europe/Paris")
    assert hourly == [utc(2025, 3, 30, 0), utc(2025, 3, 30, 1), utc(2025, 3, 30, 2)]


def test_dst_fall_back_europe_paris() -> None:
    # 2025-10-26: 03:00 local goes back to 02:00. A daily 02:30 job runs once (not twice).
    slots = run("30 2 * * *", utc(2025, 10, 25, 12), 3, "Europe/Paris")
    assert [s.astimezone(PARIS).isoformat() for s in slots] == [
        "2025-10-26T02:30:00+02:00",
        "2025-10-27T02:30:00+01:00",
        "2025-10-28T02:30:00+01:00",
    ]
    # Real-time schedules fire every hour, both 02:00s included.
    hourly = run("@hourly", utc(2025, 10, 25, 22, 30), 4, "Europe/Paris")
    assert hourly == [utc(2025, 10, 25, 23), *(utc(2025, 10, 26, h) for h in range(3))]


@pytest.mark.parametrize(
    "expression",
    ["30 2 * * *", "0 2 * * *", "15 1-3 * * *", "0 * * * *", "*/30 * * * *", "0 0 * * * *"],
)
def test_latest_slot_agrees_with_next_across_dst(expression: str) -> None:
    schedule = parse_schedule(expression, timezone="Europe/Paris")
    for day in (utc(2025, 3, 29, 22), utc(2025, 10, 25, 21)):
        moment = day
        while moment < day + timedelta(hours=8):
            latest = schedule.latest_at_or_before(moment)
            assert latest <= moment < schedule.next_after(latest), (expression, moment)
            moment += timedelta(minutes=7, seconds=13)


def test_every_is_aligned_on_the_epoch() -> None:
    schedule = parse_schedule(every=timedelta(minutes=5))
    assert schedule.text == "every 5m"
    assert schedule.next_after(utc(2025, 1, 1, 10, 7, 30)) == utc(2025, 1, 1, 10, 10)
    assert schedule.next_after(utc(2025, 1, 1, 10, 10)) == utc(2025, 1, 1, 10, 15)
    assert schedule.latest_at_or_before(utc(2025, 1, 1, 10, 10)) == utc(2025, 1, 1, 10, 10)
    assert parse_schedule(every=90).text == "every 1m30s"
    # The row's text reads back as the same schedule.
    assert schedule_from_text("every 1m30s", "UTC") == parse_schedule(every=90)
    assert schedule_from_text("@hourly", "Europe/Paris").expression == "0 * * * *"


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("", "expected 5 fields"),
        ("* * *", "expected 5 fields"),
        ("* * * * * * *", "expected 5 fields"),
        ("61 * * * *", "Bad minute"),
        ("*/0 * * * *", "Bad minute"),
        ("0 24 * * *", "Bad hour"),
        ("0 0 30 2 *", "Bad day-of-month"),
        ("0 0 * * 8", "Bad day-of-week"),
        ("every minute", "expected 5 fields"),
        ("@reboot", "unknown cron alias"),
        ("@every 5m", "unknown cron alias"),
    ],
)
def test_bad_expression_is_rejected_with_its_text(expression: str, says: str) -> None:
    with pytest.raises(InvalidScheduleError) as caught:
        parse_schedule(expression)
    assert says in str(caught.value)
    assert repr(" ".join(expression.split())) in str(caught.value)
    assert isinstance(caught.value, pgjobs.ConfigurationError)


def test_bad_timezone_and_interval() -> None:
    with pytest.raises(InvalidScheduleError, match="unknown time zone 'Mars/Olympus'"):
        parse_schedule("@hourly", timezone="Mars/Olympus")
    with pytest.raises(InvalidScheduleError, match="unknown time zone"):
        parse_schedule("@hourly", timezone="../etc/passwd")
    with pytest.raises(InvalidScheduleError, match="no effect on every="):
        parse_schedule(every=60, timezone="Europe/Paris")
    with pytest.raises(InvalidScheduleError, match="at least 1"):
        parse_schedule(every=0.5)
    with pytest.raises(InvalidScheduleError, match="whole number"):
        parse_schedule(every=1.5)
    with pytest.raises(InvalidScheduleError, match="not both"):
        parse_schedule("@hourly", every=60)
    with pytest.raises(InvalidScheduleError, match="neither"):
        parse_schedule()


# -- declarations -------------------------------------------------------------------------


@pytest.fixture
def offline() -> Iterator[pgjobs.App]:
    """An App that never reaches a database: declarations need none."""
    app = pgjobs.App(CLOSED_PORT_URL)
    yield app
    app.close()


def test_periodic_registers_a_plain_function(offline: pgjobs.App) -> None:
    @offline.periodic("*/5 * * * *", timezone="Europe/Paris", args={"n": 2}, priority=-5)
    def report(n: int) -> int:
        return n * 2

    assert isinstance(report, pgjobs.Task)
    assert offline.tasks[report.name] is report
    periodic = offline.periodics[report.name]
    assert periodic.schedule.timezone == "Europe/Paris"
    assert periodic.args_json == '{"n":2}'
    assert periodic.job_params() == {"queue": "default", "priority": -5, "max_attempts": 20}
    assert report(3) == 6  # still callable


def test_periodic_on_a_task_and_several_schedules(offline: pgjobs.App) -> None:
    @offline.periodic("@daily", name="sync.nightly", args={"full": True})
    @offline.periodic(every=60, name="sync.quick", queue="fast", max_attempts=2)
    @offline.task(name="sync", queue="sync")
    def sync(full: bool = False) -> None: ...

    assert set(offline.periodics) == {"sync.nightly", "sync.quick"}
    assert offline.periodics["sync.quick"].job_params()["queue"] == "fast"
    assert offline.periodics["sync.nightly"].job_params()["queue"] == "sync"
    assert list(offline.tasks) == ["sync"]


def test_declaration_errors(offline: pgjobs.App) -> None:
    @offline.task(name="t")
    def t(x: int) -> None: ...

    offline.periodic("@hourly", args={"x": 1})(t)
    with pytest.raises(pgjobs.ConfigurationError, match=r"'t' is already declared.*name="):
        offline.periodic("@daily", args={"x": 1})(t)
    with pytest.raises(pgjobs.InvalidJobError, match=r"periodic 'p2'.*bad arguments"):
        offline.periodic("@daily", name="p2")(t)  # x is missing
    with pytest.raises(pgjobs.InvalidJobError, match=r"periodic 'p3'.*bad arguments"):
        offline.periodic("@daily", name="p3", args={"x": 1, "y": 2})(t)
    with pytest.raises(pgjobs.PayloadError, match=r"periodic 'p4'.*JSON"):
        offline.periodic("@daily", name="p4", args={"x": object()})(t)
    with pytest.raises(pgjobs.ConfigurationError, match="missed must be"):
        offline.periodic("@daily", name="p5", args={"x": 1}, missed="later")(t)  # type: ignore[arg-type]
    with pytest.raises(pgjobs.InvalidNameError):
        offline.periodic("@daily", name="p6", args={"x": 1}, queue="bad queue")(t)
    with pytest.raises(pgjobs.ConfigurationError, match="invalid periodic name"):
        offline.periodic("@daily", name="no spaces", args={"x": 1})(t)
    with pytest.raises(InvalidScheduleError, match="'\\* \\* \\*'"):
        offline.periodic("* * *")
    other = pgjobs.App(CLOSED_PORT_URL)
    with pytest.raises(pgjobs.ConfigurationError, match="not registered with this App"):
        other.periodic("@daily", args={"x": 1})(t)
    assert set(offline.periodics) == {"t"}


def test_failed_declaration_leaves_no_task(offline: pgjobs.App) -> None:
    def needs(x: int) -> None: ...

    with pytest.raises(pgjobs.InvalidJobError):
        offline.periodic("@daily")(needs)
    assert offline.tasks == {} and offline.periodics == {}


# -- planning rounds ----------------------------------------------------------------------


def periodic(offline: pgjobs.App, name: str, **options: Any) -> PeriodicTask:
    """Declare a periodic task on ``offline`` and return its declaration."""
    schedule = options.pop("schedule", None)

    def fn() -> None: ...

    fn.__name__ = fn.__qualname__ = name.replace(".", "_")
    offline.periodic(schedule, name=name, **options)(fn)
    return offline.periodics[name]


def test_plan_first_sight_backfill_skip(offline: pgjobs.App) -> None:
    now = utc(2025, 1, 1, 10, 0, 30, 500_000)
    every = periodic(offline, "every", every=1)
    hourly = periodic(offline, "hourly", schedule="@hourly", missed="backfill")
    first = plan_round(every, None, now)
    assert first.slots == [] and first.last_slot == utc(2025, 1, 1, 10, 0, 30)
    # Backfill: every slot since the last one.
    back = plan_round(hourly, utc(2025, 1, 1, 5), now)
    assert back.slots == [utc(2025, 1, 1, h) for h in range(6, 11)]
    assert back.last_slot == utc(2025, 1, 1, 10) and not back.more
    # Skip (every second, default grace 1 s): 5 minutes of downtime leave the latest slot.
    skip = plan_round(every, utc(2025, 1, 1, 9, 55), now)
    assert skip.slots == [utc(2025, 1, 1, 10, 0, 30)] and skip.skipped
    assert skip.last_slot == utc(2025, 1, 1, 10, 0, 30)
    # Nothing due: nothing to do.
    assert plan_round(every, utc(2025, 1, 1, 10, 0, 30), now).slots == []


def test_plan_skip_grace_and_changed_schedule(offline: pgjobs.App) -> None:
    now = utc(2025, 1, 1, 10, 30)
    daily = periodic(offline, "daily", schedule="0 10 * * *")
    # 30 minutes late is past the default grace (one minute): skipped.
    late = plan_round(daily, utc(2024, 12, 31, 10), now)
    assert late.slots == [] and late.skipped and late.last_slot == utc(2025, 1, 1, 10)
    lenient = periodic(offline, "lenient", schedule="0 10 * * *", grace=3600)
    assert plan_round(lenient, utc(2024, 12, 31, 10), now).slots == [utc(2025, 1, 1, 10)]
    # A changed schedule goes on from now even with missed="backfill".
    backfill = periodic(offline, "bf", schedule="@hourly", missed="backfill")
    changed = plan_round(backfill, utc(2024, 12, 1), now, changed=True)
    assert changed.slots == [] and changed.last_slot == utc(2025, 1, 1, 10)


def test_plan_backfill_is_bounded_per_round(offline: pgjobs.App) -> None:
    every = periodic(offline, "fast", every=1, missed="backfill")
    now = utc(2025, 1, 1, 1)
    plan = plan_round(every, utc(2025, 1, 1), now)
    assert len(plan.slots) == 500 and plan.more
    assert plan.slots[0] == utc(2025, 1, 1, 0, 0, 1) and plan.last_slot == plan.slots[-1]


# -- the scheduler on a real database -------------------------------------------------------


@pytest.fixture
def db_url(emptied_db_url: str) -> str:
    """This module's tests share one database, emptied before each test."""
    return emptied_db_url


def scheduler_for(app: pgjobs.App, db_url: str) -> Scheduler:
    return Scheduler(db_url, app.queries, app.channel, list(app.periodics.values()))


def round_now(scheduler: Scheduler) -> float:
    """Make every schedule due and run one round; seconds until the next."""
    for state in scheduler._states:
        state.due_at = 0.0
    try:
        return scheduler.run_due()
    finally:
        scheduler._drop()


def row(conn: psycopg.Connection[Any], name: str) -> dict[str, Any]:
    cur = conn.execute(
        "SELECT task, schedule, timezone, last_slot, last_job_id "
        "FROM pgjobs.periodic WHERE name = %s",
        (name,),
    )
    values = cur.fetchone()
    assert values is not None, f"no periodic row {name}"
    return dict(
        zip(["task", "schedule", "timezone", "last_slot", "last_job_id"], values, strict=True)
    )


def set_last_slot(conn: psycopg.Connection[Any], name: str, slot: datetime) -> None:
    conn.execute("UPDATE pgjobs.periodic SET last_slot = %s WHERE name = %s", (slot, name))


def jobs(conn: psycopg.Connection[Any], name: str) -> list[dict[str, Any]]:
    cur = conn.execute(
        "SELECT id, task, queue, args, state, run_at, unique_key, unique_until, meta "
        "FROM pgjobs.jobs WHERE meta->>'periodic' = %s ORDER BY run_at",
        (name,),
    )
    columns = [c.name for c in cur.description or []]
    return [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]


def hour_floor(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def db_now(conn: psycopg.Connection[Any]) -> datetime:
    value = conn.execute("SELECT clock_timestamp()").fetchone()
    assert value is not None
    return value[0]  # type: ignore[no-any-return]


def test_first_sight_then_downtime_backfill(db_url: str, conn: psycopg.Connection[Any]) -> None:
    app = pgjobs.App(db_url)
    periodic(app, "hourly.bf", schedule="@hourly", missed="backfill", queue="reports")
    scheduler = scheduler_for(app, db_url)
    wait = round_now(scheduler)
    first = row(conn, "hourly.bf")
    assert first["schedule"] == "@hourly" and first["timezone"] == "UTC"
    assert first["last_slot"] == hour_floor(db_now(conn)) or first["last_slot"] == hour_floor(
        db_now(conn) - timedelta(minutes=1)
    )
    assert jobs(conn, "hourly.bf") == []
    assert 0 < wait <= 60
    # Five hours of downtime: backfill enqueues the five missed slots, once each.
    set_last_slot(conn, "hourly.bf", first["last_slot"] - timedelta(hours=5))
    round_now(scheduler)
    enqueued = jobs(conn, "hourly.bf")
    last = row(conn, "hourly.bf")["last_slot"]  # one hour later if the hour just struck
    assert [j["run_at"] for j in enqueued] == [
        first["last_slot"] - timedelta(hours=5 - h) for h in range(1, len(enqueued) + 1)
    ]
    assert enqueued[-1]["run_at"] == last and len(enqueued) in (5, 6)
    assert all(j["state"] == "available" and j["queue"] == "reports" for j in enqueued)
    job = enqueued[-1]
    assert job["unique_key"] == slot_key("hourly.bf", job["run_at"])
    assert job["unique_until"] == job["run_at"] + timedelta(hours=1)
    assert job["meta"] == {"periodic": "hourly.bf", "slot": job["run_at"].isoformat()}
    assert row(conn, "hourly.bf")["last_job_id"] == job["id"]
    # Set back again: the slots' unique keys keep them from being enqueued twice.
    set_last_slot(conn, "hourly.bf", first["last_slot"] - timedelta(hours=5))
    round_now(scheduler)
    again = jobs(conn, "hourly.bf")
    assert [j["id"] for j in again[: len(enqueued)]] == [j["id"] for j in enqueued]
    assert len(again) <= len(enqueued) + 1  # (+1: the hour struck meanwhile)
    assert scheduler.enqueued == len(again)


def test_downtime_skip(db_url: str, conn: psycopg.Connection[Any]) -> None:
    app = pgjobs.App(db_url)
    periodic(app, "hourly.skip", schedule="@hourly", grace=0)
    periodic(app, "hourly.grace", schedule="@hourly", grace=timedelta(hours=2))
    scheduler = scheduler_for(app, db_url)
    round_now(scheduler)
    latest = row(conn, "hourly.skip")["last_slot"]
    for name in ("hourly.skip", "hourly.grace"):
        set_last_slot(conn, name, latest - timedelta(hours=5))
    round_now(scheduler)
    # No grace: every missed slot is skipped, and the schedule goes on from now.
    assert jobs(conn, "hourly.skip") == []
    latest = row(conn, "hourly.skip")["last_slot"]  # (the hour may have struck meanwhile)
    assert row(conn, "hourly.grace")["last_slot"] == latest
    # Two hours of grace: the slots less than two hours late are enqueued.
    assert [j["run_at"] for j in jobs(conn, "hourly.grace")] == [
        latest - timedelta(hours=1),
        latest,
    ]


def test_every_second_downtime(db_url: str, conn: psycopg.Connection[Any]) -> None:
    app = pgjobs.App(db_url)
    periodic(app, "sec.bf", every=1, missed="backfill")
    periodic(app, "sec.skip", every=1)
    scheduler = scheduler_for(app, db_url)
    round_now(scheduler)
    start = {n: row(conn, n)["last_slot"] for n in ("sec.bf", "sec.skip")}
    for name, slot in start.items():
        set_last_slot(conn, name, slot - timedelta(seconds=30))
    round_now(scheduler)
    backfilled = [j["run_at"] for j in jobs(conn, "sec.bf")]
    end = row(conn, "sec.bf")["last_slot"]
    assert backfilled[0] == start["sec.bf"] - timedelta(seconds=29)
    assert backfilled[-1] == end
    assert backfilled == [backfilled[0] + timedelta(seconds=i) for i in range(len(backfilled))]
    assert len(backfilled) >= 30
    # Skip, grace one second: at most the last slot or two, none of the downtime.
    skipped = [j["run_at"] for j in jobs(conn, "sec.skip")]
    last = row(conn, "sec.skip")["last_slot"]
    assert 1 <= len(skipped) <= 2
    assert skipped[-1] == last and skipped[0] >= last - timedelta(seconds=1)


def test_a_busy_peer_is_left_alone(db_url: str, conn: psycopg.Connection[Any]) -> None:
    app = pgjobs.App(db_url)
    periodic(app, "hourly.busy", schedule="@hourly", missed="backfill")
    scheduler = scheduler_for(app, db_url)
    round_now(scheduler)
    latest = row(conn, "hourly.busy")["last_slot"]
    set_last_slot(conn, "hourly.busy", latest - timedelta(hours=2))
    with psycopg.connect(db_url) as peer:
        peer.execute("SELECT 1 FROM pgjobs.periodic WHERE name = 'hourly.busy' FOR UPDATE")
        started = time.monotonic()
        wait = round_now(scheduler)
        assert time.monotonic() - started < 2  # SKIP LOCKED: no waiting on the peer
        assert 0 < wait <= 0.2  # it looks again shortly
        # A worker that never saw the row (it tries to create it first) does not wait either.
        fresh = scheduler_for(app, db_url)
        assert 0 < round_now(fresh) <= 0.2
        assert time.monotonic() - started < 2
        assert jobs(conn, "hourly.busy") == []
    # The peer went away without enqueueing: the next look does it.
    round_now(scheduler)
    assert len(jobs(conn, "hourly.busy")) == 2


def test_a_peer_that_updated_the_row_and_froze_holds_up_no_other_schedule(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    # A peer that has advanced the row (periodic_enqueue's UPDATE) and not committed: a
    # scheduler that looks again must not wait on it, neither for this schedule nor for
    # the others it runs.
    app = pgjobs.App(db_url)
    periodic(app, "hourly.held", schedule="@hourly", missed="backfill")
    periodic(app, "hourly.free", schedule="@hourly", missed="backfill")
    scheduler = scheduler_for(app, db_url)
    round_now(scheduler)
    for name in ("hourly.held", "hourly.free"):
        set_last_slot(conn, name, row(conn, name)["last_slot"] - timedelta(hours=2))
    with psycopg.connect(db_url) as peer:
        peer.execute("UPDATE pgjobs.periodic SET updated_at = now() WHERE name = 'hourly.held'")
        for looker in (scheduler, scheduler_for(app, db_url)):  # it has seen the row, or not
            for _ in range(2):  # the second look follows a missed lock
                done = threading.Event()

                def look(looker: Scheduler = looker, done: threading.Event = done) -> None:
                    round_now(looker)
                    done.set()

                threading.Thread(target=look, daemon=True).start()
                assert done.wait(5), "a scheduler waited on a peer's uncommitted row"
        assert jobs(conn, "hourly.held") == []
        assert len(jobs(conn, "hourly.free")) == 2
    round_now(scheduler)
    assert len(jobs(conn, "hourly.held")) == 2


def test_changed_schedule_updates_its_row(db_url: str, conn: psycopg.Connection[Any]) -> None:
    old = pgjobs.App(db_url)
    periodic(old, "report", schedule="0 9 * * *", missed="backfill")
    round_now(scheduler_for(old, db_url))
    set_last_slot(conn, "report", row(conn, "report")["last_slot"] - timedelta(days=3))
    new = pgjobs.App(db_url)
    periodic(new, "report", schedule="0 9 * * *", timezone="Europe/Paris", missed="backfill")
    round_now(scheduler_for(new, db_url))
    changed = row(conn, "report")
    assert changed["timezone"] == "Europe/Paris"
    assert jobs(conn, "report") == []  # goes on from now: no backfill of another schedule
    assert changed["last_slot"] == new.periodics["report"].schedule.latest_at_or_before(
        db_now(conn)
    )


def test_enqueue_notifies_workers(db_url: str, conn: psycopg.Connection[Any]) -> None:
    app = pgjobs.App(db_url)
    periodic(app, "hourly.n", schedule="@hourly", missed="backfill", queue="nq")
    scheduler = scheduler_for(app, db_url)
    round_now(scheduler)
    set_last_slot(conn, "hourly.n", row(conn, "hourly.n")["last_slot"] - timedelta(hours=3))
    conn.execute(f"LISTEN {app.channel}")
    round_now(scheduler)
    payloads = [json.loads(n.payload) for n in conn.notifies(timeout=2, stop_after=1)]
    assert payloads == [{"queue": "nq"}]
    assert list(conn.notifies(timeout=0.2)) == []  # one per statement, not per job


def test_scheduler_survives_a_database_that_is_down(caplog: pytest.LogCaptureFixture) -> None:
    app = pgjobs.App(CLOSED_PORT_URL)
    periodic(app, "down", every=1)
    scheduler = Scheduler(CLOSED_PORT_URL, app.queries, app.channel, list(app.periodics.values()))
    with caplog.at_level("WARNING", logger="pgjobs.cron"):
        scheduler.start()
        wait_until(lambda: "scheduler round failed" in caplog.text, 20, "a logged failure")
        started = time.monotonic()
        scheduler.stop()
    assert time.monotonic() - started < 2
    assert not scheduler._thread.is_alive()
    assert "cannot connect" in caplog.text


def test_scheduler_thread_enqueues_and_stops_promptly(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    app = pgjobs.App(db_url)
    periodic(app, "sec.thread", every=1)
    scheduler = scheduler_for(app, db_url)
    scheduler.start()
    try:
        wait_until(lambda: len(jobs(conn, "sec.thread")) >= 2, 10, "two slots enqueued")
    finally:
        started = time.monotonic()
        scheduler.stop()
    assert time.monotonic() - started < 2 and not scheduler._thread.is_alive()
    slots = [j["run_at"] for j in jobs(conn, "sec.thread")]
    assert slots == [slots[0] + timedelta(seconds=i) for i in range(len(slots))]


def test_concurrent_schedulers_enqueue_each_slot_once(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    app = pgjobs.App(db_url)
    periodic(app, "sec.race", every=1, missed="backfill")
    schedulers = [scheduler_for(app, db_url) for _ in range(4)]
    round_now(schedulers[0])
    set_last_slot(conn, "sec.race", row(conn, "sec.race")["last_slot"] - timedelta(seconds=20))
    barrier = threading.Barrier(len(schedulers))

    def race(scheduler: Scheduler) -> None:
        barrier.wait()
        for _ in range(5):
            round_now(scheduler)

    threads = [threading.Thread(target=race, args=(s,)) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    slots = [j["run_at"] for j in jobs(conn, "sec.race")]
    assert len(slots) == len(set(slots)) >= 20
    assert slots == [slots[0] + timedelta(seconds=i) for i in range(len(slots))]
    assert sum(s.enqueued for s in schedulers) == len(slots)


# -- pgjobs cron list -----------------------------------------------------------------------


def test_cron_list(db_url: str, conn: psycopg.Connection[Any]) -> None:
    import cron_app

    app = pgjobs.App(db_url)
    periodic(app, "tick.every", every=1)  # as the test app declares it
    round_now(scheduler_for(app, db_url))
    conn.execute(
        "INSERT INTO pgjobs.periodic (name, task, schedule, timezone, last_slot) "
        "VALUES ('gone', 'old.task', '30 2 * * *', 'Europe/Paris', now())"
    )
    runner = CliRunner()
    base = ["--database-url", db_url]
    env = {"PGJOBS_APP": None}
    result = runner.invoke(cli, [*base, "cron", "list", "--json"], env=env)
    assert result.exit_code == 0, result.output
    listed = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(listed) == {"gone", "tick.every"}
    assert listed["gone"]["schedule"] == "30 2 * * *" and not listed["gone"]["declared"]
    next_gone = datetime.fromisoformat(listed["gone"]["next_slot"]).astimezone(PARIS)
    assert (next_gone.hour, next_gone.minute) in ((2, 30), (3, 0))
    tick = listed["tick.every"]
    assert tick["schedule"] == "every 1s" and tick["last_slot"] is not None
    assert datetime.fromisoformat(tick["next_slot"]) > datetime.fromisoformat(tick["last_slot"])
    # With the app: its declarations too, even the ones no worker has seen yet.
    assert cron_app.app.periodics  # imported for its declarations
    result = runner.invoke(
        cli, [*base, "--app", "tests.flow.cron_app:app", "cron", "list", "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    listed = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(listed) == {"gone", "tick.every", "tick.cron"}
    assert listed["tick.cron"]["last_slot"] is None and listed["tick.cron"]["declared"]
    assert listed["tick.cron"]["schedule"] == "* * * * * *"
    table = runner.invoke(cli, [*base, "cron", "list"], env=env)
    assert table.exit_code == 0 and "tick.every" in table.stdout and "every 1s" in table.stdout


# -- real worker processes ------------------------------------------------------------------


def every_second_once(conn: psycopg.Connection[Any], name: str) -> list[datetime]:
    """The slots of every-second schedule ``name``: each once, none missing."""
    slots = slots_of(conn, name)
    times = [slot for slot, _ in slots]
    assert all(count == 1 for _, count in slots), f"{name}: a slot enqueued twice"
    assert times == [times[0] + timedelta(seconds=i) for i in range(len(times))], (
        f"{name}: a slot is missing"
    )
    return times


@pytest.fixture
def cron_workers(db_url: str, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(db_url, tmp_path, app=APP, queues="cron")
    try:
        yield started
    finally:
        started.cleanup()


@pytest.mark.slow
def test_three_workers_every_second_exactly_once_with_a_sigkill(
    db_url: str, conn: psycopg.Connection[Any], cron_workers: Workers
) -> None:
    workers = [cron_workers.start() for _ in range(3)]
    names = ("tick.cron", "tick.every")

    def slots_seen() -> int:
        return min(len(slots_of(conn, n)) for n in names)

    wait_until(lambda: slots_seen() >= 15, 60, "15 slots of each schedule")
    workers[0].signal(signal.SIGKILL)
    workers[0].wait(10)
    killed_at = db_now(conn)
    wait_until(lambda: slots_seen() >= 30, 60, "30 slots of each schedule")
    # Its jobs are rescued once its heartbeat expires (3 s): nothing old is left unfinished.
    unfinished = (
        "SELECT count(*) FROM pgjobs.jobs "
        "WHERE state <> 'succeeded' AND run_at < now() - interval '5 seconds'"
    )
    wait_until(lambda: scalar(conn, unfinished) == 0, 30, "old jobs finished")
    for proc in workers[1:]:
        proc.signal(signal.SIGTERM)
    for proc in workers[1:]:
        assert proc.wait(30) == 0
    for name in names:
        times = every_second_once(conn, name)
        assert times[0] < killed_at - timedelta(seconds=5)
        assert times[-1] > killed_at + timedelta(seconds=5)
    # The killed worker's jobs were rescued: every job ran, or waits for the next worker.
    states = {r[0] for r in conn.execute("SELECT DISTINCT state::text FROM pgjobs.jobs")}
    assert states <= {"succeeded", "available"}


# How long the server lets the frozen scheduler's session sit idle in its transaction.
FROZEN_IDLE_SECONDS = 5


def _frozen_backend(pid_file: Path, proc: Any) -> int | None:
    """The server pid of the frozen scheduler's session, once the process is stopped."""
    if proc.poll() is not None:
        raise AssertionError(f"the frozen scheduler exited with {proc.returncode}")
    if not pid_file.exists() or not pid_file.read_text():
        return None
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return int(pid_file.read_text()) if stat.rsplit(")", 1)[1].split()[0] == "T" else None


@pytest.mark.slow
def test_a_scheduler_frozen_before_its_commit_stalls_no_other_and_is_cut_off(
    db_url: str, conn: psycopg.Connection[Any], cron_workers: Workers, tmp_path: Path
) -> None:
    for _ in range(2):
        cron_workers.start()
    names = ("tick.cron", "tick.every")
    wait_until(lambda: min(len(slots_of(conn, n)) for n in names) >= 3, 30, "3 slots each")
    pid_file = tmp_path / "frozen.pid"
    frozen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.flow.frozen_scheduler",
            db_url,
            str(pid_file),
            str(FROZEN_IDLE_SECONDS),
        ],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        backend = wait_until(lambda: _frozen_backend(pid_file, frozen), 30, "frozen in its txn")
        frozen_at = db_now(conn)
        alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
        assert scalar(conn, alive, (backend,)) == 1
        # The server ends the frozen session (its idle_in_transaction_session_timeout)...
        wait_until(lambda: scalar(conn, alive, (backend,)) == 0, 20, "frozen session ended")
        cut_at = db_now(conn)
        assert cut_at - frozen_at > timedelta(seconds=FROZEN_IDLE_SECONDS - 2)
        # ... and the schedule it held goes on from the slot it had not committed.
        wait_until(
            lambda: slots_of(conn, "tick.every")[-1][0] > cut_at + timedelta(seconds=2),
            20,
            "tick.every goes on after the cut",
        )
    finally:
        frozen.kill()
        frozen.wait(10)
    for name in names:
        every_second_once(conn, name)
    # While the frozen scheduler held its schedule, the other was enqueued on time.
    late = conn.execute(
        "SELECT max(created_at - (meta->>'slot')::timestamptz) FROM pgjobs.jobs "
        "WHERE meta->>'periodic' = 'tick.cron' AND (meta->>'slot')::timestamptz BETWEEN %s AND %s",
        (frozen_at, cut_at),
    ).fetchone()
    assert late is not None and late[0] is not None and late[0] < timedelta(seconds=1.5), late
