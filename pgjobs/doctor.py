"""``pgjobs doctor``: health checks of a pgjobs installation, each with a verdict and a fix.

Checks: pending migrations, long transactions holding back vacuum, dead tuples and the
last (auto)vacuum of the jobs table, notification queue usage, running jobs whose worker
stopped heartbeating (or vanished), and queues with runnable jobs that no live worker
serves. A check that cannot run (e.g. the schema is missing) is a failure with the reason.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgjobs import migrate
from pgjobs.database import connect
from pgjobs.durations import format_duration
from pgjobs.queries import Queries


class Verdict(enum.StrEnum):
    """How a check came out; ordered from good to bad."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"

    @property
    def rank(self) -> int:
        """0 ok, 1 warn, 2 fail."""
        return list(Verdict).index(self)


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check: verdict, what was found, and what to do about it."""

    name: str
    verdict: Verdict
    summary: str
    fix: str = ""
    details: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a finding becomes a warning or a failure."""

    transaction_warn: float = 300.0
    """Seconds a transaction may stay open before it is a warning..."""
    transaction_fail: float = 3600.0
    """...and a failure."""
    dead_tuples_warn: int = 100_000
    """Dead rows in jobs that warn, if they are also ``dead_ratio_warn`` of the live ones."""
    dead_ratio_warn: float = 0.2
    dead_tuples_fail: int = 1_000_000
    dead_ratio_fail: float = 1.0
    notify_warn: float = 0.25
    """Notification queue usage (0..1) that warns; enqueue stops notifying at 0.5."""
    notify_fail: float = 0.5
    heartbeat_timeout: float = 30.0
    """Seconds without heartbeat after which a worker counts as dead (as ``pgjobs work``)."""


def dead_tuples_verdict(live: int, dead: int, thresholds: Thresholds) -> Verdict:
    """Too many dead rows, in absolute terms and relative to live ones, is bloat."""
    ratio = dead / max(live, 1)
    if dead >= thresholds.dead_tuples_fail and ratio >= thresholds.dead_ratio_fail:
        return Verdict.FAIL
    if dead >= thresholds.dead_tuples_warn and ratio >= thresholds.dead_ratio_warn:
        return Verdict.WARN
    return Verdict.OK


class Doctor:
    """Runs the checks against one database and pgjobs schema."""

    def __init__(self, url: str, schema: str, thresholds: Thresholds | None = None) -> None:
        self.url = url
        self.schema = schema
        self.queries = Queries(schema)
        self.thresholds = thresholds or Thresholds()

    def run(self) -> list[Check]:
        """Every check, in order. Never raises for a failing check."""
        checks: list[tuple[str, Callable[[psycopg.Connection[Any]], Check]]] = [
            ("migrations", self.check_migrations),
            ("long transactions", self.check_transactions),
            ("jobs table vacuum", self.check_vacuum),
            ("notification queue", self.check_notifications),
            ("orphaned running jobs", self.check_orphans),
            ("queues without workers", self.check_unserved_queues),
        ]
        results = []
        with connect(self.url, autocommit=True) as conn:
            conn.row_factory = dict_row
            for name, check in checks:
                try:
                    results.append(check(conn))
                except Exception as exc:  # a check that cannot run is itself a finding
                    results.append(
                        Check(
                            name,
                            Verdict.FAIL,
                            f"could not run: {' '.join(str(exc).split())}",
                            "run `pgjobs migrate upgrade` if the schema is missing; "
                            "otherwise check the database connection and permissions",
                        )
                    )
        return results

    def _rows(
        self, conn: psycopg.Connection[Any], query: str, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        return conn.execute(getattr(self.queries, query), params or {}).fetchall()

    def check_migrations(self, conn: psycopg.Connection[Any]) -> Check:
        """The schema is at the newest revision this pgjobs knows."""
        current, head = migrate.current(self.url, self.schema), migrate.head()
        name = "migrations"
        if current is None:
            return Check(
                name,
                Verdict.FAIL,
                f"pgjobs is not installed in schema {self.schema!r}",
                "run `pgjobs migrate upgrade`",
            )
        if current != head:
            return Check(
                name,
                Verdict.FAIL,
                f"schema {self.schema!r} is at {current}, this pgjobs needs {head}",
                "run `pgjobs migrate upgrade` (or deploy the newer pgjobs everywhere first)",
            )
        return Check(name, Verdict.OK, f"schema {self.schema!r} is at {head} (head)")

    def check_transactions(self, conn: psycopg.Connection[Any]) -> Check:
        """Open transactions of this database, oldest first: vacuum cannot remove rows
        that died after the oldest snapshot, so finished and deleted jobs pile up."""
        rows = self._rows(conn, "doctor_transactions")
        name = "long transactions"
        if not rows or rows[0]["xact_seconds"] < self.thresholds.transaction_warn:
            return Check(
                name,
                Verdict.OK,
                "no transaction open longer than "
                f"{format_duration(self.thresholds.transaction_warn)}",
            )
        oldest = rows[0]
        verdict = (
            Verdict.FAIL
            if oldest["xact_seconds"] >= self.thresholds.transaction_fail
            else Verdict.WARN
        )
        return Check(
            name,
            verdict,
            f"pid {oldest['pid']} ({oldest['application_name'] or oldest['usename']}, "
            f"{oldest['state']}) has held a transaction open for "
            f"{format_duration(oldest['xact_seconds'])}, holding back vacuum",
            f"end it (commit/rollback, or SELECT pg_terminate_backend({oldest['pid']})); set "
            "idle_in_transaction_session_timeout to stop it happening again",
            rows,
        )

    def check_vacuum(self, conn: psycopg.Connection[Any]) -> Check:
        """Dead rows in the jobs table and when it was last vacuumed (of a partitioned
        one: its partition jobs_current, where every claim and outcome writes)."""
        from pgjobs.partitioning import CURRENT, is_partitioned

        name = CURRENT if is_partitioned(conn, self.schema) else "jobs"
        table = sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(name))
        rows = self._rows(conn, "doctor_table_stats", {"table": table.as_string(conn)})
        name = "jobs table vacuum"
        if not rows:
            return Check(name, Verdict.WARN, "no statistics for the jobs table yet")
        row = rows[0]
        live, dead = row["n_live_tup"], row["n_dead_tup"]
        last = max(
            (t for t in (row["last_vacuum"], row["last_autovacuum"]) if t is not None),
            default=None,
        )
        when = _ago(last, conn) if last else "never"
        verdict = dead_tuples_verdict(live, dead, self.thresholds)
        fix = ""
        if verdict is not Verdict.OK:
            fix = (
                "look for long transactions (above) that hold vacuum back; run "
                f"VACUUM (VERBOSE) {table}; prune finished jobs (`pgjobs prune`)"
            )
        return Check(
            name,
            verdict,
            f"{dead} dead / {live} live rows; last vacuum {when}",
            fix,
            [dict(row)],
        )

    def check_notifications(self, conn: psycopg.Connection[Any]) -> Check:
        """The server-wide LISTEN/NOTIFY queue: a listener that never reads fills it."""
        usage = self._rows(conn, "doctor_notification_queue")[0]["usage"]
        name = "notification queue"
        summary = f"{usage:.1%} of the notification queue in use"
        if usage >= self.thresholds.notify_fail:
            verdict = Verdict.FAIL
        elif usage >= self.thresholds.notify_warn:
            verdict = Verdict.WARN
        else:
            return Check(name, Verdict.OK, summary)
        return Check(
            name,
            verdict,
            summary + " (enqueue stops notifying at 50%: workers fall back to polling)",
            "find the session that LISTENs without consuming (a long transaction in a "
            "listening session blocks the queue) and end it",
        )

    def check_orphans(self, conn: psycopg.Connection[Any]) -> Check:
        """Running jobs whose worker is silent past the heartbeat timeout, or gone."""
        timeout = self.thresholds.heartbeat_timeout
        rows = self._rows(conn, "doctor_orphaned_jobs", {"timeout": timeout})
        name = "orphaned running jobs"
        if not rows:
            return Check(name, Verdict.OK, "every running job has a live worker")
        live = self._rows(conn, "doctor_live_workers", {"timeout": timeout})[0]["workers"]
        ids = ", ".join(str(row["id"]) for row in rows[:10])
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        summary = (
            f"{len(rows)} running job(s) ({ids}{more}) belong to workers silent for more "
            f"than {format_duration(timeout)} or gone"
        )
        if live:
            # A live worker rescues them at its next heartbeat: it should heal by itself.
            return Check(
                name,
                Verdict.WARN,
                summary,
                f"{live} live worker(s) should rescue them within a heartbeat; if this "
                "persists, check the workers' logs and their connection to the database",
                rows,
            )
        return Check(
            name,
            Verdict.FAIL,
            summary + "; no live worker is there to rescue them",
            "start `pgjobs work`: a worker rescues them at its first heartbeat",
            rows,
        )

    def check_unserved_queues(self, conn: psycopg.Connection[Any]) -> Check:
        """Queues with runnable jobs that no live worker serves (paused queues excepted)."""
        timeout = self.thresholds.heartbeat_timeout
        rows = self._rows(conn, "doctor_unserved_queues", {"timeout": timeout})
        name = "queues without workers"
        if not rows:
            return Check(name, Verdict.OK, "every queue with runnable jobs has a live worker")
        listed = ", ".join(f"{row['queue']} ({row['runnable']})" for row in rows)
        return Check(
            name,
            Verdict.FAIL,
            f"runnable jobs wait in queues no live worker serves: {listed}",
            "start `pgjobs work --queues "
            + ",".join(row["queue"] for row in rows)
            + "` (or pause the queue on purpose: `pgjobs queues pause NAME`)",
            rows,
        )


def _ago(moment: datetime, conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT extract(epoch FROM now() - %s)::float8 AS s", [moment]).fetchone()
    seconds = row["s"] if isinstance(row, dict) else row[0]  # type: ignore[index]
    return f"{format_duration(seconds)} ago"


def worst(checks: list[Check]) -> Verdict:
    """The worst verdict of these checks (ok when there are none)."""
    return max((c.verdict for c in checks), key=lambda v: v.rank, default=Verdict.OK)
