"""Global queue limits: concurrency and rate, enforced in the database at claim time.

A queue's limits live in its row of ``<schema>.queues``, so every worker on every host
obeys the same numbers, and an operator can change them while workers run
(``pgjobs queues limit``). Workers claim from a limited queue one at a time (they take
turns on that row, see ``claim_limited`` in queries.sql), which is what makes the limits
exact; queues without limits keep the lock-free claim.

With ``per_key`` the limits apply to each ``limit_key`` of the queue separately (a job's
key comes from ``enqueue(limit_key=...)`` or the task's ``limit_by``): e.g. one running
export per customer, or 10 calls per second per API token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pgjobs.durations import parse_duration
from pgjobs.errors import ConfigurationError

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S+)\s*$")
_UNITS = {"s": "1s", "sec": "1s", "second": "1s", "m": "1m", "min": "1m", "minute": "1m",
          "h": "1h", "hour": "1h", "d": "1d", "day": "1d"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """Limits of one queue over all workers: at most ``concurrency`` jobs running, at most
    ``rate`` job starts per ``period``; ``per_key``: per ``limit_key`` instead of for the
    whole queue. ``None`` means no such limit."""

    concurrency: int | None = None
    rate: int | None = None
    period: timedelta | None = None
    per_key: bool = False

    def __post_init__(self) -> None:
        for name in ("concurrency", "rate"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigurationError(f"{name} limit must be a positive integer, not {value!r}")
        if (self.rate is None) != (self.period is None):
            raise ConfigurationError("a rate limit needs both a count and a period")
        if self.period is not None and (
            not isinstance(self.period, timedelta) or self.period <= timedelta(0)
        ):
            raise ConfigurationError(f"the rate period must be positive, not {self.period!r}")

    @classmethod
    def build(
        cls,
        *,
        concurrency: int | None = None,
        rate: str | tuple[int, float | timedelta] | None = None,
        per_key: bool = False,
    ) -> QueueLimits:
        """Limits from friendly arguments: ``rate`` as ``"20/s"``, ``"100/m"``, ``"5/30s"``
        or ``(count, seconds or timedelta)``."""
        count, period = parse_rate(rate) if rate is not None else (None, None)
        return cls(concurrency=concurrency, rate=count, period=period, per_key=per_key)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> QueueLimits:
        """The limits of a row with the queues table's limit columns."""
        return cls(
            concurrency=row["concurrency_limit"],
            rate=row["rate_limit"],
            period=row["rate_period"],
            per_key=bool(row["limit_per_key"]),
        )

    @property
    def limited(self) -> bool:
        """True when at least one limit is set."""
        return self.concurrency is not None or self.rate is not None

    def params(self, queue: str) -> dict[str, Any]:
        """Parameters of the ``set_queue_limits`` statement."""
        return {
            "name": queue,
            "concurrency_limit": self.concurrency,
            "rate_limit": self.rate,
            "rate_period": self.period,
            "limit_per_key": self.per_key,
        }

    def describe(self) -> str:
        """A one-line summary such as ``3 running, 20 per 1s, per key``."""
        parts = []
        if self.concurrency is not None:
            parts.append(f"{self.concurrency} running")
        if self.rate is not None and self.period is not None:
            parts.append(f"{self.rate} per {_seconds_text(self.period)}")
        if parts and self.per_key:
            parts.append("per key")
        return ", ".join(parts) or "none"


def parse_rate(rate: str | tuple[int, float | timedelta]) -> tuple[int, timedelta]:
    """``(count, period)`` from ``"20/s"``, ``"100/m"``, ``"5/30s"``, ``"1000/1h"`` or a
    ``(count, seconds | timedelta)`` pair; ConfigurationError when it is not one."""
    if isinstance(rate, tuple) and len(rate) == 2:
        count, period = rate
        if isinstance(period, int | float) and not isinstance(period, bool):
            period = timedelta(seconds=period)
        if isinstance(count, int) and isinstance(period, timedelta):
            return count, period
    elif isinstance(rate, str):
        match = _RATE.match(rate)
        if match:
            unit = match.group(2)
            try:
                period = parse_duration(_UNITS.get(unit.lower(), unit))
            except ValueError:
                period = None
            if period is not None:
                return int(match.group(1)), period
    raise ConfigurationError(
        f"invalid rate {rate!r}: use COUNT/PERIOD such as 20/s, 100/m, 5/30s or 1000/1h"
    )


def _seconds_text(period: timedelta) -> str:
    seconds = period.total_seconds()
    return f"{seconds:g}s"
