"""Periodic (cron) jobs: schedules, their slots, and the scheduler every worker runs.

A *schedule* is either a cron expression in a time zone or a fixed interval (``every``).
Its *slots* are the instants at which it fires. ``@app.periodic(...)`` declares that a task
is enqueued once per slot, with fixed arguments.

Cron expressions are parsed and evaluated by ``cronsim``: the standard five fields
(minute hour day-of-month month day-of-week), an optional sixth field *in front* for
seconds (``*/10 * * * * *``: every ten seconds), the aliases ``@yearly`` (``@annually``),
``@monthly``, ``@weekly``, ``@daily`` (``@midnight``) and ``@hourly``, and the extensions
``L`` (last day), ``W`` and ``#``. Daylight saving time follows Debian's cron: a job at a
fixed time of day that falls in the hour skipped in spring runs when the clocks jump (at
03:00 for 02:30 in Europe/Paris), one in the hour repeated in autumn runs once; schedules
with a wildcard minute or hour (``*/30 * * * *``, ``@hourly``) follow real time and fire in
both passes of the repeated hour. Six-field expressions with a seconds value other than
``0`` always follow real time.

``every=timedelta(...)`` fires at every whole multiple of the interval since 1970-01-01
00:00 UTC, so every worker computes the same slots without talking to the others.

Exactly once per slot, with no scheduler process to lose: every ``pgjobs work`` process
runs a :class:`Scheduler` thread. When a slot comes due, the thread locks the schedule's
row in ``periodic`` (``FOR UPDATE SKIP LOCKED``: a peer busy with it is left to it and
checked again a moment later), reads the database clock, computes the due slots after
``last_slot``, inserts their jobs and advances ``last_slot`` in one transaction. Each job
also carries the unique key ``periodic:<name>:<slot>`` (held in every state, see
``unique_until``), so a slot that somehow comes round again is not enqueued twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from cronsim import CronSim, CronSimError

from pgjobs.durations import DurationError, parse_duration
from pgjobs.enqueue import check_max_attempts, check_priority, schema_errors, to_json
from pgjobs.errors import ConfigurationError, PgJobsError
from pgjobs.queries import Queries
from pgjobs.settings import validate_queue, validate_task_name
from pgjobs.worker_db import connect_sync, local_settings

if TYPE_CHECKING:
    from pgjobs.task import Task

log = logging.getLogger("pgjobs.cron")

Missed = Literal["skip", "backfill"]

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# With missed="skip", a slot is still enqueued this late at most (less for schedules that
# fire more often: a slot is not worth running once the next one is due).
DEFAULT_GRACE = timedelta(seconds=60)
# Slots enqueued per schedule in one transaction (a backfill after a long downtime goes on
# in further transactions at once).
MAX_SLOTS_PER_ROUND = 500
# How far the scheduler walks forward from cronsim's reverse answer (see latest_at_or_before).
_MAX_WALK = 10_000
EVERY_PREFIX = "every "
APPLICATION_NAME = "pgjobs-scheduler"
# A peer holds the schedule's row: look again this soon (seconds, jittered).
_BUSY_RETRY = 0.1
# The longest a scheduler waits for a lock (only a peer creating the same schedule's row
# can make it wait at all): schedulers must never queue up behind a frozen peer.
LOCK_TIMEOUT = "1s"
# Wake this long after a slot by the database clock (the clock offset is estimated).
_WAKE_MARGIN = 0.002
_MAX_SLEEP = 60.0
_BACKOFF_MIN, _BACKOFF_MAX = 0.5, 30.0


class InvalidScheduleError(ConfigurationError, ValueError):
    """A cron expression, interval or time zone that pgjobs cannot use."""


# -- schedules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """When a periodic task fires: a cron expression in a time zone, or an interval.

    Build one with :func:`parse_schedule`. ``text`` is what the ``periodic`` table and
    ``pgjobs cron list`` show (the expression as written, or ``every <duration>``).
    """

    text: str
    timezone: str
    expression: str | None = None
    interval: timedelta | None = None

    @property
    def zone(self) -> ZoneInfo:
        """The time zone cron fields are read in."""
        return ZoneInfo(self.timezone)

    def next_after(self, slot: datetime) -> datetime:
        """The first slot strictly after ``slot`` (aware; returned in UTC).

        Cron schedules must be stepped from slots (or from :meth:`latest_at_or_before`):
        in the repeated autumn hour a wall-clock time that is not a slot is ambiguous.
        """
        if self.interval is not None:
            step = self.interval
            return EPOCH + ((slot - EPOCH) // step + 1) * step
        assert self.expression is not None
        try:
            found = next(CronSim(self.expression, slot.astimezone(self.zone)))
        except (CronSimError, StopIteration) as exc:
            raise InvalidScheduleError(
                f"cron expression {self.text!r} has no slot after {slot.isoformat()}"
            ) from exc
        return found.astimezone(UTC)

    def latest_at_or_before(self, moment: datetime) -> datetime:
        """The last slot at or before ``moment`` (in UTC)."""
        if self.interval is not None:
            return EPOCH + ((moment - EPOCH) // self.interval) * self.interval
        assert self.expression is not None
        # cronsim's reverse iteration compares wall-clock times, so in the repeated autumn
        # hour it can answer an earlier slot than the latest: it is only a starting point,
        # stepped forward with next_after (which follows the slots exactly).
        start = moment.replace(microsecond=0) + timedelta(seconds=1)
        try:
            slot = next(CronSim(self.expression, start.astimezone(self.zone), reverse=True))
        except (CronSimError, StopIteration) as exc:
            raise InvalidScheduleError(
                f"cron expression {self.text!r} has no slot before {moment.isoformat()}"
            ) from exc
        slot = slot.astimezone(UTC)
        for _ in range(_MAX_WALK):
            following = self.next_after(slot)
            if following > moment:
                return slot
            slot = following
        return slot

    def slots(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """The slots in (``after``, ``until``], earliest first."""
        slot = self.next_after(after)
        while slot <= until:
            yield slot
            slot = self.next_after(slot)


def parse_schedule(
    expression: str | None = None,
    *,
    every: float | timedelta | None = None,
    timezone: str = "UTC",
) -> Schedule:
    """A :class:`Schedule` from a cron expression or an ``every`` interval (exactly one),
    or InvalidScheduleError naming what is wrong."""
    if (expression is None) == (every is None):
        raise InvalidScheduleError(
            "give a cron expression or every=<interval>, not "
            + ("both" if expression is not None else "neither")
        )
    zone_name = _check_timezone(timezone)
    if every is not None:
        if zone_name != "UTC":
            raise InvalidScheduleError(
                f"timezone={timezone!r} has no effect on every=: intervals are counted in "
                "real time from 1970-01-01 00:00 UTC; use a cron expression for local times"
            )
        interval = _check_interval(every)
        return Schedule(f"{EVERY_PREFIX}{_interval_text(interval)}", zone_name, interval=interval)
    assert expression is not None
    return _cron_schedule(expression, zone_name)


def schedule_from_text(text: str, timezone: str) -> Schedule:
    """The schedule a ``periodic`` row describes (its ``schedule`` and ``timezone``)."""
    if text.startswith(EVERY_PREFIX):
        try:
            interval = parse_duration(text[len(EVERY_PREFIX) :])
        except DurationError as exc:
            raise InvalidScheduleError(f"invalid interval in {text!r}: {exc}") from None
        return parse_schedule(every=interval, timezone=timezone)
    return parse_schedule(text, timezone=timezone)


def _cron_schedule(expression: str, zone_name: str) -> Schedule:
    if not isinstance(expression, str):
        raise InvalidScheduleError(f"a cron expression must be text, not {expression!r}")
    text = " ".join(expression.split())
    fields = ALIASES.get(text.lower(), text)
    if fields.startswith("@"):
        known = ", ".join(sorted(ALIASES))
        raise InvalidScheduleError(f"unknown cron alias {text!r}: use one of {known}")
    parts = fields.split()
    if len(parts) == 6 and parts[0] == "0":
        # Seconds 0 is the five-field expression, which keeps Debian's DST rules.
        fields = " ".join(parts[1:])
    if len(parts) not in (5, 6):
        raise InvalidScheduleError(
            f"invalid cron expression {text!r}: expected 5 fields (minute hour day-of-month "
            f"month day-of-week), 6 with seconds first, or an alias; got {len(parts)}"
        )
    schedule = Schedule(text, zone_name, expression=fields)
    try:
        # Parses the fields and proves that the expression ever fires.
        next(CronSim(fields, datetime.now(schedule.zone)))
    except CronSimError as exc:
        raise InvalidScheduleError(f"invalid cron expression {text!r}: {exc}") from None
    except StopIteration:
        raise InvalidScheduleError(f"cron expression {text!r} never fires") from None
    return schedule


def _check_timezone(timezone: object) -> str:
    if not isinstance(timezone, str) or not timezone:
        raise InvalidScheduleError(f"timezone must be an IANA time zone name, not {timezone!r}")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidScheduleError(
            f"unknown time zone {timezone!r}: use an IANA name such as 'UTC' or 'Europe/Paris'"
        ) from None
    return timezone


def _check_interval(every: object) -> timedelta:
    if isinstance(every, bool) or not isinstance(every, int | float | timedelta):
        raise InvalidScheduleError(f"every must be a timedelta or seconds, not {every!r}")
    interval = every if isinstance(every, timedelta) else timedelta(seconds=every)
    seconds = interval.total_seconds()
    if seconds < 1 or seconds != int(seconds):
        raise InvalidScheduleError(
            f"every must be a whole number of seconds, at least 1, not {seconds:g} s"
        )
    return interval


def _interval_text(interval: timedelta) -> str:
    # The row stores a form parse_duration reads back (format_duration rounds).
    whole = int(interval.total_seconds())
    out = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        if whole >= size:
            out.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(out)


# -- declarations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodicTask:
    """A periodic declaration: enqueue ``task`` with ``args`` at every slot of ``schedule``.

    ``missed`` says what happens to slots no worker got to in time (workers down):
    ``"skip"`` enqueues a slot only while it is at most ``grace`` late (default: a minute,
    or the schedule's period when that is shorter), ``"backfill"`` enqueues every one.
    """

    name: str
    task: Task[Any, Any]
    schedule: Schedule
    args_json: str = "{}"
    missed: Missed = "skip"
    grace: timedelta | None = None
    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None

    def job_params(self) -> dict[str, Any]:
        """Queue, priority and max_attempts of its jobs (the task's unless overridden)."""
        config = self.task.config
        return {
            "queue": self.queue or config.queue,
            "priority": config.priority if self.priority is None else self.priority,
            "max_attempts": self.max_attempts or config.max_attempts,
        }

    def grace_for(self, slot: datetime) -> timedelta:
        """How late ``slot`` may still be enqueued with missed="skip"."""
        if self.grace is not None:
            return self.grace
        return min(DEFAULT_GRACE, self.schedule.next_after(slot) - slot)


def declare(
    tasks: dict[str, Task[Any, Any]],
    periodics: dict[str, PeriodicTask],
    task: Task[Any, Any],
    schedule: Schedule,
    *,
    args: dict[str, Any] | None,
    name: str | None,
    missed: str,
    grace: float | timedelta | None,
    queue: str | None,
    priority: int | None,
    max_attempts: int | None,
) -> PeriodicTask:
    """Check a periodic declaration and add it to ``periodics``; errors name the problem."""
    if tasks.get(task.name) is not task:
        raise ConfigurationError(f"task {task.name!r} is not registered with this App")
    periodic_name = _periodic_name(name, task, periodics)
    where = f"periodic {periodic_name!r}"
    if missed not in ("skip", "backfill"):
        raise ConfigurationError(f"{where}: missed must be 'skip' or 'backfill', not {missed!r}")
    periodic = PeriodicTask(
        name=periodic_name,
        task=task,
        schedule=schedule,
        args_json=_args_json(task, args, where),
        missed="backfill" if missed == "backfill" else "skip",
        grace=_grace(grace, where),
        queue=validate_queue(queue) if queue is not None else None,
        priority=check_priority(priority) if priority is not None else None,
        max_attempts=check_max_attempts(max_attempts) if max_attempts is not None else None,
    )
    periodics[periodic_name] = periodic
    return periodic


def _periodic_name(
    name: str | None, task: Task[Any, Any], periodics: dict[str, PeriodicTask]
) -> str:
    chosen = task.name if name is None else name
    try:
        validate_task_name(chosen)
    except PgJobsError:
        raise ConfigurationError(
            f"invalid periodic name {chosen!r}: use up to 255 letters, digits and _ . : - < >"
        ) from None
    if chosen in periodics:
        hint = " (give each schedule of one task its own name=)" if name is None else ""
        raise ConfigurationError(f"a periodic task named {chosen!r} is already declared{hint}")
    return chosen


def _args_json(task: Task[Any, Any], args: dict[str, Any] | None, where: str) -> str:
    values = {} if args is None else args
    if not isinstance(values, dict):
        raise ConfigurationError(f"{where}: args must be a dict, not {type(values).__name__}")
    try:
        task.check_args(values)
        return to_json(values, "job arguments")
    except PgJobsError as exc:
        raise type(exc)(f"{where}: {exc}") from None


def _grace(grace: float | timedelta | None, where: str) -> timedelta | None:
    if grace is None:
        return None
    if not isinstance(grace, bool) and isinstance(grace, int | float):
        grace = timedelta(seconds=grace)
    if not isinstance(grace, timedelta) or grace < timedelta(0):
        raise ConfigurationError(f"{where}: grace must be a timedelta or seconds >= 0")
    return grace


# -- planning a round -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one round does for one schedule: enqueue ``slots``, set ``last_slot`` to
    ``last_slot``; ``skipped`` slots were too late; ``more`` says a backfill goes on."""

    slots: list[datetime]
    last_slot: datetime
    skipped: bool = False
    more: bool = False


def plan_round(
    periodic: PeriodicTask, last_slot: datetime | None, now: datetime, *, changed: bool = False
) -> Plan:
    """The slots to enqueue now, given the last slot enqueued and the database clock.

    First sight (no last slot): no job, and the latest slot at or before ``now`` becomes
    the last one, so the first job is the next slot. A changed schedule goes on from
    ``now`` as with missed="skip", whatever its policy (its old last slot belongs to
    another schedule).
    """
    schedule = periodic.schedule
    if last_slot is None:
        return Plan([], schedule.latest_at_or_before(now))
    if periodic.missed == "backfill" and not changed:
        return _backfill(schedule, last_slot, now)
    return _skip(periodic, last_slot, now)


def _backfill(schedule: Schedule, last_slot: datetime, now: datetime) -> Plan:
    slots = _take(schedule.slots(last_slot, now), MAX_SLOTS_PER_ROUND)
    if not slots:
        return Plan([], last_slot)
    more = len(slots) == MAX_SLOTS_PER_ROUND and schedule.next_after(slots[-1]) <= now
    return Plan(slots, slots[-1], more=more)


def _skip(periodic: PeriodicTask, last_slot: datetime, now: datetime) -> Plan:
    schedule = periodic.schedule
    # Slots older than the longest grace are never enqueued: start past them rather than
    # walking through a long downtime one slot at a time.
    horizon = now - max(periodic.grace or DEFAULT_GRACE, DEFAULT_GRACE)
    start = last_slot
    if horizon > last_slot:
        start = max(last_slot, schedule.latest_at_or_before(horizon))
    due = _take(schedule.slots(start, now), MAX_SLOTS_PER_ROUND)
    if not due:
        return Plan([], start, skipped=start > last_slot)
    slots = [s for s in due if now - s <= periodic.grace_for(s)]
    more = len(due) == MAX_SLOTS_PER_ROUND and schedule.next_after(due[-1]) <= now
    skipped = start > last_slot or len(slots) < len(due)
    return Plan(slots, due[-1], skipped=skipped, more=more)


def _take(slots: Iterable[datetime], limit: int) -> list[datetime]:
    taken: list[datetime] = []
    for slot in slots:
        taken.append(slot)
        if len(taken) == limit:
            break
    return taken


def slot_key(name: str, slot: datetime) -> str:
    """The unique key of the job of one slot."""
    return f"periodic:{name}:{slot.astimezone(UTC).isoformat()}"


# -- the scheduler thread -------------------------------------------------------------------


@dataclass
class _State:
    periodic: PeriodicTask
    due_at: float = 0.0  # time.time() at which to look again
    ensured: bool = False  # its row is known to exist


class Scheduler:
    """Enqueues the slots of the App's periodic tasks; one per worker process, on a
    thread of its own with its own connection (it never delays the claim loop).

    Each worker runs one; they agree through the ``periodic`` rows (see the module
    docstring). Database errors are logged and retried with a backoff.
    """

    def __init__(
        self,
        url: str,
        queries: Queries,
        channel: str,
        periodics: Sequence[PeriodicTask],
        *,
        notify: bool = True,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.queries = queries
        self.channel = channel
        self.notify = notify
        self.enqueued = 0
        self._states = [_State(p) for p in periodics]
        self._clock = now
        # The database clock minus ours (seconds), measured at every round.
        self._offset = 0.0
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgjobs-scheduler", daemon=True)

    def start(self) -> None:
        """Start the thread (returns at once)."""
        names = ", ".join(s.periodic.name for s in self._states)
        log.info("scheduler started for %d periodic task(s): %s", len(self._states), names)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread: at once when it sleeps; a round in progress finishes its short
        transaction (waited for at most ``timeout`` seconds: the thread is a daemon)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        self._drop()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                wait = self.run_due()
                failures = 0
            except (psycopg.Error, PgJobsError) as exc:
                failures += 1
                wait = min(_BACKOFF_MAX, _BACKOFF_MIN * 2 ** (failures - 1))
                wait *= random.uniform(0.8, 1.2)
                log.warning(
                    "scheduler round failed (retrying in %.1f s): %s",
                    wait,
                    " ".join(str(exc).split()),
                )
                self._drop()
            self._stop.wait(max(wait, 0.0))

    def run_due(self) -> float:
        """Run a round for every schedule that is due; seconds until the next one is."""
        for state in self._states:
            if self._stop.is_set():
                break
            if state.due_at <= self._clock():
                self._round(state)
        next_due = min(s.due_at for s in self._states)
        return min(next_due - self._clock(), _MAX_SLEEP)

    def _round(self, state: _State) -> None:
        periodic = state.periodic
        conn = self._connection()
        try:
            with schema_errors(self.queries.schema), conn.transaction():
                local_settings(conn, lock_timeout=LOCK_TIMEOUT)
                row = self._lock(conn, state)
                done = None if row is None else self._enqueue_due(conn, periodic, row)
        except psycopg.errors.LockNotAvailable:
            done = None  # a peer creating the row has not committed yet
        if done is None:
            # A peer holds the row (it is enqueueing this slot right now, or it is frozen
            # until the server ends its session): look again shortly; the other schedules
            # go on meanwhile.
            state.due_at = self._clock() + _BUSY_RETRY * random.uniform(0.5, 1.5)
            return
        last_slot, plan, changed = done
        self._report(periodic, last_slot, plan, changed)
        if plan.more:
            state.due_at = 0.0
        else:
            following = periodic.schedule.next_after(plan.last_slot)
            state.due_at = following.timestamp() - self._offset + _WAKE_MARGIN

    def _enqueue_due(
        self, conn: psycopg.Connection[Any], periodic: PeriodicTask, row: Any
    ) -> tuple[datetime | None, Plan, bool]:
        """Enqueue the due slots of the schedule whose locked row is ``row``; the row's
        last slot before, the plan carried out, and whether the schedule changed."""
        task, text, zone, last_slot, db_now = row
        self._offset = db_now.timestamp() - self._clock()
        changed = (task, text, zone) != (
            periodic.task.name,
            periodic.schedule.text,
            periodic.schedule.timezone,
        )
        plan = plan_round(periodic, last_slot, db_now, changed=changed)
        if plan.slots or changed or plan.last_slot != last_slot:
            self._write(conn, periodic, plan)
        return last_slot, plan, changed

    def _lock(self, conn: psycopg.Connection[Any], state: _State) -> Any:
        params = {"name": state.periodic.name}
        row = conn.execute(self.queries.periodic_lock, params).fetchone()
        if row is None and not state.ensured:
            schedule = state.periodic.schedule
            conn.execute(
                self.queries.periodic_ensure,
                {
                    **params,
                    "task": state.periodic.task.name,
                    "schedule": schedule.text,
                    "timezone": schedule.timezone,
                },
            )
            row = conn.execute(self.queries.periodic_lock, params).fetchone()
        # A row found once exists for good: when a later look finds it locked, it is not
        # created again (see periodic_ensure).
        state.ensured = state.ensured or row is not None
        return row

    def _write(self, conn: psycopg.Connection[Any], periodic: PeriodicTask, plan: Plan) -> None:
        schedule = periodic.schedule
        meta = [json.dumps({"periodic": periodic.name, "slot": s.isoformat()}) for s in plan.slots]
        params = {
            "name": periodic.name,
            "task": periodic.task.name,
            "schedule": schedule.text,
            "timezone": schedule.timezone,
            "args": periodic.args_json,
            **periodic.job_params(),
            "slot": plan.slots,
            "unique_key": [slot_key(periodic.name, s) for s in plan.slots],
            "unique_until": [schedule.next_after(s) for s in plan.slots],
            "meta": meta,
            "last_slot": plan.last_slot,
            "channel": self.channel,
            "notify": self.notify,
            "notify_queue_limit": 0.5,
        }
        row = conn.execute(self.queries.periodic_enqueue, params).fetchone()
        self.enqueued += row[0] if row else 0

    def _report(
        self, periodic: PeriodicTask, last_slot: datetime | None, plan: Plan, changed: bool
    ) -> None:
        name = periodic.name
        if last_slot is None:
            log.info(
                "periodic %s: first seen; next slot %s",
                name,
                periodic.schedule.next_after(plan.last_slot).isoformat(),
            )
        elif changed:
            log.info("periodic %s: schedule changed to %s", name, periodic.schedule.text)
        if plan.skipped:
            log.warning(
                "periodic %s: skipped missed slot(s) after %s (missed='skip')",
                name,
                last_slot.isoformat() if last_slot else "-",
            )
        for slot in plan.slots:
            log.debug("periodic %s: enqueued slot %s", name, slot.isoformat())

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect_sync(self.url, APPLICATION_NAME, lock_timeout=LOCK_TIMEOUT)
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


# -- listing --------------------------------------------------------------------------------


def list_periodic(
    conn: psycopg.Connection[Any], queries: Queries, declared: dict[str, PeriodicTask]
) -> list[dict[str, Any]]:
    """Every schedule the database knows or ``declared`` names: name, task, schedule,
    timezone, last slot, next slot, last job id, whether this App declares it."""
    columns = ("name", "task", "schedule", "timezone", "last_slot", "last_job_id")
    cur = conn.execute(queries.periodic_list)
    rows = {r[0]: dict(zip(columns, r, strict=False)) for r in cur.fetchall()}
    now = datetime.now(UTC)
    return [
        _listing(name, declared.get(name), rows.get(name), now)
        for name in sorted(set(rows) | set(declared))
    ]


def _listing(
    name: str, periodic: PeriodicTask | None, row: dict[str, Any] | None, now: datetime
) -> dict[str, Any]:
    if periodic is not None:
        task, text, zone = periodic.task.name, periodic.schedule.text, periodic.schedule.timezone
        schedule: Schedule | None = periodic.schedule
    else:
        assert row is not None
        task, text, zone = row["task"], row["schedule"], row["timezone"]
        schedule = _row_schedule(text, zone)
    return {
        "name": name,
        "task": task,
        "schedule": text,
        "timezone": zone,
        "last_slot": row["last_slot"] if row else None,
        "next_slot": _next_slot(schedule, now),
        "last_job_id": row["last_job_id"] if row else None,
        "declared": periodic is not None,
    }


def _row_schedule(text: str, timezone: str) -> Schedule | None:
    try:
        return schedule_from_text(text, timezone)
    except InvalidScheduleError:
        return None


def _next_slot(schedule: Schedule | None, now: datetime) -> datetime | None:
    # Stepped from a slot: a wall-clock time in the repeated autumn hour is ambiguous.
    return None if schedule is None else schedule.next_after(schedule.latest_at_or_before(now))


__all__ = [
    "ALIASES",
    "InvalidScheduleError",
    "PeriodicTask",
    "Plan",
    "Schedule",
    "Scheduler",
    "parse_schedule",
    "plan_round",
    "schedule_from_text",
]
