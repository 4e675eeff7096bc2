"""Durations as operators type them: ``45s``, ``30m``, ``12h``, ``7d``, ``2w``, ``1d12h``."""

from __future__ import annotations

import re
from datetime import timedelta

from pgjobs.errors import PgJobsError

_UNITS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?[wdhms])+$")
_NEVER = frozenset({"never", "forever", "keep"})


class DurationError(PgJobsError, ValueError):
    """A duration that cannot be read."""


def parse_duration(text: str) -> timedelta:
    """``text`` as a timedelta: one or more ``<number><unit>`` parts, units w d h m s, each
    unit at most once and from the largest down (``1d12h``, not ``12h1d``). A bare number
    is seconds. Raises DurationError otherwise."""
    if not isinstance(text, str):
        raise DurationError(f"invalid duration {text!r}: expected text such as 30m")
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        if seconds < 0 or seconds != seconds or seconds == float("inf"):
            raise DurationError(f"invalid duration {text!r}: must be a finite number >= 0")
        return timedelta(seconds=seconds)
    if not _WHOLE.match(value):
        raise DurationError(
            f"invalid duration {text!r}: use a number and a unit (w, d, h, m, s), "
            "e.g. 45s, 30m, 12h, 7d or 1d12h"
        )
    parts = _PART.findall(value)
    units = [unit for _, unit in parts]
    order = list(_UNITS)
    if len(set(units)) != len(units) or units != sorted(units, key=order.index):
        raise DurationError(
            f"invalid duration {text!r}: give each unit once, largest first (e.g. 1d12h)"
        )
    return timedelta(seconds=sum(float(number) * _UNITS[unit] for number, unit in parts))


def parse_retention(text: str) -> timedelta | None:
    """A retention period: a duration, or ``never`` (keep forever) as None."""
    if isinstance(text, str) and text.strip().lower() in _NEVER:
        return None
    return parse_duration(text)


def format_duration(value: timedelta | float | None) -> str:
    """A short human form of a duration (``1d2h``, ``3m20s``, ``0.4s``); ``-`` for None."""
    if value is None:
        return "-"
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    out = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        if whole >= size:
            out.append(f"{whole // size}{unit}")
            whole %= size
        if len(out) == 2:
            break
    return "".join(out) or "0s"
