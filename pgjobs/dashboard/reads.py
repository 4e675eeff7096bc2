"""What the dashboard's pages read, shaped for the templates.

Everything goes through :class:`pgjobs.admin.Admin` (the operator API) or the named
statements of ``dashboard.sql``; the overview, the workers page and the metrics read only
the SQL views, so a role granted nothing but the views can run them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pgjobs.admin import Admin
from pgjobs.limits import QueueLimits

PAGE_SIZE = 50
CHART_MINUTES = 60
CHART_WIDTH = 180
CHART_HEIGHT = 36
WAITING_STATES = ("scheduled", "available", "retryable", "pending")
# What a missing value looks like on a page.
NONE = "\u2013"


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a keyset-paginated list: its rows and the cursors around it."""

    rows: list[dict[str, Any]]
    older: int | None  # `before` of the next (older) page, if there is one
    newer: int | None  # `after` of the previous (newer) page, if there is one


def _rows(admin: Admin, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    return admin._rows(query, params)


def jobs_page(
    admin: Admin,
    *,
    state: str | None,
    queue: str | None,
    task: str | None,
    before: int | None,
    after: int | None,
    size: int = PAGE_SIZE,
) -> Page:
    """A page of jobs, newest first, below ``before`` or just above ``after``."""
    filters = {"state": state, "queue": queue, "task": task, "limit": size + 1}
    if after is not None:
        rows = _rows(admin, "dashboard_jobs_newer", {**filters, "after": after})
        more_newer = len(rows) > size
        rows = list(reversed(rows[:size]))
        older = rows[-1]["id"] if rows else None
        return Page(rows, older, rows[0]["id"] if rows and more_newer else None)
    rows = _rows(admin, "dashboard_jobs_older", {**filters, "before": before})
    more_older = len(rows) > size
    rows = rows[:size]
    older = rows[-1]["id"] if rows and more_older else None
    return Page(rows, older, rows[0]["id"] if rows and before is not None else None)


def dead_page(
    admin: Admin, *, queue: str | None, task: str | None, before: int | None
) -> tuple[Page, list[dict[str, Any]]]:
    """A page of the dead-letter queue (newest job first) and the dead count per task."""
    params = {"queue": queue, "task": task, "before": before, "limit": PAGE_SIZE + 1}
    rows = _rows(admin, "dashboard_dead_page", params)
    older = rows[PAGE_SIZE - 1]["id"] if len(rows) > PAGE_SIZE else None
    page = Page(rows[:PAGE_SIZE], older, None)
    return page, _rows(admin, "dashboard_dead_tasks", {})


# -- overview -----------------------------------------------------------------------------


def overview(admin: Admin) -> dict[str, Any]:
    """Per queue: depth by state, rates, failure rate, oldest waiting age, paused, and a
    chart of the last hour; plus how many workers are alive."""
    queues = admin.stats()
    charts = _charts(admin.throughput())
    limits = {r["queue"]: r for r in _rows(admin, "dashboard_queue_limits", {})}
    for row in queues:
        row["waiting"] = sum(int(row[state]) for state in WAITING_STATES)
        row["chart"] = charts.get(row["queue"], EMPTY_CHART)
        row["limits"] = _limits(limits.get(row["queue"]))
    workers = admin.workers()
    return {
        "queues": queues,
        "workers_alive": sum(1 for w in workers if w["alive"]),
        "workers_total": len(workers),
        "dead_total": sum(int(row["dead"]) for row in queues),
    }


def _limits(row: dict[str, Any] | None) -> str:
    """A queue's global limits in words ("3 running, 20 per 1s"), or ""."""
    return "" if row is None else QueueLimits.from_row(row).describe()


@dataclass(frozen=True, slots=True)
class Chart:
    """A queue's last hour as two SVG polylines (succeeded, failed) and their peak."""

    succeeded: str
    failed: str
    peak: int
    total_succeeded: int
    total_failed: int


EMPTY_CHART = Chart("", "", 0, 0, 0)


def _charts(throughput: list[dict[str, Any]]) -> dict[str, Chart]:
    if not throughput:
        return {}
    newest = max(row["minute"] for row in throughput)
    start = newest - timedelta(minutes=CHART_MINUTES - 1)
    series: dict[str, tuple[list[int], list[int]]] = {}
    for row in throughput:
        slot = int((row["minute"] - start).total_seconds() // 60)
        if not 0 <= slot < CHART_MINUTES:
            continue
        ok, failed = series.setdefault(row["queue"], ([0] * CHART_MINUTES, [0] * CHART_MINUTES))
        ok[slot] += int(row["succeeded"])
        failed[slot] += int(row["failed"])
    return {queue: _chart(ok, failed) for queue, (ok, failed) in series.items()}


def _chart(ok: list[int], failed: list[int]) -> Chart:
    peak = max(max(ok), max(failed), 1)
    return Chart(_points(ok, peak), _points(failed, peak), peak, sum(ok), sum(failed))


def _points(values: list[int], peak: int) -> str:
    step = CHART_WIDTH / (len(values) - 1)
    usable = CHART_HEIGHT - 2
    return " ".join(
        f"{i * step:.1f},{CHART_HEIGHT - 1 - value / peak * usable:.1f}"
        for i, value in enumerate(values)
    )


# -- formatting helpers for the templates ----------------------------------------------------


def age(value: timedelta | None) -> str:
    """A duration as people read it: 4s, 3m 12s, 2h 5m, 3d 4h."""
    if value is None:
        return NONE
    seconds = max(int(value.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def timestamp(value: datetime | None) -> str:
    """A timestamp to the second, in UTC."""
    if value is None:
        return NONE
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def rate(value: Decimal | float | None) -> str:
    """A per-minute rate."""
    return NONE if value is None else f"{float(value):.2f}"


def percent(value: Decimal | float | None) -> str:
    """A fraction as a percentage."""
    return NONE if value is None else f"{float(value) * 100:.1f}%"


def progress_percent(progress: Any) -> float | None:
    """A job's progress as a percentage for a bar: fractions (0 to 1) and percentages (up to
    100) are numbers; anything else (text, no progress) has no bar."""
    value = progress.get("value") if isinstance(progress, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if 0 <= value <= 1:
        return round(float(value) * 100, 1)
    if 1 < value <= 100:
        return round(float(value), 1)
    return None


def pretty(value: Any) -> str:
    """JSON for people: indented, characters as they are (the template escapes HTML)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)
