"""Enqueue: validate jobs, then write them with one statement in the caller's transaction.

Everything that can be wrong with a job is checked here, before anything reaches the
database, so a bad call raises a pgjobs error and leaves the caller's transaction usable.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

import psycopg

from pgjobs.errors import InvalidJobError, PayloadError, SchemaNotReadyError
from pgjobs.queries import Queries
from pgjobs.settings import PRIORITY_MAX, PRIORITY_MIN, validate_queue

OnDuplicate = Literal["existing", "none"]

# A JSON text with an unescaped \u0000: PostgreSQL's jsonb cannot store NUL characters.
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# A duplicate whose live job finished in between our insert and our look-up is enqueued
# again; more rounds than this means something else is wrong.
_UNIQUE_ROUNDS = 5
# Bounds that keep a valid-looking job from failing in SQL (and aborting the caller's
# transaction): run_at must stay a representable timestamp, max_attempts an int4, and a
# unique key short enough for a btree index entry (whose hard limit is about 2.7 kB).
MAX_DELAY = timedelta(days=36_525)  # a century
MAX_ATTEMPTS_LIMIT = 2**31 - 1
UNIQUE_KEY_MAX_BYTES = 1024
# No NOTIFY once the server's notification queue is this full (a commit must never fail
# because of it; workers poll).
_NOTIFY_QUEUE_LIMIT = 0.5


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One validated job, ready to insert."""

    task: str
    args: str  # JSON object text
    queue: str
    priority: int
    max_attempts: int
    run_at: datetime | None = None
    delay: float = 0.0
    unique_key: str | None = None
    meta: str = "{}"


@dataclass(frozen=True, slots=True)
class Options:
    """Per-call enqueue options, validated. ``None`` means: the task's default."""

    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    run_at: datetime | None = None
    delay: float = 0.0
    unique_key: str | None = None
    meta: str = "{}"  # JSON text: one serialisation for a whole batch
    on_duplicate: OnDuplicate = "existing"

    def with_unique_key(self, key: object) -> Options:
        """These options with a per-job unique key (validated)."""
        return replace(self, unique_key=check_unique_key(key))

    @classmethod
    def validate(
        cls,
        *,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        unique_key: str | None = None,
        meta: dict[str, Any] | None = None,
        on_duplicate: OnDuplicate = "existing",
    ) -> Options:
        """Check every option; raise InvalidJobError (or InvalidNameError) on the first bad one."""
        if queue is not None:
            validate_queue(queue)
        if priority is not None:
            check_priority(priority)
        if max_attempts is not None:
            check_max_attempts(max_attempts)
        if run_at is not None and delay is not None:
            raise InvalidJobError("give run_at or delay, not both")
        if run_at is not None and (not isinstance(run_at, datetime) or run_at.tzinfo is None):
            raise InvalidJobError(f"run_at must be a timezone-aware datetime, not {run_at!r}")
        if unique_key is not None:
            check_unique_key(unique_key)
        if meta is not None and not isinstance(meta, dict):
            raise InvalidJobError(f"meta must be a dict, not {type(meta).__name__}")
        if on_duplicate not in ("existing", "none"):
            raise InvalidJobError(
                f"on_duplicate must be 'existing' or 'none', not {on_duplicate!r}"
            )
        return cls(
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            run_at=run_at,
            delay=_seconds(delay),
            unique_key=unique_key,
            meta=to_json(meta, "job metadata") if meta else "{}",
            on_duplicate=on_duplicate,
        )


def check_priority(priority: object) -> int:
    """``priority`` if it is an int in the accepted range."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidJobError(f"priority must be an integer, not {priority!r}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidJobError(
            f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX} (lower runs first), "
            f"not {priority}"
        )
    return priority


def check_max_attempts(max_attempts: object) -> int:
    """``max_attempts`` if it is a positive int that the database can store."""
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT
    ):
        raise InvalidJobError(
            f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS_LIMIT}, not {max_attempts!r}"
        )
    return max_attempts


def check_unique_key(key: object) -> str:
    """``key`` if it is a non-empty string that PostgreSQL can store and index."""
    if not isinstance(key, str) or not key:
        raise InvalidJobError(f"unique_key must be a non-empty string, not {key!r}")
    if "\x00" in key:
        raise InvalidJobError("unique_key contains a NUL character, which text cannot store")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidJobError("unique_key contains a lone surrogate, not valid Unicode") from None
    if size > UNIQUE_KEY_MAX_BYTES:
        raise InvalidJobError(
            f"unique_key must be at most {UNIQUE_KEY_MAX_BYTES} bytes of UTF-8, not {size}; "
            "hash a longer key"
        )
    return key


def _seconds(delay: float | timedelta | None) -> float:
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
    ):
        raise InvalidJobError(f"delay must be a number of seconds or a timedelta, not {delay!r}")
    if seconds < 0:
        raise InvalidJobError(f"delay must not be negative, got {seconds} seconds")
    if seconds > MAX_DELAY.total_seconds():
        raise InvalidJobError(f"delay must be at most {MAX_DELAY.days} days, got {seconds} seconds")
    return float(seconds)


def to_json(value: Any, what: str) -> str:
    """``value`` as JSON text that PostgreSQL's jsonb accepts, or PayloadError saying why not."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"{what} must be JSON-serialisable: {exc}") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(f"{what} contain a lone surrogate, which is not valid Unicode") from None
    if _NUL.search(text):
        raise PayloadError(f"{what} contain a NUL character (\\u0000), which jsonb cannot store")
    return text


def make_spec(
    task: str, args: dict[str, Any], options: Options, defaults: dict[str, Any]
) -> JobSpec:
    """A JobSpec from validated options, falling back to the task's ``defaults``.

    ``task`` is already validated (at registration, or by the enqueue-by-name path): this
    runs once per job of a bulk enqueue, so it checks only what differs per job.
    """
    if not isinstance(args, dict):
        raise InvalidJobError(f"job arguments must be a dict, not {type(args).__name__}")
    if not all(isinstance(key, str) for key in args):
        raise PayloadError("job argument names must be strings")
    return JobSpec(
        task=task,
        args=to_json(args, "job arguments"),
        queue=options.queue or defaults["queue"],
        priority=options.priority if options.priority is not None else defaults["priority"],
        max_attempts=options.max_attempts or defaults["max_attempts"],
        run_at=options.run_at,
        delay=options.delay,
        unique_key=options.unique_key,
        meta=options.meta,
    )


def _params(specs: Sequence[JobSpec], common: dict[str, Any]) -> dict[str, Any]:
    return {
        "queue": [s.queue for s in specs],
        "task": [s.task for s in specs],
        "args": [s.args for s in specs],
        "priority": [s.priority for s in specs],
        "max_attempts": [s.max_attempts for s in specs],
        "run_at": [s.run_at for s in specs],
        "delay": [s.delay for s in specs],
        "unique_key": [s.unique_key for s in specs],
        "meta": [s.meta for s in specs],
        **common,
    }


def _one_params(spec: JobSpec, common: dict[str, Any]) -> dict[str, Any]:
    return {
        "queue": spec.queue,
        "task": spec.task,
        "args": spec.args,
        "priority": spec.priority,
        "max_attempts": spec.max_attempts,
        "run_at": spec.run_at,
        "delay": spec.delay,
        "unique_key": spec.unique_key,
        "meta": spec.meta,
        **common,
    }


def _match_inserted(
    specs: Sequence[JobSpec], rows: list[tuple[int, str | None]]
) -> list[int | None]:
    """Line returned (id, unique_key) rows up with the input: rows come back in input order,
    and an input is missing only when its unique key was already taken."""
    ids: list[int | None] = []
    position = 0
    for spec in specs:
        if position < len(rows) and rows[position][1] == spec.unique_key:
            ids.append(rows[position][0])
            position += 1
        else:
            ids.append(None)
    return ids


@dataclass
class Writer:
    """Writes JobSpecs for one schema; the sync and async paths share everything but I/O."""

    queries: Queries
    channel: str
    notify: bool = True
    events: bool = False  # publish `enqueued` events (opt-in: a NOTIFY in every enqueue)
    events_channel: str = ""

    def _common(self) -> dict[str, Any]:
        """The parameters every insert statement shares."""
        return {
            "channel": self.channel,
            "notify": self.notify,
            "notify_queue_limit": _NOTIFY_QUEUE_LIMIT,
            "events": self.events,
            "events_channel": self.events_channel,
        }

    def insert(
        self, conn: psycopg.Connection[Any], specs: Sequence[JobSpec], on_duplicate: OnDuplicate
    ) -> list[int | None]:
        """Insert ``specs`` through ``conn``; duplicates resolve per ``on_duplicate``."""
        if len(specs) == 1:
            return [self._insert_one(conn, specs[0], on_duplicate)]
        pending = list(range(len(specs)))
        ids: list[int | None] = [None] * len(specs)
        for _ in range(_UNIQUE_ROUNDS):
            batch = [specs[i] for i in pending]
            with schema_errors(self.queries.schema), conn.cursor() as cur:
                cur.execute(self.queries.insert_jobs, _params(batch, self._common()))
                inserted = _match_inserted(batch, cur.fetchall())
                keys = [s.unique_key for s, i in zip(batch, inserted, strict=True) if i is None]
                existing = (
                    dict(cur.execute(self.queries.find_live_unique, {"keys": keys}).fetchall())
                    if keys
                    else {}
                )
            pending = self._resolve(specs, pending, inserted, existing, ids, on_duplicate)
            if not pending:
                return ids
        raise InvalidJobError("unique keys kept changing hands during enqueue; try again")

    async def insert_async(
        self,
        conn: psycopg.AsyncConnection[Any],
        specs: Sequence[JobSpec],
        on_duplicate: OnDuplicate,
    ) -> list[int | None]:
        """The async twin of :meth:`insert`."""
        if len(specs) == 1:
            return [await self._insert_one_async(conn, specs[0], on_duplicate)]
        pending = list(range(len(specs)))
        ids: list[int | None] = [None] * len(specs)
        for _ in range(_UNIQUE_ROUNDS):
            batch = [specs[i] for i in pending]
            with schema_errors(self.queries.schema):
                async with conn.cursor() as cur:
                    await cur.execute(self.queries.insert_jobs, _params(batch, self._common()))
                    inserted = _match_inserted(batch, await cur.fetchall())
                    keys = [s.unique_key for s, i in zip(batch, inserted, strict=True) if i is None]
                    existing = {}
                    if keys:
                        await cur.execute(self.queries.find_live_unique, {"keys": keys})
                        existing = dict(await cur.fetchall())
            pending = self._resolve(specs, pending, inserted, existing, ids, on_duplicate)
            if not pending:
                return ids
        raise InvalidJobError("unique keys kept changing hands during enqueue; try again")

    def _insert_one(
        self, conn: psycopg.Connection[Any], spec: JobSpec, on_duplicate: OnDuplicate
    ) -> int | None:
        """One job through ``insert_job`` (scalar parameters); the same rules as insert."""
        params = _one_params(spec, self._common())
        for _ in range(_UNIQUE_ROUNDS):
            with schema_errors(self.queries.schema):
                row = conn.execute(self.queries.insert_job, params).fetchone()
                if row is not None:
                    return int(row[0])
                found = conn.execute(
                    self.queries.find_live_unique, {"keys": [spec.unique_key]}
                ).fetchone()
            if found is not None:
                return int(found[1]) if on_duplicate == "existing" else None
            # The live duplicate finished in between: insert again.
        raise InvalidJobError("unique keys kept changing hands during enqueue; try again")

    async def _insert_one_async(
        self, conn: psycopg.AsyncConnection[Any], spec: JobSpec, on_duplicate: OnDuplicate
    ) -> int | None:
        """The async twin of :meth:`_insert_one`."""
        params = _one_params(spec, self._common())
        for _ in range(_UNIQUE_ROUNDS):
            with schema_errors(self.queries.schema):
                cur = await conn.execute(self.queries.insert_job, params)
                row = await cur.fetchone()
                if row is not None:
                    return int(row[0])
                cur = await conn.execute(self.queries.find_live_unique, {"keys": [spec.unique_key]})
                found = await cur.fetchone()
            if found is not None:
                return int(found[1]) if on_duplicate == "existing" else None
        raise InvalidJobError("unique keys kept changing hands during enqueue; try again")

    @staticmethod
    def _resolve(
        specs: Sequence[JobSpec],
        pending: list[int],
        inserted: list[int | None],
        existing: dict[str, int],
        ids: list[int | None],
        on_duplicate: OnDuplicate,
    ) -> list[int]:
        """Fill ``ids``; return the positions whose live duplicate vanished (to insert again).

        A duplicate within one call resolves too: the look-up sees this transaction's rows.
        """
        again = []
        for position, job_id in zip(pending, inserted, strict=True):
            if job_id is not None:
                ids[position] = job_id
                continue
            key = specs[position].unique_key
            assert key is not None
            if key in existing:
                ids[position] = existing[key] if on_duplicate == "existing" else None
            else:
                again.append(position)
        return again


@contextmanager
def schema_errors(schema: str) -> Iterator[None]:
    """Turn 'relation does not exist' into a pointer to ``pgjobs migrate``."""
    try:
        yield
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName) as exc:
        raise SchemaNotReadyError(
            f"the pgjobs schema {schema!r} is not installed in this database: "
            "run `pgjobs migrate upgrade` first"
        ) from exc
